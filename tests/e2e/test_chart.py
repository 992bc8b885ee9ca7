"""The Helm chart with real helm and kubectl against the real control plane: lint and template,
the values schema, install → upgrade → uninstall, and least-privilege RBAC proven by running
the operator as the chart's ServiceAccount (a TokenRequest token, RBAC authorizer on) — once
with the chart's rules, then once without each single rule, showing which capability breaks."""

from __future__ import annotations

import base64
import json
import pathlib
import re
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

from cluster import ROOT, TARGET, Kubelet, MockProvider, Operator, wait_for

CHART = ROOT / "charts" / "airouter"


@pytest.fixture(scope="module")
def helm(control_plane):
    def run(*args, check: bool = True):
        out = subprocess.run([str(control_plane.bin / "helm"), *args], capture_output=True, text=True,
                             env=control_plane.env, timeout=120)
        if check and out.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed: {out.stderr}")
        return out
    return run


def docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def test_lint_and_template_are_clean(helm):
    out = helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in out.stdout, out.stdout
    rendered = docs(helm("template", "rel", str(CHART), "-n", "ops", "--kube-version", "1.36.3").stdout)
    kinds = sorted(d["kind"] for d in rendered)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "Deployment", "PodDisruptionBudget", "Role",
                     "RoleBinding", "Service", "ServiceAccount"], kinds
    [deploy] = [d for d in rendered if d["kind"] == "Deployment"]
    pod = deploy["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert deploy["spec"]["replicas"] == 2
    assert pod["securityContext"]["runAsNonRoot"] is True
    sc = container["securityContext"]
    assert (sc["readOnlyRootFilesystem"], sc["allowPrivilegeEscalation"], sc["capabilities"]["drop"]) == (True, False, ["ALL"])
    assert container["resources"]["requests"] == {"cpu": "50m", "memory": "64Mi"}
    assert {container["readinessProbe"]["httpGet"]["path"], container["livenessProbe"]["httpGet"]["path"]} == {"/readyz", "/healthz"}
    assert "--dataplane-image=ghcr.io/airouter/airouter:0.1.0" in container["args"]
    assert "--lease-name=rel-airouter" in container["args"]
    resources = [a for a in container["args"] if a.startswith("--dataplane-resources=")]
    assert [json.loads(a.split("=", 1)[1]) for a in resources] == [
        {"limits": {"memory": "512Mi"}, "requests": {"cpu": "100m", "memory": "64Mi"}}], resources
    # Optional parts, off by default, render when asked for.
    extra = docs(helm("template", "rel", str(CHART), "--api-versions", "monitoring.coreos.com/v1",
                      "--set", "metrics.serviceMonitor.enabled=true", "--set", "grafanaDashboard.enabled=true").stdout)
    [monitor] = [d for d in extra if d["kind"] == "ServiceMonitor"]
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    [dashboard] = [d for d in extra if d["kind"] == "ConfigMap"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    panels = json.loads(dashboard["data"]["airouter.json"])["panels"]
    assert any("airouter_operator_push_duration_seconds_bucket" in t["expr"] for p in panels for t in p["targets"])
    single = docs(helm("template", "rel", str(CHART), "--set", "replicaCount=1",
                       "--set", "operator.leaderElection.enabled=false").stdout)
    assert not [d for d in single if d["kind"] in ("Role", "PodDisruptionBudget")]
    [deploy] = [d for d in single if d["kind"] == "Deployment"]
    assert "--no-leader-election" in deploy["spec"]["template"]["spec"]["containers"][0]["args"]


@pytest.mark.parametrize("value,words", [
    ("replicaCount=two", "replicaCount"),
    ("operator.pushTimeout=soon", "pushTimeout"),
    ("image.pullPolicy=Sometimes", "pullPolicy"),
    ("replicas=3", "replicas"),
    # Two operators without leader election would both write every object.
    ("operator.leaderElection.enabled=false", "replicaCount"),
])
def test_a_wrong_value_is_refused_at_install(helm, value, words):
    out = helm("install", "bad", str(CHART), "-n", "default", "--dry-run=client", "--set", value, check=False)
    assert out.returncode != 0, out.stdout
    assert "values don't meet the specifications of the schema" in out.stderr and words in out.stderr, out.stderr


def test_install_upgrade_uninstall(helm, control_plane):
    cp = control_plane
    ns = cp.new_namespace("chart")
    helm("install", "life", str(CHART), "-n", ns)
    deploy = cp.get("deployment", "life-airouter", ns)
    assert deploy["spec"]["replicas"] == 2
    for kind, name, namespaced in [("serviceaccount", "life-airouter", True), ("service", "life-airouter-metrics", True),
                                   ("role", "life-airouter-leader-election", True), ("pdb", "life-airouter", True),
                                   ("clusterrole", "life-airouter", False), ("clusterrolebinding", "life-airouter", False)]:
        assert cp.get(kind, name, ns if namespaced else None), f"{kind}/{name} missing after install"

    helm("upgrade", "life", str(CHART), "-n", ns, "--reuse-values", "--set", "replicaCount=3",
         "--set", "operator.logFormat=text")
    deploy = cp.get("deployment", "life-airouter", ns)
    assert deploy["spec"]["replicas"] == 3
    assert "--log-format=text" in deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    assert helm("history", "life", "-n", ns).stdout.count("deployed") == 1  # the old revision is superseded

    helm("uninstall", "life", "-n", ns, "--wait=false")
    for kind, name, namespaced in [("deployment", "life-airouter", True), ("serviceaccount", "life-airouter", True),
                                   ("clusterrole", "life-airouter", False), ("clusterrolebinding", "life-airouter", False)]:
        wait_for(f"{kind}/{name} gone", lambda: cp.get(kind, name, ns if namespaced else None) is None, timeout=20)
    # CRDs are never removed by helm (and so neither are users' resources).
    assert cp.get("crd", "routerpools.airouter.dev")


def test_the_readme_values_table_is_generated_from_values_yaml():
    sys.path.insert(0, str(ROOT / "tests" / "tools"))
    import values_table
    readme = values_table.README.read_text()
    start = readme.index(values_table.START) + len(values_table.START)
    assert readme[start:readme.index(values_table.END)].strip() == values_table.table(), \
        "README values table is stale: run python3 tests/tools/values_table.py --write"
    documented = {key for key, _, _ in values_table.rows()}

    def leaves(value, path=()):
        if isinstance(value, dict) and value and ".".join(path) not in documented:
            for k, v in value.items():
                yield from leaves(v, (*path, k))
        else:
            yield ".".join(path)
    undocumented = [p for p in leaves(yaml.safe_load(values_table.VALUES.read_text())) if p not in documented]
    assert not undocumented, f"values without a '# --' comment: {undocumented}"


# === least privilege ===

def sa_kubeconfig(cp, ns: str, sa: str, path: pathlib.Path) -> pathlib.Path:
    token = cp.kubectl("create", "token", sa, "-n", ns, "--duration=1h").stdout.strip()
    admin = yaml.safe_load(cp.kubeconfig.read_text())
    cluster = admin["clusters"][0]["cluster"]
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "h", "cluster": cluster}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "h", "user": sa, "namespace": ns}}],
    }))
    return path


