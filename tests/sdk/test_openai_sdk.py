"""Compatibility tests with the official ``openai`` Python SDK.

The router binary (env ``AIROUTER_BIN``, default ``target/debug/airouter``,
relative paths resolved from the repository root) is started with
``examples/quickstart.yaml`` moved to a free 127.0.0.1 port.
"""

from __future__ import annotations

import os
import pathlib
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request

import openai
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
MODEL = "gpt-4o-mini"
DEFAULT_MASTER_KEY = "sk-airouter-quickstart"
READY_TIMEOUT_S = 10.0
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


def parse_duration(value, default: float = 0.0) -> float:
    """Parse '10ms', '1s', '1.5s', '2m', '250us' or a bare number of seconds."""
    if value is None:
        return default
    if isinstance(value, (int, float)):
        return float(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(us|µs|ms|s|m|h)?\s*", str(value))
    if not m:
        raise ValueError(f"unparsable duration {value!r}")
    n = float(m.group(1))
    unit = m.group(2) or "s"
    return n * {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def router_binary() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("AIROUTER_BIN", "target/debug/airouter"))
    if not path.is_absolute():
        path = ROOT / path
    return path


def _no_proxy_opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


class RouterProcess:
    def __init__(self, cfg: dict, workdir: pathlib.Path):
        self.cfg = cfg
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log_path = workdir / "router.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def start(self) -> None:
        binary = router_binary()
        assert binary.exists(), f"router binary not found at {binary} (set AIROUTER_BIN)"
        env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
        last_error = ""
        for _attempt in range(3):
            self.port = free_port()
            cfg = dict(self.cfg)
            cfg["server"] = dict(cfg.get("server") or {})
            cfg["server"]["host"] = "127.0.0.1"
            cfg["server"]["port"] = self.port
            config_path = self.workdir / "config.yaml"
            config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(
                    [str(binary), "run", "--config", str(config_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=str(ROOT),
                )
            if self._wait_ready():
                return
            last_error = self.logs()
            self.stop()
            if "in use" not in last_error.lower():
                break
        raise AssertionError(f"router did not become ready; logs:\n{last_error}")

    def _wait_ready(self) -> bool:
        opener = _no_proxy_opener()
        deadline = time.monotonic() + READY_TIMEOUT_S
        url = f"http://127.0.0.1:{self.port}/health/readiness"
        for _ in range(int(READY_TIMEOUT_S / 0.02) + 1):
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            try:
                with opener.open(url, timeout=0.5) as resp:
                    if resp.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 1 s (the router's graceful shutdown keeps
        serving for a grace period; the tests need not wait for it)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None


@pytest.fixture(scope="module")
def quickstart() -> dict:
    assert QUICKSTART.exists(), f"{QUICKSTART} is missing"
    cfg = yaml.safe_load(QUICKSTART.read_text())
    assert isinstance(cfg, dict) and "server" in cfg, "quickstart.yaml has no server section"
    return cfg


@pytest.fixture(scope="module")
def router(quickstart, tmp_path_factory):
    proc = RouterProcess(quickstart, tmp_path_factory.mktemp("airouter"))
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def master_key(cfg: dict) -> str:
    key = (cfg.get("server") or {}).get("master_key")
    if isinstance(key, str) and key and not key.startswith("os.environ/"):
        return key
    return DEFAULT_MASTER_KEY


def make_client(router: RouterProcess, api_key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(
        api_key=api_key or master_key(router.cfg),
        base_url=router.base_url,
        max_retries=0,
        timeout=20.0,
        http_client=openai.DefaultHttpxClient(trust_env=False),
    )


def mock_settings(cfg: dict) -> tuple[int, float]:
    """(chunks, chunk_interval seconds) of the quickstart's mock credential."""
    mocks = [c for c in cfg.get("credentials") or [] if c.get("type") == "mock"]
    assert mocks, "quickstart.yaml has no credential of type mock"
    settings = mocks[0].get("mock") or {}
    return int(settings.get("chunks", 0) or 0), parse_duration(settings.get("chunk_interval"))


def test_models_list_contains_quickstart_model(router):
    client = make_client(router)
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids, ids


def test_non_streaming_completion_has_usage(router):
    client = make_client(router)
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello"}]
    )
    assert resp.choices, resp
    assert isinstance(resp.choices[0].message.content, str)
    assert resp.usage is not None
    assert resp.usage.total_tokens > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_streaming_completion_arrives_incrementally(router):
    chunks_cfg, interval = mock_settings(router.cfg)
    assert interval > 0, "quickstart mock chunk_interval must be > 0 to show streaming"
    client = make_client(router)
    arrivals: list[float] = []
    pieces: list[str] = []
    start = time.monotonic()
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count to five"}],
        stream=True,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - start)
            pieces.append(chunk.choices[0].delta.content)
    assert len(arrivals) >= 2, f"expected several chunks, got {pieces!r}"
    n = chunks_cfg if chunks_cfg >= 2 else len(arrivals)
    spread = arrivals[-1] - arrivals[0]
    required = 0.5 * (n - 1) * interval
    assert spread >= required, (
        f"chunks not delivered incrementally: spread {spread:.3f}s < {required:.3f}s; "
        f"arrivals {[round(a, 3) for a in arrivals]}"
    )


def test_streaming_usage_only_when_requested(router):
    client = make_client(router)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    usages = [c.usage for c in stream if c.usage is not None]
    assert len(usages) == 1 and usages[0].total_tokens > 0, usages

    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    assert [c.usage for c in stream if c.usage is not None] == []


def test_wrong_key_raises_authentication_error(router):
    client = make_client(router, api_key="sk-definitely-wrong")
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])


def test_parse_duration():
    assert parse_duration("10ms") == pytest.approx(0.01)
    assert parse_duration("1.5s") == pytest.approx(1.5)
    assert parse_duration(2) == 2.0
    assert parse_duration(None, 0.3) == 0.3
