"""The operator end to end: the real `airouter-operator` against the real API server, with
stand-in pods running the real `airouter` (see cluster.py for how pods exist without a kubelet),
and a mock OpenAI provider. One namespace per test."""

from __future__ import annotations

import base64
import datetime
import json
import pathlib
import signal
import socket
import subprocess
import statistics
import tempfile
import time

import pytest

from cluster import ROOT, TARGET, Kubelet, MockProvider, Operator, free_port, free_ports, http, wait_for

EXAMPLES = ROOT / "examples" / "kubernetes"
LEASE_NS = "airouter-system"


class Env:
    def __init__(self, cp, work: pathlib.Path):
        self.cp = cp
        self.work = work
        self.mock = MockProvider()
        self.kubelet = Kubelet(cp, work)
        self.operators: list[Operator] = []
        if cp.get("namespace", LEASE_NS) is None:
            cp.kubectl("create", "namespace", LEASE_NS)
        self.operator = self.start_operator("operator-0")

    def start_operator(self, name: str, extra: list[str] | None = None) -> Operator:
        op = Operator(self.cp, self.work, name, LEASE_NS, extra)
        self.operators.append(op)
        assert op.proc.poll() is None, f"operator {name} exited at start:\n{op.log_path.read_text()[-3000:]}"
        return op

    def stop(self):
        for op in self.operators:
            op.stop()
        self.kubelet.stop_all()
        self.mock.stop()


@pytest.fixture(scope="module")
def env(control_plane):
    work = pathlib.Path(tempfile.mkdtemp(prefix="airouter-e2e-"))
    e = Env(control_plane, work)
    try:
        yield e
    finally:
        e.stop()


# === helpers ===

def admin_token(cp, ns: str, pool: str) -> str:
    secret = wait_for(f"Secret {ns}/{pool}-admin", lambda: cp.get("secret", f"{pool}-admin", ns))
    return base64.b64decode(secret["data"]["token"]).decode()


def master_key(cp, ns: str, secret: str) -> str:
    return base64.b64decode(cp.get("secret", secret, ns)["data"]["key"]).decode()


def chat(pod, key: str, model: str = "gpt-4o-mini"):
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
    status, _, reply = http("POST", f"{pod.url}/v1/chat/completions", body,
                            {"authorization": f"Bearer {key}", "content-type": "application/json"})
    return status, json.loads(reply) if reply else None


def wait_ready(cp, kind: str, name: str, ns: str, timeout: float = 30):
    return wait_for(f"{kind} {ns}/{name} Ready=True",
                    lambda: (cp.condition(kind, name, ns, "Ready") or {}).get("status") == "True", timeout)


def wait_not_ready(cp, kind: str, name: str, ns: str, reason: str, timeout: float = 30) -> dict:
    """Waits for Ready=False with `reason` and returns the condition. A pool applied in one
    document with its Credentials can first say, for a moment, that it selects none resolved;
    the reason a test is after comes once the operator has seen them."""
    last = {}

    def check():
        nonlocal last
        last = cp.condition(kind, name, ns, "Ready") or {}
        return last.get("status") == "False" and last.get("reason") == reason and last

    try:
        return wait_for(f"{kind} {ns}/{name} Ready=False ({reason})", check, timeout)
    except AssertionError as e:
        raise AssertionError(f"{e}; the last Ready condition: {last}") from None


def examples(ns: str, mock_url: str) -> str:
    text = "\n---\n".join(p.read_text() for p in sorted(EXAMPLES.glob("*.yaml")))
    return (text.replace("airouter-demo", ns)
            .replace("https://api.openai.com", mock_url)
            .replace("-REPLACE-ME", "-e2e"))


def events(cp, ns: str, reason: str) -> list[dict]:
    return [e for e in cp.items("events.events.k8s.io", ns) if e.get("reason") == reason]


def state_of(pod, token: str, credential: str) -> dict | None:
    for c in pod.admin("/admin/state", token)["credentials"]:
        if c["name"] == credential:
            return c
    return None


def one_pod_pool(env, ns: str, credential: str):
    """A ready pool `p` of one pod serving one Credential; returns (pod, admin token)."""
    env.cp.apply(simple_pool(ns, env.mock.url, replicas=1, credentials={credential: {}}))
    [pod] = env.kubelet.run_deployment(ns, "p")
    wait_ready(env.cp, "routerpool", "p", ns)
    return pod, admin_token(env.cp, ns, "p")


