//! RouterPool status, pure: [`build_status`] (what it should say, from what the reconcile
//! observed) and [`events`] (what changed that a person should hear about).
//! `crate::status_patch` writes it, only when it differs from the stored one — so a pool whose
//! facts do not change is never rewritten.

use airouter_crds::{
    condition::{self, Condition, ConditionStatus},
    RouterPool, RouterPoolStatus,
};
use kube::{runtime::events::EventType, ResourceExt};

use super::{desired, push::PushReport, resolve::CredentialProblem};

pub const READY: &str = "Ready";
pub const CONFIG_SYNCED: &str = "ConfigSynced";
pub const AVAILABLE: &str = "Available";

/// What one reconcile of a pool found.
#[derive(Debug)]
pub struct Observed<'a> {
    /// Ready pods of the pool.
    pub ready_replicas: i32,
    pub config: Result<Synced<'a>, Refused>,
}

/// The config rendered, applied and pushed.
#[derive(Debug)]
pub struct Synced<'a> {
    pub hash: &'a str,
    pub primary: i32,
    pub fallback: i32,
    /// Selected Credentials left out of the config, and why.
    pub skipped: &'a [(String, CredentialProblem)],
    pub report: &'a PushReport,
}

/// The spec (or something it references) cannot be turned into a config: a user error. The
/// pods keep the config they have.
#[derive(Clone, Debug)]
pub struct Refused {
    pub reason: &'static str,
    pub message: String,
}

