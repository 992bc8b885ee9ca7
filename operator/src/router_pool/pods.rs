//! Pure: which of a pool's pods can take a config push, from the pods the operator watches.
//!
//! A pod counts when it carries the pool's labels, is not terminating, has an IP and its
//! `Ready` condition is true. The admin port is the container port named `admin` (the
//! Deployment declares it), falling back to the default.

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use super::{push::PodTarget, render::ADMIN_PORT};

pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "airouter-operator";

/// The pool a pod belongs to, by its labels.
pub fn pool_of(pod: &Pod) -> Option<&str> {
    let labels = pod.labels();
    (labels.get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY))
        .then(|| labels.get(INSTANCE_LABEL).map(String::as_str))
        .flatten()
}

/// True when the pod is serving: Ready, with an IP, not being deleted.
pub fn is_ready(pod: &Pod) -> bool {
    let Some(status) = &pod.status else {
        return false;
    };
    pod.metadata.deletion_timestamp.is_none()
        && status.pod_ip.as_deref().is_some_and(|ip| !ip.is_empty())
        && status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// The ready pods of `pool` in `namespace`, sorted by name, as push targets.
pub fn targets<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    namespace: &str,
    pool: &str,
) -> Vec<PodTarget> {
    let mut out: Vec<PodTarget> = pods
        .into_iter()
        .filter(|p| p.namespace().as_deref() == Some(namespace) && pool_of(p) == Some(pool))
        .filter(|p| is_ready(p))
        .filter_map(|p| {
            let ip = p.status.as_ref()?.pod_ip.clone()?;
            let port = p
                .spec
                .iter()
                .flat_map(|s| &s.containers)
                .flat_map(|c| c.ports.iter().flatten())
                .find(|port| port.name.as_deref() == Some("admin"))
                .and_then(|port| u16::try_from(port.container_port).ok())
                .unwrap_or(ADMIN_PORT);
            Some(PodTarget {
                name: p.name_any(),
                ip,
                port,
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(name: &str, pool: &str, ready: &str, ip: Option<&str>) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ai", "labels": {
                "app.kubernetes.io/instance": pool, "app.kubernetes.io/managed-by": "airouter-operator"}},
            "spec": {"containers": [{"name": "airouter", "ports": [{"name": "admin", "containerPort": 9191}]}]},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": ready}]}
        }))
        .unwrap()
    }

    #[test]
    fn only_ready_pods_of_the_pool_with_an_ip_are_targets() {
        let pods = [
            pod("b", "main", "True", Some("10.0.0.2")),
            pod("a", "main", "True", Some("10.0.0.1")),
            pod("c", "main", "False", Some("10.0.0.3")),
            pod("d", "main", "True", None),
            pod("e", "other", "True", Some("10.0.0.5")),
        ];
        let t = targets(&pods, "ai", "main");
        assert_eq!(
            t,
            [
                PodTarget {
                    name: "a".into(),
                    ip: "10.0.0.1".into(),
                    port: 9191
                },
                PodTarget {
                    name: "b".into(),
                    ip: "10.0.0.2".into(),
                    port: 9191
                }
            ]
        );
        assert!(targets(&pods, "elsewhere", "main").is_empty());
    }
}