def simple_pool(ns: str, mock_url: str, replicas: int = 2, credentials: dict[str, dict] | None = None) -> str:
    """A pool `p` selecting Credentials labelled pool=p, each an openai key at the mock."""
    docs = [f"""
apiVersion: v1
kind: Secret
metadata: {{name: master, namespace: {ns}}}
stringData: {{key: sk-master-{ns}}}
---
apiVersion: airouter.dev/v1alpha1
kind: RouterPool
metadata: {{name: p, namespace: {ns}}}
spec:
  replicas: {replicas}
  credentialSelector: {{matchLabels: {{pool: p}}}}
  masterKeySecretRef: {{name: master, key: key}}
"""]
    for name, spec in (credentials or {}).items():
        docs.append(credential(ns, name, mock_url, **spec))
    return "\n---\n".join(docs)


def credential(ns: str, name: str, mock_url: str, secret: str | None = None, rpm: int = 1000,
               with_secret: bool = True) -> str:
    secret = secret or f"key-{name}"
    doc = f"""
apiVersion: airouter.dev/v1alpha1
kind: Credential
metadata: {{name: {name}, namespace: {ns}, labels: {{pool: p}}}}
spec:
  type: openai
  baseUrl: {mock_url}
  apiKeySecretRef: {{name: {secret}, key: key}}
  rpm: {rpm}
"""
    if with_secret:
        doc += f"""---
apiVersion: v1
kind: Secret
metadata: {{name: {secret}, namespace: {ns}}}
stringData: {{key: sk-{name}-v1}}
"""
    return doc


# === tests ===

def test_examples_become_ready_and_route_round_robin_then_fall_back(env):
    cp, mock, kubelet = env.cp, env.mock, env.kubelet
    ns = f"demo-{int(time.time()) % 100000}"
    out = cp.apply(examples(ns, mock.url))
    assert "routerpool.airouter.dev/main created" in out, out
    [backup] = kubelet.run_deployment(ns, "backup")
    main = kubelet.run_deployment(ns, "main")
    assert len(main) == 2, "spec.replicas of the example is 2"
    for pool in ("main", "backup"):
        wait_ready(cp, "routerpool", pool, ns)
    for cred in ("openai-primary-a", "openai-primary-b", "to-backup", "openai-backup"):
        wait_ready(cp, "credential", cred, ns)
    status = cp.get("routerpool", "main", ns)["status"]
    assert (status["readyReplicas"], status["syncedReplicas"]) == (2, 2), status
    assert (status["primaryCredentials"], status["fallbackCredentials"]) == (2, 1), status
    assert status["endpoint"] == f"http://main.{ns}.svc:8080"
    assert status["observedGeneration"] == cp.get("routerpool", "main", ns)["metadata"]["generation"]
    token = admin_token(cp, ns, "main")
    for pod in main:
        assert pod.admin("/admin/config/hash", token)["hash"] == status["configHash"]
    cred = cp.get("credential", "openai-primary-a", ns)
    assert cred["status"]["pools"] == ["main"], cred["status"]

    # Round-robin over the two primaries, through one pod (each pod has its own cursor).
    key = master_key(cp, ns, "main-master-key")
    mock.clear()
    for _ in range(4):
        code, reply = chat(main[0], key)
        assert code == 200, reply
    seen = mock.keys_seen()
    assert seen[0] != seen[1] and seen[0] == seen[2] and seen[1] == seen[3], seen
    assert set(seen) == {"sk-openai-primary-a-e2e", "sk-openai-primary-b-e2e"}, seen

    # Every primary exhausted (429, banned by the example's rule) → the fallback proxy → the
    # backup pool's pod → its own credential.
    mock.fail.update({"sk-openai-primary-a-e2e": 429, "sk-openai-primary-b-e2e": 429})
    mock.clear()
    code, reply = chat(main[0], key, model="fast")
    assert code == 200, reply
    assert mock.keys_seen()[-1] == "sk-openai-backup-e2e", mock.keys_seen()
    assert reply["choices"][0]["message"]["content"] == "hello from up-e2e"
    # The data plane's bans reach the Credential's status and Events.
    wait_for("openai-primary-a banned in status",
             lambda: ((cp.get("credential", "openai-primary-a", ns)["status"].get("live") or {}).get("banned")))
    wait_for("a Banned Event", lambda: events(cp, ns, "Banned"))
    table = cp.kubectl("get", "credentials", "-n", ns).stdout
    header, *rows = [line.split() for line in table.splitlines()]
    row = next(r for r in rows if r[0] == "openai-primary-a")
    assert row[header.index("BANNED")] == "true", table
    mock.fail.clear()
    for pod in (*main, backup):
        kubelet.stop_pod(pod)


