//! Golden tests of the pure render step: `tests/golden/<case>/input.yaml` (a RouterPool spec and
//! what resolve would find) renders to exactly `expected.yaml`, and the data plane's own parser
//! reads that document back to the same `RouterConfig` (the operator renders what the data
//! plane runs). `UPDATE_GOLDEN=1` rewrites the expected files.

use std::path::{Path, PathBuf};

use airouter::config::RouterConfig;
use airouter_crds::{CredentialSpec, RouterPoolSpec};
use airouter_operator::router_pool::{
    render::render_config, ProxyTarget, Resolved, ResolvedCredential, SharedLimits,
};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Input {
    pool: RouterPoolSpec,
    master_key: String,
    admin_token: String,
    credentials: Vec<InputCredential>,
    shared_limits: Option<InputShared>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InputShared {
    redis_url: String,
    key_prefix: String,
    #[serde(default)]
    cluster: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InputCredential {
    name: String,
    spec: CredentialSpec,
    api_key: Option<String>,
    proxy_target: Option<InputTarget>,
    vertex_credentials_json: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InputTarget {
    url: String,
    master_key: String,
}

fn render(dir: &Path) -> (RouterConfig, String) {
    let input: Input =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("input.yaml")).unwrap()).unwrap();
    let resolved = Resolved {
        master_key: input.master_key,
        admin_token: input.admin_token,
        credentials: input
            .credentials
            .into_iter()
            .map(|c| ResolvedCredential {
                name: c.name,
                spec: c.spec,
                api_key: c.api_key,
                proxy_target: c.proxy_target.map(|t| ProxyTarget {
                    url: t.url,
                    master_key: t.master_key,
                }),
                vertex_credentials_json: c.vertex_credentials_json,
            })
            .collect(),
        shared_limits: input.shared_limits.map(|s| SharedLimits {
            redis_url: s.redis_url,
            key_prefix: s.key_prefix,
            cluster: s.cluster,
        }),
        trusted_ca_hash: None,
    };
    let config = render_config(&input.pool, &resolved).expect("renders");
    let yaml = config.to_yaml();
    (config, yaml)
}

#[test]
fn golden_cases() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut cases = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let dir = entry.unwrap().path();
        let (config, yaml) = render(&dir);
        let expected_path = dir.join("expected.yaml");
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&expected_path, &yaml).unwrap();
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run with UPDATE_GOLDEN=1)",
                expected_path.display()
            )
        });
        assert_eq!(yaml, expected, "{} renders differently", dir.display());
        let parsed = RouterConfig::from_yaml(&yaml, &|_| None).unwrap_or_else(|e| {
            panic!("{}: the data plane rejects the render: {e}", dir.display())
        });
        assert_eq!(
            parsed.config,
            config,
            "{}: the data plane reads back a different config",
            dir.display()
        );
        cases += 1;
    }
    assert!(cases >= 2, "golden cases missing");
}

#[test]
fn render_is_independent_of_input_order_and_hash_is_stable() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/chained-pool");
    let (a, _) = render(&dir);
    let text = std::fs::read_to_string(dir.join("input.yaml")).unwrap();
    let mut input: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    input["credentials"].as_sequence_mut().unwrap().reverse();
    let tmp = std::env::temp_dir().join(format!("airouter-golden-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(
        tmp.join("input.yaml"),
        serde_yaml::to_string(&input).unwrap(),
    )
    .unwrap();
    let (b, _) = render(&tmp);
    std::fs::remove_dir_all(&tmp).unwrap();
    assert_eq!(a.hash(), b.hash());
}
