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
read -r MOCK AR AR2 PT < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(4)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])')
WORK="$(mktemp -d)"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
config() { # port, extra credential fields
    cat <<YAML
server: {host: 127.0.0.1, port: $1, master_key: bench, logging_level: error, max_provider_retries: 2}
credentials:
  - {name: primary-1, type: openai, api_key: sk-1, base_url: "http://127.0.0.1:$MOCK", rpm: 100000000, tpm: 100000000000$2}
  - {name: primary-2, type: openai, api_key: sk-2, base_url: "http://127.0.0.1:$MOCK", rpm: 100000000, tpm: 100000000000$2}
  - {name: backup, type: proxy, api_key: sk-3, base_url: "http://127.0.0.1:$MOCK", is_fallback: true}
models:
  - {name: gpt-4o-mini, rpm: 100000000}
model_alias: {fast: gpt-4o-mini}
YAML
}
config "$AR" "" > "$WORK/ar.yaml"
config "$AR2" ", http_version: http2" > "$WORK/ar2.yaml"
"$GEN/bench-mock" --listen "127.0.0.1:$MOCK" --chunks 20 --chunk-interval-ms 1 >/dev/null 2>&1 & pids+=($!)
"$GEN/airouter" run --config "$WORK/ar.yaml" >"$WORK/ar.log" 2>&1 & pids+=($!)
"$GEN/airouter" run --config "$WORK/ar2.yaml" >"$WORK/ar2.log" 2>&1 & pids+=($!)
"$GEN/bench-passthrough" --listen "127.0.0.1:$PT" --upstream "http://127.0.0.1:$MOCK" >/dev/null 2>&1 & pids+=($!)
for port in "$AR" "$AR2" "$PT"; do
    for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$port/v1/models" && break; sleep 0.1; done
done
python3 - "$WORK/big.json" <<'PY'
import json, sys
line = 'The router reads "model" and "stream" from every request body.\n'
prompt = (line * 300)[:16384]
json.dump({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}]}, open(sys.argv[1], "w"))
PY
SMALL='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
load() { # port, oha arguments...
    local port=$1; shift
    "$OHA" --no-tui --output-format json -m POST -H "Authorization: Bearer bench" \
        -H "Content-Type: application/json" "$@" "http://127.0.0.1:$port/v1/chat/completions" >/dev/null
}
for port in "$AR" "$AR2" "$PT"; do
    load "$port" -d "$SMALL" -z 3s -c 64
    load "$port" -D "$WORK/big.json" -z 2s -c 64
    load "$port" -d "$SMALL" -n 1000 -c 1
    "$GEN/bench-stream" --url "http://127.0.0.1:$port/v1/chat/completions" --key bench latency \
        --streams 200 --concurrency 4 >/dev/null
done
# A clean exit writes each process's profile.
kill -TERM "${pids[@]}"
for pid in "${pids[@]}"; do
    for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
done
pids=()
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
