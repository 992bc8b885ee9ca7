//! Resolve: what a pool's render needs from the cluster — the Credentials its selector picks,
//! the Secrets they and the pool reference, and the RouterPools that `proxy` Credentials point
//! at — turned into a [`Resolution`].
//!
//! Split into a pure half ([`secret_names`], [`resolve_credential`]: which Secrets are needed,
//! and what a Credential becomes given their values) and the I/O half ([`SecretValues::fetch`],
//! [`resolve`]: read them). A Credential that cannot be resolved is left out of the config
//! with a [`CredentialProblem`]; the rest keep serving.

use std::collections::{BTreeMap, BTreeSet};

use airouter_crds::{
    credential::SecretKeyRef, router_pool::RateLimitBackend, Credential, RouterPool,
};
use futures::future::try_join_all;
use k8s_openapi::{
    api::core::v1::{ConfigMap, Secret},
    ByteString,
};
use kube::{
    api::{Api, Patch, PatchParams, PostParams},
    core::{DeserializeGuard, ObjectMeta, Selector, SelectorExt},
    runtime::reflector::{ObjectRef, Store},
    Client, Resource, ResourceExt,
};

use super::{desired, ProxyTarget, Resolved, ResolvedCredential, SharedLimits};
use crate::error::{Error, Result};

/// The key of the generated admin token in the `<pool>-admin` Secret.
pub const ADMIN_TOKEN_KEY: &str = "token";

/// What resolve found: the render input, plus the Credentials left out and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolution {
    pub resolved: Resolved,
    pub skipped: Vec<(String, CredentialProblem)>,
}

/// Why a Credential cannot be used now. `reason` is the Credential's `Ready=False` reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CredentialProblem {
    pub reason: &'static str,
    pub message: String,
}

/// Secret values by name, within one namespace; `None`: the Secret does not exist.
#[derive(Clone, Debug, Default)]
pub struct SecretValues(BTreeMap<String, Option<BTreeMap<String, ByteString>>>);

impl SecretValues {
    /// Reads the named Secrets (all at once).
    pub async fn fetch(api: &Api<Secret>, names: BTreeSet<String>) -> Result<SecretValues> {
        let found = try_join_all(names.into_iter().map(|name| async move {
            let secret = api.get_opt(&name).await?;
            Ok::<_, Error>((name, secret.map(|s| s.data.unwrap_or_default())))
        }))
        .await?;
        Ok(SecretValues(found.into_iter().collect()))
    }

    #[cfg(test)]
    pub fn from_map(map: BTreeMap<String, Option<BTreeMap<String, ByteString>>>) -> SecretValues {
        SecretValues(map)
    }

    /// The UTF-8 value at `r`, or why there is none (the message never holds the value).
    pub fn value(&self, r: &SecretKeyRef, field: &str) -> Result<String, CredentialProblem> {
        let data = self
            .0
            .get(&r.name)
            .and_then(Option::as_ref)
            .ok_or_else(|| CredentialProblem {
                reason: "SecretNotFound",
                message: format!("Secret {} (from {field}) does not exist", r.name),
            })?;
        data.get(&r.key)
            .and_then(|v| String::from_utf8(v.0.clone()).ok())
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| CredentialProblem {
                reason: "SecretKeyMissing",
                message: format!(
                    "Secret {} has no non-empty UTF-8 key {:?} (from {field})",
                    r.name, r.key
                ),
            })
    }
}

/// Looks up a RouterPool of the namespace being resolved.
pub type PoolLookup<'a> = &'a dyn Fn(&str) -> Option<std::sync::Arc<DeserializeGuard<RouterPool>>>;

/// Pure: the Secrets `cred` needs (its key, Vertex file, and a proxy target pool's master key).
pub fn secret_names(cred: &Credential, pools: PoolLookup<'_>) -> Vec<String> {
    let spec = &cred.spec;
    let mut names: Vec<String> = spec
        .api_key_secret_ref
        .iter()
        .map(|r| r.name.clone())
        .chain(
            spec.vertex
                .iter()
                .map(|v| v.credentials_secret_ref.name.clone()),
        )
        .collect();
    if let Some(target) = spec
        .proxy
        .as_ref()
        .and_then(|p| pools(&p.router_pool_ref.name))
    {
        if let Ok(target) = &target.0 {
            names.push(target.spec.master_key_secret_ref.name.clone());
        }
    }
    names
}

