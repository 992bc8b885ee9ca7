//! I/O: server-side apply of a pool's [`Desired`] objects as the field manager `airouter`.
//!
//! Applying an unchanged object is a no-op in the API server (no write, no new
//! resourceVersion), so this runs on every reconcile and repairs any drift.

use airouter_crds::FIELD_MANAGER;
use k8s_openapi::NamespaceResourceScope;
use kube::{
    api::{Api, Patch, PatchParams},
    Client, Resource, ResourceExt,
};
use serde::{de::DeserializeOwned, Serialize};

use super::desired::Desired;
use crate::error::Result;

/// Applies every object the pool owns. The config Secret goes first: pods created for a new
/// Deployment must find it to start.
pub async fn apply(client: &Client, namespace: &str, desired: &Desired) -> Result<()> {
    // Destructured without `..`: a new owned object cannot be forgotten here.
    let Desired {
        config_secret,
        service_account,
        deployment,
        service,
        pdb,
    } = desired;
    ssa(client, namespace, config_secret).await?;
    futures::try_join!(
        ssa(client, namespace, service_account),
        ssa(client, namespace, service),
        ssa(client, namespace, pdb),
    )?;
    ssa(client, namespace, deployment).await
}

async fn ssa<K>(client: &Client, namespace: &str, object: &K) -> Result<()>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let name = object.name_any();
    let mut body = serde_json::to_value(object).expect("k8s objects serialise");
    // SSA needs apiVersion and kind in the body; k8s-openapi types leave them implicit.
    body["apiVersion"] = K::api_version(&()).into();
    body["kind"] = K::kind(&()).into();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(body),
    )
    .await?;
    Ok(())
}