def test_a_missing_secret_leaves_the_credential_out_and_the_rest_serving(env):
    cp, mock, kubelet = env.cp, env.mock, env.kubelet
    ns = cp.new_namespace("secret")
    cp.apply(simple_pool(ns, mock.url, replicas=1, credentials={"good": {}, "orphan": {"with_secret": False}}))
    [pod] = kubelet.run_deployment(ns, "p")
    wait_ready(cp, "routerpool", "p", ns)
    orphan = wait_for("orphan Ready=False",
                      lambda: (c := cp.condition("credential", "orphan", ns, "Ready")) and c["status"] == "False" and c)
    assert orphan["reason"] == "SecretNotFound", orphan
    assert "key-orphan" in orphan["message"], orphan
    ready = cp.condition("routerpool", "p", ns, "Ready")
    assert "Credential orphan (SecretNotFound)" in ready["message"], ready
    token = admin_token(cp, ns, "p")
    names = [c["name"] for c in pod.admin("/admin/state", token)["credentials"]]
    assert names == ["good"], names
    code, _ = chat(pod, f"sk-master-{ns}")
    assert code == 200
    assert events(cp, ns, "SecretNotFound")

    # The Secret appears: the Credential is resolved and pushed to the pod.
    cp.apply(f"apiVersion: v1\nkind: Secret\nmetadata: {{name: key-orphan, namespace: {ns}}}\nstringData: {{key: sk-orphan}}\n")
    wait_ready(cp, "credential", "orphan", ns)
    wait_for("orphan in the pod's config",
             lambda: [c["name"] for c in pod.admin("/admin/state", token)["credentials"]] == ["good", "orphan"])

    # Credentials the schema lets through but the data plane would refuse (a query string in
    # baseUrl), or that would proxy back to their own pool, are left out too and say why on
    # themselves; the config the pods get stays one they accept.
    cp.apply(f"""
apiVersion: airouter.dev/v1alpha1
kind: Credential
metadata: {{name: queried, namespace: {ns}, labels: {{pool: p}}}}
spec: {{type: openai, baseUrl: "{mock.url}/v1?x=1", apiKeySecretRef: {{name: key-good, key: key}}}}
---
apiVersion: airouter.dev/v1alpha1
kind: Credential
metadata: {{name: loop, namespace: {ns}, labels: {{pool: p}}}}
spec: {{type: proxy, proxy: {{routerPoolRef: {{name: p}}}}}}
""")
    for name, says in (("queried", "spec.baseUrl: base_url must not have a query string"),
                       ("loop", "cannot fall back to itself")):
        c = wait_for(f"{name} Ready=False", lambda: (c := cp.condition("credential", name, ns, "Ready"))
                     and c["status"] == "False" and c)
        assert c["reason"] == "Invalid" and says in c["message"], c
        wait_for(f"the pool names {name}",
                 lambda: f"Credential {name} (Invalid)" in cp.condition("routerpool", "p", ns, "Ready")["message"])
    wait_ready(cp, "routerpool", "p", ns)
    assert [c["name"] for c in pod.admin("/admin/state", token)["credentials"]] == ["good", "orphan"]
    code, _ = chat(pod, f"sk-master-{ns}")
    assert code == 200
    kubelet.stop_pod(pod)