/// Pure: a Credential with its Secrets read, or why it cannot be used.
///
/// `own_pool` is the pool being rendered: a proxy back to itself would only loop (and be
/// refused by the hop guard), so it is reported instead.
pub fn resolve_credential(
    cred: &Credential,
    secrets: &SecretValues,
    pools: PoolLookup<'_>,
    own_pool: Option<&str>,
) -> Result<ResolvedCredential, CredentialProblem> {
    let spec = &cred.spec;
    let name = cred.name_any();
    let namespace = cred.namespace().unwrap_or_default();
    // The schema only checks the scheme; the data plane's own rule decides, so that a URL it
    // would refuse leaves this Credential out instead of making pods refuse the whole config.
    if let Some(url) = &spec.base_url {
        airouter::config::base_url(url).map_err(|message| CredentialProblem {
            reason: "Invalid",
            message: format!("spec.baseUrl: {message}"),
        })?;
    }
    let api_key = spec
        .api_key_secret_ref
        .as_ref()
        .map(|r| secrets.value(r, "spec.apiKeySecretRef"))
        .transpose()?;
    let vertex_credentials_json = spec
        .vertex
        .as_ref()
        .map(|v| {
            secrets.value(
                &v.credentials_secret_ref,
                "spec.vertex.credentialsSecretRef",
            )
        })
        .transpose()?;
    let proxy_target = match &spec.proxy {
        None => None,
        Some(proxy) => {
            let target = &proxy.router_pool_ref.name;
            if own_pool == Some(target.as_str()) {
                return Err(CredentialProblem {
                    reason: "Invalid",
                    message: format!(
                        "spec.proxy.routerPoolRef names RouterPool {target}, which selects this Credential: a pool cannot fall back to itself"
                    ),
                });
            }
            let pool = pools(target).ok_or_else(|| CredentialProblem {
                reason: "RouterPoolNotFound",
                message: format!("spec.proxy.routerPoolRef: RouterPool {target} does not exist in namespace {namespace}"),
            })?;
            let pool = pool.0.as_ref().map_err(|e| CredentialProblem {
                reason: "RouterPoolNotFound",
                message: format!(
                    "spec.proxy.routerPoolRef: RouterPool {target} cannot be read: {}",
                    crate::malformed::describe("RouterPool", &e.error)
                ),
            })?;
            let master_key = secrets
                .value(
                    &pool.spec.master_key_secret_ref,
                    &format!("RouterPool {target} spec.masterKeySecretRef"),
                )
                .map_err(|p| CredentialProblem {
                    reason: p.reason,
                    message: format!("spec.proxy.routerPoolRef: {}", p.message),
                })?;
            Some(ProxyTarget {
                url: desired::endpoint(target, &namespace),
                master_key,
            })
        }
    };
    Ok(ResolvedCredential {
        name,
        spec: spec.clone(),
        api_key,
        proxy_target,
        vertex_credentials_json,
    })
}

/// Pure: whether `pool` selects `cred` (same namespace, selector matches its labels).
pub fn selects(pool: &RouterPool, cred: &Credential) -> bool {
    if pool.namespace() != cred.namespace() {
        return false;
    }
    selector(pool).is_ok_and(|s| s.matches(cred.labels()))
}

/// Pure: the pool's Credential selector, or an error naming the part that is wrong.
pub fn selector(pool: &RouterPool) -> Result<Selector> {
    let spec = &pool.spec.credential_selector;
    for (i, e) in spec.match_expressions.iter().flatten().enumerate() {
        let needs_values = match e.operator.as_str() {
            "In" | "NotIn" => true,
            "Exists" | "DoesNotExist" => false,
            other => {
                return Err(Error::BadSelector(format!(
                    "matchExpressions[{i}].operator {other:?} is not one of In, NotIn, Exists, DoesNotExist"
                )))
            }
        };
        let has_values = e.values.as_ref().is_some_and(|v| !v.is_empty());
        if needs_values != has_values {
            return Err(Error::BadSelector(format!(
                "matchExpressions[{i}] ({} {}): values must be {} for this operator",
                e.key,
                e.operator,
                if needs_values { "non-empty" } else { "empty" }
            )));
        }
    }
    Selector::try_from(spec.clone()).map_err(|e| Error::BadSelector(e.to_string()))
}

