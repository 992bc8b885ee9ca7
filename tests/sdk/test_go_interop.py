"""Interop with the reference Go router, Auto AI Router (issue 3).

Two chains, each ending at an in-process mock OpenAI provider:

* A: client -> airouter (``type: proxy`` credential) -> Go router (``type: openai``) -> mock
* B: client -> Go router (``type: proxy`` credential) -> airouter (``type: openai``) -> mock

and, for each, success (non-streaming and streaming, usage counted), upstream error mapping
(429/401/500), exhaustion on the far side, and airouter's health sync reading the Go router's
``/health`` and ``/v1/models``.

The Go binary comes from ``tests/tools/go-router.sh`` (``GO_ROUTER_BIN`` short-circuits the
build). When that script exits 3 (the module proxy does not serve the module) every test here
is reported SKIPPED with the script's reason; any other failure of the script fails the tests.

Run: ``GO_ROUTER_BIN=/path/to/auto_ai_router AIROUTER_BIN=target/debug/airouter
python -m pytest -q -rs tests/sdk/test_go_interop.py``

The Go router's config is written in its own format (``-config FILE``; ``models[]`` entries
carry an explicit ``rpm: -1`` because upstream treats an omitted rpm as a limit of 0, spec
§1.6.4; a high ``fail2ban.max_attempts`` keeps single error responses from banning anything).
Where the reference build behaves differently from the spec's HEAD (it is an older commit, see
the assertions' comments) the tests pin what it does.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
import yaml

from test_openai_sdk import PROXY_VARS, ROOT, RouterProcess, free_port

GO_ROUTER_SH = ROOT / "tests" / "tools" / "go-router.sh"
AIR_KEY = "sk-air-interop"
GO_KEY = "sk-go-interop"
MOCK_KEY = "sk-mock-upstream"
USAGE = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
CHUNKS = ["Hel", "lo ", "from ", "mock"]
ERROR_MODELS = {"fail-429": 429, "fail-401": 401, "fail-500": 500}


# ---------------------------------------------------------------------------------------------
# the Go binary


@pytest.fixture(scope="module")
def go_bin() -> str:
    proc = subprocess.run(
        ["bash", str(GO_ROUTER_SH)],
        cwd=str(ROOT),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode == 3:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        pytest.skip(f"reference Go router unavailable (go-router.sh exit 3): {tail}")
    if proc.returncode != 0:
        pytest.fail(f"go-router.sh failed (exit {proc.returncode}):\n{proc.stderr}")
    path = proc.stdout.strip().splitlines()[-1]
    assert os.access(path, os.X_OK), f"go-router.sh printed a non-executable path {path!r}"
    return path


# ---------------------------------------------------------------------------------------------
# a mock OpenAI provider


class MockProvider:
    """Chat completions (JSON or SSE), ``/v1/models``; ``model`` names in ERROR_MODELS answer
    that status with an OpenAI error body. Every request is recorded."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        mock = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send(self, status, body: bytes, ctype="application/json", extra=None):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/v1/models":
                    self._send(200, json.dumps({"object": "list", "data": []}).encode())
                else:
                    self._send(404, b'{"error":{"message":"not found"}}')

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.loads(raw or b"{}")
                with mock.lock:
                    mock.requests.append({"path": self.path, "body": body,
                                          "headers": {k.lower(): v for k, v in self.headers.items()}})
                model = body.get("model", "")
                if model in ERROR_MODELS:
                    status = ERROR_MODELS[model]
                    err = {"error": {"message": f"mock says {status}", "type": "mock_error", "param": None, "code": str(status)}}
                    extra = {"Retry-After": "1"} if status == 429 else None
                    self._send(status, json.dumps(err).encode(), extra=extra)
                    return
                cid = "chatcmpl-mock"
                if body.get("stream"):
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    events = []
                    for i, piece in enumerate(CHUNKS):
                        delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
                        events.append({"id": cid, "object": "chat.completion.chunk", "created": 1, "model": model,
                                       "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
                    events.append({"id": cid, "object": "chat.completion.chunk", "created": 1, "model": model,
                                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
                    if (body.get("stream_options") or {}).get("include_usage"):
                        events.append({"id": cid, "object": "chat.completion.chunk", "created": 1, "model": model,
                                       "choices": [], "usage": USAGE})
                    frames = [f"data: {json.dumps(e)}\n\n".encode() for e in events] + [b"data: [DONE]\n\n"]
                    for frame in frames:
                        self.wfile.write(f"{len(frame):x}\r\n".encode() + frame + b"\r\n")
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                    return
                resp = {"id": cid, "object": "chat.completion", "created": 1, "model": model,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(CHUNKS)},
                                     "finish_reason": "stop"}],
                        "usage": USAGE}
                self._send(200, json.dumps(resp).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self, model: str | None = None) -> int:
        with self.lock:
            return sum(1 for r in self.requests if model is None or r["body"].get("model") == model)

    def last(self) -> dict:
        with self.lock:
            return self.requests[-1]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------------------------------------
# the Go router process


class GoRouterProcess:
    def __init__(self, binary: str, cfg: dict, workdir: pathlib.Path):
        self.binary = binary
        self.cfg = cfg
        self.workdir = workdir
        self.log_path = workdir / "go-router.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
        for _attempt in range(3):
            self.port = free_port()
            cfg = json.loads(json.dumps(self.cfg))
            cfg["server"]["port"] = self.port
            path = self.workdir / "go-config.yaml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen([self.binary, "-config", str(path)], stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(self.workdir))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                status, _, _ = http("GET", self.url + "/health")
                if status in (200, 503):
                    # The startup /health + /v1/models sync of proxy credentials runs in the
                    # background; give it a moment so limits learnt from remotes are in place.
                    time.sleep(0.5)
                    return
                time.sleep(0.05)
            logs = self.logs()
            self.stop()
            if "address already in use" not in logs:
                raise AssertionError(f"Go router did not start; logs:\n{logs}")
        raise AssertionError(f"Go router did not start; logs:\n{self.logs()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None


# ---------------------------------------------------------------------------------------------
# helpers


def http(method: str, url: str, body=None, token: str | None = None, timeout: float = 10.0):
    """(status, headers, body bytes); status 0 when nothing answered."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()
    except (urllib.error.URLError, OSError):
        return 0, {}, b""


def chat(base: str, token: str, model: str, **extra):
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    return http("POST", base + "/v1/chat/completions", body, token)


def health(base: str) -> dict:
    status, _, raw = http("GET", base + "/health")
    assert status in (200, 503), (status, raw)
    return json.loads(raw)


def model_ids(base: str) -> set[str]:
    status, _, raw = http("GET", base + "/v1/models")
    assert status == 200, (status, raw)
    return {m["id"] for m in json.loads(raw)["data"]}


def wait_until(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def sdk(base: str, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=token, max_retries=0, timeout=15)


def go_model(name: str, credential: str, rpm: int = -1) -> dict:
    # rpm spelled out: upstream blocks a models[] entry without rpm (limit 0).
    return {"name": name, "credential": credential, "rpm": rpm, "tpm": 0}


GO_SERVER = {"master_key": GO_KEY, "max_body_size_mb": 10, "request_timeout": "30s",
             "logging_level": "info", "default_models_rpm": -1}
GO_FAIL2BAN = {"max_attempts": 1000, "ban_duration": "1s", "error_codes": [599]}


# ---------------------------------------------------------------------------------------------
# fixtures: chain A (airouter -> Go -> mock)


@pytest.fixture(scope="module")
def mock():
    m = MockProvider()
    yield m
    m.close()


@pytest.fixture(scope="module")
def go_a(go_bin, mock, tmp_path_factory):
    models = [go_model(m, "mock") for m in ["gpt-4o-mini", *ERROR_MODELS]]
    models += [go_model("tiny", "mock-limited"), go_model("tiny2", "mock-limited2")]
    cfg = {
        "server": dict(GO_SERVER),
        "fail2ban": GO_FAIL2BAN,
        "credentials": [
            {"name": "mock", "type": "openai", "api_key": MOCK_KEY, "base_url": mock.base_url, "rpm": -1, "tpm": -1},
            {"name": "mock-limited", "type": "openai", "api_key": MOCK_KEY, "base_url": mock.base_url, "rpm": 2},
            {"name": "mock-limited2", "type": "openai", "api_key": MOCK_KEY, "base_url": mock.base_url, "rpm": 2},
        ],
        "monitoring": {"prometheus_enabled": False},
        "models": models,
    }
    proc = GoRouterProcess(go_bin, cfg, tmp_path_factory.mktemp("go-a"))
    proc.start()
    yield proc
    proc.stop()


def air_to_go_cfg(go: GoRouterProcess, sync: str) -> dict:
    return {
        "server": {"master_key": AIR_KEY, "max_provider_retries": 2, "health_sync_interval": sync},
        "credentials": [{"name": "go", "type": "proxy", "base_url": go.url, "api_key": GO_KEY}],
        "models": [{"name": "air-local", "credential": "go"}],
    }


@pytest.fixture(scope="module")
def air_a(go_a, tmp_path_factory):
    """airouter in front of go_a; syncs once at start (interval 1h), so a remote refusal is
    seen as the remote's own answer."""
    proc = RouterProcess(air_to_go_cfg(go_a, "1h"), tmp_path_factory.mktemp("air-a"))
    proc.start()
    base = f"http://127.0.0.1:{proc.port}"
    wait_until(lambda: "gpt-4o-mini" in model_ids(base), what="airouter to learn the Go router's models")
    yield base
    proc.stop()


# ---------------------------------------------------------------------------------------------
# chain A


def test_a_non_streaming_through_go(air_a, go_a, mock):
    before = mock.count("gpt-4o-mini")
    reply = sdk(air_a, AIR_KEY).chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "".join(CHUNKS)
    assert reply.usage.total_tokens == 12
    assert mock.count("gpt-4o-mini") == before + 1
    # The Go router replaced airouter's credential key with its own upstream key.
    assert mock.last()["headers"].get("authorization") == f"Bearer {MOCK_KEY}"
    # Usage counted on both sides: airouter on its proxy credential, the Go router on its own.
    air = health(air_a)
    assert air["credentials"]["go"]["current_tpm"] >= 12, air["credentials"]["go"]
    go = health(go_a.url)
    assert go["credentials"]["mock"]["current_tpm"] >= 12, go["credentials"]["mock"]


def test_a_streaming_through_go(air_a, go_a, mock):
    tpm_before = health(air_a)["credentials"]["go"]["current_tpm"]
    stream = sdk(air_a, AIR_KEY).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(CHUNKS)
    # The client did not ask for usage: airouter strips the usage chunk the Go router
    # requested upstream (spec §12.10) ...
    assert all(c.usage is None for c in chunks)
    # ... but counted its tokens.
    assert health(air_a)["credentials"]["go"]["current_tpm"] >= tpm_before + 12
    # The Go router forced include_usage on the upstream request (spec §8.2).
    assert mock.last()["body"]["stream_options"]["include_usage"] is True

    stream = sdk(air_a, AIR_KEY).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True})
    usages = [c.usage for c in stream if c.usage is not None]
    assert [u.total_tokens for u in usages] == [12]


