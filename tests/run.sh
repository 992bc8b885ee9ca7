#!/usr/bin/env bash
# The project's test command: build, format check, lints, Rust tests, then the
# Python SDK compatibility tests in a cached virtualenv.
#
#   bash tests/run.sh
#
# Needs: cargo (rustup, with rustfmt and clippy) and python3.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

section() {
    printf '\n==== %s ====\n' "$*"
}

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
if command -v chromium >/dev/null 2>&1; then
    chromium --version 2>/dev/null || true
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's chromium"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    chromium --version 2>/dev/null || true
else
    echo "error: chromium is missing; install Debian's chromium package" >&2
    exit 1
fi

section "Python SDK tests (pytest)"
export PYTHONDONTWRITEBYTECODE=1
AIROUTER_BIN="${CARGO_TARGET_DIR:-target}/debug/airouter" "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/sdk

section "Benchmark smoke: every scenario of bench/run.sh with tiny counts (figures discarded)"
# Keeps the benchmark suite runnable: it drives airouter and the bare pass-through with oha
# (installed into ~/.cache/airouter by version) and fails on any non-200 answer, unfinished
# stream or missing figure. The real run is `bash bench/run.sh` on a quiet machine.
command -v taskset >/dev/null 2>&1 || {
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq util-linux >/dev/null
    fi
}
SMOKE_OUT="$(mktemp -d)"
if ! BENCH_SMOKE=1 BENCH_OUT="$SMOKE_OUT" bash bench/run.sh >"$SMOKE_OUT/log" 2>&1; then
    tail -n 60 "$SMOKE_OUT/log"
    echo "error: the benchmark smoke run failed (full log: $SMOKE_OUT/log)" >&2
    exit 1
fi
awk '/^## Targets/ { t = 1 } t && /^\|/ { print; p = 1; next } p { exit }' "$SMOKE_OUT/RESULTS.md"
rm -rf "$SMOKE_OUT"

section "Kubernetes control plane binaries (kube-apiserver, etcd, kubectl, helm; cached by version)"
# tool:Debian package. unshare and mount give each stand-in pod its own /etc/hosts (tests/e2e).
for pair in openssl:openssl curl:curl unshare:util-linux mount:mount; do
    tool="${pair%%:*}"; package="${pair#*:}"
    if ! command -v "$tool" >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >/dev/null
        else
            echo "error: $tool (Debian package $package) is missing" >&2; exit 1
        fi
    fi
done
bash tests/tools/k8s-binaries.sh

section "End-to-end: CRDs and the operator against a real kube-apiserver, with stand-in pods (pytest)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/e2e