/// I/O: resolves everything `pool`'s config needs. The admin token Secret is created on first
/// use (a random token the operator pushes configs with).
pub async fn resolve(
    client: &Client,
    pool: &RouterPool,
    credentials: &Store<DeserializeGuard<Credential>>,
    pools: &Store<DeserializeGuard<RouterPool>>,
    remembered_token: Option<String>,
) -> Result<Resolution> {
    let namespace = pool.namespace().unwrap_or_default();
    let pool_name = pool.name_any();
    let selector = selector(pool)?;
    let lookup_pool = |name: &str| pools.get(&ObjectRef::new(name).within(&namespace));
    let mut selected: Vec<std::sync::Arc<DeserializeGuard<Credential>>> = credentials
        .state()
        .into_iter()
        .filter(|c| c.namespace().as_deref() == Some(namespace.as_str()))
        .filter(|c| selector.matches(c.labels()))
        .collect();
    selected.sort_by_key(|c| c.name_any());

    let secrets_api: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let admin_token = ensure_admin_token(&secrets_api, pool, remembered_token).await?;
    let mut names = BTreeSet::from([pool.spec.master_key_secret_ref.name.clone()]);
    let redis_ref = pool
        .spec
        .rate_limit
        .as_ref()
        .filter(|r| r.backend == RateLimitBackend::Redis)
        .and_then(|r| r.redis.as_ref());
    names.extend(redis_ref.map(|r| r.url_secret_ref.name.clone()));
    for cred in selected.iter().filter_map(|c| c.0.as_ref().ok()) {
        names.extend(secret_names(cred, &lookup_pool));
    }
    let secrets = SecretValues::fetch(&secrets_api, names).await?;

    let master_key = pool_secret(
        &secrets,
        &pool.spec.master_key_secret_ref,
        "spec.masterKeySecretRef",
        &namespace,
    )?;

    let shared_limits = match redis_ref {
        None => None,
        Some(r) => {
            let redis_url = pool_secret(
                &secrets,
                &r.url_secret_ref,
                "spec.rateLimit.redis.urlSecretRef",
                &namespace,
            )?;
            Some(SharedLimits {
                redis_url,
                key_prefix: format!("{namespace}/{pool_name}"),
                cluster: r.cluster,
            })
        }
    };

    let trusted_ca_hash = match &pool.spec.trusted_ca {
        None => None,
        Some(r) => {
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
            let map = api.get_opt(&r.name).await?;
            let pem = map.as_ref().and_then(|m| m.data.as_ref()?.get(&r.key));
            Some(
                trusted_ca_hash(map.is_some(), pem.map(String::as_str), &r.key).map_err(
                    |(reason, problem)| Error::TrustedCa {
                        namespace: namespace.clone(),
                        name: r.name.clone(),
                        problem,
                        reason,
                    },
                )?,
            )
        }
    };

    let mut resolved = Vec::new();
    let mut skipped = Vec::new();
    for cred in &selected {
        match &cred.0 {
            Err(invalid) => skipped.push((
                cred.name_any(),
                CredentialProblem {
                    reason: "Invalid",
                    message: format!(
                        "the object cannot be read: {}",
                        crate::malformed::describe("Credential", &invalid.error)
                    ),
                },
            )),
            Ok(cred) => match resolve_credential(cred, &secrets, &lookup_pool, Some(&pool_name)) {
                Ok(r) => resolved.push(r),
                Err(problem) => skipped.push((cred.name_any(), problem)),
            },
        }
    }
    Ok(Resolution {
        resolved: Resolved {
            master_key,
            admin_token,
            credentials: resolved,
            shared_limits,
            trusted_ca_hash,
        },
        skipped,
    })
}

/// A value the pool itself needs (its master key, its Redis URL): without it the pool cannot
/// run, so the error is the pool's, naming the Secret and `field`.
fn pool_secret(
    secrets: &SecretValues,
    r: &SecretKeyRef,
    field: &'static str,
    namespace: &str,
) -> Result<String> {
    secrets.value(r, field).map_err(|p| match p.reason {
        "SecretNotFound" => Error::SecretNotFound {
            namespace: namespace.to_owned(),
            secret: r.name.clone(),
            field,
        },
        _ => Error::SecretKeyMissing {
            secret: r.name.clone(),
            key: r.key.clone(),
            field,
        },
    })
}

/// The content hash of a `spec.trustedCA` bundle (what rolls the pods when it changes), or
/// the condition reason and message saying why it cannot be used.
pub fn trusted_ca_hash(
    exists: bool,
    pem: Option<&str>,
    key: &str,
) -> Result<String, (&'static str, String)> {
    if !exists {
        return Err((
            "ConfigMapNotFound",
            "does not exist; create it or correct spec.trustedCA.name".into(),
        ));
    }
    let Some(pem) = pem else {
        return Err((
            "ConfigMapKeyMissing",
            format!("has no key {key:?} in its data; add it or correct spec.trustedCA.key"),
        ));
    };
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err((
            "InvalidTrustedCA",
            format!("key {key:?} holds no PEM certificate (-----BEGIN CERTIFICATE-----); put the CA certificates there in PEM"),
        ));
    }
    Ok(airouter::config::document_hash(pem))
}