def test_replicas_share_their_limits_in_redis(env, tmp_path):
    """`spec.rateLimit.backend: redis`: the URL comes from a Secret (a missing one is a
    condition naming the field), the limits reach the pods whole, and two pods together admit
    exactly the credential's RPM through a real redis-server."""
    cp, mock, kubelet = env.cp, env.mock, env.kubelet
    port = free_port()
    redis = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                              "--appendonly", "no", "--requirepass", "e2e-redis-pass", "--dir", str(tmp_path)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ns = cp.new_namespace("redis")
        cp.apply(simple_pool(ns, mock.url, replicas=2, credentials={"c1": {"rpm": 3}}))
        cp.kubectl("patch", "routerpool", "p", "-n", ns, "--type=merge", "-p", json.dumps(
            {"spec": {"rateLimit": {"backend": "redis", "redis": {"urlSecretRef": {"name": "redis", "key": "url"}}}}}))
        ready = wait_not_ready(cp, "routerpool", "p", ns, "SecretNotFound")
        assert "spec.rateLimit.redis.urlSecretRef" in ready["message"], ready

        url = f"redis://:e2e-redis-pass@127.0.0.1:{port}/0"
        wait_for("redis-server answers", lambda: redis_ping(port))
        cp.kubectl("-n", ns, "create", "secret", "generic", "redis", f"--from-literal=url={url}")
        pods = kubelet.run_deployment(ns, "p")
        assert len(pods) == 2
        wait_ready(cp, "routerpool", "p", ns)
        config = base64.b64decode(cp.get("secret", "p-config", ns)["data"]["config.yaml"]).decode()
        assert "backend: redis" in config and f"key_prefix: {ns}/p" in config and "replicas: 2" in config, config
        assert "rpm: 3" in config, "with Redis the limit is not split per replica"

        key = f"sk-master-{ns}"
        assert [chat(pod, key)[0] for pod in (pods[0], pods[1], pods[0])] == [200, 200, 200]
        assert [chat(pod, key)[0] for pod in pods] == [503, 503], "3 RPM for the pool, not per pod"

        # The password never shows in what the operator writes for people to read.
        pool = json.dumps(cp.get("routerpool", "p", ns))
        evts = json.dumps(cp.items("events.events.k8s.io", ns))
        assert "e2e-redis-pass" not in pool and "e2e-redis-pass" not in evts
        for pod in pods:
            kubelet.stop_pod(pod)
    finally:
        redis.kill()
        redis.wait()


