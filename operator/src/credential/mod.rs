//! Credential reconciliation: resolve its references (I/O: Secrets, the proxy target pool) →
//! [`status::build_status`] (pure: `Ready`, the pools selecting it, and the live state the
//! data plane reports, from [`live`]) → a status write only when it changed.

pub mod live;
pub mod status;

use std::{collections::BTreeSet, sync::Arc, time::Instant};

use airouter_crds::Credential;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    api::Api,
    runtime::{controller::Action, reflector::ObjectRef},
    Resource, ResourceExt,
};
use tracing::instrument;

use crate::{
    context::{now, Context},
    error::Result,
    metrics::KindLabels,
    router_pool::{
        desired::MissingMetadata,
        resolve::{resolve_credential, secret_names, selects, SecretValues},
    },
    triggers::Cred,
};

pub const CONTROLLER: &str = "credential";

#[instrument(skip_all, fields(credential = %obj.name_any(), namespace = ?obj.namespace()))]
pub async fn reconcile(obj: Arc<Cred>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let namespace = obj.namespace().ok_or(MissingMetadata("namespace"))?;
    let name = obj.name_any();
    let api: Api<Credential> = Api::namespaced(ctx.client.clone(), &namespace);
    let cred = match &obj.0 {
        Ok(cred) => cred,
        Err(invalid) => {
            return crate::malformed::handle(
                &ctx,
                obj.as_ref(),
                "Credential",
                &invalid.error,
                CONTROLLER,
                started,
            )
            .await;
        }
    };

    let pools: Vec<String> = {
        let mut names: Vec<String> = ctx
            .pools
            .state()
            .iter()
            .filter_map(|p| p.0.as_ref().ok())
            .filter(|p| selects(p, cred))
            .map(|p| p.name_any())
            .collect();
        names.sort();
        names
    };
    let lookup = |pool: &str| ctx.pools.get(&ObjectRef::new(pool).within(&namespace));
    let names: BTreeSet<String> = secret_names(cred, &lookup).into_iter().collect();
    let secrets_api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let secrets = match SecretValues::fetch(&secrets_api, names).await {
        Ok(s) => s,
        Err(e) => {
            ctx.metrics
                .reconciled(CONTROLLER, started.elapsed(), "error");
            return Err(e);
        }
    };
    // Resolved as every pool that selects it resolves it (a proxy back to its own pool is
    // left out there, and must not read Ready here), or once when none selects it.
    let problem = (pools.iter().map(|pool| Some(pool.as_str())))
        .chain(pools.is_empty().then_some(None))
        .find_map(|own_pool| resolve_credential(cred, &secrets, &lookup, own_pool).err());
    let live = ctx.live.get(&namespace, &name);
    let status = status::build_status(cred, problem.as_ref(), pools, live, &now());
    for note in status::events(cred.status.as_ref(), &status) {
        ctx.publish(&obj.object_ref(&()), note).await;
    }
    if crate::status_patch::write_if_changed(&api, &name, cred.status.as_ref(), &status).await? {
        ctx.metrics
            .status_writes
            .get_or_create(&KindLabels { kind: "Credential" })
            .inc();
    }
    ctx.metrics.reconciled(
        CONTROLLER,
        started.elapsed(),
        if problem.is_some() {
            "user_error"
        } else {
            "ok"
        },
    );
    Ok(Action::requeue(ctx.settings.resync))
}
