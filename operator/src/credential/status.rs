//! Credential status, pure: [`build_status`] (what it should say) and [`events`] (what
//! changed that a person should hear about). `crate::status_patch` writes it, only on change.

use airouter_crds::{
    condition::{self, Condition, ConditionStatus},
    credential::LiveState,
    Credential, CredentialStatus,
};
use kube::runtime::events::EventType;

use crate::router_pool::{resolve::CredentialProblem, status::Note};

pub const READY: &str = "Ready";

/// Pure: the status to store. `problem` is why the Credential cannot be used (none: it
/// resolved), `pools` the RouterPools selecting it, `live` what their pods report.
pub fn build_status(
    cred: &Credential,
    problem: Option<&CredentialProblem>,
    pools: Vec<String>,
    live: Option<LiveState>,
    now: &str,
) -> CredentialStatus {
    let old = cred.status.clone().unwrap_or_default();
    let generation = cred.metadata.generation;
    let ready = match problem {
        Some(p) => Condition::new(
            READY,
            ConditionStatus::False,
            p.reason,
            p.message.clone(),
            generation,
        ),
        None if pools.is_empty() => Condition::new(
            READY,
            ConditionStatus::True,
            "Resolved",
            "resolved; no RouterPool selects it yet",
            generation,
        ),
        None => Condition::new(
            READY,
            ConditionStatus::True,
            "Resolved",
            format!("served by RouterPool {}", pools.join(", ")),
            generation,
        ),
    };
    CredentialStatus {
        observed_generation: generation,
        conditions: condition::merge(&old.conditions, vec![ready], now),
        pools,
        live,
    }
}

/// Pure: Events for a status change — a new problem, and bans starting or ending.
pub fn events(old: Option<&CredentialStatus>, new: &CredentialStatus) -> Vec<Note> {
    let mut out = Vec::new();
    let before = old.and_then(|o| condition::find(&o.conditions, READY));
    if let Some(ready) = condition::find(&new.conditions, READY) {
        let moved = before.map(|b| (&b.status, &b.reason)) != Some((&ready.status, &ready.reason));
        if !ready.is_true() && moved {
            out.push(Note {
                type_: EventType::Warning,
                reason: ready.reason.clone(),
                message: ready.message.clone(),
            });
        }
    }
    let was_banned = old.and_then(|o| o.live.as_ref()).is_some_and(|l| l.banned);
    let banned = new.live.as_ref().is_some_and(|l| l.banned);
    if banned && !was_banned {
        let until = new
            .live
            .as_ref()
            .and_then(|l| l.banned_until.as_deref())
            .map_or_else(|| " until unbanned".to_owned(), |u| format!(" until {u}"));
        out.push(Note {
            type_: EventType::Warning,
            reason: "Banned".into(),
            message: format!("fail2ban banned this credential for at least one model{until}"),
        });
    } else if was_banned && !banned {
        out.push(Note {
            type_: EventType::Normal,
            reason: "Unbanned".into(),
            message: "no model of this credential is banned any more".into(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn cred() -> Credential {
        let mut c = Credential::new(
            "k1",
            serde_json::from_value(json!({"type": "openai", "baseUrl": "https://h", "apiKeySecretRef": {"name": "s", "key": "key"}})).unwrap(),
        );
        c.metadata.generation = Some(1);
        c
    }

    #[test]
    fn a_missing_secret_is_not_ready_and_said_once() {
        let mut c = cred();
        let problem = CredentialProblem {
            reason: "SecretNotFound",
            message: "Secret s (from spec.apiKeySecretRef) does not exist".into(),
        };
        let s = build_status(&c, Some(&problem), vec!["main".into()], None, "t1");
        let ready = condition::find(&s.conditions, READY).unwrap();
        assert_eq!(
            (ready.is_true(), ready.reason.as_str()),
            (false, "SecretNotFound")
        );
        assert_eq!(events(None, &s)[0].reason, "SecretNotFound");
        c.status = Some(s.clone());
        let again = build_status(&c, Some(&problem), vec!["main".into()], None, "t2");
        assert_eq!(again, s);
        assert!(events(Some(&s), &again).is_empty());
    }

    #[test]
    fn bans_starting_and_ending_are_events() {
        let c = cred();
        let banned = LiveState {
            banned: true,
            banned_until: Some("2026-12-01T10:00:00Z".into()),
            rpm_used: 3,
            tpm_used: 0,
        };
        let free = build_status(&c, None, vec!["main".into()], None, "t");
        let ban = build_status(&c, None, vec!["main".into()], Some(banned), "t");
        assert!(condition::find(&ban.conditions, READY).unwrap().is_true());
        let notes = events(Some(&free), &ban);
        assert_eq!(notes.len(), 1);
        assert_eq!(notes[0].reason, "Banned");
        assert!(notes[0].message.contains("2026-12-01T10:00:00Z"));
        assert_eq!(events(Some(&ban), &free)[0].reason, "Unbanned");
    }
}
