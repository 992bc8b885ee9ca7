#!/usr/bin/env python3
"""airouter benchmark driver: runs every scenario side by side and writes bench/RESULTS.md.

Started by bench/run.sh (which builds the binaries and installs the load generator and the
peers). Roles are pinned with taskset: the load generator on CPU 0; the system under test and
the mock provider on CPU 1 (the mock is cheap, and every target shares the core with it the
same way). Each scenario runs RUNS times per target; tables show the median and the spread.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
REL = pathlib.Path(os.environ.get("BENCH_BIN_DIR") or ROOT / "target" / "release")  # BENCH_BIN_DIR: for smoke runs
# When REL holds profile-guided builds, the plain release builds too, for scenario (2d).
PLAIN = pathlib.Path(os.environ["BENCH_PLAIN_BIN_DIR"]) if os.environ.get("BENCH_PLAIN_BIN_DIR") else None
OHA = os.environ["OHA"]
LITELLM = os.environ.get("LITELLM")  # path to the litellm executable, or empty to skip
GO_NAME = "Go Auto AI Router"
H2_NAME = "airouter, HTTP/2 upstream"
GO_ROUTER: str | None = None  # resolved by resolve_go_router(): GO_ROUTER_BIN or tests/tools/go-router.sh
GO_ROUTER_NOTE = ""  # why the Go router is not measured, when it is not
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
DURATION = os.environ.get("BENCH_DURATION", "8s")
LOADGEN_CPU, SUT_CPU = "0", "1"
# Throughput rounds: more, shorter, paired runs than the other scenarios, in alternating order
# (A B, then B A), because single runs on this kind of machine move by ±15 %.
TP_ROUNDS = int(os.environ.get("BENCH_TP_ROUNDS", str(2 * int(os.environ.get("BENCH_RUNS", "3")) + 1)))
TP_DURATION = os.environ.get("BENCH_TP_DURATION", "4s")
# The throughput target is a ratio of two close figures on a VM whose speed drifts by tens of
# percent over seconds; it is measured on its own, in many short back-to-back pairs.
TP_PAIRS = int(os.environ.get("BENCH_TP_PAIRS", "15"))
TP_PAIR_DURATION = os.environ.get("BENCH_TP_PAIR_DURATION", "2s")
# Smaller counts and another output directory make a smoke run (tests/run.sh does one).
OUT = pathlib.Path(os.environ.get("BENCH_OUT") or ROOT / "bench")
LAT_REQUESTS = int(os.environ.get("BENCH_LAT_REQUESTS", "5000"))
STREAMS = int(os.environ.get("BENCH_STREAMS", "1500"))
OPEN_STREAMS = int(os.environ.get("BENCH_OPEN_STREAMS", "5000"))
KEY = "bench"
BODY = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
# (2c): a request with a long prompt, as real chat traffic has, which the router must scan
# for `model` and `stream` while the pass-through only copies it.
BIG_PROMPT_BYTES = 16 * 1024
# Pairs in the side scenarios (2c) and (2d), which are not target rows.
SIDE_PAIRS = int(os.environ.get("BENCH_SIDE_PAIRS", "7"))
TMP = pathlib.Path(tempfile.mkdtemp(prefix="airouter-bench-"))
procs: list[subprocess.Popen] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60.0) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with opener.open(url, timeout=1) as r:
                if r.status < 500:
                    return
        except Exception:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up within {timeout}s")


def start(cmd: list[str], cpu: str = SUT_CPU, env: dict | None = None, log: str = "proc") -> subprocess.Popen:
    out = open(TMP / f"{log}.log", "wb")
    p = subprocess.Popen(["taskset", "-c", cpu, *cmd], stdout=out, stderr=subprocess.STDOUT,
                         env={**os.environ, **(env or {})}, start_new_session=True)
    procs.append(p)
    return p


def stop(p: subprocess.Popen, graceful: bool = False) -> None:
    """Kills `p`; `graceful`: SIGTERM first (an instrumented build writes its profile on a
    clean exit), SIGKILL only if it has not exited within 30 s."""
    if p.poll() is None:
        if graceful:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=30)
                return
            except subprocess.TimeoutExpired:
                pass
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=10)


def stop_all() -> None:
    for p in procs:
        stop(p)


def child_pid(p: subprocess.Popen) -> int:
    """taskset execs the program, so the Popen pid is the program's pid."""
    return p.pid


def rss_kb(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_ticks(pid: int) -> int:
    f = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])


def big_body() -> pathlib.Path:
    """A chat request whose user message is BIG_PROMPT_BYTES of prose with newlines and quotes
    (escaped in JSON, as a real prompt's are)."""
    line = 'The router reads "model" and "stream" from every request body.\n'
    prompt = (line * (BIG_PROMPT_BYTES // len(line) + 1))[:BIG_PROMPT_BYTES]
    path = TMP / "big-body.json"
    path.write_text(json.dumps({"model": "gpt-4o-mini", "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": prompt}]}))
    return path


def oha(url: str, *args: str, cpu: str = LOADGEN_CPU, body_file: pathlib.Path | None = None) -> dict:
    body = ["-D", str(body_file)] if body_file else ["-d", BODY]
    cmd = ["taskset", "-c", cpu, OHA, "--no-tui", "--output-format", "json", "-m", "POST",
           "-H", f"Authorization: Bearer {KEY}", "-H", "Content-Type: application/json", *body,
           *args, url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"oha failed: {out.stderr[-500:]}")
    d = json.loads(out.stdout)
    codes = d.get("statusCodeDistribution") or {}
    ok = codes.get("200", 0)
    total = sum(codes.values())
    if total == 0 or ok / total < 0.999:
        raise RuntimeError(f"non-200 answers from {url}: {codes} {d.get('errorDistribution')}")
    return d


