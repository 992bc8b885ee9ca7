//! What makes a controller look at an object again: a filter over watch streams that lets
//! through only changes that matter (and every deletion), and the pure mappers from a changed
//! Credential, Secret, RouterPool or Pod to the objects that depend on it.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    hash::{Hash, Hasher},
    sync::Arc,
};

use airouter_crds::{Credential, RouterPool};
use futures::{future::ready, Stream, StreamExt};
use kube::{
    core::DeserializeGuard,
    runtime::{reflector::ObjectRef, watcher},
    Resource, ResourceExt,
};

use k8s_openapi::api::core::v1::Pod;

use crate::router_pool::{pods, resolve::selects};

pub type Pool = DeserializeGuard<RouterPool>;
pub type Cred = DeserializeGuard<Credential>;

/// Objects from a watch whose `property` changed since the last time they were seen, and
/// every deleted object. Status-only writes (ours included) do not change the properties
/// the controllers filter on, so they do not trigger another reconcile.
pub fn changed_or_deleted<K, S>(
    events: S,
    property: fn(&K) -> Option<u64>,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send
where
    K: Resource + Send + 'static,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
{
    let mut seen: HashMap<(Option<String>, String), Option<u64>> = HashMap::new();
    events.filter_map(move |event| {
        let out = match event {
            Err(e) => Some(Err(e)),
            Ok(watcher::Event::Apply(obj) | watcher::Event::InitApply(obj)) => {
                let value = property(&obj);
                let key = (obj.namespace(), obj.name_any());
                match seen.insert(key, value) {
                    Some(previous) if previous == value => None,
                    _ => Some(Ok(obj)),
                }
            }
            Ok(watcher::Event::Delete(obj)) => {
                seen.remove(&(obj.namespace(), obj.name_any()));
                Some(Ok(obj))
            }
            Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
        };
        ready(out)
    })
}

fn hash_of(value: impl Hash) -> Option<u64> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut h);
    Some(h.finish())
}

/// The spec and labels: what a Credential's or RouterPool's consumers read.
pub fn spec_and_labels<K: Resource>(obj: &K) -> Option<u64> {
    hash_of((obj.meta().generation, obj.meta().labels.as_ref()))
}

/// A pod's readiness, IP and the time its `Ready` condition last flipped — a restarted
/// container re-reads its mounted config, and its Ready transition shows it.
pub fn pod_readiness(pod: &Pod) -> Option<u64> {
    let status = pod.status.as_ref();
    let ready_since = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .and_then(|c| c.last_transition_time.as_ref())
        .map(|t| t.0);
    hash_of((
        pods::is_ready(pod),
        status.and_then(|s| s.pod_ip.as_ref()),
        ready_since,
    ))
}

/// Every change.
pub fn any_change<K: Resource>(obj: &K) -> Option<u64> {
    hash_of(obj.meta().resource_version.as_ref())
}

fn pool_ref(pool: &Pool) -> ObjectRef<Pool> {
    ObjectRef::from_obj(pool)
}

fn valid(pools: &[Arc<Pool>]) -> impl Iterator<Item = (&Arc<Pool>, &RouterPool)> {
    pools
        .iter()
        .filter_map(|p| p.0.as_ref().ok().map(|ok| (p, ok)))
}

/// Pools that select `cred` now, and those its status says used it (its labels may have
/// changed so that they no longer do: they must drop it).
pub fn pools_for_credential(cred: &Cred, pools: &[Arc<Pool>]) -> Vec<ObjectRef<Pool>> {
    let namespace = cred.namespace();
    let mut out: HashSet<ObjectRef<Pool>> = HashSet::new();
    if let Ok(c) = &cred.0 {
        out.extend(
            valid(pools)
                .filter(|(_, p)| selects(p, c))
                .map(|(p, _)| pool_ref(p)),
        );
        for name in c.status.iter().flat_map(|s| &s.pools) {
            let mut r = ObjectRef::new(name);
            r.namespace = namespace.clone();
            out.insert(r);
        }
    } else {
        // A malformed Credential still has labels: pools selecting it must leave it out.
        out.extend(
            valid(pools)
                .filter(|(_, p)| p.namespace() == namespace)
                .filter(|(_, p)| {
                    crate::router_pool::resolve::selector(p)
                        .is_ok_and(|s| kube::core::SelectorExt::matches(&s, cred.labels()))
                })
                .map(|(p, _)| pool_ref(p)),
        );
    }
    out.into_iter().collect()
}

