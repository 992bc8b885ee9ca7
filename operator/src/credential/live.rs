//! Live state: what the data plane sees of each Credential (bans, RPM/TPM in use), read from
//! every ready pod's `GET /admin/state` on an interval and summed over a pool's replicas.
//!
//! [`aggregate`] is pure; [`poll`] does the I/O. The result is kept in a [`LiveIndex`]; a
//! Credential whose live state changed is handed to its controller, which writes its status —
//! so with nothing changing, nothing is written.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::Duration,
};

use airouter_crds::credential::LiveState;
use bytes::Bytes;
use futures::future::join_all;
use http::{header, Request};
use http_body_util::{BodyExt, Full, Limited};
use parking_lot::Mutex;
use serde::Deserialize;

use crate::router_pool::push::{PodTarget, PushClient};

/// The part of a pod's `/admin/state` the operator reads.
#[derive(Clone, Debug, Deserialize)]
pub struct PodState {
    pub credentials: Vec<CredentialState>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct CredentialState {
    pub name: String,
    pub rpm: Window,
    pub tpm: Window,
    #[serde(default)]
    pub pairs: Vec<PairState>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Window {
    pub used: u64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct PairState {
    pub banned: bool,
    #[serde(default)]
    pub ban: Option<Ban>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Ban {
    pub permanent: bool,
    #[serde(default)]
    pub until: Option<String>,
}

/// Pure: one Credential's state summed over the pods that reported it. A ban on any pod
/// for any model counts; `bannedUntil` is the latest end among timed bans (absent when one
/// is permanent).
pub fn aggregate<'a>(
    states: impl IntoIterator<Item = &'a PodState>,
) -> BTreeMap<String, LiveState> {
    let mut out: BTreeMap<String, LiveState> = BTreeMap::new();
    let mut permanent: BTreeMap<String, bool> = BTreeMap::new();
    for pod in states {
        for cred in &pod.credentials {
            let live = out.entry(cred.name.clone()).or_default();
            live.rpm_used += cred.rpm.used as i64;
            live.tpm_used += cred.tpm.used as i64;
            for pair in cred.pairs.iter().filter(|p| p.banned) {
                live.banned = true;
                match &pair.ban {
                    Some(Ban {
                        permanent: true, ..
                    }) => {
                        permanent.insert(cred.name.clone(), true);
                    }
                    // RFC 3339 in UTC with the same precision: text order is time order.
                    Some(Ban {
                        until: Some(until), ..
                    }) if live.banned_until.as_ref().is_none_or(|u| u < until) => {
                        live.banned_until = Some(until.clone());
                    }
                    _ => {}
                }
            }
        }
    }
    for (name, _) in permanent {
        if let Some(live) = out.get_mut(&name) {
            live.banned_until = None;
        }
    }
    out
}

/// Reads one pod's state; `None` when it does not answer in time or answers something else.
pub async fn read_state(
    client: &PushClient,
    pod: &PodTarget,
    admin_token: &str,
    timeout: Duration,
) -> Option<PodState> {
    let host = if pod.ip.contains(':') {
        format!("[{}]", pod.ip)
    } else {
        pod.ip.clone()
    };
    let request = Request::get(format!("http://{host}:{}/admin/state", pod.port))
        .header(header::AUTHORIZATION, format!("Bearer {admin_token}"))
        .body(Full::new(Bytes::new()))
        .ok()?;
    let exchange = async {
        let resp = client.request(request).await.ok()?;
        if !resp.status().is_success() {
            return None;
        }
        let body = Limited::new(resp.into_body(), 8 << 20)
            .collect()
            .await
            .ok()?
            .to_bytes();
        serde_json::from_slice::<PodState>(&body).ok()
    };
    tokio::time::timeout(timeout, exchange).await.ok().flatten()
}

/// The pods of one pool to read, with the token to read them.
pub struct PoolPods {
    pub namespace: String,
    pub admin_token: String,
    pub pods: Vec<PodTarget>,
}

/// One round of [`poll`].
pub struct Reading {
    pub state: HashMap<(String, String), LiveState>,
    /// Namespaces where some ready pod did not answer: their previous state is kept for
    /// Credentials this round saw nothing of (see [`LiveIndex::replace`]).
    pub partial: BTreeSet<String>,
    pub ok: usize,
    pub failed: usize,
}

/// I/O: reads every pod of every pool and aggregates per (namespace, credential).
pub async fn poll(client: &PushClient, pools: &[PoolPods], timeout: Duration) -> Reading {
    let reads = pools.iter().flat_map(|pool| {
        pool.pods.iter().map(move |pod| async move {
            (
                pool.namespace.as_str(),
                read_state(client, pod, &pool.admin_token, timeout).await,
            )
        })
    });
    let results = join_all(reads).await;
    let mut reading = Reading {
        state: HashMap::new(),
        partial: BTreeSet::new(),
        ok: 0,
        failed: 0,
    };
    let mut by_namespace: BTreeMap<&str, Vec<PodState>> = BTreeMap::new();
    for (namespace, state) in results {
        match state {
            Some(s) => {
                reading.ok += 1;
                by_namespace.entry(namespace).or_default().push(s);
            }
            None => {
                reading.failed += 1;
                reading.partial.insert(namespace.to_owned());
            }
        }
    }
    for (namespace, states) in by_namespace {
        for (name, live) in aggregate(&states) {
            reading.state.insert((namespace.to_owned(), name), live);
        }
    }
    reading
}

/// How many polls in a row a Credential unseen in a `partial` namespace keeps its last state.
const KEPT_POLLS: u32 = 3;

/// The latest live state per (namespace, Credential name), with how many polls in a row it
/// has been kept without being seen.
#[derive(Default)]
pub struct LiveIndex(Mutex<HashMap<(String, String), (LiveState, u32)>>);

impl LiveIndex {
    pub fn get(&self, namespace: &str, name: &str) -> Option<LiveState> {
        self.0
            .lock()
            .get(&(namespace.to_owned(), name.to_owned()))
            .map(|(live, _)| live.clone())
    }

    /// Replaces the index with `next`, except that a Credential of a `partial` namespace (a
    /// pod there did not answer) that `next` lacks keeps its last state for up to
    /// [`KEPT_POLLS`] polls: a pod that missed a poll must not blank it (and write status
    /// twice), but one that stays silent — or a Credential no pool serves any more — must not
    /// keep showing a ban for ever. Returns the keys whose state changed (appeared, moved,
    /// vanished).
    pub fn replace(
        &self,
        next: HashMap<(String, String), LiveState>,
        partial: &BTreeSet<String>,
    ) -> Vec<(String, String)> {
        let mut current = self.0.lock();
        let mut next: HashMap<_, _> = next.into_iter().map(|(k, v)| (k, (v, 0))).collect();
        for (key, (live, kept)) in current.iter() {
            if partial.contains(&key.0) && !next.contains_key(key) && *kept < KEPT_POLLS {
                next.insert(key.clone(), (live.clone(), kept + 1));
            }
        }
        let mut changed: Vec<(String, String)> = next
            .iter()
            .filter(|(k, (v, _))| current.get(*k).map(|(live, _)| live) != Some(v))
            .map(|(k, _)| k.clone())
            .collect();
        changed.extend(current.keys().filter(|k| !next.contains_key(*k)).cloned());
        *current = next;
        changed
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(v: serde_json::Value) -> PodState {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn state_is_summed_over_replicas_and_any_ban_counts() {
        let a = pod(json!({"config_hash": "h", "credentials": [
            {"name": "k1", "rpm": {"used": 3, "limit": 10}, "tpm": {"used": 100, "limit": -1}, "pairs": [
                {"model": "m", "banned": true, "ban": {"code": 401, "permanent": false, "until": "2026-12-01T10:00:05Z"}}]},
            {"name": "k2", "rpm": {"used": 1, "limit": 10}, "tpm": {"used": 0, "limit": -1}, "pairs": []}
        ]}));
        let b = pod(json!({"credentials": [
            {"name": "k1", "rpm": {"used": 2, "limit": 10}, "tpm": {"used": 50, "limit": -1}, "pairs": [
                {"model": "m", "banned": true, "ban": {"code": 401, "permanent": false, "until": "2026-12-01T10:00:09Z"}}]},
            {"name": "k2", "rpm": {"used": 4, "limit": 10}, "tpm": {"used": 0, "limit": -1}, "pairs": [
                {"model": "m", "banned": true, "ban": {"code": 403, "permanent": true}}]}
        ]}));
        let live = aggregate([&a, &b]);
        assert_eq!(
            live["k1"],
            LiveState {
                banned: true,
                banned_until: Some("2026-12-01T10:00:09Z".into()),
                rpm_used: 5,
                tpm_used: 150
            }
        );
        assert_eq!(
            live["k2"],
            LiveState {
                banned: true,
                banned_until: None,
                rpm_used: 5,
                tpm_used: 0
            }
        );
    }

    #[test]
    fn the_index_reports_only_what_changed() {
        let index = LiveIndex::default();
        let key = ("ai".to_owned(), "k1".to_owned());
        let state = |rpm| LiveState {
            rpm_used: rpm,
            ..Default::default()
        };
        let none = BTreeSet::new();
        assert_eq!(
            index.replace(HashMap::from([(key.clone(), state(1))]), &none),
            std::slice::from_ref(&key)
        );
        assert!(index
            .replace(HashMap::from([(key.clone(), state(1))]), &none)
            .is_empty());
        let partial = BTreeSet::from(["ai".to_owned()]);
        assert!(
            index.replace(HashMap::new(), &partial).is_empty(),
            "a namespace with an unanswered pod keeps what it had"
        );
        assert_eq!(index.get("ai", "k1"), Some(state(1)));
        assert_eq!(
            index.replace(HashMap::new(), &none),
            std::slice::from_ref(&key)
        );
        assert_eq!(index.get("ai", "k1"), None);
    }

    #[test]
    fn an_unseen_state_is_kept_for_a_few_partial_polls_only() {
        let index = LiveIndex::default();
        let key = ("ai".to_owned(), "k1".to_owned());
        let banned = LiveState {
            banned: true,
            ..Default::default()
        };
        let partial = BTreeSet::from(["ai".to_owned()]);
        index.replace(HashMap::from([(key.clone(), banned.clone())]), &partial);
        for poll in 1..=KEPT_POLLS {
            assert!(
                index.replace(HashMap::new(), &partial).is_empty(),
                "poll {poll}"
            );
            assert_eq!(index.get("ai", "k1"), Some(banned.clone()), "poll {poll}");
        }
        assert_eq!(
            index.replace(HashMap::new(), &partial),
            std::slice::from_ref(&key),
            "a pod silent for {KEPT_POLLS} polls no longer holds the ban up"
        );
        assert_eq!(index.get("ai", "k1"), None);
        // Seen again: counted afresh.
        index.replace(HashMap::from([(key.clone(), banned.clone())]), &partial);
        assert!(index.replace(HashMap::new(), &partial).is_empty());
    }
}