def test_replicas_share_their_limits_in_a_redis_cluster(env, tmp_path):
    """`spec.rateLimit.redis.cluster: true`: the Secret names one node of a real three-node
    Redis Cluster; the pods learn the rest from it and together admit exactly the RPM."""
    cp, mock, kubelet = env.cp, env.mock, env.kubelet
    picked = free_ports(6)
    ports, buses = picked[:3], picked[3:]
    nodes = []
    try:
        for port, bus in zip(ports, buses):
            d = tmp_path / str(port)
            d.mkdir()
            nodes.append(subprocess.Popen(
                # The bus port is port + 10000 unless given: past 65535 for a high free port.
                ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                 "--cluster-enabled", "yes", "--cluster-port", str(bus),
                 "--cluster-config-file", "nodes.conf", "--dir", str(d)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in ports:
            wait_for(f"redis-server on {port} answers", lambda port=port: redis_ping(port))
        subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
        for port in ports:
            wait_for(f"node {port} sees the cluster ok", lambda port=port: "cluster_state:ok" in subprocess.run(
                ["redis-cli", "-p", str(port), "cluster", "info"], capture_output=True, text=True, timeout=10).stdout)

        ns = cp.new_namespace("redis-cluster")
        cp.kubectl("-n", ns, "create", "secret", "generic", "redis",
                   f"--from-literal=url=redis://127.0.0.1:{ports[1]}")
        cp.apply(simple_pool(ns, mock.url, replicas=2, credentials={"c1": {"rpm": 3}}))
        cp.kubectl("patch", "routerpool", "p", "-n", ns, "--type=merge", "-p", json.dumps(
            {"spec": {"rateLimit": {"backend": "redis",
                                    "redis": {"urlSecretRef": {"name": "redis", "key": "url"}, "cluster": True}}}}))
        pods = kubelet.run_deployment(ns, "p")
        wait_ready(cp, "routerpool", "p", ns)
        config = base64.b64decode(cp.get("secret", "p-config", ns)["data"]["config.yaml"]).decode()
        assert "cluster: true" in config, config

        key = f"sk-master-{ns}"
        assert [chat(pod, key)[0] for pod in (pods[0], pods[1], pods[0])] == [200, 200, 200]
        assert [chat(pod, key)[0] for pod in pods] == [503, 503], "3 RPM for the pool, held by the cluster"
        keys = [int(subprocess.run(["redis-cli", "-p", str(p), "dbsize"], capture_output=True, text=True,
                                   timeout=10).stdout)
                for p in ports]
        assert sum(1 for n in keys if n) == 1, f"the pool's keys are in one slot: {keys}"
        for pod in pods:
            kubelet.stop_pod(pod)
    finally:
        for n in nodes:
            n.kill()
            n.wait()


def test_a_trusted_ca_bundle_reaches_the_pods_and_its_rotation_rolls_them(env):
    """`spec.trustedCA`: a missing ConfigMap is a condition naming it; once it exists the pods
    mount it as SSL_CERT_FILE, and a new bundle changes the pod template (a rollout) while the
    config, which is pushed, keeps its hash."""
    cp, mock, kubelet = env.cp, env.mock, env.kubelet
    ns = cp.new_namespace("ca")
    cp.apply(simple_pool(ns, mock.url, replicas=1, credentials={"c1": {}}))
    cp.kubectl("patch", "routerpool", "p", "-n", ns, "--type=merge", "-p",
               json.dumps({"spec": {"trustedCA": {"name": "corp-ca", "key": "ca.pem"}}}))
    ready = wait_not_ready(cp, "routerpool", "p", ns, "ConfigMapNotFound")
    assert f"ConfigMap {ns}/corp-ca (from spec.trustedCA)" in ready["message"], ready

    def bundle(n: int) -> str:
        return json.dumps({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "corp-ca", "namespace": ns},
                           "data": {"ca.pem": f"-----BEGIN CERTIFICATE-----\nMIIB{n}\n-----END CERTIFICATE-----\n"}})

    cp.apply(bundle(1))
    [pod] = kubelet.run_deployment(ns, "p")
    wait_ready(cp, "routerpool", "p", ns)
    template = cp.get("deployment", "p", ns)["spec"]["template"]
    [container] = template["spec"]["containers"]
    assert {"name": "SSL_CERT_FILE", "value": "/etc/airouter-trusted-ca/ca.pem"} in container["env"]
    [volume] = [v for v in template["spec"]["volumes"] if v["name"] == "trusted-ca"]
    assert volume["configMap"]["name"] == "corp-ca", volume
    first = template["metadata"]["annotations"]["airouter.dev/trusted-ca-hash"]
    config_hash = cp.get("routerpool", "p", ns)["status"]["configHash"]

    cp.apply(bundle(2))
    rolled = wait_for("a new trusted-ca hash on the pod template", lambda: (
        h := cp.get("deployment", "p", ns)["spec"]["template"]["metadata"]["annotations"]["airouter.dev/trusted-ca-hash"]
    ) != first and h)
    assert rolled != first
    assert cp.get("routerpool", "p", ns)["status"]["configHash"] == config_hash, "the config itself did not change"
    kubelet.stop_pod(pod)


def redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def test_a_pod_that_starts_on_a_stale_config_is_brought_up_to_date(env):
    """The mounted Secret lags behind (kubelet refreshes it within a minute): a pod turning
    Ready gets the current config pushed at once."""
    cp, mock, kubelet = env.cp, env.mock, env.kubelet
    ns = cp.new_namespace("stale")
    cp.apply(simple_pool(ns, mock.url, replicas=2, credentials={"c1": {}}))
    [first] = kubelet.run_deployment(ns, "p", replicas=1)
    wait_for("p-config", lambda: cp.get("secret", "p-config", ns))
    stale = base64.b64decode(cp.get("secret", "p-config", ns)["data"]["config.yaml"]).decode()
    cp.apply(credential(ns, "c2", mock.url))
    token = admin_token(cp, ns, "p")
    wait_for("c2 on the first pod", lambda: state_of(first, token, "c2"))
    [second] = kubelet.run_deployment(ns, "p", document=stale)
    wait_for("c2 pushed to the pod that started without it", lambda: state_of(second, token, "c2"), timeout=10)
    wait_ready(cp, "routerpool", "p", ns)
    status = cp.get("routerpool", "p", ns)["status"]
    assert status["syncedReplicas"] == 2, status
    assert second.admin("/admin/config/hash", token)["hash"] == status["configHash"]

    # A pod that stops answering while its Pod object still says Ready: the push to it fails,
    # the pool says which pod and why, and a SyncFailed Event is published.
    second.proc.kill()
    second.proc.wait()
    cp.kubectl("patch", "credential", "c1", "-n", ns, "--type=merge", "-p", json.dumps({"spec": {"rpm": 1500}}))
    synced = wait_for("ConfigSynced=False", lambda: (c := cp.condition("routerpool", "p", ns, "ConfigSynced"))
                      and c["status"] == "False" and c)
    assert synced["reason"] == "PushFailed" and f"pod {second.name} unreachable" in synced["message"], synced
    assert cp.get("routerpool", "p", ns)["status"]["syncedReplicas"] == 1
    wait_for("a SyncFailed Event", lambda: events(cp, ns, "SyncFailed"))
    assert (state_of(first, token, "c1") or {}).get("rpm", {}).get("limit") == 750, "the live pod got it"
    for pod in (first, second):
        kubelet.stop_pod(pod)


def test_an_admin_token_emptied_by_hand_is_put_back(env):
    """The `<pool>-admin` Secret is the operator's: a token removed from it by hand comes back
    as the one the pods were pushed with, so pushes keep working."""
    cp, kubelet = env.cp, env.kubelet
    ns = cp.new_namespace("token")
    pod, token = one_pod_pool(env, ns, "c1")
    cp.kubectl("patch", "secret", "p-admin", "-n", ns, "--type=merge", "-p", json.dumps({"data": {"token": ""}}))
    wait_for("the token put back", lambda: admin_token(cp, ns, "p") == token)
    cp.kubectl("patch", "credential", "c1", "-n", ns, "--type=merge", "-p", json.dumps({"spec": {"rpm": 1200}}))
    wait_for("a push with it", lambda: (state_of(pod, token, "c1") or {}).get("rpm", {}).get("limit") == 1200)
    kubelet.stop_pod(pod)


def test_bad_specs_get_a_condition_not_a_crash(env):
    """Objects the API server accepted but the operator cannot use: an invalid label selector
    operator, a pool selecting nothing, and one written under an older, looser CRD schema (here
    `maxAttempts` as a string) that no longer reads as the current type."""
    cp, mock = env.cp, env.mock
    ns = cp.new_namespace("bad")
    crd_file = ROOT / "charts" / "airouter" / "crds" / "airouter.dev_routerpools.yaml"
    path = "/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/fail2ban/properties/maxAttempts"
    cp.kubectl("patch", "crd", "routerpools.airouter.dev", "--type=json",
               "-p", json.dumps([{"op": "replace", "path": path, "value": {"type": "string"}}]))
    try:
        wait_for("the loosened schema", lambda: "created" in cp.kubectl(
            "apply", "-f", "-", check=False, stdin=f"""
apiVersion: airouter.dev/v1alpha1
kind: RouterPool
metadata: {{name: overflow, namespace: {ns}}}
spec:
  credentialSelector: {{matchLabels: {{pool: p}}}}
  masterKeySecretRef: {{name: master, key: key}}
  fail2ban: {{maxAttempts: three}}
""").stdout)
    finally:
        cp.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd_file))
    cp.apply(f"""
apiVersion: v1
kind: Secret
metadata: {{name: master, namespace: {ns}}}
stringData: {{key: sk-master}}
---
apiVersion: airouter.dev/v1alpha1
kind: RouterPool
metadata: {{name: selector, namespace: {ns}}}
spec:
  credentialSelector: {{matchExpressions: [{{key: pool, operator: Sometimes, values: [p]}}]}}
  masterKeySecretRef: {{name: master, key: key}}
---
apiVersion: airouter.dev/v1alpha1
kind: RouterPool
metadata: {{name: empty, namespace: {ns}}}
spec:
  credentialSelector: {{matchLabels: {{pool: nobody}}}}
  masterKeySecretRef: {{name: master, key: key}}
""")
    for name, reason, words in [("selector", "InvalidSpec", "matchExpressions[0].operator \"Sometimes\""),
                                ("overflow", "Malformed", "RouterPool overflow cannot be read"),
                                ("empty", "InvalidSpec", "spec.credentialSelector")]:
        ready = wait_for(f"{name} Ready=False", lambda: cp.condition("routerpool", name, ns, "Ready"))
        assert (ready["status"], ready["reason"]) == ("False", reason), ready
        assert words in ready["message"], ready
        assert any(e["regarding"]["name"] == name for e in events(cp, ns, reason)), f"no {reason} Event on {name}"
    # Nothing was rendered for them, and the operator is still serving everyone else.
    assert cp.get("secret", "selector-config", ns) is None
    assert env.operator.proc.poll() is None
    assert env.operator.metric("airouter_operator_reconcile_errors_total") == 0


