"""End-to-end harness: a real control plane, the real operator binary, a stand-in kubelet that
runs real `airouter` processes for the pods of the Deployments the operator creates, and a mock
OpenAI provider (the only mock: there is no internet).

There is no kubelet, scheduler or controller-manager here, so `Kubelet` does their part for the
operator's Deployments, the way the real ones would:

- it creates the Pod objects of a Deployment (labels and containers from its template);
- it "mounts" the `<pool>-config` Secret: the pod's process is started on that document;
- each pod gets its own loopback IP (127.x.y.z), and its process binds that address on the
  ports the config names (`airouter run --listen-host IP`), as a pod binds its pod IP;
- it writes the pod's status (Running, podIP, Ready) once the process answers readiness;
- as cluster DNS, it keeps a hosts file mapping `<service>.<namespace>.svc` to a ready pod of
  the Service, bind-mounted over /etc/hosts in each pod's own mount namespace (`unshare -m`),
  so a `proxy` Credential pointing at another RouterPool reaches that pool's pods.
"""

from __future__ import annotations

import base64
import http.server as http_server
import json
import os
import pathlib
import random
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

ROOT = pathlib.Path(__file__).resolve().parents[2]
TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
AIROUTER = pathlib.Path(os.environ.get("AIROUTER_BIN", TARGET / "debug" / "airouter"))
OPERATOR = pathlib.Path(os.environ.get("AIROUTER_OPERATOR_BIN", TARGET / "debug" / "airouter-operator"))


def wait_for(what: str, check, timeout: float = 30.0, interval: float = 0.05):
    """Polls `check` until it returns something truthy; fails naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last_error = None
    for _ in range(int(timeout / interval) + 1):
        if time.monotonic() >= deadline:
            break
        try:
            value = check()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - reported below if it never succeeds
            last_error = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}" + (f" (last error: {last_error})" if last_error else ""))


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports on 127.0.0.1: the sockets are held together, so no two are the
    same (ports picked one at a time can repeat once released)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 10.0):
    """One request; returns (status, headers, body bytes) for any status."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


# === control plane ===