/// Names of the pools in `namespace` whose master key is Secret `secret`.
fn pools_keyed_by(namespace: &str, secret: &str, pools: &[Arc<Pool>]) -> BTreeSet<String> {
    valid(pools)
        .filter(|(_, p)| p.namespace().as_deref() == Some(namespace))
        .filter(|(_, p)| p.spec.master_key_secret_ref.name == secret)
        .map(|(_, p)| p.name_any())
        .collect()
}

/// Whether `cred` reads Secret `secret`: its key, its Vertex file, or (through a proxy to a
/// pool in `keyed`) that pool's master key.
fn reads_secret(cred: &Credential, secret: &str, keyed: &BTreeSet<String>) -> bool {
    let s = &cred.spec;
    s.api_key_secret_ref
        .as_ref()
        .is_some_and(|r| r.name == secret)
        || s.vertex
            .as_ref()
            .is_some_and(|v| v.credentials_secret_ref.name == secret)
        || s.proxy
            .as_ref()
            .is_some_and(|p| keyed.contains(&p.router_pool_ref.name))
}

/// Pools whose config uses Secret `secret` of `namespace`: as their master key, through a
/// selected Credential, or as the master key of a pool a selected proxy Credential targets.
pub fn pools_for_secret(
    namespace: &str,
    secret: &str,
    pools: &[Arc<Pool>],
    creds: &[Arc<Cred>],
) -> Vec<ObjectRef<Pool>> {
    let keyed = pools_keyed_by(namespace, secret, pools);
    let users: Vec<&Credential> = creds
        .iter()
        .filter_map(|c| c.0.as_ref().ok())
        .filter(|c| c.namespace().as_deref() == Some(namespace))
        .filter(|c| reads_secret(c, secret, &keyed))
        .collect();
    valid(pools)
        .filter(|(_, p)| p.namespace().as_deref() == Some(namespace))
        .filter(|(_, p)| {
            p.spec.master_key_secret_ref.name == secret
                || p.spec
                    .rate_limit
                    .as_ref()
                    .and_then(|r| r.redis.as_ref())
                    .is_some_and(|r| r.url_secret_ref.name == secret)
                || users.iter().any(|c| selects(p, c))
        })
        .map(|(p, _)| pool_ref(p))
        .collect()
}

/// Pools of `namespace` whose `spec.trustedCA` names ConfigMap `config_map`.
pub fn pools_trusting(
    namespace: &str,
    config_map: &str,
    pools: &[Arc<Pool>],
) -> Vec<ObjectRef<Pool>> {
    valid(pools)
        .filter(|(_, p)| p.namespace().as_deref() == Some(namespace))
        .filter(|(_, p)| {
            p.spec
                .trusted_ca
                .as_ref()
                .is_some_and(|r| r.name == config_map)
        })
        .map(|(p, _)| pool_ref(p))
        .collect()
}

/// Credentials that read Secret `secret` (their key, or their proxy target's master key).
pub fn credentials_for_secret(
    namespace: &str,
    secret: &str,
    pools: &[Arc<Pool>],
    creds: &[Arc<Cred>],
) -> Vec<ObjectRef<Cred>> {
    let keyed = pools_keyed_by(namespace, secret, pools);
    creds
        .iter()
        .filter(|c| c.namespace().as_deref() == Some(namespace))
        .filter(|c| c.0.as_ref().is_ok_and(|c| reads_secret(c, secret, &keyed)))
        .map(|c| ObjectRef::from_obj(c.as_ref()))
        .collect()
}