REFUSAL = re.compile(r'cannot (\w+) resource \\*"([\w./]+)\\*" in API group \\*"([\w.]*)\\*"')


def refusals(op: Operator) -> list[str]:
    """The distinct refusals of the API server in the operator's log ("VERB GROUP/RESOURCE")."""
    seen = []
    for m in REFUSAL.finditer(op.log_path.read_text()):
        verb, resource, group = m.groups()
        text = f"{verb} {group or 'core'}/{resource}"
        if text not in seen:
            seen.append(text)
    return seen


def scenario(cp, kubelet: Kubelet, mock: MockProvider, op: Operator, timeout: float) -> str | None:
    """Runs what the operator does, step by step, in a fresh namespace; returns the first step
    that does not happen within `timeout` and the API server's refusals (None: all happen)."""
    ns = cp.new_namespace("rbac")
    pods = []

    def poll(check, timeout: float) -> bool:
        # Once the API server has refused something, a step gets 5 s more, not the whole
        # timeout: steps that do not need the refused call finish well within that.
        deadline = time.monotonic() + timeout
        shortened = False
        while time.monotonic() < deadline and op.proc.poll() is None:
            if not shortened and refusals(op):
                deadline = min(deadline, time.monotonic() + 5)
                shortened = True
            try:
                if check():
                    return True
            except Exception:  # noqa: BLE001 - an error is "not yet"
                pass
            time.sleep(0.1)
        return False

    try:
        failed = steps(cp, kubelet, mock, op, ns, pods, poll, timeout)
        refused = refusals(op)
        if failed is None:
            return f"(every step worked, yet the API server refused: {refused})" if refused else None
        return f"{failed} (refused: {', '.join(refused) or 'nothing logged'})"
    finally:
        for pod in pods:
            kubelet.stop_pod(pod)


