#!/usr/bin/env bash
# Profile-guided release builds of airouter and the benchmark binaries (bench/run.sh measures
# these): an instrumented build, a training run of the benchmark's own kinds of traffic
# against the mock provider, and a build that uses the merged profile. Every binary the
# benchmark compares (airouter, the bare pass-through, the mock) gets the same treatment.
#
# Needs OHA (the load generator bench/run.sh installs) and llvm-profdata of the LLVM rustc is
# built on (Debian: llvm-N); run as root with apt, it installs that package. Prints the
# directory of the optimised binaries on its last line.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
: "${OHA:?OHA must name the oha binary (bench/run.sh sets it)}"

major="$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')"
PROFDATA="$(command -v "llvm-profdata-$major" || true)"
if [ -z "$PROFDATA" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing Debian's llvm-$major (llvm-profdata for rustc's LLVM $major)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "llvm-$major" >/dev/null 2>&1 || true
    PROFDATA="$(command -v "llvm-profdata-$major" || true)"
fi
if [ -z "$PROFDATA" ]; then
    echo "pgo: llvm-profdata-$major not found: rustc's LLVM is $major (Debian: apt-get install llvm-$major)" >&2
    exit 1
fi

T="${CARGO_TARGET_DIR:-$ROOT/target}"
RAW="$T/pgo-profiles"
rm -rf "$RAW"
mkdir -p "$RAW"
echo "== PGO 1/3: instrumented build" >&2
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$RAW" CARGO_TARGET_DIR="$T/pgo-gen" \
    cargo build --release --locked -p airouter -p airouter-bench >&2
GEN="$T/pgo-gen/release"

echo "== PGO 2/3: training" >&2
# bench.py --train: the benchmark's own traffic, from the same topology and bodies as its
# scenarios; it stops every process with SIGTERM, and each writes its profile on exit.
BENCH_BIN_DIR="$GEN" python3 bench/bench.py --train >&2
ls "$RAW"/*.profraw >/dev/null
"$PROFDATA" merge -o "$T/pgo.profdata" "$RAW"/*.profraw
# Named by its content: cargo does not look inside a file RUSTFLAGS names, so a new profile
# must change the flags for the optimised build to be rebuilt with it.
PROFILE="$T/pgo-$(sha256sum "$T/pgo.profdata" | cut -c1-16).profdata"
rm -f "$T"/pgo-*.profdata
mv "$T/pgo.profdata" "$PROFILE"

echo "== PGO 3/3: optimised build" >&2
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$PROFILE -Cllvm-args=-pgo-warn-missing-function=false" \
    CARGO_TARGET_DIR="$T/pgo" cargo build --release --locked -p airouter -p airouter-bench >&2
echo "$T/pgo/release"