@pytest.mark.parametrize("model,status", sorted(ERROR_MODELS.items()))
def test_a_upstream_errors_propagate(air_a, go_a, mock, model, status):
    before = mock.count(model)
    code, headers, raw = chat(air_a, AIR_KEY, model)
    # The Go router passes the provider's error through unchanged (no fallback configured);
    # airouter, out of alternatives, returns the last upstream error as the upstream sent it
    # (spec §12.4).
    assert code == status, raw
    assert json.loads(raw)["error"]["message"] == f"mock says {status}"
    assert mock.count(model) == before + 1, "exactly one attempt: no credential to retry on"


def test_a_go_exhaustion_reaches_the_client(air_a, go_a, mock):
    """The Go router's own exhaustion of a model (its only credential at its RPM) reaches the
    client through airouter, whose last sync saw the credential free: airouter forwards, gets
    the Go router's refusal, has no other credential and returns it as received."""
    for _ in range(2):
        code, _, raw = chat(air_a, AIR_KEY, "tiny2")
        assert code == 200, raw
    code, headers, raw = chat(air_a, AIR_KEY, "tiny2")
    # This reference build answers a plain-text 503 here: its selection reports "rate limit"
    # (429) only when *every* credential it looked at was rate-limited, and the credentials
    # that do not serve the model count as another reason (spec HEAD answers 429, §3.5).
    assert code == 503, raw
    assert raw.strip() == b"Service Unavailable"
    assert mock.count("tiny2") == 2