/// Pools that proxy to `pool` through one of their Credentials: its Service URL or master
/// key feeds their config, and its deletion leaves them with a dangling reference.
pub fn pools_depending_on(
    pool: &Pool,
    pools: &[Arc<Pool>],
    creds: &[Arc<Cred>],
) -> Vec<ObjectRef<Pool>> {
    let namespace = pool.namespace();
    let name = pool.name_any();
    let proxies: Vec<&Credential> = creds
        .iter()
        .filter_map(|c| c.0.as_ref().ok())
        .filter(|c| c.namespace() == namespace)
        .filter(|c| {
            c.spec
                .proxy
                .as_ref()
                .is_some_and(|p| p.router_pool_ref.name == name)
        })
        .collect();
    valid(pools)
        .filter(|(_, p)| proxies.iter().any(|c| selects(p, c)))
        .map(|(p, _)| pool_ref(p))
        .collect()
}

/// Credentials whose status depends on `pool`: those it selects (their `pools` list) and
/// those that proxy to it.
pub fn credentials_for_pool(pool: &Pool, creds: &[Arc<Cred>]) -> Vec<ObjectRef<Cred>> {
    let namespace = pool.namespace();
    let name = pool.name_any();
    creds
        .iter()
        .filter(|c| c.namespace() == namespace)
        .filter(|c| match (&c.0, &pool.0) {
            (Ok(c), Ok(p)) => {
                selects(p, c)
                    || c.status.iter().any(|s| s.pools.contains(&name))
                    || c.spec
                        .proxy
                        .as_ref()
                        .is_some_and(|x| x.router_pool_ref.name == name)
            }
            (Ok(c), Err(_)) => c.status.iter().any(|s| s.pools.contains(&name)),
            (Err(_), _) => false,
        })
        .map(|c| ObjectRef::from_obj(c.as_ref()))
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pool(name: &str, selector: &str, master: &str) -> Arc<Pool> {
        let mut p = RouterPool::new(
            name,
            serde_json::from_value(json!({
                "credentialSelector": {"matchLabels": {"pool": selector}},
                "masterKeySecretRef": {"name": master, "key": "key"}
            }))
            .unwrap(),
        );
        p.metadata.namespace = Some("ai".into());
        Arc::new(DeserializeGuard(Ok(p)))
    }

    fn cred(name: &str, label: &str, spec: serde_json::Value) -> Arc<Cred> {
        let mut c = Credential::new(name, serde_json::from_value(spec).unwrap());
        c.metadata.namespace = Some("ai".into());
        c.metadata.labels = Some([("pool".to_owned(), label.to_owned())].into());
        Arc::new(DeserializeGuard(Ok(c)))
    }

    fn names<K: Resource>(refs: Vec<ObjectRef<K>>) -> Vec<String>
    where
        K::DynamicType: Eq + Hash + Clone,
    {
        let mut v: Vec<String> = refs.into_iter().map(|r| r.name).collect();
        v.sort();
        v
    }

    #[test]
    fn a_config_map_change_reaches_the_pools_that_trust_it() {
        let mut trusting = RouterPool::new(
            "trusting",
            serde_json::from_value(json!({
                "credentialSelector": {"matchLabels": {"pool": "t"}},
                "masterKeySecretRef": {"name": "m", "key": "key"},
                "trustedCA": {"name": "corp-ca", "key": "ca.pem"}
            }))
            .unwrap(),
        );
        trusting.metadata.namespace = Some("ai".into());
        let pools = vec![
            Arc::new(DeserializeGuard(Ok(trusting))),
            pool("main", "main", "main-master"),
        ];
        assert_eq!(names(pools_trusting("ai", "corp-ca", &pools)), ["trusting"]);
        assert!(pools_trusting("other", "corp-ca", &pools).is_empty());
        assert!(pools_trusting("ai", "kube-root-ca.crt", &pools).is_empty());
    }

    fn topology() -> (Vec<Arc<Pool>>, Vec<Arc<Cred>>) {
        let pools = vec![
            pool("main", "main", "main-master"),
            pool("backup", "backup", "backup-master"),
        ];
        let creds = vec![
            cred(
                "a",
                "main",
                json!({"type": "openai", "baseUrl": "https://h", "apiKeySecretRef": {"name": "key-a", "key": "key"}}),
            ),
            cred(
                "to-backup",
                "main",
                json!({"type": "proxy", "proxy": {"routerPoolRef": {"name": "backup"}}, "isFallback": true}),
            ),
            cred(
                "b",
                "backup",
                json!({"type": "openai", "baseUrl": "https://h", "apiKeySecretRef": {"name": "key-b", "key": "key"}}),
            ),
        ];
        (pools, creds)
    }

    #[test]
    fn a_secret_maps_to_every_pool_whose_config_it_feeds() {
        let (pools, creds) = topology();
        assert_eq!(
            names(pools_for_secret("ai", "key-a", &pools, &creds)),
            ["main"]
        );
        assert_eq!(
            names(pools_for_secret("ai", "key-b", &pools, &creds)),
            ["backup"]
        );
        assert_eq!(
            names(pools_for_secret("ai", "backup-master", &pools, &creds)),
            ["backup", "main"],
            "main proxies to backup with backup's master key"
        );
        assert!(pools_for_secret("other", "key-a", &pools, &creds).is_empty());
        assert_eq!(
            names(credentials_for_secret(
                "ai",
                "backup-master",
                &pools,
                &creds
            )),
            ["to-backup"]
        );
    }

    #[test]
    fn pool_changes_reach_the_pools_and_credentials_that_depend_on_them() {
        let (pools, creds) = topology();
        assert_eq!(
            names(pools_depending_on(&pools[1], &pools, &creds)),
            ["main"]
        );
        assert!(pools_depending_on(&pools[0], &pools, &creds).is_empty());
        assert_eq!(
            names(credentials_for_pool(&pools[1], &creds)),
            ["b", "to-backup"]
        );
        assert_eq!(names(pools_for_credential(&creds[0], &pools)), ["main"]);
    }

    #[test]
    fn a_credential_relabelled_away_still_reaches_its_old_pool() {
        let (pools, _) = topology();
        let mut moved = Credential::new(
            "a",
            serde_json::from_value(json!({"type": "proxy", "baseUrl": "http://x"})).unwrap(),
        );
        moved.metadata.namespace = Some("ai".into());
        moved.metadata.labels = Some([("pool".to_owned(), "none".to_owned())].into());
        moved.status = Some(airouter_crds::CredentialStatus {
            pools: vec!["main".into()],
            ..Default::default()
        });
        assert_eq!(
            names(pools_for_credential(&DeserializeGuard(Ok(moved)), &pools)),
            ["main"]
        );
    }

    fn pod(name: &str, pool: &str, ready: &str, ip: Option<&str>) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ai", "labels": {
                "app.kubernetes.io/instance": pool, "app.kubernetes.io/managed-by": "airouter-operator"}},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": ready}]}
        }))
        .unwrap()
    }

    #[test]
    fn pod_readiness_follows_readiness_and_ip() {
        let a = pod("a", "main", "True", Some("10.0.0.1"));
        assert_eq!(pod_readiness(&a), pod_readiness(&a.clone()));
        assert_ne!(
            pod_readiness(&a),
            pod_readiness(&pod("a", "main", "False", Some("10.0.0.1")))
        );
        assert_ne!(
            pod_readiness(&a),
            pod_readiness(&pod("a", "main", "True", Some("10.0.0.9")))
        );
        assert_eq!(pods::pool_of(&a), Some("main"));
    }

    #[tokio::test]
    async fn only_changes_of_the_property_and_deletions_pass() {
        let obj = |rv: &str, generation: i64| {
            let mut c = Credential::new(
                "a",
                serde_json::from_value(json!({"type": "proxy", "baseUrl": "http://x"})).unwrap(),
            );
            c.metadata.resource_version = Some(rv.into());
            c.metadata.generation = Some(generation);
            c
        };
        let events = futures::stream::iter(vec![
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(obj("1", 1))),
            Ok(watcher::Event::InitDone),
            Ok(watcher::Event::Apply(obj("2", 1))), // status-only write
            Ok(watcher::Event::Apply(obj("3", 2))), // spec change
            Ok(watcher::Event::Delete(obj("4", 2))),
        ]);
        let passed: Vec<String> = changed_or_deleted(events, spec_and_labels::<Credential>)
            .map(|r| r.unwrap().metadata.resource_version.unwrap())
            .collect()
            .await;
        assert_eq!(passed, ["1", "3", "4"]);
    }
}