class ControlPlane:
    def __init__(self, d: pathlib.Path):
        self.dir = d
        self.bin = pathlib.Path((d / "bin").read_text().strip())
        self.kubeconfig = d / "admin.kubeconfig"
        self.env = {"KUBECONFIG": str(self.kubeconfig), "PATH": "/usr/bin:/bin", "HOME": str(d)}

    @staticmethod
    def start(d: pathlib.Path) -> "ControlPlane":
        subprocess.run(["bash", str(ROOT / "tests" / "tools" / "control-plane.sh"), "start", str(d)], check=True, timeout=1800)
        return ControlPlane(d)

    def stop(self):
        subprocess.run(["bash", str(ROOT / "tests" / "tools" / "control-plane.sh"), "stop", str(self.dir)], timeout=60)

    def kubectl(self, *args, stdin: str | None = None, check: bool = True, timeout: float = 60):
        out = subprocess.run([str(self.bin / "kubectl"), *args], input=stdin, capture_output=True, text=True,
                             env=self.env, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {out.stderr}")
        return out

    def get(self, kind: str, name: str, ns: str | None = None) -> dict | None:
        args = ["get", kind, name, "-o", "json"] + (["-n", ns] if ns else [])
        out = self.kubectl(*args, check=False)
        if out.returncode != 0:
            if "NotFound" in out.stderr:
                return None
            raise AssertionError(out.stderr)
        return json.loads(out.stdout)

    def items(self, kind: str, ns: str, selector: str | None = None) -> list[dict]:
        args = ["get", kind, "-n", ns, "-o", "json"] + (["-l", selector] if selector else [])
        return json.loads(self.kubectl(*args).stdout)["items"]

    def apply(self, manifest: str, ns: str | None = None, server_side: bool = False) -> str:
        args = ["apply", "-f", "-"] + (["-n", ns] if ns else []) + (["--server-side"] if server_side else [])
        return self.kubectl(*args, stdin=manifest).stdout

    def new_namespace(self, prefix: str) -> str:
        ns = f"{prefix}-{random.randrange(16**6):06x}"
        self.kubectl("create", "namespace", ns)
        return ns

    def condition(self, kind: str, name: str, ns: str, type_: str) -> dict | None:
        obj = self.get(kind, name, ns)
        for c in ((obj or {}).get("status") or {}).get("conditions") or []:
            if c["type"] == type_:
                return c
        return None


# === the operator ===

class Operator:
    """The real `airouter-operator` binary against the control plane."""

    def __init__(self, cp: ControlPlane, log_dir: pathlib.Path, name: str, lease_namespace: str,
                 extra: list[str] | None = None, args: list[str] | None = None,
                 kubeconfig: pathlib.Path | None = None):
        """Runs the operator with the test defaults, or with exactly `args` (the chart's, say)
        plus a local metrics port; `kubeconfig` selects whose credentials it uses."""
        self.metrics_port = free_port()
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.log = open(self.log_path, "w")
        if args is None:
            args = ["run", "--lease-namespace", lease_namespace, "--identity", name,
                    "--lease-duration", "4s", "--lease-grace", "1s",
                    "--live-state-interval", "1s", "--push-timeout", "2s",
                    "--dataplane-image", "ghcr.io/airouter/airouter:e2e"]
        args = [a for a in args if not a.startswith("--metrics-addr")]
        args += ["--metrics-addr", f"127.0.0.1:{self.metrics_port}", *(extra or [])]
        env = {**cp.env, "RUST_LOG": "info,airouter_operator=debug,kube=warn", "POD_NAME": name}
        if kubeconfig:
            env["KUBECONFIG"] = str(kubeconfig)
        self.proc = subprocess.Popen([str(OPERATOR), *args], stdout=self.log, stderr=subprocess.STDOUT, env=env)
        # An exit is an answer too: the RBAC test runs operators that lack a permission.
        wait_for(f"operator {name} /readyz (or its exit)",
                 lambda: self.proc.poll() is not None or self.get("/readyz")[0] == 200, timeout=30)

    def get(self, path: str):
        try:
            return http("GET", f"http://127.0.0.1:{self.metrics_port}{path}", timeout=2)
        except OSError:
            return 0, {}, b""

    def metrics(self) -> dict[str, float]:
        """Samples by `name{labels}`, parsed with prometheus_client's OpenMetrics parser."""
        from prometheus_client.openmetrics.parser import text_string_to_metric_families
        status, _, body = self.get("/metrics")
        assert status == 200, status
        out = {}
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}"] = s.value
        return out

    def metric(self, name: str, **labels) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        total = 0.0
        for key, value in self.metrics().items():
            sample, _, rest = key.partition("{")
            have = dict(kv.split("=", 1) for kv in rest.rstrip("}").split(",") if kv)
            if sample == name and all(have.get(k) == v for k, v in labels.items()):
                total += value
        return total

    def is_leader(self) -> bool:
        return self.metric("airouter_operator_leader") == 1

    def stop(self, sig=signal.SIGTERM, timeout: float = 20):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# === the mock provider ===

class MockProvider:
    """An OpenAI-compatible provider on loopback. Answers by API key: `fail[key] = status` makes
    that key fail; every request is recorded as (key, model)."""

    def __init__(self):
        self.requests: list[tuple[str, str]] = []
        self.fail: dict[str, int] = {}
        self.lock = threading.Lock()
        mock = self

        class Handler(http_server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
                key = (self.headers.get("authorization") or "").removeprefix("Bearer ")
                model = body.get("model", "")
                with mock.lock:
                    mock.requests.append((key, model))
                    status = mock.fail.get(key)
                if status:
                    payload = json.dumps({"error": {"message": f"mock failure {status}", "type": "mock", "code": status}}).encode()
                else:
                    status = 200
                    payload = json.dumps({
                        "id": "chatcmpl-mock", "object": "chat.completion", "created": 0, "model": model,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": f"hello from {key[-6:]}"},
                                     "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
                    }).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = http_server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def keys_seen(self) -> list[str]:
        with self.lock:
            return [k for k, _ in self.requests]

    def clear(self):
        with self.lock:
            self.requests.clear()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


# === the stand-in kubelet ===

@dataclass
class StandInPod:
    name: str
    namespace: str
    pool: str
    ip: str
    dir: pathlib.Path
    proc: subprocess.Popen
    log: object
    admin_port: int = 9090
    public_port: int = 8080
    extra: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.public_port}"

    def admin(self, path: str, token: str):
        status, _, body = http("GET", f"http://{self.ip}:{self.admin_port}{path}",
                               headers={"authorization": f"Bearer {token}"}, timeout=5)
        assert status == 200, (status, body)
        return json.loads(body)