# ---------------------------------------------------------------------------------------------
# health sync (d) and exhaustion handled by airouter (c)


@pytest.fixture(scope="module")
def air_a_sync(go_a, tmp_path_factory):
    proc = RouterProcess(air_to_go_cfg(go_a, "300ms"), tmp_path_factory.mktemp("air-a-sync"))
    proc.start()
    yield f"http://127.0.0.1:{proc.port}"
    proc.stop()


def test_d_health_sync_reads_go_health_and_models(air_a_sync, go_a):
    base = air_a_sync
    ids = wait_until(lambda: model_ids(base) if "gpt-4o-mini" in model_ids(base) else None,
                     what="remote models in airouter's /v1/models")
    # Remote models merged with our own.
    assert {"air-local", "gpt-4o-mini", "tiny", "tiny2", *ERROR_MODELS} <= ids, ids
    remote = health(base)["credentials"]["go"]["remote"]
    assert remote["reachable"] is True, remote
    go = health(go_a.url)
    assert remote["credentials_available"] == go["credentials_available"], (remote, go)
    assert remote["status"] == go["status"] == "healthy"
    # A remote model is routed to the proxy even though no models[] entry of ours names it.
    code, _, raw = chat(base, AIR_KEY, "gpt-4o-mini")
    assert code == 200, raw


