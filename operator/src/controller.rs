//! Wiring: the watches, the two controllers (RouterPool and Credential) and the live-state
//! poller, run until `shutdown` resolves. Only the leader runs this.
//!
//! RouterPool reconciles are triggered by a change of the pool's spec or labels, of a
//! Credential it selects (or selected), of a Secret its config reads, of a pool it proxies
//! to, and of the readiness or IP of one of its pods. Credential reconciles are triggered by
//! their own spec, their Secrets, the pools selecting or targeted by them, and a change of
//! what the data plane reports about them.

use std::{future::Future, sync::Arc, time::Duration};

use futures::{channel::mpsc, FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::{
    api::Api,
    core::PartialObjectMeta,
    runtime::{
        controller::{Action, Controller},
        events::{Recorder, Reporter},
        reflector,
        reflector::ObjectRef,
        watcher, WatchStreamExt,
    },
    Client, ResourceExt,
};
use tracing::{info, warn};

use crate::{
    context::{Context, Settings},
    credential::{self, live},
    error::Error,
    metrics::{Metrics, OutcomeLabels},
    router_pool::{self, pods},
    triggers::{self, Cred, Pool},
};

/// Runs the controllers until `shutdown` resolves.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    reporter: Reporter,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let pools_api: Api<Pool> = Api::all(client.clone());
    let creds_api: Api<Cred> = Api::all(client.clone());
    // Secrets are watched as metadata only: the values are read when a reconcile needs them.
    let secrets_api: Api<PartialObjectMeta<Secret>> = Api::all(client.clone());
    // ConfigMaps too (a pool's `spec.trustedCA` bundle); read when a reconcile needs one.
    let config_maps_api: Api<PartialObjectMeta<ConfigMap>> = Api::all(client.clone());
    let pods_api: Api<Pod> = Api::all(client.clone());
    let wc = watcher::Config::default;

    let (pool_store, pool_writer) = reflector::store::<Pool>();
    let (cred_store, cred_writer) = reflector::store::<Cred>();
    let (pod_store, pod_writer) = reflector::store::<Pod>();

    let pool_events = watcher(pools_api.clone(), wc())
        .default_backoff()
        .reflect(pool_writer);
    let cred_events = watcher(creds_api.clone(), wc())
        .default_backoff()
        .reflect(cred_writer);
    let pod_selector = format!("{}={}", pods::MANAGED_BY_LABEL, pods::MANAGED_BY);
    let pod_events = watcher(pods_api, wc().labels(&pod_selector))
        .default_backoff()
        .reflect(pod_writer);

    let ctx = Arc::new(Context::new(
        client.clone(),
        settings,
        metrics,
        Recorder::new(client.clone(), reporter),
        pool_store.clone(),
        cred_store.clone(),
        pod_store.clone(),
    ));

    let shutdown = shutdown.shared();

    // === RouterPool controller ===
    let pool_controller = {
        let pools = pool_store.clone();
        let on_cred = move |c: Cred| triggers::pools_for_credential(&c, &pools.state());
        let (pools, creds) = (pool_store.clone(), cred_store.clone());
        let on_secret =
            move |s: PartialObjectMeta<Secret>| secret_to_pools(&s, &pools.state(), &creds.state());
        let pools = pool_store.clone();
        let on_config_map = move |m: PartialObjectMeta<ConfigMap>| {
            let ns = m.namespace().unwrap_or_default();
            triggers::pools_trusting(&ns, &m.name_any(), &pools.state())
        };
        let (pools, creds) = (pool_store.clone(), cred_store.clone());
        let on_pool =
            move |p: Pool| triggers::pools_depending_on(&p, &pools.state(), &creds.state());
        let on_pod = |p: Pod| {
            let pool = pods::pool_of(&p).map(str::to_owned);
            pool.map(|name| {
                ObjectRef::<Pool>::new(&name).within(&p.namespace().unwrap_or_default())
            })
        };
        Controller::for_stream(
            triggers::changed_or_deleted(pool_events, triggers::spec_and_labels::<Pool>),
            pool_store.clone(),
        )
        .watches_stream(
            triggers::changed_or_deleted(cred_events, triggers::spec_and_labels::<Cred>),
            on_cred,
        )
        .watches_stream(
            triggers::changed_or_deleted(
                watcher(secrets_api.clone(), wc()).default_backoff(),
                triggers::any_change::<PartialObjectMeta<Secret>>,
            ),
            on_secret,
        )
        .watches_stream(
            triggers::changed_or_deleted(
                watcher(config_maps_api, wc()).default_backoff(),
                triggers::any_change::<PartialObjectMeta<ConfigMap>>,
            ),
            on_config_map,
        )
        .watches_stream(
            triggers::changed_or_deleted(
                watcher(pools_api.clone(), wc()).default_backoff(),
                triggers::spec_and_labels::<Pool>,
            ),
            on_pool,
        )
        .watches_stream(
            triggers::changed_or_deleted(pod_events, triggers::pod_readiness),
            on_pod,
        )
        .graceful_shutdown_on(shutdown.clone())
        .run(reconcile_pool, error_policy_pool, ctx.clone())
        .for_each(|result| async move {
            if let Err(e) = result {
                log_controller_error(router_pool::CONTROLLER, &e);
            }
        })
    };

    // === Credential controller ===
    let (live_tx, live_rx) = mpsc::unbounded::<ObjectRef<Cred>>();
    let cred_controller = {
        let (own_store, own_writer) = reflector::store::<Cred>();
        let own_events = watcher(creds_api, wc())
            .default_backoff()
            .reflect(own_writer);
        let (pools, creds) = (pool_store.clone(), own_store.clone());
        let on_secret = move |s: PartialObjectMeta<Secret>| {
            let ns = s.namespace().unwrap_or_default();
            triggers::credentials_for_secret(&ns, &s.name_any(), &pools.state(), &creds.state())
        };
        let creds = own_store.clone();
        let on_pool = move |p: Pool| triggers::credentials_for_pool(&p, &creds.state());
        Controller::for_stream(
            triggers::changed_or_deleted(own_events, triggers::spec_and_labels::<Cred>),
            own_store,
        )
        .watches_stream(
            triggers::changed_or_deleted(
                watcher(secrets_api, wc()).default_backoff(),
                triggers::any_change::<PartialObjectMeta<Secret>>,
            ),
            on_secret,
        )
        .watches_stream(
            triggers::changed_or_deleted(
                watcher(pools_api, wc()).default_backoff(),
                triggers::spec_and_labels::<Pool>,
            ),
            on_pool,
        )
        .reconcile_on(live_rx)
        .graceful_shutdown_on(shutdown.clone())
        .run(reconcile_credential, error_policy_credential, ctx.clone())
        .for_each(|result| async move {
            if let Err(e) = result {
                log_controller_error(credential::CONTROLLER, &e);
            }
        })
    };

    let poller = poll_live_state(ctx.clone(), live_tx);
    info!("controllers started");
    tokio::select! {
        _ = futures::future::join(pool_controller, cred_controller) => {}
        _ = poller => {}
        _ = shutdown => {}
    }
    info!("controllers stopped");
}

