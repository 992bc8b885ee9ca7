//! Status conditions, shaped like `metav1.Condition` with `observedGeneration` on each, kept
//! as our own type so the schema is generated with the rest (and listed as a map keyed by
//! `type`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

/// One aspect of an object's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready`, `ConfigSynced` or `Available`.
    #[serde(rename = "type")]
    pub type_: String,
    pub status: ConditionStatus,
    /// A PascalCase word saying why, e.g. `SecretNotFound`.
    pub reason: String,
    /// What a person should know or do; never contains a secret.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// When `status` last changed (RFC 3339).
    pub last_transition_time: String,
    /// The `metadata.generation` this condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
