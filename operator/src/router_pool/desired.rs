//! Pure: what a RouterPool should own in the cluster — the `<pool>-config` Secret, a
//! ServiceAccount, the data-plane Deployment, its Service and a PodDisruptionBudget — all with a
//! controller owner reference to the pool, for server-side apply.
//!
//! The config hash is deliberately not in the pod template: a config change is pushed to the
//! running pods (`PUT /admin/config`), it does not roll the Deployment.

use std::collections::BTreeMap;

use airouter::config::{document_hash, RouterConfig};
use airouter_crds::{router_pool::ServiceType, RouterPool};
use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment},
        core::v1::{
            Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, HTTPGetAction,
            KeyToPath, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements,
            SeccompProfile, Secret, SecretVolumeSource, SecurityContext, Service, ServiceAccount,
            ServicePort, ServiceSpec, TCPSocketAction, Volume, VolumeMount,
        },
        policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec},
    },
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, ObjectMeta},
        util::intstr::IntOrString,
    },
    ByteString,
};
use kube::Resource;

use super::render::{ADMIN_PORT, PUBLIC_PORT};

/// Where the config Secret is mounted in the pod.
pub const CONFIG_DIR: &str = "/etc/airouter";
/// The key of the rendered document in the `<pool>-config` Secret.
pub const CONFIG_KEY: &str = "config.yaml";
/// The annotation on the config Secret carrying the config hash.
pub const HASH_ANNOTATION: &str = "airouter.dev/config-hash";
/// Where the `spec.trustedCA` bundle is mounted (as [`TRUSTED_CA_FILE`]).
pub const TRUSTED_CA_DIR: &str = "/etc/airouter-trusted-ca";
pub const TRUSTED_CA_FILE: &str = "ca.pem";
/// The pod-template annotation carrying the bundle's hash: a new bundle rolls the pods (the
/// data plane reads `SSL_CERT_FILE` at start). Config changes never do: they are pushed.
pub const TRUSTED_CA_ANNOTATION: &str = "airouter.dev/trusted-ca-hash";

/// Operator-wide defaults for pools that do not set their own (chart values).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Defaults {
    pub image: String,
    /// Data-plane container resources.
    pub resources: Option<ResourceRequirements>,
}

/// Every object a pool owns.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    pub config_secret: Secret,
    pub service_account: ServiceAccount,
    pub deployment: Deployment,
    pub service: Service,
    pub pdb: PodDisruptionBudget,
}

impl Desired {
    /// The rendered document, as the config Secret holds it.
    pub fn config_document(&self) -> &str {
        let data = self
            .config_secret
            .data
            .as_ref()
            .and_then(|d| d.get(CONFIG_KEY));
        data.and_then(|v| std::str::from_utf8(&v.0).ok())
            .expect("desired_state puts the UTF-8 document in the config Secret")
    }

    /// Its hash, as the config Secret's annotation holds it.
    pub fn config_hash(&self) -> &str {
        let annotations = self.config_secret.metadata.annotations.as_ref();
        annotations
            .and_then(|a| a.get(HASH_ANNOTATION))
            .expect("desired_state annotates the config Secret with the hash")
    }
}

/// The pool has no name, namespace or uid (it was not read from the API server).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("RouterPool object lacks metadata.{0}")]
pub struct MissingMetadata(pub &'static str);

/// Labels on everything a pool owns; the selector uses the first two.
pub fn labels(pool: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "airouter".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), pool.to_owned()),
        (
            "app.kubernetes.io/component".to_owned(),
            "router".to_owned(),
        ),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "airouter-operator".to_owned(),
        ),
    ])
}

fn selector(pool: &str) -> BTreeMap<String, String> {
    labels(pool).into_iter().take(2).collect()
}

