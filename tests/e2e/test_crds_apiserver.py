"""The generated CRDs against a real kube-apiserver (+ etcd) on loopback, through real kubectl:
they install, bad objects are refused with the schema rule's message, defaults and printer
columns work. The control plane (conftest.py) comes from tests/tools/control-plane.sh (binaries
built once from the Go module proxy and cached by version)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module", autouse=True)
def crds_namespace(kubectl):
    kubectl("create", "namespace", "crds")


def credential(name: str, spec: str) -> str:
    return f"apiVersion: airouter.dev/v1alpha1\nkind: Credential\nmetadata: {{name: {name}, labels: {{pool: main}}}}\nspec: {spec}\n"


def pool(name: str, extra: str = "") -> str:
    return (f"apiVersion: airouter.dev/v1alpha1\nkind: RouterPool\nmetadata: {{name: {name}}}\n"
            f"spec: {{credentialSelector: {{matchLabels: {{pool: main}}}}, masterKeySecretRef: {{name: mk, key: key}}{extra}}}\n")


REFUSED = [
    (credential("c1", '{type: proxy, baseUrl: "http://b", proxy: {routerPoolRef: {name: b}}}'),
     "a proxy credential needs exactly one of spec.baseUrl or spec.proxy.routerPoolRef"),
    (credential("c2", "{type: proxy}"), "a proxy credential needs exactly one of spec.baseUrl"),
    (credential("c3", '{type: openai, baseUrl: "https://h"}'), "spec.apiKeySecretRef is required"),
    (credential("c4", "{type: anthropic, apiKeySecretRef: {name: k, key: key}}"), "spec.baseUrl is required"),
    (credential("c5", '{type: openai, baseUrl: "https://h", apiKeySecretRef: {name: k, key: key}, rpm: -5}'),
     "should be greater than or equal to -1"),
    (credential("c6", '{type: openai, baseUrl: "https://h", apiKeySecretRef: {name: k, key: key}, rpm: 0}'),
     "spec.rpm: use -1 (or omit it) for unlimited"),
    (credential("c7", '{type: openai, baseUrl: "https://h", apiKeySecretRef: {name: k, key: key}, models: [{name: a}, {name: a}]}'),
     "Duplicate value"),
    (credential("c8", '{type: foo, baseUrl: "https://h"}'), 'Unsupported value: "foo"'),
    (credential("c9", '{type: openai, baseUrl: "ftp://h", apiKeySecretRef: {name: k, key: key}}'),
     "spec.baseUrl must start with http:// or https://"),
    (credential("c10", "{type: vertex-ai}"), "spec.vertex (projectId, location, credentialsSecretRef) is required"),
    (pool("p1", ", rateLimit: {backend: redis}"), "spec.rateLimit.redis.urlSecretRef is required when backend is redis"),
    (pool("p2", ', fail2ban: {banDuration: "5 minutes"}'), "spec.fail2ban.banDuration in body should match"),
    (pool("p3", ", replicas: -1"), "should be greater than or equal to 0"),
]


@pytest.mark.parametrize("manifest,message", REFUSED, ids=[m.split("name: ")[1].split("}")[0].split(",")[0] for m, _ in REFUSED])
def test_bad_objects_are_refused_with_the_rules_message(kubectl, manifest, message):
    out = kubectl("-n", "crds", "apply", "-f", "-", stdin=manifest, check=False)
    assert out.returncode != 0, f"accepted:\n{manifest}"
    assert message in out.stderr, out.stderr


def test_good_objects_are_accepted_with_defaults_and_columns(kubectl):
    kubectl("-n", "crds", "apply", "-f", "-", stdin=credential(
        "main-1", '{type: openai, baseUrl: "https://api.openai.com", apiKeySecretRef: {name: k, key: key}, rpm: 500, '
                  'models: [{name: gpt-4o}, {name: gpt-4o-mini, rpm: 100}]}'))
    kubectl("-n", "crds", "apply", "-f", "-", stdin=credential(
        "backup", "{type: proxy, proxy: {routerPoolRef: {name: backup}}, isFallback: true}"))
    kubectl("-n", "crds", "apply", "-f", "-", stdin=pool("main"))
    assert kubectl("-n", "crds", "get", "routerpool", "main", "-o", "jsonpath={.spec.replicas}").stdout == "2"
    table = kubectl("-n", "crds", "get", "credentials").stdout.splitlines()
    assert table[0].split() == ["NAME", "TYPE", "FALLBACK", "READY", "BANNED", "RPM", "LIMIT", "AGE"], table
    assert table[1].split()[:3] == ["backup", "proxy", "true"], table
    header = kubectl("-n", "crds", "get", "rp").stdout.splitlines()[0].split()
    assert header == ["NAME", "READY", "SYNCED", "DESIRED", "CREDENTIALS", "CONFIG", "AGE"], header
    assert "cred" in kubectl("api-resources", "--api-group=airouter.dev").stdout
    explain = kubectl("explain", "credential.spec.isFallback").stdout
    assert "Used only after every primary credential for a model is exhausted" in explain
