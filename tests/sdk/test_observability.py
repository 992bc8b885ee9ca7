"""Observability through real clients: `/metrics` read by the Prometheus project's own
parser, `/vhealth` rendered by headless Chromium (its DOM after the page's script ran, and a
screenshot)."""

from __future__ import annotations

import json
import re
import os
import pathlib
import shutil
import subprocess
import urllib.error
import urllib.request

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from test_openai_sdk import RouterProcess, free_port

MASTER = "sk-observe"
ADMIN = "adm-observe-token"


def opener():
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def call(url, body=None, token=MASTER, method=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    if data:
        req.add_header("Content-Type", "application/json")
    try:
        with opener().open(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    dead = free_port()  # nothing listens there: connection refused
    cfg = {
        "server": {"master_key": MASTER, "admin_port": free_port(), "admin_token": ADMIN, "max_provider_retries": 0},
        "monitoring": {"prometheus_enabled": True},
        "fail2ban": {"max_attempts": 1, "ban_duration": "10m", "error_codes": [502]},
        "credentials": [
            {"name": "primary-mock", "type": "mock", "rpm": 2, "mock": {"prompt_tokens": 4, "completion_tokens": 6}},
            {"name": "backup-mock", "type": "mock", "is_fallback": True, "rpm": 1},
            {"name": "broken", "type": "openai", "api_key": "sk-never-logged", "base_url": f"http://127.0.0.1:{dead}"},
        ],
        "models": [
            {"name": "gpt-4o-mini", "credential": "primary-mock"},
            {"name": "gpt-4o-mini", "credential": "backup-mock"},
            {"name": "flaky", "credential": "broken"},
        ],
    }
    proc = RouterProcess(cfg, tmp_path_factory.mktemp("observe"))
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def root(router) -> str:
    return f"http://127.0.0.1:{router.port}"


def test_metrics_parse_with_the_prometheus_parser(router):
    chat = f"{root(router)}/v1/chat/completions"
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    statuses = [call(chat, body)[0] for _ in range(4)]
    # rpm 2 on the primary, then the fallback (rpm 1), then exhaustion.
    assert statuses == [200, 200, 200, 503], statuses
    assert call(chat, {"model": "flaky", "messages": []})[0] == 502  # connection refused, banned

    status, text = call(f"{root(router)}/metrics", token="")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text.decode())}

    def samples(family, name=None, **labels):
        return [
            s for s in families[family].samples
            if (name is None or s.name == name) and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def value(family, name=None, **labels):
        found = samples(family, name, **labels)
        assert len(found) == 1, (family, labels, found)
        return found[0].value

    for name in [
        "auto_ai_router_requests", "auto_ai_router_requests_duration_seconds",
        "auto_ai_router_credential_errors", "auto_ai_router_credential_rpm_current",
        "auto_ai_router_credential_tpm_current", "auto_ai_router_model_rpm_current",
        "auto_ai_router_model_tpm_current", "auto_ai_router_credential_selection_rejected",
        "auto_ai_router_credential_ban_events", "auto_ai_router_credential_banned",
        "airouter_request_duration_seconds", "airouter_upstream_ttfb_seconds", "airouter_tokens",
        "airouter_fallbacks", "airouter_exhausted", "airouter_bans", "airouter_config_reloads",
        "airouter_config_info",
    ]:
        assert name in families, f"{name} missing from /metrics"

    assert families["auto_ai_router_requests"].type == "counter"
    assert value("auto_ai_router_requests", "auto_ai_router_requests_total",
                 credential="primary-mock", endpoint="/v1/chat/completions", status="200") == 2
    assert value("auto_ai_router_requests", "auto_ai_router_requests_total",
                 credential="broken", endpoint="/v1/chat/completions", status="502") == 1
    assert value("auto_ai_router_credential_errors", "auto_ai_router_credential_errors_total", credential="broken") == 1
    assert value("auto_ai_router_credential_rpm_current", credential="primary-mock") == 2
    assert value("auto_ai_router_credential_tpm_current", credential="primary-mock") == 20
    assert value("auto_ai_router_credential_banned", credential="broken") == 1
    assert value("auto_ai_router_credential_banned", credential="primary-mock") == 0
    assert value("auto_ai_router_credential_ban_events", "auto_ai_router_credential_ban_events_total",
                 credential="broken", model="flaky", error_code="502") == 1
    assert value("airouter_tokens", "airouter_tokens_total", credential="primary-mock",
                 model="gpt-4o-mini", kind="total") == 20
    assert value("airouter_tokens", "airouter_tokens_total", credential="primary-mock",
                 model="gpt-4o-mini", kind="prompt") == 8
    assert value("airouter_fallbacks", "airouter_fallbacks_total", model="gpt-4o-mini") == 1
    assert value("airouter_exhausted", "airouter_exhausted_total", model="gpt-4o-mini", reason="rate_limited") == 1
    assert value("auto_ai_router_credential_selection_rejected",
                 "auto_ai_router_credential_selection_rejected_total", reason="rate_limit") >= 3
    assert value("airouter_request_duration_seconds", "airouter_request_duration_seconds_count",
                 model="gpt-4o-mini", credential="backup-mock", status="200") == 1
    assert value("airouter_config_reloads", "airouter_config_reloads_total", source="startup", result="success") == 1

    admin = f"http://127.0.0.1:{router.cfg['server']['admin_port']}"
    status, body = call(f"{admin}/admin/config/hash", token=ADMIN)
    assert status == 200
    running = json.loads(body)["hash"]
    info = samples("airouter_config_info")
    assert [s.labels["hash"] for s in info] == [running]

    # The admin port serves the same metrics, and neither leaks a key.
    status, admin_text = call(f"{admin}/metrics", token=ADMIN)
    assert status == 200 and b"auto_ai_router_requests_total" in admin_text
    for secret in (b"sk-never-logged", MASTER.encode(), ADMIN.encode()):
        assert secret not in text and secret not in admin_text


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "chromium is not installed (tests/run.sh installs Debian's chromium)"
    return path


CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=4000", "--window-size=1280,900",
]


def test_vhealth_dashboard_renders_in_chromium(router, tmp_path):
    # A pair to show banned, whether or not the metrics test ran first (502 bans at once; a
    # banned pair answers 503).
    flaky = call(f"{root(router)}/v1/chat/completions", {"model": "flaky", "messages": []})[0]
    assert flaky in (502, 503), flaky
    url = f"{root(router)}/vhealth"
    status, html = call(url, token="")
    assert status == 200
    assert b"<script" in html and b"http://" not in html and b"https://" not in html, "no external assets"

    profile = tmp_path / "profile"
    dom = subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
        capture_output=True, timeout=90, text=True,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    rendered = dom.stdout
    # The page's script fetched /health and filled the tables.
    for name in ("primary-mock", "backup-mock", "broken", "flaky"):
        assert name in rendered, f"{name} not rendered:\n{rendered[:3000]}"
    # (The static page already holds the words "healthy" and "banned": look for what the script
    # writes.)
    assert "loading…" not in rendered, rendered[:3000]
    assert re.search(r'<span id="status" class="(\w+)">\1</span>', rendered), rendered[:3000]
    assert 'class="pill bad">banned' in rendered, rendered[:3000]

    shot = pathlib.Path(os.environ.get("AIROUTER_SCREENSHOT_DIR", tmp_path)) / "vhealth.png"
    res = subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}", url],
        capture_output=True, timeout=90, text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, len(data)