def test_c_remote_exhaustion_becomes_our_503(air_a_sync, go_a, mock):
    """Exhaust the Go router's 'tiny' credential directly; after the next sync airouter skips
    the proxy for 'tiny' and answers its own 503 (spec §12.1, §12.9) without a round trip."""
    base = air_a_sync
    for _ in range(2):
        code, _, raw = chat(go_a.url, GO_KEY, "tiny")
        assert code == 200, raw
    assert health(go_a.url)["credentials"]["mock-limited"]["current_rpm"] == 2
    before = mock.count("tiny")

    # The next sync sees the remote credential at its limit and marks the model unavailable.
    def marked():
        r = health(base)["credentials"]["go"]["remote"]
        return r if "tiny" in r["unavailable_models"] else None

    remote = wait_until(marked, timeout=5, what="airouter's sync to mark 'tiny' unavailable")
    assert "gpt-4o-mini" not in remote["unavailable_models"], remote
    code, headers, raw = chat(base, AIR_KEY, "tiny")
    assert code == 503, raw
    err = json.loads(raw)["error"]  # airouter's JSON error, not the Go router's plain text
    assert err["type"] and err["message"], err
    print("airouter's answer for a remote-refused model:", code, err, headers)
    # NOTE: no Retry-After here (reported): airouter only computes one from its own windows and
    # bans, not for a proxy skipped because of its remote's health (spec §12.1 asks for one).
    assert mock.count("tiny") == before, "nothing reached the provider"
    # Other models of the same remote still flow.
    code, _, raw = chat(base, AIR_KEY, "gpt-4o-mini")
    assert code == 200, raw


# ---------------------------------------------------------------------------------------------
# chain B (Go -> airouter -> mock)


@pytest.fixture(scope="module")
def air_b(mock, tmp_path_factory):
    cfg = {
        "server": {"master_key": AIR_KEY, "max_provider_retries": 2},
        "credentials": [{"name": "mock", "type": "openai", "api_key": MOCK_KEY, "base_url": mock.base_url}],
        "models": [
            {"name": "gpt-4o-mini", "credential": "mock"},
            {"name": "tiny", "credential": "mock", "rpm": 2},
            *({"name": m, "credential": "mock"} for m in ERROR_MODELS),
        ],
    }
    proc = RouterProcess(cfg, tmp_path_factory.mktemp("air-b"))
    proc.start()
    yield f"http://127.0.0.1:{proc.port}"
    proc.stop()


@pytest.fixture(scope="module")
def go_b(go_bin, air_b, tmp_path_factory):
    cfg = {
        "server": dict(GO_SERVER),
        "fail2ban": GO_FAIL2BAN,
        "credentials": [{"name": "air", "type": "proxy", "base_url": air_b, "api_key": AIR_KEY}],
        "monitoring": {"prometheus_enabled": False},
    }
    proc = GoRouterProcess(go_bin, cfg, tmp_path_factory.mktemp("go-b"))
    proc.start()
    yield proc
    proc.stop()


def test_b_non_streaming_through_airouter(go_b, air_b, mock):
    before = mock.count("gpt-4o-mini")
    reply = sdk(go_b.url, GO_KEY).chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "".join(CHUNKS)
    assert reply.usage.total_tokens == 12
    assert mock.count("gpt-4o-mini") == before + 1
    assert mock.last()["headers"].get("authorization") == f"Bearer {MOCK_KEY}"
    # airouter counted the usage. (This reference build does not count tokens on its own
    # proxy path; it learns the remote's usage from the remote's /health every 30 s.)
    assert health(air_b)["credentials"]["mock"]["current_tpm"] >= 12


def test_b_streaming_through_airouter(go_b, air_b, mock):
    tpm_before = health(air_b)["credentials"]["mock"]["current_tpm"]
    stream = sdk(go_b.url, GO_KEY).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(CHUNKS)
    # The Go router rewrites every streaming request with include_usage=true (spec §8.2), so to
    # airouter the client asked for usage and keeps the chunk.
    assert [c.usage.total_tokens for c in chunks if c.usage is not None] == [12]
    assert health(air_b)["credentials"]["mock"]["current_tpm"] >= tpm_before + 12


