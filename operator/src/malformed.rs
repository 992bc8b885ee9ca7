//! An object the API server holds but the operator cannot read as its type (written under an
//! older, looser schema, for instance) gets `Ready=False` with reason `Malformed` and an
//! Event, and waits for a fix — instead of failing every reconcile.
//!
//! The status is written with a JSON merge patch: server-side apply would first have to turn
//! the stored object into the current typed schema, which is exactly what fails for it.

use airouter_crds::condition::{Condition, ConditionStatus};
use kube::{
    api::{Api, Patch, PatchParams},
    runtime::events::EventType,
    Resource, ResourceExt,
};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::{
    context::{now, Context},
    error::{Error, Result},
    router_pool::status::Note,
};

/// Records why `obj` cannot be used. `kind` names it in messages.
pub async fn record<K>(
    ctx: &Context,
    api: &Api<K>,
    obj: &K,
    kind: &'static str,
    error: &str,
) -> Result<()>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
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
    Ok(())
}