def test_key_rotation_reaches_the_pod_and_resets_the_ban(env):
    cp, mock, kubelet = env.cp, env.mock, env.kubelet
    ns = cp.new_namespace("rotate")
    pod, token = one_pod_pool(env, ns, "k")
    mock.fail["sk-k-v1"] = 401
    for _ in range(3):  # the safe default: three 401s ban the pair
        code, _ = chat(pod, f"sk-master-{ns}")
        assert code == 401
    assert any(p["banned"] for p in state_of(pod, token, "k")["pairs"])
    wait_for("live ban in status", lambda: (cp.get("credential", "k", ns)["status"].get("live") or {}).get("banned"))
    assert events(cp, ns, "Banned")

    cp.kubectl("patch", "secret", "key-k", "-n", ns, "--type=merge", "-p", json.dumps({"stringData": {"key": "sk-k-v2"}}))
    wait_for("ban cleared on the pod", lambda: not any(p["banned"] for p in state_of(pod, token, "k")["pairs"]))
    mock.clear()
    code, _ = chat(pod, f"sk-master-{ns}")
    assert code == 200
    assert mock.keys_seen() == ["sk-k-v2"]
    wait_for("live ban gone from status", lambda: (cp.get("credential", "k", ns)["status"].get("live") or {}).get("banned") is False)
    wait_for("an Unbanned Event", lambda: events(cp, ns, "Unbanned"))
    mock.fail.clear()
    kubelet.stop_pod(pod)