/// Pure: the status to store, given the stored one (for transition times) and `now` (RFC 3339).
pub fn build_status(pool: &RouterPool, observed: &Observed<'_>, now: &str) -> RouterPoolStatus {
    let old = pool.status.clone().unwrap_or_default();
    let generation = pool.metadata.generation;
    let desired_replicas = pool.spec.replicas;
    let ready = observed.ready_replicas;
    let cond = |t, ok: bool, reason: &str, message: String| {
        let status = if ok {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        };
        Condition::new(t, status, reason, message, generation)
    };

    let available = match (desired_replicas, ready) {
        (0, _) => cond(
            AVAILABLE,
            false,
            "ScaledToZero",
            "spec.replicas is 0".into(),
        ),
        (_, 0) => cond(
            AVAILABLE,
            false,
            "NoReadyReplicas",
            format!("0 of {desired_replicas} pods are ready"),
        ),
        (_, n) => cond(
            AVAILABLE,
            true,
            "ReplicasAvailable",
            format!("{n} of {desired_replicas} pods are ready"),
        ),
    };

    let mut status = RouterPoolStatus {
        observed_generation: generation,
        conditions: Vec::new(),
        config_hash: old.config_hash.clone(),
        primary_credentials: old.primary_credentials,
        fallback_credentials: old.fallback_credentials,
        ready_replicas: ready,
        synced_replicas: old.synced_replicas.min(ready),
        endpoint: pool
            .namespace()
            .map(|ns| desired::endpoint(&pool.name_any(), &ns)),
    };

    let (synced_cond, ready_cond) = match &observed.config {
        Err(refused) => {
            let keep = match &old.config_hash {
                Some(h) => format!("; the pods keep serving config {h}"),
                None => String::new(),
            };
            (
                cond(
                    CONFIG_SYNCED,
                    false,
                    refused.reason,
                    format!("{}{keep}", refused.message),
                ),
                cond(READY, false, refused.reason, refused.message.clone()),
            )
        }
        Ok(synced) => {
            status.config_hash = Some(synced.hash.to_owned());
            status.primary_credentials = synced.primary;
            status.fallback_credentials = synced.fallback;
            let n = synced.report.synced(synced.hash) as i32;
            status.synced_replicas = n;
            let left_out = match synced.skipped {
                [] => String::new(),
                skipped => format!(
                    "; left out: {}",
                    skipped
                        .iter()
                        .map(|(name, p)| format!("Credential {name} ({})", p.reason))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            let synced_cond = if ready == 0 {
                cond(
                    CONFIG_SYNCED,
                    false,
                    "NoReadyReplicas",
                    format!("no ready pod to push config {} to", synced.hash),
                )
            } else if n == ready {
                cond(
                    CONFIG_SYNCED,
                    true,
                    "Synced",
                    format!("{n} of {ready} ready pods serve config {}", synced.hash),
                )
            } else {
                cond(
                    CONFIG_SYNCED,
                    false,
                    "PushFailed",
                    format!(
                        "{n} of {ready} ready pods serve config {}; {}",
                        synced.hash,
                        synced.report.first_failure().unwrap_or_default()
                    ),
                )
            };
            let ready_cond = if !synced_cond.is_true() {
                cond(
                    READY,
                    false,
                    &synced_cond.reason,
                    synced_cond.message.clone(),
                )
            } else if ready < desired_replicas {
                cond(
                    READY,
                    false,
                    "ReplicasNotReady",
                    format!("{ready} of {desired_replicas} pods are ready{left_out}"),
                )
            } else {
                cond(
                    READY,
                    true,
                    "Ready",
                    format!(
                        "{ready} pods serve {} primary and {} fallback credentials{left_out}",
                        synced.primary, synced.fallback
                    ),
                )
            };
            (synced_cond, ready_cond)
        }
    };
    status.conditions = condition::merge(
        &old.conditions,
        vec![ready_cond, synced_cond, available],
        now,
    );
    status
}

/// An Event to publish on the pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub type_: EventType,
    pub reason: String,
    pub message: String,
}

/// Pure: the Events worth publishing for a status going from `old` to `new` — only on a
/// change, so a pool stuck in one state does not flood its Events.
pub fn events(old: Option<&RouterPoolStatus>, new: &RouterPoolStatus) -> Vec<Note> {
    let was = |t| old.and_then(|o| condition::find(&o.conditions, t));
    let mut out = Vec::new();
    if let Some(ready) = condition::find(&new.conditions, READY) {
        let before = was(READY);
        let user_error = matches!(
            ready.reason.as_str(),
            "InvalidSpec"
                | "InvalidCredential"
                | "InvalidConfig"
                | "SecretNotFound"
                | "SecretKeyMissing"
                | "ConfigMapNotFound"
                | "ConfigMapKeyMissing"
                | "InvalidTrustedCA"
                | "Malformed"
        );
        if user_error
            && before.map(|b| (&b.status, &b.reason)) != Some((&ready.status, &ready.reason))
        {
            out.push(Note {
                type_: EventType::Warning,
                reason: ready.reason.clone(),
                message: ready.message.clone(),
            });
        }
    }
    if let Some(synced) = condition::find(&new.conditions, CONFIG_SYNCED) {
        let before = was(CONFIG_SYNCED);
        if synced.reason == "PushFailed" && before.map(|b| b.reason.as_str()) != Some("PushFailed")
        {
            out.push(Note {
                type_: EventType::Warning,
                reason: "SyncFailed".into(),
                message: synced.message.clone(),
            });
        }
        let hash_moved = old.and_then(|o| o.config_hash.as_ref()) != new.config_hash.as_ref();
        let newly_synced = before.is_none_or(|b| !b.is_true());
        if synced.is_true() && (hash_moved || newly_synced) {
            out.push(Note {
                type_: EventType::Normal,
                reason: "ConfigSynced".into(),
                message: synced.message.clone(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::router_pool::push::PodOutcome;

    fn pool(replicas: i32) -> RouterPool {
        let mut p = RouterPool::new(
            "main",
            serde_json::from_value(json!({
                "replicas": replicas,
                "credentialSelector": {}, "masterKeySecretRef": {"name": "m", "key": "k"}
            }))
            .unwrap(),
        );
        p.metadata.namespace = Some("ai".into());
        p.metadata.generation = Some(3);
        p
    }

    fn report(outcomes: &[PodOutcome]) -> PushReport {
        PushReport {
            pods: outcomes
                .iter()
                .enumerate()
                .map(|(i, o)| (format!("main-{i}"), o.clone()))
                .collect(),
        }
    }

    fn synced(hash: &str) -> PodOutcome {
        PodOutcome::Synced { hash: hash.into() }
    }

    fn observe<'a>(ready: i32, r: &'a PushReport) -> Observed<'a> {
        Observed {
            ready_replicas: ready,
            config: Ok(Synced {
                hash: "h1",
                primary: 2,
                fallback: 1,
                skipped: &[],
                report: r,
            }),
        }
    }

    fn get<'a>(s: &'a RouterPoolStatus, t: &str) -> &'a Condition {
        condition::find(&s.conditions, t).unwrap()
    }

    #[test]
    fn all_pods_synced_is_ready_and_recomputing_changes_nothing() {
        let mut p = pool(2);
        let r = report(&[synced("h1"), synced("h1")]);
        let s = build_status(&p, &observe(2, &r), "t1");
        assert!(get(&s, READY).is_true());
        assert!(get(&s, CONFIG_SYNCED).is_true());
        assert_eq!(
            (
                s.synced_replicas,
                s.ready_replicas,
                s.config_hash.as_deref()
            ),
            (2, 2, Some("h1"))
        );
        assert_eq!(s.endpoint.as_deref(), Some("http://main.ai.svc:8080"));
        assert_eq!(get(&s, READY).observed_generation, Some(3));
        p.status = Some(s.clone());
        let again = build_status(&p, &observe(2, &r), "t2");
        assert_eq!(again, s, "same facts, same status: nothing to write");
        assert!(events(Some(&s), &again).is_empty());
    }

    #[test]
    fn a_failed_push_is_named_and_reported_once() {
        let p = pool(2);
        let r = report(&[
            synced("h1"),
            PodOutcome::Unreachable {
                error: "connection refused".into(),
            },
        ]);
        let s = build_status(&p, &observe(2, &r), "t1");
        let c = get(&s, CONFIG_SYNCED);
        assert_eq!(c.reason, "PushFailed");
        assert!(c.message.contains("main-1 unreachable"), "{}", c.message);
        assert_eq!(get(&s, READY).reason, "PushFailed");
        assert_eq!(s.synced_replicas, 1);
        let notes = events(None, &s);
        assert_eq!(notes[0].reason, "SyncFailed");
        assert!(events(Some(&s), &s).is_empty());
    }

    #[test]
    fn a_refused_spec_keeps_the_last_hash() {
        let mut p = pool(1);
        let r = report(&[synced("h1")]);
        p.status = Some(build_status(&p, &observe(1, &r), "t1"));
        let s = build_status(
            &p,
            &Observed {
                ready_replicas: 1,
                config: Err(Refused {
                    reason: "SecretNotFound",
                    message: "Secret m (from spec.masterKeySecretRef) does not exist".into(),
                }),
            },
            "t2",
        );
        assert_eq!(s.config_hash.as_deref(), Some("h1"));
        assert_eq!(get(&s, READY).reason, "SecretNotFound");
        assert_eq!(get(&s, READY).last_transition_time, "t2");
        assert!(get(&s, CONFIG_SYNCED)
            .message
            .contains("keep serving config h1"));
        assert!(get(&s, AVAILABLE).is_true());
        let notes = events(p.status.as_ref(), &s);
        assert_eq!(
            (notes[0].type_, notes[0].reason.as_str()),
            (EventType::Warning, "SecretNotFound")
        );
        // Every reason a user has to fix is published, trusted CA and config included.
        for reason in [
            "ConfigMapNotFound",
            "ConfigMapKeyMissing",
            "InvalidTrustedCA",
            "InvalidConfig",
        ] {
            let refused = Observed {
                ready_replicas: 1,
                config: Err(Refused {
                    reason,
                    message: "why".into(),
                }),
            };
            let s = build_status(&p, &refused, "t2");
            let notes = events(p.status.as_ref(), &s);
            assert_eq!(notes[0].reason, reason, "{notes:?}");
        }
    }

    #[test]
    fn fewer_ready_pods_than_desired_is_not_ready() {
        let p = pool(3);
        let r = report(&[synced("h1")]);
        let s = build_status(&p, &observe(1, &r), "t1");
        assert!(get(&s, CONFIG_SYNCED).is_true());
        assert_eq!(get(&s, READY).reason, "ReplicasNotReady");
        assert!(get(&s, AVAILABLE).is_true());
        let none = build_status(&p, &observe(0, &report(&[])), "t1");
        assert_eq!(get(&none, CONFIG_SYNCED).reason, "NoReadyReplicas");
        assert!(!get(&none, AVAILABLE).is_true());
    }
}
