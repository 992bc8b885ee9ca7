#!/usr/bin/env bash
# airouter benchmark suite: builds everything, installs the load generator (oha) and the
# LiteLLM peer into ~/.cache/airouter (cached by version), runs every scenario and writes
# bench/RESULTS.md. Takes about 25 minutes, the PGO builds included (bench/pgo.sh).
# Set BENCH_NO_LITELLM=1 to skip LiteLLM.
# The Go Auto AI Router peer comes from GO_ROUTER_BIN (a prebuilt binary) or
# tests/tools/go-router.sh; BENCH_NO_GO=1 skips it. `python3 bench/bench.py --smoke-go`
# (with OHA set) runs only a short check of the Go peer.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/airouter"
OHA_VERSION=1.16.0
LITELLM_VERSION="${LITELLM_VERSION:-1.108.7}"

command -v taskset >/dev/null || { echo "taskset (util-linux) is required" >&2; exit 1; }
if [ -n "${BENCH_SMOKE:-}" ]; then
    # BENCH_SMOKE=1: a check that every scenario still runs (tests/run.sh does one): debug
    # binaries, tiny counts, no peers, results written to BENCH_OUT (a temporary directory)
    # instead of bench/. Its figures mean nothing.
    echo "== smoke run: debug binaries, tiny counts"
    cargo build -p airouter -p airouter-bench
    export BENCH_BIN_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/debug" BENCH_RUNS=1 BENCH_DURATION=1s BENCH_TP_PAIRS=2 BENCH_SIDE_PAIRS=1 BENCH_TP_PAIR_DURATION=1s \
        BENCH_LAT_REQUESTS=200 BENCH_STREAMS=40 BENCH_OPEN_STREAMS=200 BENCH_NO_LITELLM=1 BENCH_NO_GO=1
    BENCH_OUT="${BENCH_OUT:-$(mktemp -d)}"
    export BENCH_OUT
    echo "== results go to $BENCH_OUT"
else
    echo "== building release binaries"
    cargo build --release -p airouter -p airouter-bench
fi

# oha on OpenSSL (Debian's libssl-dev): it builds in ~5 minutes, where its default rustls
# backend compiles aws-lc (~8.5). The benchmark only speaks plain HTTP on loopback.
OHA="$CACHE/tools/oha-$OHA_VERSION-native-tls/bin/oha"
if [ ! -x "$OHA" ]; then
    if ! pkg-config --exists openssl 2>/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            echo "== installing Debian's pkg-config and libssl-dev (to build oha)"
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pkg-config libssl-dev >/dev/null
        else
            echo "building oha needs OpenSSL's headers: install Debian's pkg-config and libssl-dev" >&2
            exit 1
        fi
    fi
    echo "== installing oha $OHA_VERSION"
    cargo install oha --version "$OHA_VERSION" --locked --no-default-features --features native-tls \
        --root "$CACHE/tools/oha-$OHA_VERSION-native-tls"
fi
export OHA

export LITELLM=""
if [ -z "${BENCH_NO_LITELLM:-}" ]; then
    VENV="$CACHE/litellm-$LITELLM_VERSION"
    if [ ! -x "$VENV/bin/litellm" ]; then
        echo "== installing LiteLLM proxy $LITELLM_VERSION"
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install --quiet "litellm[proxy]==$LITELLM_VERSION"
    fi
    export LITELLM="$VENV/bin/litellm"
fi

# The binaries measured: profile-guided builds (bench/pgo.sh) of airouter, the pass-through
# and the mock alike; BENCH_NO_PGO=1 (or no llvm-profdata for rustc's LLVM) measures the plain
# release builds instead, and RESULTS.md says which.
if [ -z "${BENCH_SMOKE:-}" ] && [ -z "${BENCH_NO_PGO:-}" ]; then
    if PGO_DIR="$(bash bench/pgo.sh | tail -n 1)"; then
        export BENCH_BIN_DIR="$PGO_DIR" BENCH_PLAIN_BIN_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/release"
        export BENCH_BUILD="profile-guided release builds (bench/pgo.sh, LLVM $(rustc -vV | sed -n 's/^LLVM version: //p'))"
    else
        echo "== PGO unavailable: measuring the plain release builds" >&2
        export BENCH_BUILD="plain release builds (bench/pgo.sh could not run)"
    fi
else
    export BENCH_BUILD="${BENCH_SMOKE:+debug builds (smoke run)}"
    export BENCH_BUILD="${BENCH_BUILD:-plain release builds (BENCH_NO_PGO)}"
fi

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
echo "== running scenarios"
exec python3 bench/bench.py