fn secret_to_pools(
    secret: &PartialObjectMeta<Secret>,
    pools: &[Arc<Pool>],
    creds: &[Arc<Cred>],
) -> Vec<ObjectRef<Pool>> {
    let ns = secret.namespace().unwrap_or_default();
    // The config and admin-token Secrets a pool owns: an edit by hand is reverted.
    let owned = secret
        .owner_references()
        .iter()
        .filter(|o| o.kind == "RouterPool" && o.api_version.starts_with(airouter_crds::GROUP))
        .map(|o| ObjectRef::<Pool>::new(&o.name).within(&ns));
    let mut out: Vec<ObjectRef<Pool>> = owned.collect();
    out.extend(triggers::pools_for_secret(
        &ns,
        &secret.name_any(),
        pools,
        creds,
    ));
    out
}

fn log_controller_error(
    controller: &str,
    e: &kube::runtime::controller::Error<Error, watcher::Error>,
) {
    use kube::runtime::controller::Error as E;
    match e {
        // A reconcile scheduled for an object deleted meanwhile: routine.
        E::ObjectNotFound(_) => tracing::debug!(controller, "{e}"),
        // Already counted and logged by the error policy.
        E::ReconcilerFailed(..) => {}
        // A watch failing (RBAC, API server down) stops changes from arriving: say so.
        E::QueueError(_) | E::RunnerError(_) => warn!(controller, "{e}"),
    }
}

