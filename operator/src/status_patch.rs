//! I/O: write a status subresource with server-side apply (field manager `airouter`), only
//! when the computed status differs from the stored one. Together with conditions that keep
//! their `lastTransitionTime` (see `airouter_crds::condition::merge`), an object whose facts
//! do not change is never rewritten.

use airouter_crds::FIELD_MANAGER;
use kube::{
    api::{Api, Patch, PatchParams},
    Resource,
};
use serde::{de::DeserializeOwned, Serialize};
use serde_json::json;

use crate::error::Result;

/// Stores `new` as the status of object `name` unless it equals `stored`. Returns whether it
/// wrote.
pub async fn write_if_changed<K, S>(
    api: &Api<K>,
    name: &str,
    stored: Option<&S>,
    new: &S,
) -> Result<bool>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    S: Serialize + PartialEq,
{
    if stored == Some(new) {
        return Ok(false);
    }
    let patch = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": new,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await?;
    Ok(true)
}