def test_changes_reach_every_pod_and_the_time_they_take_is_reported(env):
    """20+ changes (rpm edits, key rotations, deletions and re-creations), each timed from the
    kubectl call to the moment every pod serves it. The figures go to target/e2e-latency.json;
    the goal (p99 ≤ 1 s) is reported, not asserted: timing targets belong to benchmarks."""
    cp, mock, kubelet = env.cp, env.mock, env.kubelet
    ns = cp.new_namespace("latency")
    cp.apply(simple_pool(ns, mock.url, replicas=2, credentials={"c1": {}, "c2": {}, "c3": {}}))
    pods = kubelet.run_deployment(ns, "p")
    wait_ready(cp, "routerpool", "p", ns)
    token = admin_token(cp, ns, "p")
    samples: dict[str, list[float]] = {"rpm": [], "rotation": [], "delete": [], "create": []}

    def timed(kind: str, change, served):
        t0 = time.monotonic()
        change()
        wait_for(f"{kind} served by every pod", lambda: all(served(p) for p in pods), timeout=30, interval=0.005)
        samples[kind].append(time.monotonic() - t0)

    for i in range(10):
        rpm = 2000 + 2 * i
        timed("rpm", lambda: cp.kubectl("patch", "credential", "c1", "-n", ns, "--type=merge",
                                        "-p", json.dumps({"spec": {"rpm": rpm}})),
              lambda p: (state_of(p, token, "c1") or {}).get("rpm", {}).get("limit") == rpm // 2)
    for i in range(5):
        before = {p.name: p.admin("/admin/config/hash", token)["hash"] for p in pods}
        timed("rotation", lambda: cp.kubectl("patch", "secret", "key-c2", "-n", ns, "--type=merge",
                                             "-p", json.dumps({"stringData": {"key": f"sk-c2-v{i + 2}"}})),
              lambda p: p.admin("/admin/config/hash", token)["hash"] != before[p.name])
    for _ in range(5):
        timed("delete", lambda: cp.kubectl("delete", "credential", "c3", "-n", ns),
              lambda p: state_of(p, token, "c3") is None)
        timed("create", lambda: cp.apply(credential(ns, "c3", mock.url, with_secret=False)),
              lambda p: state_of(p, token, "c3") is not None)

    # The last rotation is what the provider sees.
    mock.clear()
    for _ in range(6):
        assert chat(pods[0], f"sk-master-{ns}")[0] == 200
    assert "sk-c2-v6" in mock.keys_seen(), mock.keys_seen()

    every = sorted(s for v in samples.values() for s in v)
    assert len(every) >= 20
    p99 = every[min(len(every) - 1, int(round(0.99 * (len(every) - 1))))]
    report = {
        "changes": len(every),
        "p50_ms": round(statistics.median(every) * 1000, 1),
        "p99_ms": round(p99 * 1000, 1),
        "max_ms": round(every[-1] * 1000, 1),
        "by_kind_median_ms": {k: round(statistics.median(v) * 1000, 1) for k, v in samples.items()},
        "measured_from": "the kubectl call (includes kubectl's own start-up) to every pod serving the change",
    }
    TARGET.mkdir(exist_ok=True)
    (TARGET / "e2e-latency.json").write_text(json.dumps(report, indent=2) + "\n")
    print("apply-to-served latency:", json.dumps(report))
    for p in pods:
        kubelet.stop_pod(p)


def resource_versions(cp, ns: str) -> dict[str, str]:
    out = {}
    for kind in ("credentials", "routerpools", "secrets", "deployments", "services", "serviceaccounts",
                 "poddisruptionbudgets"):
        for item in cp.items(kind, ns):
            out[f"{kind}/{item['metadata']['name']}"] = item["metadata"]["resourceVersion"]
    return out


def test_reapplying_changes_nothing_and_a_quiet_minute_writes_nothing(env):
    cp, mock, kubelet = env.cp, env.mock, env.kubelet
    ns = f"quiet-{int(time.time()) % 100000}"
    manifests = examples(ns, mock.url)
    cp.apply(manifests, server_side=True)
    pods = kubelet.run_deployment(ns, "backup") + kubelet.run_deployment(ns, "main")
    for pool in ("main", "backup"):
        wait_ready(cp, "routerpool", pool, ns)
    for cred in ("openai-primary-a", "openai-primary-b", "to-backup", "openai-backup"):
        wait_for(f"{cred} live state", lambda: (cp.get("credential", cred, ns).get("status") or {}).get("live"))
    # The last live-state poll may still land: wait until status writes stop (3 s apart).
    settled = {"writes": -1.0}

    def writes_stopped():
        now = env.operator.metric("airouter_operator_status_writes_total")
        stopped, settled["writes"] = now == settled["writes"], now
        return stopped
    wait_for("status writes to stop", writes_stopped, interval=3)
    before = resource_versions(cp, ns)

    diff = cp.kubectl("diff", "--server-side", "-f", "-", stdin=manifests, check=False)
    assert diff.returncode == 0 and not diff.stdout, f"re-applying would change:\n{diff.stdout}{diff.stderr}"
    cp.apply(manifests, server_side=True)
    writes = env.operator.metric("airouter_operator_status_writes_total")
    reconciles = env.operator.metric("airouter_operator_reconciles_total")
    time.sleep(60)
    after = resource_versions(cp, ns)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after) if before.get(k) != after.get(k)}
    # The operator kept looking (the pods' live state is polled every second) but wrote nothing.
    assert env.operator.metric("airouter_operator_live_state_polls_total", outcome="ok") > 0
    print(f"quiet minute: {env.operator.metric('airouter_operator_status_writes_total') - writes:.0f} status writes "
          f"cluster-wide, {env.operator.metric('airouter_operator_reconciles_total') - reconciles:.0f} reconciles")
    for p in pods:
        kubelet.stop_pod(p)