@pytest.mark.parametrize("model,status", sorted(ERROR_MODELS.items()))
def test_b_upstream_errors_propagate(go_b, air_b, mock, model, status):
    before = mock.count(model)
    code, _, raw = chat(go_b.url, GO_KEY, model)
    # airouter returns the provider's error as sent (§12.4); the Go router's proxy path passes
    # any response through when there is no fallback proxy.
    assert code == status, raw
    assert json.loads(raw)["error"]["message"] == f"mock says {status}"
    assert mock.count(model) == before + 1


def test_b_airouter_exhaustion_handled_by_go(go_b, air_b, mock):
    """airouter limits (mock, tiny) to 2 RPM. The Go router read that limit from airouter's
    /health at start (its remote sync) and enforces it on its proxy credential: the third
    request is refused by the Go router itself (429) without reaching airouter. Should the
    Go side forward anyway, airouter's own answer is a 503 with Retry-After, passed through."""
    for _ in range(2):
        code, _, raw = chat(go_b.url, GO_KEY, "tiny")
        assert code == 200, raw
    before = mock.count("tiny")
    code, headers, raw = chat(go_b.url, GO_KEY, "tiny")
    assert mock.count("tiny") == before
    assert code == 429, (code, raw)
    assert raw.strip() == b"Too Many Requests"

    # What airouter itself answers once exhausted, as the Go router would pass it on.
    code, headers, raw = chat(air_b, AIR_KEY, "tiny")
    assert code == 503, raw
    assert json.loads(raw)["error"]["type"]
    assert "retry-after" in {k.lower() for k in headers}, headers


def test_b_go_reads_airouter_health_and_models(go_b, air_b):
    """The Go router's proxy sync parses airouter's /health (same shape) and lists airouter's
    models in its own /v1/models."""
    ids = model_ids(go_b.url)
    assert {"gpt-4o-mini", "tiny", *ERROR_MODELS} <= ids, ids
    go = health(go_b.url)
    air = health(air_b)
    # Limits learnt from airouter: the per-model RPM of 'tiny' is mirrored on the proxy pair.
    assert go["models"]["air:tiny"]["limit_rpm"] == 2, go["models"]
    assert air["models"]["mock:tiny"]["limit_rpm"] == 2, air["models"]


def test_a_remote_cooling_down_one_model_still_serves_the_others(air_b, mock, tmp_path_factory):
    # (Needs no Go router: it runs also when the Go tests are skipped.)
    """A 429 cooldown on one (credential, model) pair of airouter B must not hide B's other
    models from a router in front of it (§12.9): B's /health still counts the credential as
    available (it serves gpt-4o-mini) and lists only that pair as banned, so the front router
    forwards gpt-4o-mini and refuses only the cooling model itself, without a round trip. (Found
    by these interop tests: /health used to count any banned pair as the whole credential
    unavailable, and the front skipped B for every model.)"""
    if not health(air_b)["models"]["mock:fail-429"]["is_banned"]:  # chain B did not run (no Go)
        assert chat(air_b, AIR_KEY, "fail-429")[0] == 429
    air = health(air_b)
    banned = [k for k, v in air["models"].items() if v["is_banned"]]
    assert banned == ["mock:fail-429"], air["models"]
    assert air["credentials_available"] == 1 and air["status"] == "healthy", air
    code, _, raw = chat(air_b, AIR_KEY, "gpt-4o-mini")
    assert code == 200, "B itself still serves gpt-4o-mini"
    front = RouterProcess({
        "server": {"master_key": "sk-front", "health_sync_interval": "300ms"},
        "credentials": [{"name": "b", "type": "proxy", "base_url": air_b, "api_key": AIR_KEY}],
    }, tmp_path_factory.mktemp("air-front"))
    front.start()
    try:
        base = f"http://127.0.0.1:{front.port}"
        wait_until(lambda: health(base)["credentials"]["b"]["remote"].get("synced_at"), what="first sync")
        code, _, raw = chat(base, "sk-front", "gpt-4o-mini")
        assert code == 200, f"front must forward the models B can serve: {code} {raw[:200]!r}"
        seen = mock.count("fail-429")
        code, _, raw = chat(base, "sk-front", "fail-429")
        assert code == 503, f"front refuses the cooling model itself: {code} {raw[:200]!r}"
        assert mock.count("fail-429") == seen, "no round trip to B for a model it reported unavailable"
    finally:
        front.stop()