fn key<K: kube::Resource>(controller: &str, obj: &K) -> String {
    format!(
        "{controller}/{}/{}",
        obj.namespace().unwrap_or_default(),
        obj.name_any()
    )
}

/// Waits until the pool, Credential and pod caches hold their first full list: reconciling
/// before that would render a pool with no Credentials.
async fn wait_for_caches(ctx: &Context) {
    ready(&ctx.pools).await;
    ready(&ctx.credentials).await;
    ready(&ctx.pods).await;
}

/// `Store::wait_until_ready` keeps one waker (a oneshot receiver shared by every caller), so
/// with several reconciles waiting at once only the last one is woken. Each check here is a
/// fresh, non-blocking look instead.
async fn ready<K>(store: &reflector::Store<K>)
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    while store.wait_until_ready().now_or_never().is_none() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn reconcile_pool(obj: Arc<Pool>, ctx: Arc<Context>) -> Result<Action, Error> {
    wait_for_caches(&ctx).await;
    let action = router_pool::reconcile(obj.clone(), ctx.clone()).await?;
    ctx.succeeded(&key(router_pool::CONTROLLER, obj.as_ref()));
    Ok(action)
}

fn error_policy_pool(obj: Arc<Pool>, err: &Error, ctx: Arc<Context>) -> Action {
    policy(router_pool::CONTROLLER, obj.as_ref(), err, &ctx)
}

async fn reconcile_credential(obj: Arc<Cred>, ctx: Arc<Context>) -> Result<Action, Error> {
    wait_for_caches(&ctx).await;
    let action = credential::reconcile(obj.clone(), ctx.clone()).await?;
    ctx.succeeded(&key(credential::CONTROLLER, obj.as_ref()));
    Ok(action)
}

fn error_policy_credential(obj: Arc<Cred>, err: &Error, ctx: Arc<Context>) -> Action {
    policy(credential::CONTROLLER, obj.as_ref(), err, &ctx)
}

/// User errors were recorded in status by the reconcile and wait for a change; anything that
/// reaches here is transient and is retried with exponential backoff.
fn policy<K: kube::Resource>(
    controller: &'static str,
    obj: &K,
    err: &Error,
    ctx: &Context,
) -> Action {
    ctx.metrics.failed(controller, err.reason());
    let delay = ctx.backoff(key(controller, obj));
    warn!(
        controller,
        object = %obj.name_any(),
        namespace = ?obj.namespace(),
        reason = err.reason(),
        retry_in_ms = delay.as_millis() as u64,
        "reconcile failed: {err}"
    );
    Action::requeue(delay)
}

/// Reads every ready pod's `/admin/state` each `live_interval` and hands the Credentials whose
/// live state changed to the Credential controller.
async fn poll_live_state(ctx: Arc<Context>, changed: mpsc::UnboundedSender<ObjectRef<Cred>>) {
    let mut tick = tokio::time::interval(ctx.settings.live_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        ready(&ctx.pools).await;
        ready(&ctx.pods).await;
        let pods = ctx.pods.state();
        let tokens = ctx.admin_tokens.lock().clone();
        let targets: Vec<live::PoolPods> = ctx
            .pools
            .state()
            .iter()
            .filter_map(|p| {
                let ns = p.namespace()?;
                let token = tokens.get(&ObjectRef::from_obj(p.as_ref()))?.clone();
                Some(live::PoolPods {
                    pods: pods::targets(pods.iter().map(|p| p.as_ref()), &ns, &p.name_any()),
                    namespace: ns,
                    admin_token: token,
                })
            })
            .collect();
        let timeout = ctx.settings.push_timeout.min(Duration::from_secs(5));
        let reading = live::poll(&ctx.push_client, &targets, timeout).await;
        for (outcome, n) in [("ok", reading.ok), ("failed", reading.failed)] {
            ctx.metrics
                .live_polls
                .get_or_create(&OutcomeLabels { outcome })
                .inc_by(n as u64);
        }
        for (namespace, name) in ctx.live.replace(reading.state, &reading.partial) {
            if changed
                .unbounded_send(ObjectRef::<Cred>::new(&name).within(&namespace))
                .is_err()
            {
                return;
            }
        }
    }
}
