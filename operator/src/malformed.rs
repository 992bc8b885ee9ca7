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
    router_pool::status::{Note, READY},
};

/// What a user reads about an object of `kind` that serde could not read (`serde_message`):
/// serde's words with the values it quotes left out — a key pasted into the wrong field must
/// not reach status or Events — and what to do about it.
pub fn describe(kind: &str, serde_message: &str) -> String {
    // serde quotes a string value as `string "…"` (Debug-escaped) and a variant as
    // `unknown variant `…``.
    let message = redact(serde_message, "string \"", '"', "a string");
    let message = redact(&message, "variant `", '`', "variant");
    format!(
        "{message}; edit it to match the current schema (kubectl explain {}.spec)",
        kind.to_lowercase()
    )
}

/// `message` with each `open`…`close` span (a `\`-escaped `close` does not end it) replaced
/// by `with`.
fn redact(message: &str, open: &str, close: char, with: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find(open) {
        out.push_str(&rest[..at]);
        out.push_str(with);
        let value = &rest[at + open.len()..];
        let mut escaped = false;
        let end = value
            .char_indices()
            .find(|&(_, c)| {
                let ends = c == close && !escaped;
                escaped = c == '\\' && !escaped;
                ends
            })
            .map_or(value.len(), |(i, c)| i + c.len_utf8());
        rest = &value[end..];
    }
    out.push_str(rest);
    out
}

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
        message: describe(kind, error),
    };
    let generation = obj.meta().generation;
    let mut ready = Condition::new(
        READY,
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

#[cfg(test)]
mod tests {
    use super::describe;

    #[test]
    fn quoted_values_stay_out_and_the_fix_is_named() {
        assert_eq!(
            describe("RouterPool", r#"invalid type: string "sk-live-\"x", expected u32 at line 1"#),
            "invalid type: a string, expected u32 at line 1; edit it to match the current schema (kubectl explain routerpool.spec)"
        );
        assert_eq!(
            describe("Credential", "unknown variant `sk-123`, expected one of `openai`, `proxy`"),
            "unknown variant, expected one of `openai`, `proxy`; edit it to match the current schema (kubectl explain credential.spec)"
        );
        assert_eq!(
            describe("Credential", "missing field `type`"),
            "missing field `type`; edit it to match the current schema (kubectl explain credential.spec)"
        );
    }
}