/// The objects of `pool`; `trusted_ca_hash` is the content hash of its `spec.trustedCA`
/// bundle, which resolve read.
pub fn desired_state(
    pool: &RouterPool,
    config: &RouterConfig,
    trusted_ca_hash: Option<&str>,
    defaults: &Defaults,
) -> Result<Desired, MissingMetadata> {
    let name = pool.metadata.name.clone().ok_or(MissingMetadata("name"))?;
    let namespace = pool
        .metadata
        .namespace
        .clone()
        .ok_or(MissingMetadata("namespace"))?;
    let owner = pool
        .controller_owner_ref(&())
        .ok_or(MissingMetadata("uid"))?;
    let meta = |object_name: String, annotations: BTreeMap<String, String>| ObjectMeta {
        name: Some(object_name),
        namespace: Some(namespace.clone()),
        labels: Some(labels(&name)),
        annotations: (!annotations.is_empty()).then_some(annotations),
        owner_references: Some(vec![owner.clone()]),
        ..Default::default()
    };
    let config_name = format!("{name}-config");
    let spec = &pool.spec;

    let document = config.to_yaml();
    let config_secret = Secret {
        metadata: meta(
            config_name.clone(),
            BTreeMap::from([(HASH_ANNOTATION.to_owned(), document_hash(&document))]),
        ),
        data: Some(BTreeMap::from([(
            CONFIG_KEY.to_owned(),
            ByteString(document.into_bytes()),
        )])),
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    let service_account = ServiceAccount {
        metadata: meta(name.clone(), BTreeMap::new()),
        automount_service_account_token: Some(false),
        ..Default::default()
    };
    let grace = config.server.shutdown_grace + config.server.shutdown_timeout;
    let mut volumes = vec![Volume {
        name: "config".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(config_name),
            ..Default::default()
        }),
        ..Default::default()
    }];
    let mut mounts = vec![VolumeMount {
        name: "config".into(),
        mount_path: CONFIG_DIR.into(),
        read_only: Some(true),
        ..Default::default()
    }];
    let mut env = Vec::new();
    let mut template_annotations = BTreeMap::new();
    if let (Some(ca), Some(hash)) = (&spec.trusted_ca, trusted_ca_hash) {
        volumes.push(Volume {
            name: "trusted-ca".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: ca.name.clone(),
                items: Some(vec![KeyToPath {
                    key: ca.key.clone(),
                    path: TRUSTED_CA_FILE.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        });
        mounts.push(VolumeMount {
            name: "trusted-ca".into(),
            mount_path: TRUSTED_CA_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
        env.push(EnvVar {
            name: "SSL_CERT_FILE".into(),
            value: Some(format!("{TRUSTED_CA_DIR}/{TRUSTED_CA_FILE}")),
            ..Default::default()
        });
        template_annotations.insert(TRUSTED_CA_ANNOTATION.to_owned(), hash.to_owned());
    }
    let container = Container {
        name: "airouter".into(),
        image: Some(spec.image.clone().unwrap_or_else(|| defaults.image.clone())),
        args: Some(vec![
            "run".into(),
            "--config".into(),
            format!("{CONFIG_DIR}/{CONFIG_KEY}"),
            "--log-format".into(),
            "json".into(),
        ]),
        ports: Some(vec![
            ContainerPort {
                name: Some("http".into()),
                container_port: PUBLIC_PORT.into(),
                ..Default::default()
            },
            ContainerPort {
                name: Some("admin".into()),
                container_port: ADMIN_PORT.into(),
                ..Default::default()
            },
        ]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/health/readiness".into()),
                port: IntOrString::String("http".into()),
                ..Default::default()
            }),
            period_seconds: Some(2),
            failure_threshold: Some(1),
            ..Default::default()
        }),
        // Liveness must not follow readiness (which fails on purpose while draining).
        liveness_probe: Some(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::String("http".into()),
                ..Default::default()
            }),
            period_seconds: Some(10),
            failure_threshold: Some(3),
            ..Default::default()
        }),
        resources: spec
            .resources
            .clone()
            .or_else(|| defaults.resources.clone()),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        volume_mounts: Some(mounts),
        env: (!env.is_empty()).then_some(env),
        ..Default::default()
    };
    let deployment = Deployment {
        metadata: meta(name.clone(), BTreeMap::new()),
        spec: DeploymentSpec {
            replicas: Some(spec.replicas),
            selector: LabelSelector {
                match_labels: Some(selector(&name)),
                ..Default::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_unavailable: Some(IntOrString::Int(0)),
                    max_surge: Some(IntOrString::Int(1)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(&name)),
                    annotations: (!template_annotations.is_empty()).then_some(template_annotations),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(name.clone()),
                    automount_service_account_token: Some(false),
                    containers: vec![container],
                    volumes: Some(volumes),
                    node_selector: (!spec.node_selector.is_empty())
                        .then(|| spec.node_selector.clone()),
                    tolerations: (!spec.tolerations.is_empty()).then(|| spec.tolerations.clone()),
                    termination_grace_period_seconds: Some(grace.as_secs() as i64 + 10),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        run_as_group: Some(65532),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            },
            ..Default::default()
        },
        ..Default::default()
    };
    let service_spec = spec.service.clone().unwrap_or_default();
    let service = Service {
        metadata: meta(name.clone(), service_spec.annotations.clone()),
        spec: Some(ServiceSpec {
            type_: Some(
                match service_spec.type_ {
                    ServiceType::ClusterIP => "ClusterIP",
                    ServiceType::NodePort => "NodePort",
                    ServiceType::LoadBalancer => "LoadBalancer",
                }
                .into(),
            ),
            selector: Some(selector(&name)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: PUBLIC_PORT.into(),
                target_port: Some(IntOrString::String("http".into())),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let pdb = PodDisruptionBudget {
        metadata: meta(name.clone(), BTreeMap::new()),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector(&name)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    Ok(Desired {
        config_secret,
        service_account,
        deployment,
        service,
        pdb,
    })
}

/// The URL clients of a pool use: its Service in the cluster.
pub fn endpoint(pool: &str, namespace: &str) -> String {
    format!("http://{pool}.{namespace}.svc:{PUBLIC_PORT}")
}

#[cfg(test)]
mod tests {
    use airouter_crds::{router_pool::ConfigMapKeyRef, RouterPoolSpec};

    use super::*;
    use crate::router_pool::{render::render_config, Resolved, ResolvedCredential};

    fn resolved(master_key: &str) -> Resolved {
        Resolved {
            master_key: master_key.into(),
            admin_token: "adm".into(),
            shared_limits: None,
            trusted_ca_hash: None,
            credentials: vec![ResolvedCredential {
                name: "c".into(),
                spec: serde_json::from_value(
                    serde_json::json!({"type": "proxy", "baseUrl": "http://r:8080"}),
                )
                .unwrap(),
                api_key: None,
                proxy_target: None,
                vertex_credentials_json: None,
            }],
        }
    }

    fn pool() -> RouterPool {
        let spec: RouterPoolSpec = serde_json::from_value(serde_json::json!({
            "replicas": 3,
            "credentialSelector": {"matchLabels": {"pool": "main"}},
            "masterKeySecretRef": {"name": "m", "key": "k"},
            "service": {"type": "LoadBalancer", "annotations": {"a": "b"}},
            "nodeSelector": {"zone": "x"},
        }))
        .unwrap();
        let mut pool = RouterPool::new("main", spec);
        pool.metadata.namespace = Some("ai".into());
        pool.metadata.uid = Some("uid-1".into());
        pool
    }

    fn defaults() -> Defaults {
        Defaults {
            image: "ghcr.io/airouter/airouter:0.1.0".into(),
            resources: Some(
                serde_json::from_value(serde_json::json!({"requests": {"cpu": "100m"}})).unwrap(),
            ),
        }
    }

    fn desired(pool: &RouterPool) -> (Desired, RouterConfig) {
        let config = render_config(&pool.spec, &resolved("sk-master")).unwrap();
        (
            desired_state(pool, &config, None, &defaults()).unwrap(),
            config,
        )
    }

    #[test]
    fn everything_is_owned_by_the_pool_and_labelled() {
        let (d, _) = desired(&pool());
        let metas = [
            &d.config_secret.metadata,
            &d.service_account.metadata,
            &d.deployment.metadata,
            &d.service.metadata,
            &d.pdb.metadata,
        ];
        for meta in metas {
            let owner = &meta.owner_references.as_ref().unwrap()[0];
            assert_eq!(
                (
                    owner.kind.as_str(),
                    owner.name.as_str(),
                    owner.uid.as_str(),
                    owner.controller
                ),
                ("RouterPool", "main", "uid-1", Some(true))
            );
            assert_eq!(meta.namespace.as_deref(), Some("ai"));
            assert_eq!(
                meta.labels.as_ref().unwrap()["app.kubernetes.io/instance"],
                "main"
            );
        }
        assert_eq!(
            d.config_secret.metadata.name.as_deref(),
            Some("main-config")
        );
        assert_eq!(endpoint("main", "ai"), "http://main.ai.svc:8080");
    }

    #[test]
    fn the_config_secret_holds_the_rendered_document() {
        let (d, config) = desired(&pool());
        let text =
            String::from_utf8(d.config_secret.data.clone().unwrap()[CONFIG_KEY].0.clone()).unwrap();
        let parsed = RouterConfig::from_yaml(&text, &|_| None).unwrap().config;
        assert_eq!(parsed, config);
        assert_eq!(
            d.config_secret.metadata.annotations.clone().unwrap()[HASH_ANNOTATION],
            config.hash()
        );
        assert_eq!(
            (d.config_document(), d.config_hash()),
            (text.as_str(), config.hash().as_str())
        );
    }

    #[test]
    fn pods_are_locked_down_and_config_changes_do_not_roll_them() {
        let p = pool();
        let (d, _) = desired(&p);
        let spec = d.deployment.spec.clone();
        assert_eq!(spec.replicas, Some(3));
        let template = spec.template.clone();
        let pod = template.spec.unwrap();
        let c = &pod.containers[0];
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(
            (
                sc.run_as_non_root,
                sc.read_only_root_filesystem,
                sc.allow_privilege_escalation
            ),
            (Some(true), Some(true), Some(false))
        );
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_string()][..])
        );
        assert_eq!(c.image.as_deref(), Some("ghcr.io/airouter/airouter:0.1.0"));
        assert_eq!(
            c.resources
                .as_ref()
                .and_then(|r| r.requests.as_ref())
                .map(|r| r["cpu"].0.as_str()),
            Some("100m"),
            "the operator's default applies to a pool that sets none"
        );
        assert_eq!(c.volume_mounts.as_ref().unwrap()[0].mount_path, CONFIG_DIR);
        assert_eq!(
            c.readiness_probe
                .as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .path
                .as_deref(),
            Some("/health/readiness")
        );
        assert!(c.liveness_probe.as_ref().unwrap().tcp_socket.is_some());
        assert_eq!(pod.node_selector.unwrap()["zone"], "x");
        assert_eq!(pod.termination_grace_period_seconds, Some(45));
        // A different config (new master key) changes the Secret but not the pod template.
        let other = render_config(&p.spec, &resolved("sk-rotated")).unwrap();
        let d2 = desired_state(&p, &other, None, &defaults()).unwrap();
        assert_eq!(d2.deployment, d.deployment);
        assert_ne!(d2.config_secret, d.config_secret);
    }

    #[test]
    fn service_follows_the_spec() {
        let (d, _) = desired(&pool());
        let svc = d.service.spec.unwrap();
        assert_eq!(svc.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(d.service.metadata.annotations.unwrap()["a"], "b");
        assert_eq!(svc.ports.unwrap()[0].port, 8080);
        assert_eq!(svc.selector.unwrap().len(), 2);
    }

    #[test]
    fn a_trusted_ca_is_mounted_named_by_ssl_cert_file_and_its_content_rolls_the_pods() {
        let mut p = pool();
        p.spec.trusted_ca = Some(ConfigMapKeyRef {
            name: "corp-ca".into(),
            key: "bundle.pem".into(),
        });
        let config = render_config(&p.spec, &resolved("m")).unwrap();
        let d = desired_state(&p, &config, Some("h1"), &defaults()).unwrap();
        let template = d.deployment.spec.template.clone();
        let pod = template.spec.unwrap();
        let volume = &pod.volumes.as_ref().unwrap()[1];
        let source = volume.config_map.as_ref().unwrap();
        assert_eq!(source.name, "corp-ca");
        let item = &source.items.as_ref().unwrap()[0];
        assert_eq!(
            (item.key.as_str(), item.path.as_str()),
            ("bundle.pem", TRUSTED_CA_FILE)
        );
        let c = &pod.containers[0];
        let mount = &c.volume_mounts.as_ref().unwrap()[1];
        assert_eq!(
            (mount.name.as_str(), mount.mount_path.as_str()),
            ("trusted-ca", TRUSTED_CA_DIR)
        );
        assert_eq!(mount.read_only, Some(true));
        let env = &c.env.as_ref().unwrap()[0];
        assert_eq!(env.name, "SSL_CERT_FILE");
        assert_eq!(
            env.value.as_deref(),
            Some("/etc/airouter-trusted-ca/ca.pem")
        );
        let annotations = template.metadata.unwrap().annotations.unwrap();
        assert_eq!(annotations[TRUSTED_CA_ANNOTATION], "h1");

        let rotated = desired_state(&p, &config, Some("h2"), &defaults()).unwrap();
        assert_ne!(
            rotated.deployment, d.deployment,
            "a new bundle rolls the pods"
        );
        let (plain, _) = desired(&pool());
        let pod = plain.deployment.spec.template;
        assert!(pod.metadata.unwrap().annotations.is_none());
        assert!(
            pod.spec.unwrap().containers[0].env.is_none(),
            "no bundle, no SSL_CERT_FILE"
        );
    }

    #[test]
    fn a_pool_without_a_uid_is_refused() {
        let mut p = pool();
        p.metadata.uid = None;
        let config = render_config(&p.spec, &resolved("m")).unwrap();
        assert_eq!(
            desired_state(&p, &config, None, &Defaults::default()).unwrap_err(),
            MissingMetadata("uid")
        );
    }
}
