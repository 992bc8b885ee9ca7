//! RouterPool reconciliation, as typed steps (design §1, style §11.3):
//!
//! [`resolve`] (I/O: Credentials, Secrets, proxy targets) → [`render`] (pure: the data
//! plane's own `RouterConfig`) → [`desired`] (pure: the objects the pool owns) → [`apply`]
//! (I/O: server-side apply) → [`push`] (I/O: `PUT /admin/config` to every ready pod) →
//! [`status`] (pure build, then a write only when it changed).

pub mod apply;
pub mod desired;
pub mod pods;
pub mod push;
pub mod render;
pub mod resolve;
pub mod status;

use std::{sync::Arc, time::Instant};

use airouter_crds::{CredentialSpec, RouterPool};
use kube::{api::Api, runtime::controller::Action, Resource, ResourceExt};
use tracing::{debug, info, instrument};

use self::{
    push::{PodOutcome, PushReport},
    resolve::CredentialProblem,
    status::{Observed, Refused, Synced},
};
use crate::{
    context::{now, Context},
    error::Result,
    metrics::OutcomeLabels,
    triggers::Pool,
};

pub const CONTROLLER: &str = "routerpool";

/// The shortest wait before pushing again to a pod that missed a push.
const PUSH_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// What the resolve step found for one pool: the hand-off to [`render::render_config`].
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    /// From `spec.masterKeySecretRef`.
    pub master_key: String,
    /// The token the operator pushes configs with (its own Secret per pool).
    pub admin_token: String,
    /// The Credentials the selector picked whose references all resolved, in any order.
    pub credentials: Vec<ResolvedCredential>,
    /// `spec.rateLimit.backend: redis`: where the replicas share their limits.
    pub shared_limits: Option<SharedLimits>,
    /// The content hash of the `spec.trustedCA` bundle: pods roll when it changes.
    pub trusted_ca_hash: Option<String>,
}

/// The Redis a pool's replicas share windows and bans in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedLimits {
    /// From `spec.rateLimit.redis.urlSecretRef`.
    pub redis_url: String,
    /// `<namespace>/<pool>`: pools sharing one Redis keep apart.
    pub key_prefix: String,
    /// `spec.rateLimit.redis.cluster`.
    pub cluster: bool,
}

/// One selected Credential with its Secrets read.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedCredential {
    /// The Credential's object name: the credential name in the router config.
    pub name: String,
    pub spec: CredentialSpec,
    /// From `spec.apiKeySecretRef`.
    pub api_key: Option<String>,
    /// For `spec.proxy.routerPoolRef`: the target pool's Service URL and master key.
    pub proxy_target: Option<ProxyTarget>,
    /// For vertex-ai: the service-account JSON from `spec.vertex.credentialsSecretRef`.
    pub vertex_credentials_json: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyTarget {
    pub url: String,
    pub master_key: String,
}

/// The outcome of resolve → render → apply → push.
struct Pushed {
    hash: String,
    primary: i32,
    fallback: i32,
    skipped: Vec<(String, CredentialProblem)>,
    report: PushReport,
}