def steps(cp, kubelet, mock, op, ns, pods, poll, timeout) -> str | None:
    """The capabilities, in order; the first that does not work is returned."""
    if not poll(lambda: op.metric("airouter_operator_leader") == 1, timeout):
        return "become the leader (Lease)"
    cp.apply(f"""
apiVersion: v1
kind: Secret
metadata: {{name: master, namespace: {ns}}}
stringData: {{key: sk-master}}
---
apiVersion: v1
kind: Secret
metadata: {{name: key-a, namespace: {ns}}}
stringData: {{key: sk-a-v1}}
---
apiVersion: airouter.dev/v1alpha1
kind: Credential
metadata: {{name: a, namespace: {ns}, labels: {{pool: p}}}}
spec: {{type: openai, baseUrl: "{mock.url}", apiKeySecretRef: {{name: key-a, key: key}}}}
---
apiVersion: airouter.dev/v1alpha1
kind: Credential
metadata: {{name: b, namespace: {ns}, labels: {{pool: p}}}}
spec: {{type: openai, baseUrl: "{mock.url}", apiKeySecretRef: {{name: key-b, key: key}}}}
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: corp-ca, namespace: {ns}}}
data: {{ca.pem: "-----BEGIN CERTIFICATE-----\\nMIIB1\\n-----END CERTIFICATE-----\\n"}}
---
apiVersion: airouter.dev/v1alpha1
kind: RouterPool
metadata: {{name: p, namespace: {ns}}}
spec:
  replicas: 1
  credentialSelector: {{matchLabels: {{pool: p}}}}
  masterKeySecretRef: {{name: master, key: key}}
  trustedCA: {{name: corp-ca, key: ca.pem}}
""")
    if not poll(lambda: cp.get("deployment", "p", ns) and cp.get("secret", "p-config", ns), timeout):
        return "apply the pool's objects (config Secret, ServiceAccount, Service, PDB, Deployment)"
    pods.extend(kubelet.run_deployment(ns, "p"))
    if not poll(lambda: (cp.condition("routerpool", "p", ns, "Ready") or {}).get("status") == "True", timeout):
        return "reconcile the pool to Ready (read Secrets, watch pods, push, write RouterPool status)"
    if not poll(lambda: (cp.get("credential", "a", ns).get("status") or {}).get("live"), timeout):
        return "write Credential status"
    if not poll(lambda: [e for e in cp.items("events.events.k8s.io", ns) if e.get("reason") == "ConfigSynced"], timeout):
        return "publish Events"
    token = base64.b64decode(cp.get("secret", "p-admin", ns)["data"]["token"]).decode()
    before = pods[0].admin("/admin/config/hash", token)["hash"]
    cp.kubectl("patch", "secret", "key-a", "-n", ns, "--type=merge", "-p", json.dumps({"stringData": {"key": "sk-a-v2"}}))
    if not poll(lambda: pods[0].admin("/admin/config/hash", token)["hash"] != before, timeout):
        return "follow a Secret change (watch Secrets)"

    def ca_hash():
        return cp.get("deployment", "p", ns)["spec"]["template"]["metadata"]["annotations"]["airouter.dev/trusted-ca-hash"]
    first = ca_hash()
    cp.kubectl("patch", "configmap", "corp-ca", "-n", ns, "--type=merge", "-p",
               json.dumps({"data": {"ca.pem": "-----BEGIN CERTIFICATE-----\nMIIB2\n-----END CERTIFICATE-----\n"}}))
    if not poll(lambda: ca_hash() != first, timeout):
        return "follow a trusted-CA ConfigMap change (watch ConfigMaps)"
    # b's Secret is missing (a SecretNotFound Event); it appears, then goes again: the
    # second SecretNotFound updates the first Event's series.
    cp.apply(f"apiVersion: v1\nkind: Secret\nmetadata: {{name: key-b, namespace: {ns}}}\nstringData: {{key: sk-b}}\n")
    if not poll(lambda: (cp.condition("credential", "b", ns, "Ready") or {}).get("status") == "True", timeout):
        return "resolve a Credential whose Secret appeared"
    cp.kubectl("delete", "secret", "key-b", "-n", ns)

    def repeated():
        return [e for e in cp.items("events.events.k8s.io", ns)
                if e.get("reason") == "SecretNotFound" and (e.get("series") or {}).get("count", 0) >= 2]
    if not poll(repeated, timeout):
        return "update a repeated Event"
    return None


