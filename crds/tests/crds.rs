//! The CRD YAML in `charts/airouter/crds/` is exactly what the types generate, and the schema
//! rules refuse the objects they are meant to refuse (evaluated with kube's CEL engine here;
//! the end-to-end suite checks the same objects against a real API server).

use std::path::PathBuf;

use airouter_crds::{credential::CredentialSpec, router_pool::RateLimitSpec};
use serde_json::{json, Value};

fn chart_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/airouter/crds")
}

#[test]
fn committed_crds_match_the_types() {
    let update = std::env::var_os("UPDATE_CRDS").is_some();
    for (file, yaml) in airouter_crds::crds() {
        let path = chart_dir().join(&file);
        if update {
            std::fs::write(&path, &yaml).unwrap();
            continue;
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{} is missing ({e}); run `cargo run -p airouter-crds --bin crdgen`",
                path.display()
            )
        });
        assert!(
            committed == yaml,
            "{} differs from the types; run `cargo run -p airouter-crds --bin crdgen` and commit the result",
            path.display()
        );
    }
}

fn refusal(spec: Value) -> Option<String> {
    CredentialSpec::validate_cel(&spec, None)
        .err()
        .map(|e| e.to_string())
}

fn valid_openai() -> Value {
    json!({"type": "openai", "baseUrl": "https://api.openai.com", "apiKeySecretRef": {"name": "k", "key": "key"}})
}

#[test]
fn valid_credentials_pass() {
    for spec in [
        valid_openai(),
        json!({"type": "proxy", "baseUrl": "http://backup:8080"}),
        json!({"type": "proxy", "proxy": {"routerPoolRef": {"name": "backup"}}, "isFallback": true}),
        json!({"type": "vertex-ai", "vertex": {"projectId": "p", "location": "l", "credentialsSecretRef": {"name": "s", "key": "k"}}}),
        json!({"type": "openai", "baseUrl": "https://h", "apiKeySecretRef": {"name": "k", "key": "key"}, "rpm": -1, "models": [{"name": "m", "rpm": 5}]}),
    ] {
        assert_eq!(refusal(spec.clone()), None, "{spec}");
    }
}

#[test]
fn cross_field_rules_refuse_with_their_message() {
    let cases = [
        (
            json!({"type": "proxy", "baseUrl": "http://b", "proxy": {"routerPoolRef": {"name": "b"}}}),
            "exactly one of spec.baseUrl or spec.proxy",
        ),
        (
            json!({"type": "proxy"}),
            "exactly one of spec.baseUrl or spec.proxy",
        ),
        (
            json!({"type": "openai", "baseUrl": "https://h"}),
            "spec.apiKeySecretRef is required",
        ),
        (
            json!({"type": "anthropic", "apiKeySecretRef": {"name": "k", "key": "key"}}),
            "spec.baseUrl is required",
        ),
        (
            json!({"type": "openai", "baseUrl": "https://h", "apiKeySecretRef": {"name": "k", "key": "key"}, "proxy": {"routerPoolRef": {"name": "b"}}}),
            "only for credentials of type proxy",
        ),
        (json!({"type": "vertex-ai"}), "spec.vertex"),
        (
            {
                let mut v = valid_openai();
                v["rpm"] = json!(0);
                v
            },
            "spec.rpm: use -1",
        ),
        (
            {
                let mut v = valid_openai();
                v["baseUrl"] = json!("ftp://h");
                v
            },
            "must start with http:// or https://",
        ),
        (
            {
                let mut v = valid_openai();
                v["models"] = json!([{"name": "m", "rpm": 0}]);
                v
            },
            "spec.models[].rpm",
        ),
    ];
    for (spec, want) in cases {
        let got = refusal(spec.clone()).unwrap_or_else(|| panic!("{spec} was accepted"));
        assert!(got.contains(want), "{spec}: {got}");
    }
}

#[test]
fn redis_backend_needs_a_url() {
    assert!(RateLimitSpec::validate_cel(&json!({"backend": "redis"}), None).is_err());
    assert!(RateLimitSpec::validate_cel(
        &json!({"backend": "redis", "redis": {"urlSecretRef": {"name": "r", "key": "url"}}}),
        None
    )
    .is_ok());
    assert!(RateLimitSpec::validate_cel(&json!({"backend": "local"}), None).is_ok());
}

#[test]
fn schema_has_the_structural_rules() {
    let crds = airouter_crds::crds();
    let cred: Value = serde_yaml::from_str(
        &crds
            .iter()
            .find(|(f, _)| f.contains("credentials"))
            .unwrap()
            .1,
    )
    .unwrap();
    let version = &cred["spec"]["versions"][0];
    assert_eq!(version["subresources"]["status"], json!({}));
    assert_eq!(cred["spec"]["names"]["shortNames"], json!(["cred"]));
    let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(
        spec["properties"]["type"]["enum"],
        json!([
            "openai",
            "anthropic",
            "gemini",
            "vertex-ai",
            "bedrock",
            "proxy"
        ])
    );
    assert_eq!(spec["properties"]["rpm"]["minimum"], json!(-1.0));
    assert_eq!(
        spec["properties"]["models"]["x-kubernetes-list-type"],
        "map"
    );
    assert_eq!(
        spec["properties"]["models"]["x-kubernetes-list-map-keys"],
        json!(["name"])
    );
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        columns,
        ["Type", "Fallback", "Ready", "Banned", "RPM", "Limit", "Age"]
    );
}