def test_only_the_leader_reconciles_and_a_standby_takes_over(env):
    cp, mock, kubelet = env.cp, env.mock, env.kubelet
    env.operator.stop()
    first = env.start_operator("operator-a")
    wait_for("operator-a leads", first.is_leader, timeout=30)
    second = env.start_operator("operator-b")
    ns = cp.new_namespace("leader")
    cp.apply(simple_pool(ns, mock.url, replicas=1, credentials={"c": {}}))
    [pod] = kubelet.run_deployment(ns, "p")
    wait_ready(cp, "routerpool", "p", ns)
    assert not second.is_leader()
    assert second.metric("airouter_operator_reconciles_total") == 0
    lease = cp.get("lease", "airouter-operator", LEASE_NS)
    assert lease["spec"]["holderIdentity"] == "operator-a", lease["spec"]

    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    t0 = time.monotonic()
    wait_for("operator-b takes over", second.is_leader, timeout=30)
    took = time.monotonic() - t0
    token = admin_token(cp, ns, "p")
    cp.kubectl("patch", "credential", "c", "-n", ns, "--type=merge", "-p", json.dumps({"spec": {"rpm": 4242}}))
    wait_for("the new leader pushes the change",
             lambda: (state_of(pod, token, "c") or {}).get("rpm", {}).get("limit") == 4242)
    assert second.metric("airouter_operator_reconciles_total") > 0
    assert cp.get("lease", "airouter-operator", LEASE_NS)["spec"]["holderIdentity"] == "operator-b"
    print(f"standby took over {took:.1f}s after the leader was killed")

    # SIGTERM (a rolling upgrade): the leader gives the Lease up as it exits, so the next one
    # need not wait for it to expire — right after the exit it is nobody's (or the standby's).
    third = env.start_operator("operator-c")
    second.stop()
    assert second.proc.returncode == 0, second.proc.returncode
    holder = cp.get("lease", "airouter-operator", LEASE_NS)["spec"].get("holderIdentity")
    assert holder in (None, "operator-c"), f"still held by {holder} after it exited"
    wait_for("operator-c takes over", third.is_leader, timeout=30)

    # A leader that finds the Lease held by someone else stops writing at once: it exits
    # (non-zero, so its Deployment restarts it as a standby) instead of racing the new holder.
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    cp.kubectl("patch", "lease", "airouter-operator", "-n", LEASE_NS, "--type=merge", "-p", json.dumps(
        {"spec": {"holderIdentity": "intruder", "renewTime": now, "leaseDurationSeconds": 3600}}))
    try:
        code = third.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError("operator-c kept running after losing the Lease") from None
    assert code == 1, code
    assert "lost the leader Lease" in third.log_path.read_text()
    kubelet.stop_pod(pod)