/// The name of the Secret holding a pool's admin token.
pub fn admin_secret_name(pool: &str) -> String {
    format!("{pool}-admin")
}

/// Reads the pool's admin token, creating the Secret (owned by the pool) the first time.
/// A Secret whose token was emptied or removed by hand gets `remembered` back (the token the
/// pods were last pushed with), or a new one: pods read it from their mounted config within
/// the kubelet's refresh.
async fn ensure_admin_token(
    api: &Api<Secret>,
    pool: &RouterPool,
    remembered: Option<String>,
) -> Result<String> {
    let name = admin_secret_name(&pool.name_any());
    let existing = |s: &Secret| {
        s.data
            .as_ref()
            .and_then(|d| d.get(ADMIN_TOKEN_KEY))
            .and_then(|v| String::from_utf8(v.0.clone()).ok())
            .filter(|v| !v.is_empty())
    };
    let current = api.get_opt(&name).await?;
    if let Some(token) = current.as_ref().and_then(existing) {
        return Ok(token);
    }
    let token = remembered.unwrap_or_else(|| {
        format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        )
    });
    let data = BTreeMap::from([(
        ADMIN_TOKEN_KEY.to_owned(),
        ByteString(token.clone().into_bytes()),
    )]);
    if current.is_some() {
        let repair = Secret {
            data: Some(data),
            ..Default::default()
        };
        api.patch(&name, &PatchParams::default(), &Patch::Merge(&repair))
            .await?;
        return Ok(token);
    }
    let owner = pool
        .controller_owner_ref(&())
        .ok_or(desired::MissingMetadata("uid"))?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: pool.namespace(),
            labels: Some(desired::labels(&pool.name_any())),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        data: Some(data),
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(token),
        // Another writer (a previous leader) created it first: use theirs.
        Err(kube::Error::Api(status)) if status.code == 409 => api
            .get_opt(&name)
            .await?
            .as_ref()
            .and_then(existing)
            .ok_or_else(|| Error::SecretKeyMissing {
                secret: name,
                key: ADMIN_TOKEN_KEY.into(),
                field: "the operator-managed admin token",
            }),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;

    fn cred(spec: serde_json::Value) -> Credential {
        let mut c = Credential::new("c", serde_json::from_value(spec).unwrap());
        c.metadata.namespace = Some("ai".into());
        c
    }

    #[test]
    fn a_trusted_ca_bundle_must_exist_and_hold_a_certificate() {
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let hash = trusted_ca_hash(true, Some(pem), "ca.pem").unwrap();
        assert_eq!(hash, airouter::config::document_hash(pem));
        assert_ne!(
            hash,
            trusted_ca_hash(true, Some(&pem.repeat(2)), "ca.pem").unwrap()
        );
        let reason = |exists, pem| trusted_ca_hash(exists, pem, "ca.pem").unwrap_err();
        assert_eq!(reason(false, None).0, "ConfigMapNotFound");
        let (why, message) = reason(true, None);
        assert_eq!(why, "ConfigMapKeyMissing");
        assert!(message.contains("\"ca.pem\""), "{message}");
        assert_eq!(
            reason(true, Some("not a certificate")).0,
            "InvalidTrustedCA"
        );
    }

    fn secrets(entries: &[(&str, &[(&str, &str)])]) -> SecretValues {
        SecretValues::from_map(
            entries
                .iter()
                .map(|(name, data)| {
                    (
                        name.to_string(),
                        Some(
                            data.iter()
                                .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                                .collect(),
                        ),
                    )
                })
                .collect(),
        )
    }

    fn backup_pool() -> Arc<DeserializeGuard<RouterPool>> {
        let spec = serde_json::from_value(json!({
            "credentialSelector": {}, "masterKeySecretRef": {"name": "backup-master", "key": "key"}
        }))
        .unwrap();
        Arc::new(DeserializeGuard(Ok(RouterPool::new("backup", spec))))
    }

    fn no_pools(_: &str) -> Option<Arc<DeserializeGuard<RouterPool>>> {
        None
    }

    #[test]
    fn a_missing_secret_or_key_is_named_without_the_value() {
        let c = cred(
            json!({"type": "openai", "baseUrl": "https://h", "apiKeySecretRef": {"name": "k", "key": "key"}}),
        );
        let p = resolve_credential(&c, &SecretValues::default(), &no_pools, None).unwrap_err();
        assert_eq!(p.reason, "SecretNotFound");
        assert!(p.message.contains("Secret k"), "{}", p.message);
        let p = resolve_credential(
            &c,
            &secrets(&[("k", &[("other", "sk-1")])]),
            &no_pools,
            None,
        )
        .unwrap_err();
        assert_eq!(p.reason, "SecretKeyMissing");
        assert!(!p.message.contains("sk-1"));
        let ok = resolve_credential(
            &c,
            &secrets(&[("k", &[("key", "sk-1\n")])]),
            &no_pools,
            None,
        )
        .unwrap();
        assert_eq!(
            ok.api_key.as_deref(),
            Some("sk-1"),
            "a trailing newline is trimmed"
        );
    }

    #[test]
    fn a_base_url_the_data_plane_refuses_leaves_the_credential_out() {
        let key = secrets(&[("k", &[("key", "sk-1")])]);
        for (url, says) in [
            ("https://", "invalid base_url"),
            ("https://h/v1?x=1", "query string"),
            ("https://u:pw word@h", "invalid base_url"),
        ] {
            let c = cred(
                json!({"type": "openai", "baseUrl": url, "apiKeySecretRef": {"name": "k", "key": "key"}}),
            );
            let p = resolve_credential(&c, &key, &no_pools, None).unwrap_err();
            assert_eq!(p.reason, "Invalid", "{url}");
            assert!(p.message.starts_with("spec.baseUrl: "), "{}", p.message);
            assert!(p.message.contains(says), "{url}: {}", p.message);
            assert!(!p.message.contains("pw word"), "{}", p.message);
        }
    }

    #[test]
    fn a_pool_reference_resolves_to_its_service_and_master_key() {
        let c = cred(json!({"type": "proxy", "proxy": {"routerPoolRef": {"name": "backup"}}}));
        let pools = |name: &str| (name == "backup").then(backup_pool);
        assert_eq!(secret_names(&c, &pools), ["backup-master"]);
        let p = resolve_credential(&c, &SecretValues::default(), &no_pools, None).unwrap_err();
        assert_eq!(p.reason, "RouterPoolNotFound");
        let ok = resolve_credential(
            &c,
            &secrets(&[("backup-master", &[("key", "sk-b")])]),
            &pools,
            Some("main"),
        )
        .unwrap();
        let target = ok.proxy_target.unwrap();
        assert_eq!(target.url, "http://backup.ai.svc:8080");
        assert_eq!(target.master_key, "sk-b");
        let own = resolve_credential(
            &c,
            &secrets(&[("backup-master", &[("key", "sk-b")])]),
            &pools,
            Some("backup"),
        )
        .unwrap_err();
        assert_eq!(own.reason, "Invalid");
    }

    #[test]
    fn a_bad_selector_names_the_expression_and_value() {
        let spec = serde_json::from_value(json!({
            "credentialSelector": {"matchExpressions": [
                {"key": "a", "operator": "Exists"},
                {"key": "pool", "operator": "Sometimes", "values": ["p"]}]},
            "masterKeySecretRef": {"name": "m", "key": "k"}
        }))
        .unwrap();
        let err = selector(&RouterPool::new("main", spec))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("matchExpressions[1].operator \"Sometimes\""),
            "{err}"
        );
        let spec = serde_json::from_value(json!({
            "credentialSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]},
            "masterKeySecretRef": {"name": "m", "key": "k"}
        }))
        .unwrap();
        let err = selector(&RouterPool::new("main", spec))
            .unwrap_err()
            .to_string();
        assert!(err.contains("values must be non-empty"), "{err}");
    }

    #[test]
    fn selection_is_by_namespace_and_labels() {
        let spec = serde_json::from_value(json!({
            "credentialSelector": {"matchLabels": {"pool": "main"}},
            "masterKeySecretRef": {"name": "m", "key": "k"}
        }))
        .unwrap();
        let mut pool = RouterPool::new("main", spec);
        pool.metadata.namespace = Some("ai".into());
        let mut c = cred(json!({"type": "proxy", "baseUrl": "http://x"}));
        assert!(!selects(&pool, &c));
        c.metadata.labels = Some([("pool".to_owned(), "main".to_owned())].into());
        assert!(selects(&pool, &c));
        c.metadata.namespace = Some("other".into());
        assert!(!selects(&pool, &c));
    }
}