class Kubelet:
    """Runs the pods of the operator's Deployments as real airouter processes (see module doc)."""

    def __init__(self, cp: ControlPlane, work: pathlib.Path):
        self.cp = cp
        self.work = work
        self.hosts = work / "hosts"
        self.pods: dict[tuple[str, str], StandInPod] = {}
        self.services: dict[str, str] = {}
        self.base = f"127.{random.randrange(100, 250)}.{random.randrange(0, 250)}"
        self.next_ip = 2
        self._write_hosts()

    def _write_hosts(self):
        lines = ["127.0.0.1 localhost"]
        lines += [f"{ip} {svc} {svc}.cluster.local" for svc, ip in sorted(self.services.items())]
        # Rewritten in place: the pods' bind mounts see the same inode.
        with open(self.hosts, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _ip(self) -> str:
        ip = f"{self.base}.{self.next_ip}"
        self.next_ip += 1
        return ip

    def run_deployment(self, ns: str, pool: str, replicas: int | None = None,
                       document: str | None = None) -> list[StandInPod]:
        """Creates and starts the Deployment's pods (spec.replicas of them unless given). With
        `document`, pods start on it instead of the config Secret (a stale mount)."""
        deployment = wait_for(f"Deployment {ns}/{pool}", lambda: self.cp.get("deployment", pool, ns))
        template = deployment["spec"]["template"]
        count = deployment["spec"]["replicas"] if replicas is None else replicas
        started = []
        for i in range(count):
            name = f"{pool}-{i}"
            if (ns, name) in self.pods:
                continue
            started.append(self.start_pod(ns, pool, name, template, document))
        return started

    def start_pod(self, ns: str, pool: str, name: str, template: dict, document: str | None = None) -> StandInPod:
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": template["metadata"]["labels"]},
            "spec": template["spec"],
        }
        self.cp.apply(json.dumps(pod))
        if document is None:
            secret = wait_for(f"Secret {ns}/{pool}-config", lambda: self.cp.get("secret", f"{pool}-config", ns))
            document = base64.b64decode(secret["data"]["config.yaml"]).decode()
        d = self.work / ns / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.yaml").write_text(document)
        ip = self._ip()
        log = open(d / "airouter.log", "w")
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             'mount --bind "$0" /etc/hosts && exec "$@"', str(self.hosts),
             str(AIROUTER), "run", "--config", str(d / "config.yaml"), "--listen-host", ip],
            stdout=log, stderr=subprocess.STDOUT)
        sp = StandInPod(name=name, namespace=ns, pool=pool, ip=ip, dir=d, proc=proc, log=log)
        wait_for(f"pod {ns}/{name} readiness on {ip}",
                 lambda: proc.poll() is None and http("GET", f"{sp.url}/health/readiness", timeout=1)[0] == 200,
                 timeout=20)
        if proc.poll() is not None:
            raise AssertionError(f"pod {name} exited: {(d / 'airouter.log').read_text()}")
        self.set_ready(sp, True)
        self.pods[(ns, name)] = sp
        self.services.setdefault(f"{pool}.{ns}.svc", ip)
        self._write_hosts()
        return sp

    def set_ready(self, sp: StandInPod, ready: bool):
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        status = {"status": {
            "phase": "Running", "podIP": sp.ip, "podIPs": [{"ip": sp.ip}], "hostIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": now}],
        }}
        self.cp.kubectl("patch", "pod", sp.name, "-n", sp.namespace, "--subresource=status", "--type=merge",
                        "-p", json.dumps(status))

    def stop_pod(self, sp: StandInPod):
        """Stops the pod's process and deletes its Pod object, as a kubelet would."""
        self.cp.kubectl("delete", "pod", sp.name, "-n", sp.namespace, "--grace-period=0", "--force",
                        "--wait=false", check=False)
        if sp.proc.poll() is None:
            sp.proc.terminate()
            try:
                sp.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                sp.proc.kill()
                sp.proc.wait()
        sp.log.close()
        self.pods.pop((sp.namespace, sp.name), None)

    def stop_all(self):
        for sp in list(self.pods.values()):
            sp.proc.kill()
        for sp in list(self.pods.values()):
            sp.proc.wait()
            sp.log.close()
        self.pods.clear()