def test_rbac_is_exactly_what_the_operator_needs(helm, control_plane):
    cp = control_plane
    ns = cp.new_namespace("airouter-op")
    # The chart's own values, but live state every second so the steps stay short.
    helm("install", "lp", str(CHART), "-n", ns, "--set", "operator.liveStateInterval=1s")
    manifest = docs(helm("get", "manifest", "lp", "-n", ns).stdout)
    [deploy] = [d for d in manifest if d["kind"] == "Deployment"]
    chart_args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    sa = deploy["spec"]["template"]["spec"]["serviceAccountName"]
    roles = {(d["kind"], d["metadata"]["name"]): d for d in manifest if d["kind"] in ("ClusterRole", "Role")}
    work = pathlib.Path(tempfile.mkdtemp(prefix="airouter-rbac-"))
    kubeconfig = sa_kubeconfig(cp, ns, sa, work / "sa.kubeconfig")
    # The ServiceAccount really is limited: the API server refuses it what the chart omits.
    assert "no" in cp.kubectl("auth", "can-i", "delete", "secrets", "--as", f"system:serviceaccount:{ns}:{sa}", check=False).stdout
    kubelet, mock = Kubelet(cp, work), MockProvider()

    def run(label: str, timeout: float) -> str | None:
        args = [a for a in chart_args if not a.startswith("--lease-name")] + [f"--lease-name=lp-{label}"]
        op = Operator(cp, work, f"op-{label}", ns, args=args, kubeconfig=kubeconfig)
        try:
            return scenario(cp, kubelet, mock, op, timeout)
        finally:
            op.stop()

    def put(role: dict):
        cp.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=json.dumps(role))

    try:
        assert run("all-rules", timeout=30) is None, "the chart's own RBAC must be enough for a full reconcile"
        broken = {}
        for (kind, name), role in roles.items():
            grants = [(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
                      for r in rule["resources"] for v in rule["verbs"]]
            for i, (group, resource, verb) in enumerate(grants):
                reduced = json.loads(json.dumps(role))
                reduced["rules"] = [{"apiGroups": [g], "resources": [r], "verbs": [v]}
                                    for j, (g, r, v) in enumerate(grants) if j != i]
                put(reduced)
                try:
                    broken[f"{kind}: {verb} {group or 'core'}/{resource}"] = run(f"{kind}-{i}".lower(), timeout=10)
                finally:
                    put(role)
        report = "\n".join(f"  {grant:48} → {capability}" for grant, capability in broken.items())
        print(f"\nwithout this grant → this breaks:\n{report}")
        (TARGET / "e2e-rbac.txt").write_text(report + "\n")
        unnecessary = [grant for grant, capability in broken.items() if capability is None]
        assert not unnecessary, f"grants nothing needs: {unnecessary}"
        # What broke must be the API server refusing that very grant, not a step that failed
        # for another reason.
        def refused(capability: str) -> list[str]:
            return re.findall(r"[a-z]+ [a-z0-9.]+/[a-z/]+", capability.partition("refused: ")[2])
        unexplained = {grant: capability for grant, capability in broken.items()
                       if grant.split(": ", 1)[1] not in refused(capability)}
        assert not unexplained, f"broke without the API server refusing the removed grant: {unexplained}"
    finally:
        kubelet.stop_all()
        mock.stop()
        helm("uninstall", "lp", "-n", ns, "--wait=false", check=False)