def stream_probe(url: str, *args: str) -> dict:
    cmd = ["taskset", "-c", LOADGEN_CPU, str(REL / "bench-stream"), "--url", url, "--key", KEY, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"bench-stream failed: {out.stderr[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def hold_streams(base: str, target: subprocess.Popen, count: int = OPEN_STREAMS) -> dict:
    """Opens `count` streams through `target` and holds them: peak RSS and CPU while open."""
    pid = child_pid(target)
    probe = subprocess.Popen(
        ["taskset", "-c", LOADGEN_CPU, str(REL / "bench-stream"), "--url", base + "/v1/chat/completions",
         "--key", KEY, "hold", "--open", str(count)], stdout=subprocess.PIPE, text=True)
    assert probe.stdout is not None
    line = probe.stdout.readline().strip()
    opened = int(line.split()[1])
    t0, c0 = time.monotonic(), cpu_ticks(pid)
    peak = 0
    while time.monotonic() - t0 < 4.0:
        peak = max(peak, rss_kb(pid))
        time.sleep(0.1)
    cpu = (cpu_ticks(pid) - c0) / os.sysconf("SC_CLK_TCK") / (time.monotonic() - t0) * 100
    rest = probe.communicate(timeout=120)[0]
    completed = int(rest.strip().split()[-1])
    time.sleep(1.0)
    return {"opened": opened, "completed": completed, "rss_kb": peak, "cpu_pct": cpu}


def airouter_config(mock_port: int, port: int, http2: bool = False) -> pathlib.Path:
    """The realistic topology: 4 primaries, 1 fallback, an alias, limits too high to trigger.
    `http2`: every credential speaks HTTP/2 to the mock (h2c), as `auto` does with an https
    provider that offers h2."""
    up = f"http://127.0.0.1:{mock_port}"
    h2 = ", http_version: http2" if http2 else ""
    cfg = f"""server:
  host: 127.0.0.1
  port: {port}
  master_key: {KEY}
  logging_level: error
  max_provider_retries: 2
credentials:
  - {{name: primary-1, type: openai, api_key: sk-1, base_url: "{up}", rpm: 100000000, tpm: 100000000000{h2}}}
  - {{name: primary-2, type: openai, api_key: sk-2, base_url: "{up}", rpm: 100000000, tpm: 100000000000{h2}}}
  - {{name: primary-3, type: openai, api_key: sk-3, base_url: "{up}", rpm: 100000000, tpm: 100000000000{h2}}}
  - {{name: primary-4, type: openai, api_key: sk-4, base_url: "{up}", rpm: 100000000, tpm: 100000000000{h2}}}
  - {{name: backup, type: proxy, api_key: sk-5, base_url: "{up}", is_fallback: true{h2}}}
models:
  - {{name: gpt-4o-mini, rpm: 100000000}}
model_alias:
  fast: gpt-4o-mini
"""
    path = TMP / f"airouter-{port}{'-h2' if http2 else ''}.yaml"
    path.write_text(cfg)
    return path


def litellm_config(mock_port: int) -> pathlib.Path:
    up = f"http://127.0.0.1:{mock_port}/v1"
    items = "".join(
        f"""  - model_name: gpt-4o-mini
    litellm_params: {{model: openai/gpt-4o-mini, api_base: "{up}", api_key: sk-{i}}}
""" for i in range(1, 5))
    cfg = f"""model_list:
{items}  - model_name: gpt-4o-mini-backup
    litellm_params: {{model: openai/gpt-4o-mini, api_base: "{up}", api_key: sk-5}}
router_settings:
  routing_strategy: simple-shuffle
  fallbacks: [{{"gpt-4o-mini": ["gpt-4o-mini-backup"]}}]
litellm_settings:
  telemetry: false
  drop_params: true
general_settings:
  master_key: {KEY}
"""
    path = TMP / "litellm.yaml"
    path.write_text(cfg)
    return path


def resolve_go_router() -> None:
    """The Go peer: `GO_ROUTER_BIN` if set, else whatever `tests/tools/go-router.sh` builds
    (it honours GO_ROUTER_BIN itself; exit 3 = the module proxy does not serve the module)."""
    global GO_ROUTER, GO_ROUTER_NOTE
    if os.environ.get("BENCH_NO_GO"):
        GO_ROUTER_NOTE = "skipped (BENCH_NO_GO set)"
        return
    try:
        out = subprocess.run(["bash", str(ROOT / "tests" / "tools" / "go-router.sh")], capture_output=True,
                             text=True, timeout=1800, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        GO_ROUTER_NOTE = "tests/tools/go-router.sh timed out"
        return
    if out.returncode == 0 and out.stdout.strip():
        GO_ROUTER = out.stdout.strip().splitlines()[-1]
        return
    why = " ".join(out.stderr.strip().splitlines()[-2:])
    GO_ROUTER_NOTE = (f"the Go module proxy does not serve `github.com/mixaill76/auto_ai_router` (go-router.sh exit 3; "
                      f"set GO_ROUTER_BIN to a prebuilt binary): {why}" if out.returncode == 3
                      else f"tests/tools/go-router.sh failed (exit {out.returncode}): {why}")
    print(f"bench: Go router not measured: {GO_ROUTER_NOTE}", file=sys.stderr)


def go_router_config(mock_port: int, port: int) -> pathlib.Path:
    """The same topology as airouter_config, in Auto AI Router's format (`-config FILE`).

    Differences forced by the Go router: `models[]` entries name the four primaries one by
    one, because an older upstream puts every credential (fallbacks too) into the normal
    round-robin and a global entry would send 1/5 of the traffic through the fallback proxy;
    `fail2ban` must be present (its max_attempts has no default there); `model_alias` is
    written but only newer upstream builds read it."""
    up = f"http://127.0.0.1:{mock_port}"
    prim = "".join(f"""  - {{name: primary-{i}, type: openai, api_key: sk-{i}, base_url: "{up}", rpm: 100000000, tpm: 100000000000}}
""" for i in range(1, 5))
    models = "".join(f"""  - {{name: gpt-4o-mini, credential: primary-{i}, rpm: 100000000, tpm: 0}}
""" for i in range(1, 5))
    cfg = f"""server:
  port: {port}
  master_key: {KEY}
  logging_level: error
  max_body_size_mb: 100
  request_timeout: 60s
  max_provider_retries: 2
  default_models_rpm: -1
fail2ban:
  max_attempts: 3
  ban_duration: 1m
  error_codes: [401, 403, 500]
monitoring:
  prometheus_enabled: false
credentials:
{prim}  - {{name: backup, type: proxy, api_key: sk-5, base_url: "{up}", is_fallback: true}}
models:
{models}model_alias:
  fast: gpt-4o-mini
"""
    path = TMP / f"go-router-{port}.yaml"
    path.write_text(cfg)
    return path


def start_go_router(mock_port: int) -> tuple[str, subprocess.Popen]:
    assert GO_ROUTER
    p = free_port()
    go = start([GO_ROUTER, "-config", str(go_router_config(mock_port, p))], log=f"go-router-{p}")
    wait_http(f"http://127.0.0.1:{p}/health")
    return f"http://127.0.0.1:{p}", go


class Stack:
    """A mock provider and every target in front of it."""

    def __init__(self, mock_args: list[str], with_litellm: bool, with_go: bool = True, with_h2: bool = False):
        self.mock_port = free_port()
        self.mock = start([str(REL / "bench-mock"), "--listen", f"127.0.0.1:{self.mock_port}", *mock_args], log="mock")
        wait_http(f"http://127.0.0.1:{self.mock_port}/v1/models")
        self.targets: dict[str, tuple[str, subprocess.Popen | None]] = {
            "direct (mock)": (f"http://127.0.0.1:{self.mock_port}", self.mock)}
        p = free_port()
        pt = start([str(REL / "bench-passthrough"), "--listen", f"127.0.0.1:{p}",
                    "--upstream", f"http://127.0.0.1:{self.mock_port}"], log="passthrough")
        self.targets["bare hyper pass-through"] = (f"http://127.0.0.1:{p}", pt)
        p = free_port()
        ar = start([str(REL / "airouter"), "run", "--config", str(airouter_config(self.mock_port, p))], log="airouter")
        wait_http(f"http://127.0.0.1:{p}/health/readiness")
        self.targets["airouter"] = (f"http://127.0.0.1:{p}", ar)
        if with_h2:
            p = free_port()
            h2 = start([str(REL / "airouter"), "run", "--config", str(airouter_config(self.mock_port, p, http2=True))],
                       log="airouter-h2")
            wait_http(f"http://127.0.0.1:{p}/health/readiness")
            self.targets[H2_NAME] = (f"http://127.0.0.1:{p}", h2)
        if with_go and GO_ROUTER:
            self.targets[GO_NAME] = start_go_router(self.mock_port)
        if with_litellm and LITELLM:
            p = free_port()
            ll = start([LITELLM, "--config", str(litellm_config(self.mock_port)), "--host", "127.0.0.1",
                        "--port", str(p), "--num_workers", "1"], log="litellm",
                       env={"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "NO_PROXY": "*"})
            wait_http(f"http://127.0.0.1:{p}/health/readiness", timeout=180)
            self.targets["LiteLLM proxy"] = (f"http://127.0.0.1:{p}", ll)
        for name, (base, _) in self.targets.items():
            oha(base + "/v1/chat/completions", "-n", "200", "-c", "4")  # warm pools

    def close(self, graceful: bool = False) -> None:
        for _, p in self.targets.values():
            if p is not None:
                stop(p, graceful)


def check(r: dict) -> list[str]:
    """What makes a results document unusable: a target or scenario with no figure, a figure
    that is not a positive number, or a stream that did not complete."""
    problems = []
    must = ("direct (mock)", "bare hyper pass-through", "airouter")
    def positive(what: str, xs) -> None:
        if not xs or not all(isinstance(x, (int, float)) and x > 0 for x in xs):
            problems.append(f"{what}: {xs!r}")
    for n in must:
        positive(f"latency_c1_one_cpu_us[{n}].p50", r["latency_c1_one_cpu_us"].get(n, {}).get("p50"))
        positive(f"latency_c1_us[{n}].p50", r["latency_c1_us"].get(n, {}).get("p50"))
        positive(f"latency_c1_us[{n}].p99", r["latency_c1_us"].get(n, {}).get("p99"))
        positive(f"rps_c64[{n}]", r["rps_c64"].get(n))
    for n in ("bare hyper pass-through", "airouter"):
        positive(f"rps_pairs[{n}]", r.get("rps_pairs", {}).get(n))
        positive(f"rps_big_prompt_pairs[{n}]", r.get("rps_big_prompt_pairs", {}).get(n))
        positive(f"fixed_rate[{n}]", r["fixed_rate"]["p99_us"].get(n))
        for k in ("ttfc_p50", "ttfc_p99", "gap_p50", "gap_p99"):
            positive(f"streaming_us[{n}].{k}", r["streaming_us"].get(n, {}).get(k))
    positive("idle_rss_kb", [r.get("idle_rss_kb")])
    for key in ("open_streams", "open_streams_h2", "open_streams_passthrough"):
        runs = r.get(key) or []
        if not runs:
            problems.append(f"{key}: no runs")
        for i, h in enumerate(runs, 1):
            if not h["opened"] == h["completed"] == OPEN_STREAMS:
                problems.append(f"{key} run {i}: opened {h['opened']}, completed {h['completed']} of {OPEN_STREAMS}")
            positive(f"{key} run {i} rss_kb", [h["rss_kb"]])
    return problems


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> str:
    return f"{min(xs):.4g}–{max(xs):.4g}"


def us(x: float) -> str:
    return f"{x:.0f} µs" if abs(x) < 10_000 else f"{x / 1000:.1f} ms"


def train() -> int:
    """The traffic bench/pgo.sh trains its instrumented builds (BENCH_BIN_DIR) on: every kind
    the scenarios send (64 connections with short and 16 KiB bodies, concurrency 1, streams),
    to the pass-through and to airouter with HTTP/1.1 and HTTP/2 upstreams. Every process is
    stopped with SIGTERM, so each writes its profile."""
    stack = Stack(["--chunks", "20", "--chunk-interval-ms", "1"], with_litellm=False, with_go=False,
                  with_h2=True)
    try:
        big = big_body()
        for name in ("bare hyper pass-through", "airouter", H2_NAME):
            url = stack.targets[name][0] + "/v1/chat/completions"
            oha(url, "-z", "3s", "-c", "64")
            oha(url, "-z", "2s", "-c", "64", body_file=big)
            oha(url, "-n", "1000", "-c", "1")
            stream_probe(url, "latency", "--streams", "200", "--concurrency", "4")
    finally:
        stack.close(graceful=True)
        stop_all()
    shutil.rmtree(TMP, ignore_errors=True)
    return 0


def main() -> int:
    if "--train" in sys.argv:
        return train()
    resolve_go_router()
    if "--smoke-go" in sys.argv:
        return smoke_go()
    results: dict = {"machine": machine()}
    rows: list[str] = []
    try:
        stack = Stack([], with_litellm=True)
        names = list(stack.targets)
        url = {n: stack.targets[n][0] + "/v1/chat/completions" for n in names}

        # (1) latency at concurrency 1
        lat = {n: {"p50": [], "p99": []} for n in names}
        for _ in range(RUNS):
            for n in names:
                count = str(LAT_REQUESTS // 10 if n == "LiteLLM proxy" else LAT_REQUESTS)
                d = oha(url[n], "-n", count, "-c", "1")
                lat[n]["p50"].append(d["latencyPercentiles"]["p50"] * 1e6)
                lat[n]["p99"].append(d["latencyPercentiles"]["p99"] * 1e6)
        results["latency_c1_us"] = lat

        # (1b) the same with every role on one CPU: no cross-CPU wake-ups, so what is left
        # is each process's own work and the context switches between them.
        one = ("direct (mock)", "bare hyper pass-through", "airouter")
        lat1 = {n: {"p50": [], "p99": []} for n in one}
        for _ in range(RUNS):
            for n in one:
                d = oha(url[n], "-n", str(LAT_REQUESTS), "-c", "1", cpu=SUT_CPU)
                lat1[n]["p50"].append(d["latencyPercentiles"]["p50"] * 1e6)
                lat1[n]["p99"].append(d["latencyPercentiles"]["p99"] * 1e6)
        results["latency_c1_one_cpu_us"] = lat1

        # (2) max throughput at 64 connections: TP_ROUNDS rounds, the order reversed every
        # other round, so neither target always runs right after the other.
        rps = {n: [] for n in names}
        for i in range(TP_ROUNDS):
            for n in (names if i % 2 == 0 else names[::-1]):
                d = oha(url[n], "-z", TP_DURATION, "-c", "64")
                rps[n].append(d["summary"]["requestsPerSec"])
        results["rps_c64"] = rps

        # (2b) the target ratio: airouter and the pass-through in TP_PAIRS short pairs, back to
        # back, the order swapped every other pair; the ratio is the median of per-pair ratios.
        results["rps_pairs"] = measure_pairs(url, TP_PAIRS)

        # (3) p99 at a fixed rate = half of airouter's max (latency-corrected)
        rate = int(med(rps["airouter"]) / 2)
        fixed = {n: [] for n in names if n != "LiteLLM proxy"}
        for _ in range(RUNS):
            for n in fixed:
                d = oha(url[n], "-z", DURATION, "-c", "64", "-q", str(rate), "--latency-correction")
                fixed[n].append(d["latencyPercentiles"]["p99"] * 1e6)
        results["fixed_rate"] = {"rate": rate, "p99_us": fixed}

        # (6) idle RSS, after warm-up traffic and a quiet second
        time.sleep(1.0)
        results["idle_rss_kb"] = rss_kb(child_pid(stack.targets["airouter"][1]))
        results["idle_rss_passthrough_kb"] = rss_kb(child_pid(stack.targets["bare hyper pass-through"][1]))
        if GO_NAME in stack.targets:
            results["go_idle_rss_kb"] = rss_kb(child_pid(stack.targets[GO_NAME][1]))

        # (2c) the pairs of (2b) with a 16 KiB prompt in every request; after the idle RSS of (6),
        # which then stays comparable with earlier runs, and followed by an idle RSS of its own
        big = big_body()
        results["rps_big_prompt_pairs"] = {"body_bytes": big.stat().st_size,
                                           **measure_pairs(url, SIDE_PAIRS, body_file=big)}
        time.sleep(1.0)
        results["idle_rss_after_big_kb"] = rss_kb(child_pid(stack.targets["airouter"][1]))

        # (2d) the pairs of (2b) with the plain release builds of airouter and the pass-through
        # (same mock): what PGO changes, and the ratio without it.
        if PLAIN:
            p_pt, p_ar = free_port(), free_port()
            plain = {
                "bare hyper pass-through": start([str(PLAIN / "bench-passthrough"), "--listen", f"127.0.0.1:{p_pt}",
                                                  "--upstream", f"http://127.0.0.1:{stack.mock_port}"], log="plain-pt"),
                "airouter": start([str(PLAIN / "airouter"), "run", "--config",
                                   str(airouter_config(stack.mock_port, p_ar))], log="plain-airouter"),
            }
            plain_url = {"bare hyper pass-through": f"http://127.0.0.1:{p_pt}/v1/chat/completions",
                         "airouter": f"http://127.0.0.1:{p_ar}/v1/chat/completions"}
            wait_http(f"http://127.0.0.1:{p_pt}/v1/models")
            wait_http(f"http://127.0.0.1:{p_ar}/health/readiness")
            for n in PAIR_NAMES:
                oha(plain_url[n], "-n", "200", "-c", "4")  # warm pools
            results["rps_plain_build_pairs"] = measure_pairs(plain_url, SIDE_PAIRS)
            for proc in plain.values():
                stop(proc)
        stack.close()

        # (4) streaming: 20 chunks 2 ms apart
        stack = Stack(["--chunks", "20", "--chunk-interval-ms", "2"], with_litellm=False)
        sl = {n: {"ttfc_p50": [], "ttfc_p99": [], "gap_p50": [], "gap_p99": []} for n in stack.targets}
        for _ in range(RUNS):
            for n, (base, _) in stack.targets.items():
                d = stream_probe(base + "/v1/chat/completions", "latency", "--streams", str(STREAMS),
                                 "--concurrency", "4")
                if n == GO_NAME and d["errors"]:
                    results.setdefault("go_stream_errors", []).append(d["errors"])
                assert n == GO_NAME or d["errors"] == 0, d
                sl[n]["ttfc_p50"].append(d["ttfc_us"]["p50"])
                sl[n]["ttfc_p99"].append(d["ttfc_us"]["p99"])
                sl[n]["gap_p50"].append(d["gap_us"]["p50"])
                sl[n]["gap_p99"].append(d["gap_us"]["p99"])
        results["streaming_us"] = sl
        stack.close()

        # (5) OPEN_STREAMS (5,000) concurrent open streams (20 chunks 500 ms apart: ~10 s each), airouter and the
        # bare pass-through (the physical limit of a hyper proxy) alternately.
        # The mock allows 256 HTTP/2 streams per connection (as large providers' edges do),
        # so the HTTP/2 airouter opens ~20 upstream connections for 5,000 streams.
        stack = Stack(["--chunks", "20", "--chunk-interval-ms", "500", "--h2-max-streams", "256"],
                      with_litellm=False, with_go=False, with_h2=True)
        held, held_h2, held_pt = [], [], []
        for _ in range(RUNS):
            for name, out in (("airouter", held), (H2_NAME, held_h2), ("bare hyper pass-through", held_pt)):
                out.append(hold_streams(*stack.targets[name]))
        results["open_streams"] = held
        results["open_streams_h2"] = held_h2
        results["open_streams_passthrough"] = held_pt
        stack.close()
    except BaseException:
        print(f"bench: process logs kept in {TMP}", file=sys.stderr)
        raise
    finally:
        stop_all()

    # GO_ROUTER_PROVENANCE: where a prebuilt GO_ROUTER_BIN came from, said in RESULTS.md.
    results["go_router"] = {"binary": GO_ROUTER, "note": GO_ROUTER_NOTE,
                            "provenance": os.environ.get("GO_ROUTER_PROVENANCE", "")}
    results["counts"] = {"latency_requests": LAT_REQUESTS, "streams": STREAMS, "open_streams": OPEN_STREAMS}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    write_markdown(results)
    print((OUT / "RESULTS.md").read_text())
    problems = check(results)
    for p in problems:
        print(f"bench: unusable result: {p}", file=sys.stderr)
    if problems:
        print(f"bench: process logs kept in {TMP}", file=sys.stderr)
        return 1
    shutil.rmtree(TMP, ignore_errors=True)
    return 0


def smoke_go() -> int:
    """`bench.py --smoke-go`: a short run of the Go peer alone (mock + Go router, the bench
    topology): warm-up, concurrency 1, 64 connections for 2 s, a streaming probe, idle RSS.
    Proves the Go-peer part of the suite works without running the whole suite."""
    if not GO_ROUTER:
        print(f"Go router unavailable: {GO_ROUTER_NOTE}", file=sys.stderr)
        return 3
    out: dict = {"binary": GO_ROUTER}
    try:
        mock_port = free_port()
        start([str(REL / "bench-mock"), "--listen", f"127.0.0.1:{mock_port}", "--chunks", "20",
               "--chunk-interval-ms", "2"], log="mock")
        wait_http(f"http://127.0.0.1:{mock_port}/v1/models")
        base, go = start_go_router(mock_port)
        url = base + "/v1/chat/completions"
        oha(url, "-n", "200", "-c", "4")
        d = oha(url, "-n", "500", "-c", "1")
        out["c1_p50_us"] = d["latencyPercentiles"]["p50"] * 1e6
        out["c1_p99_us"] = d["latencyPercentiles"]["p99"] * 1e6
        d = oha(url, "-z", "2s", "-c", "64")
        out["c64_rps"] = d["summary"]["requestsPerSec"]
        d = stream_probe(url, "latency", "--streams", "100", "--concurrency", "4")
        out["stream"] = {"errors": d["errors"], "ttfc_p50_us": d["ttfc_us"]["p50"], "gap_p99_us": d["gap_us"]["p99"]}
        time.sleep(1.0)
        out["idle_rss_kb"] = rss_kb(child_pid(go))
    finally:
        stop_all()
    print(json.dumps(out, indent=2))
    return 0


def machine() -> dict:
    cpu = next((l.split(":", 1)[1].strip() for l in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), "?")
    def ver(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except Exception:
            return "?"
    return {
        "cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "rustc": ver(["rustc", "--version"]), "oha": ver([OHA, "--version"]),
        "litellm": ver([sys.executable, "-c", "print('n/a')"]) if not LITELLM else ver(
            [str(pathlib.Path(LITELLM).parent / "python"), "-c", "import importlib.metadata as m; print(m.version('litellm'))"]),
        "airouter": ver([str(REL / "airouter"), "--version"]),
        "build": os.environ.get("BENCH_BUILD", "plain release builds"),
        "go_router": GO_ROUTER or "not measured",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


PAIR_NAMES = ("bare hyper pass-through", "airouter")


def measure_pairs(urls: dict, count: int, body_file: pathlib.Path | None = None) -> dict:
    """`count` back-to-back pairs of TP_PAIR_DURATION at 64 connections, the order swapped
    every other pair: requests/s per target of PAIR_NAMES (`urls` maps them to their URL)."""
    rps = {n: [] for n in PAIR_NAMES}
    for i in range(count):
        for n in (PAIR_NAMES if i % 2 == 0 else PAIR_NAMES[::-1]):
            d = oha(urls[n], "-z", TP_PAIR_DURATION, "-c", "64", body_file=body_file)
            rps[n].append(d["summary"]["requestsPerSec"])
    return {"duration": TP_PAIR_DURATION, **rps}


def pair_rows(pairs: dict) -> list[str]:
    """The table of one set of pairs (from measure_pairs)."""
    pt, ar = PAIR_NAMES
    rows = ["| pair | pass-through requests/s | airouter requests/s | ratio |\n|---|---|---|---|"]
    for i, (b, a) in enumerate(zip(pairs[pt], pairs[ar]), 1):
        rows.append(f"| {i} | {b:,.0f} | {a:,.0f} | {a / b:.2f} |")
    return rows


def write_markdown(r: dict) -> None:
    m = r["machine"]
    lat, rps, fixed, sl = r["latency_c1_us"], r["rps_c64"], r["fixed_rate"], r["streaming_us"]
    d50, d99 = med(lat["direct (mock)"]["p50"]), med(lat["direct (mock)"]["p99"])
    pt_rps = med(rps["bare hyper pass-through"])
    ar_rps = med(rps["airouter"])
    ll_rps = med(rps["LiteLLM proxy"]) if "LiteLLM proxy" in rps else None
    held = r["open_streams"]
    s = []
    s.append("# airouter benchmark results\n")
    s.append(f"Measured {m['date']} on {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, Linux {m['kernel']}; "
             f"{m['rustc']}; load generator {m['oha']}; {m['airouter']}; LiteLLM {m['litellm']}. "
             f"Binaries: {m.get('build', 'plain release builds')}, the same for airouter, the pass-through "
             "and the mock.\n")
    s.append("Reproduce: `bash bench/run.sh` (builds everything, installs oha and LiteLLM into "
             "`~/.cache/airouter/`, runs every scenario, rewrites this file and `bench/results.json`).\n")
    s.append("Placement: the load generator (oha, `bench-stream`) is pinned to CPU 0; the target and the mock "
             "provider share CPU 1 (`taskset`), the same way for every target (scenario 1b moves the load "
             "generator to CPU 1 too). Every figure is the median of "
             f"{len(lat['airouter']['p50'])} runs ({len(rps['airouter'])} for throughput), with the spread (min–max) "
             "beside it. The airouter config is the "
             "realistic topology: 4 primary credentials, 1 fallback proxy, an alias, limits too high to trigger "
             "(`bench/bench.py: airouter_config`).\n")
    pt, ar = "bare hyper pass-through", "airouter"
    # Throughput ratios are paired (each pair runs the two targets back to back), so a slow
    # stretch of the machine moves both sides of a ratio, not one. Older results files have
    # only the rounds of scenario 2.
    pairs = r.get("rps_pairs")
    paired_from = pairs or rps
    paired = sorted(a / b for a, b in zip(paired_from[ar], paired_from[pt]))
    quartiles = statistics.quantiles(paired, n=4) if len(paired) >= 4 else [min(paired), 0, max(paired)]
    s.append("## Targets\n")
    s.append("The bare hyper pass-through column is the same measurement of the physical limit: a proxy with "
             "no routing logic, in the same place as airouter.\n")
    s.append("| target | airouter | bare pass-through | goal | met |\n|---|---|---|---|---|")
    def row(what, val, limit, goal, ok):
        s.append(f"| {what} | {val} | {limit} | {goal} | {'yes' if ok else '**no**'} |")
    row(f"throughput vs bare pass-through (median of {len(paired)} per-{'pair' if pairs else 'round'} ratios; "
        "interquartile range, then min–max)",
        f"{med(paired):.2f}× ({quartiles[0]:.2f}–{quartiles[2]:.2f}; {min(paired):.2f}–{max(paired):.2f})",
        "1.00×", "≥ 0.85×", med(paired) >= 0.85)
    if ll_rps:
        row("throughput vs LiteLLM proxy", f"{ar_rps / ll_rps:.1f}×", f"{pt_rps / ll_rps:.1f}×", "≥ 20×",
            ar_rps / ll_rps >= 20)
    go_rps = med(rps[GO_NAME]) if GO_NAME in rps else None
    if go_rps:
        row("throughput vs Go Auto AI Router", f"{ar_rps / go_rps:.1f}×", f"{pt_rps / go_rps:.1f}×", "≥ 3×",
            ar_rps / go_rps >= 3)
    else:
        s.append("| throughput vs Go Auto AI Router | not measured | | ≥ 3× | — |")
    a50, p50 = med(lat[ar]["p50"]) - d50, med(lat[pt]["p50"]) - d50
    a99, p99 = med(lat[ar]["p99"]) - d99, med(lat[pt]["p99"]) - d99
    row("added latency, concurrency 1, p50", us(a50), us(p50), "≤ 50 µs", a50 <= 50)
    row("added latency, concurrency 1, p99", us(a99), us(p99), "≤ 150 µs", a99 <= 150)
    direct_t99 = med(sl["direct (mock)"]["ttfc_p99"])
    t99, pt_t99 = med(sl[ar]["ttfc_p99"]) - direct_t99, med(sl[pt]["ttfc_p99"]) - direct_t99
    row("streaming added time to first chunk, p99", us(t99), us(pt_t99), "≤ 200 µs", t99 <= 200)
    idle_mb = r["idle_rss_kb"] / 1024
    pt_idle = r.get("idle_rss_passthrough_kb")
    row("idle RSS", f"{idle_mb:.1f} MB", f"{pt_idle / 1024:.1f} MB" if pt_idle else "", "≤ 20 MB", idle_mb <= 20)
    peak_mb = med([h["rss_kb"] for h in held]) / 1024
    held_h2 = r.get("open_streams_h2") or []
    held_pt = r.get("open_streams_passthrough") or []
    pt_peak = f"{med([h['rss_kb'] for h in held_pt]) / 1024:.1f} MB" if held_pt else ""
    counts = r.get("counts") or {"streams": 1500, "open_streams": 5000}
    if held_h2:
        h2_mb = med([h["rss_kb"] for h in held_h2]) / 1024
        row(f"RSS with {counts['open_streams']:,} open streams, HTTP/2 upstream (what an https provider "
            "offering h2 gets)", f"{h2_mb:.1f} MB", "", "≤ 100 MB", h2_mb <= 100)
    row(f"RSS with {counts['open_streams']:,} open streams, HTTP/1.1 upstream", f"{peak_mb:.1f} MB", pt_peak,
        "≤ 100 MB", peak_mb <= 100)
    gr = r.get("go_router") or {}
    if go_rps:
        s.append(f"\nGo Auto AI Router: `{gr.get('binary')}` (from `GO_ROUTER_BIN` or `tests/tools/go-router.sh`), same "
                 "topology (`bench/bench.py: go_router_config`); it is in scenarios 1–4 and 6."
                 + (f" Provenance: {gr['provenance']}" if gr.get("provenance") else "") + "\n")
    else:
        s.append(f"\nThe Go Auto AI Router was not measured: {gr.get('note') or 'unknown reason'}.\n")

    s.append("## (1) Added latency at concurrency 1\n")
    s.append("| target | p50 | p99 | added p50 | added p99 |\n|---|---|---|---|---|")
    for n, v in lat.items():
        s.append(f"| {n} | {us(med(v['p50']))} ({spread(v['p50'])}) | {us(med(v['p99']))} ({spread(v['p99'])}) | "
                 f"{us(med(v['p50']) - d50)} | {us(med(v['p99']) - d99)} |")
    lat1 = r.get("latency_c1_one_cpu_us")
    if lat1:
        o50, o99 = med(lat1["direct (mock)"]["p50"]), med(lat1["direct (mock)"]["p99"])
        s.append("\n## (1b) Concurrency 1 with every role on CPU 1\n")
        s.append("The load generator moved beside the mock and the target: no request crosses between CPUs, so "
                 "the added latency is the target's own work plus the context switches it adds. Compare with (1), "
                 "where each request and answer crosses between the two CPUs once.\n")
        s.append("| target | p50 | p99 | added p50 | added p99 |\n|---|---|---|---|---|")
        for n, v in lat1.items():
            s.append(f"| {n} | {us(med(v['p50']))} ({spread(v['p50'])}) | {us(med(v['p99']))} ({spread(v['p99'])}) | "
                     f"{us(med(v['p50']) - o50)} | {us(med(v['p99']) - o99)} |")
    s.append("\n## (2) Maximum throughput, 64 connections\n")
    where = ("the target ratio is measured in (2b)" if pairs
             else "the ratio in the targets table is the median of the per-round ratios")
    s.append(f"{len(next(iter(rps.values())))} rounds of {TP_DURATION}, the target order reversed every other round; "
             f"{where}.\n")
    s.append("| target | requests/s | spread | vs pass-through |\n|---|---|---|---|")
    for n, v in rps.items():
        s.append(f"| {n} | {med(v):,.0f} | {spread(v)} | {med(v) / pt_rps:.2f}× |")
    if pairs:
        s.append(f"\n## (2b) airouter against the pass-through, {len(pairs[ar])} pairs of {pairs['duration']}\n")
        s.append("The throughput target: the two targets back to back in each pair, the order swapped every "
                 "other pair, so both see the same stretch of the machine; the ratio is the median of the "
                 "per-pair ratios.\n")
        s.extend(pair_rows(pairs))
    big = r.get("rps_big_prompt_pairs")
    if big:
        ratios = sorted(a / b for a, b in zip(big[ar], big[pt]))
        s.append(f"\n## (2c) A {big['body_bytes'] / 1024:.0f} KiB request body, {len(big[ar])} pairs of {big['duration']}\n")
        s.append("Real chat requests carry long prompts. airouter reads `model` and `stream` from every body "
                 "(a validating scan, see NOTES: \"Sixth round\"); the pass-through copies bytes. Not a target; "
                 f"median ratio **{med(ratios):.2f}×** (min–max {min(ratios):.2f}–{max(ratios):.2f}).\n")
        s.extend(pair_rows(big))
    plain = r.get("rps_plain_build_pairs")
    if plain:
        ratios = sorted(a / b for a, b in zip(plain[ar], plain[pt]))
        pgo_pt = med(pairs[pt]) / med(plain[pt]) if pairs else None
        pgo_ar = med(pairs[ar]) / med(plain[ar]) if pairs else None
        s.append(f"\n## (2d) Plain release builds (no PGO), {len(plain[ar])} pairs of {plain['duration']}\n")
        s.append("The pairs of (2b) with the plain `cargo build --release` binaries of airouter and the pass-through, "
                 f"against the same mock: median ratio **{med(ratios):.2f}×** (min–max {min(ratios):.2f}–{max(ratios):.2f})."
                 + (f" PGO's gain, from the medians of (2b) over these: pass-through {pgo_pt:.2f}×, airouter {pgo_ar:.2f}× "
                    "(different minutes of the run, so only indicative)." if pgo_pt else "") + "\n")
        s.extend(pair_rows(plain))
    s.append(f"\n## (3) p99 at a fixed rate of {fixed['rate']:,} requests/s (half of airouter's maximum), latency-corrected\n")
    s.append("| target | p99 | spread |\n|---|---|---|")
    for n, v in fixed["p99_us"].items():
        s.append(f"| {n} | {us(med(v))} | {spread(v)} |")
    s.append(f"\n## (4) Streaming: 20 chunks 2 ms apart, {counts['streams']:,} streams, 4 at a time\n")
    s.append("| target | first chunk p50 | first chunk p99 | gap p50 | gap p99 |\n|---|---|---|---|---|")
    for n, v in sl.items():
        s.append(f"| {n} | {us(med(v['ttfc_p50']))} | {us(med(v['ttfc_p99']))} | {us(med(v['gap_p50']))} | {us(med(v['gap_p99']))} |")
    base = sl["direct (mock)"]
    s.append(f"\nairouter adds {us(med(sl[ar]['ttfc_p50']) - med(base['ttfc_p50']))} (p50) / "
             f"{us(t99)} (p99) to the first chunk and {us(med(sl['airouter']['gap_p99']) - med(base['gap_p99']))} "
             "to the p99 inter-chunk gap.\n")
    s.append(f"## (5) {counts['open_streams']:,} concurrent open streams\n")
    s.append("Rounds alternate between the targets; each target is one process through all its rounds. The mock "
             "allows 256 HTTP/2 streams per connection, so the HTTP/2 airouter holds ~20 upstream connections where "
             "the others hold 5,000.\n")
    s.append("| target | run | opened | completed | peak RSS | CPU while open |\n|---|---|---|---|---|---|")
    for name, runs in ((ar, held), (H2_NAME, held_h2), (pt, held_pt)):
        for i, h in enumerate(runs, 1):
            s.append(f"| {name} | {i} | {h['opened']} | {h['completed']} | {h['rss_kb'] / 1024:.1f} MB | "
                     f"{h['cpu_pct']:.0f} % |")
    s.append(f"\n## (6) Idle RSS\n\nairouter after warm-up traffic, idle: {idle_mb:.1f} MB.\n")
    if r.get("idle_rss_after_big_kb"):
        s.append(f"airouter idle again after the 16 KiB bodies of (2c): {r['idle_rss_after_big_kb'] / 1024:.1f} MB "
                 "(buffers and allocator pages sized for the larger bodies, kept for the next ones).\n")
    if r.get("go_idle_rss_kb"):
        s.append(f"Go Auto AI Router after the same warm-up traffic, idle: {r['go_idle_rss_kb'] / 1024:.1f} MB.\n")
    if r.get("go_stream_errors"):
        s.append(f"Go Auto AI Router streaming errors per run: {r['go_stream_errors']}.\n")
    notes = ROOT / "bench" / "NOTES.md"
    if notes.exists():
        s.append(notes.read_text())
    (OUT / "RESULTS.md").write_text("\n".join(s) + "\n")


if __name__ == "__main__":
    sys.exit(main())
