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

impl Condition {
    /// A condition for `generation`; `last_transition_time` is filled in by [`merge`].
    pub fn new(
        type_: &str,
        status: ConditionStatus,
        reason: &str,
        message: impl Into<String>,
        generation: Option<i64>,
    ) -> Condition {
        Condition {
            type_: type_.to_owned(),
            status,
            reason: reason.to_owned(),
            message: message.into(),
            last_transition_time: String::new(),
            observed_generation: generation,
        }
    }

    pub fn is_true(&self) -> bool {
        self.status == ConditionStatus::True
    }
}

/// Finds a condition by type.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// The conditions to write: `new`, each keeping the `last_transition_time` of the condition of
/// the same type in `old` while its status did not flip (and `now` when it did, or is new).
/// With that, a status computed twice from the same facts is equal, so it is not rewritten.
pub fn merge(old: &[Condition], new: Vec<Condition>, now: &str) -> Vec<Condition> {
    new.into_iter()
        .map(|mut c| {
            c.last_transition_time = match find(old, &c.type_) {
                Some(prev) if prev.status == c.status => prev.last_transition_time.clone(),
                _ => now.to_owned(),
            };
            c
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_when_the_status_flips() {
        let old = merge(
            &[],
            vec![Condition::new(
                "Ready",
                ConditionStatus::False,
                "A",
                "",
                Some(1),
            )],
            "t1",
        );
        assert_eq!(old[0].last_transition_time, "t1");
        let same = merge(
            &old,
            vec![Condition::new(
                "Ready",
                ConditionStatus::False,
                "B",
                "m",
                Some(2),
            )],
            "t2",
        );
        assert_eq!(same[0].last_transition_time, "t1", "reason changes keep it");
        let flipped = merge(
            &same,
            vec![Condition::new(
                "Ready",
                ConditionStatus::True,
                "B",
                "",
                Some(2),
            )],
            "t3",
        );
        assert_eq!(flipped[0].last_transition_time, "t3");
    }
}