/// Reconciles one RouterPool.
#[instrument(skip_all, fields(pool = %obj.name_any(), namespace = ?obj.namespace()))]
pub async fn reconcile(obj: Arc<Pool>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let namespace = obj
        .namespace()
        .ok_or(desired::MissingMetadata("namespace"))?;
    let name = obj.name_any();
    let api: Api<Pool> = Api::namespaced(ctx.client.clone(), &namespace);
    let pool = match &obj.0 {
        Ok(pool) => pool,
        Err(invalid) => {
            return crate::malformed::handle(
                &ctx,
                obj.as_ref(),
                "RouterPool",
                &invalid.error,
                CONTROLLER,
                started,
            )
            .await;
        }
    };

    let ready_pods = {
        let pods = ctx.pods.state();
        pods::targets(pods.iter().map(|p| p.as_ref()), &namespace, &name)
    };
    let pushed = match sync(&ctx, pool, &namespace, &ready_pods).await {
        Ok(pushed) => Ok(pushed),
        Err(e) if e.is_user_error() => Err(Refused {
            reason: e.reason(),
            message: e.to_string(),
        }),
        Err(e) => {
            ctx.metrics
                .reconciled(CONTROLLER, started.elapsed(), "error");
            return Err(e);
        }
    };
    // A pod that missed the push is pushed again: soon at first, then backing off (5 s
    // doubling to 5 min) while it keeps missing it — unreachable behind a NetworkPolicy, or
    // refusing the document — instead of re-reading every Secret every 5 s for ever.
    let push_key = format!("push/{namespace}/{name}");
    let (action, result) = match &pushed {
        Ok(p) if p.report.synced(&p.hash) < ready_pods.len() => {
            let retry = ctx.backoff(push_key).max(PUSH_RETRY);
            (Action::requeue(retry), "ok")
        }
        Ok(_) => {
            ctx.succeeded(&push_key);
            (Action::requeue(ctx.settings.resync), "ok")
        }
        Err(_) => (Action::await_change(), "user_error"),
    };
    let config = match &pushed {
        Ok(p) => Ok(Synced {
            hash: &p.hash,
            primary: p.primary,
            fallback: p.fallback,
            skipped: &p.skipped,
            report: &p.report,
        }),
        Err(refused) => Err(refused.clone()),
    };
    let observed = Observed {
        ready_replicas: ready_pods.len() as i32,
        config,
    };
    let status = status::build_status(pool, &observed, &now());
    for note in status::events(pool.status.as_ref(), &status) {
        ctx.publish(&obj.object_ref(&()), note).await;
    }
    if crate::status_patch::write_if_changed(&api, &name, pool.status.as_ref(), &status).await? {
        ctx.metrics
            .status_writes
            .get_or_create(&crate::metrics::KindLabels { kind: "RouterPool" })
            .inc();
        debug!("status written");
    }
    ctx.metrics
        .reconciled(CONTROLLER, started.elapsed(), result);
    Ok(action)
}

/// resolve → render → desired → apply → push.
async fn sync(
    ctx: &Context,
    pool: &RouterPool,
    namespace: &str,
    ready_pods: &[push::PodTarget],
) -> Result<Pushed> {
    let pool_ref = kube::runtime::reflector::ObjectRef::new(&pool.name_any()).within(namespace);
    let remembered = ctx.admin_tokens.lock().get(&pool_ref).cloned();
    let resolution =
        resolve::resolve(&ctx.client, pool, &ctx.credentials, &ctx.pools, remembered).await?;
    let config = render::render_config(&pool.spec, &resolution.resolved)?;
    let trusted_ca = resolution.resolved.trusted_ca_hash.as_deref();
    let desired = desired::desired_state(pool, &config, trusted_ca, &ctx.settings.defaults)?;
    render::check_document(desired.config_document(), desired.config_hash(), &config)?;
    apply::apply(&ctx.client, namespace, &desired).await?;
    let (document, hash) = (desired.config_document(), desired.config_hash().to_owned());
    let token = resolution.resolved.admin_token;
    ctx.admin_tokens.lock().insert(pool_ref, token.clone());

    let started = Instant::now();
    let report = push::push(
        &ctx.push_client,
        ready_pods,
        document,
        &token,
        ctx.settings.push_timeout,
    )
    .await;
    if !ready_pods.is_empty() {
        ctx.metrics
            .push_duration
            .observe(started.elapsed().as_secs_f64());
    }
    for (pod, outcome) in &report.pods {
        let label = match outcome {
            PodOutcome::Synced { .. } => "synced",
            PodOutcome::Rejected { .. } => "rejected",
            PodOutcome::Unreachable { .. } => "unreachable",
        };
        ctx.metrics
            .pod_pushes
            .get_or_create(&OutcomeLabels { outcome: label })
            .inc();
        if label != "synced" {
            info!(pod, outcome = ?outcome, "config push did not take");
        }
    }
    let fallback = config.credentials.iter().filter(|c| c.is_fallback).count() as i32;
    Ok(Pushed {
        primary: config.credentials.len() as i32 - fallback,
        fallback,
        hash,
        skipped: resolution.skipped,
        report,
    })
}
