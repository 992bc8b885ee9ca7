//! An object the API server holds but the operator cannot read as its type (written under an
//! older, looser schema, for instance) gets `Ready=False` with reason `Malformed` and an
//! Event, and waits for a fix — instead of failing every reconcile.
//!
//! The status is written with a JSON merge patch: server-side apply would first have to turn
//! the stored object into the current typed schema, which is exactly what fails for it.

use airouter_crds::condition::{Condition, ConditionStatus};
use std::time::Instant;

use k8s_openapi::NamespaceResourceScope;
use kube::{
    api::{Api, Patch, PatchParams},
    runtime::{controller::Action, events::EventType},
    Resource, ResourceExt,
};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::{
    context::{now, Context},
    error::{Error, Result},
    router_pool::status::Note,
};

/// Records why `obj` cannot be used (`kind` names it in messages), counts the reconcile for
/// `controller` and waits for the object to change.
pub async fn handle<K>(
    ctx: &Context,
    obj: &K,
    kind: &'static str,
    error: &str,
    controller: &'static str,
    started: Instant,
) -> Result<Action>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    let err = Error::Malformed {
        kind,
        name: obj.name_any(),
        message: error.to_owned(),
    };
    let generation = obj.meta().generation;
    let mut ready = Condition::new(
        "Ready",
        ConditionStatus::False,
        err.reason(),
        err.to_string(),
        generation,
    );
    ready.last_transition_time = now();
    let patch = json!({"status": {"observedGeneration": generation, "conditions": [ready]}});
    api.patch_status(
        &obj.name_any(),
        &PatchParams::default(),
        &Patch::Merge(patch),
    )
    .await?;
    ctx.publish(
        &obj.object_ref(&()),
        Note {
            type_: EventType::Warning,
            reason: err.reason().into(),
            message: err.to_string(),
        },
    )
    .await;
    ctx.metrics
        .reconciled(controller, started.elapsed(), "user_error");
    Ok(Action::await_change())
}
