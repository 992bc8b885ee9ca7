//! Router chaining: what proxy credentials' remote routers report about themselves.
//!
//! Every `server.health_sync_interval` (and right after a config change) the sync task reads
//! each proxy credential's remote `/health` and `/v1/models` and publishes one snapshot
//! (spec §12.9). Selection skips a proxy for a model its remote reports no available
//! credential for; the remote's models are routed to it and listed in our `/v1/models` (a
//! failed fetch keeps the last list: upstream never unregisters a remote's model, spec §7.2).
//! Limiter windows are never touched by a sync.
//!
//! Upstream builds its model list from every proxy before it serves (§7.2.3). We serve at
//! once, so until the first sync of a proxy ends its models are unknown: readiness waits for
//! the first sync after start, and a request for a model nothing else serves waits (bounded)
//! for the sync that covers its config, rather than get a 404 for a model the remote is about
//! to report.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures::future::join_all;
use http::{header, Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use serde::Deserialize;
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};

use crate::{
    config::CredentialType,
    runtime::{Credential, Runtime},
    upstream::Client,
};

/// How long one remote fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Remote documents larger than this are refused.
const MAX_REMOTE_BODY: usize = 10 * 1024 * 1024;
/// How long a request waits for a proxy's first sync: its fetches run side by side, each
/// bounded by `FETCH_TIMEOUT`, so this covers a whole sync with room to spare.
const SYNC_WAIT: Duration = Duration::from_secs(FETCH_TIMEOUT.as_secs() + 2);

/// One model a remote serves, as its `/v1/models` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteModel {
    pub id: String,
    pub created: Option<i64>,
    pub owned_by: Option<String>,
}

/// The last sync of one proxy credential.
#[derive(Clone, Debug, Default)]
pub struct RemoteStatus {
    pub synced_at: Option<SystemTime>,
    /// `/health` answered with a document we could read.
    pub reachable: bool,
    pub error: Option<String>,
    pub status: Option<String>,
    pub credentials_available: Option<u64>,
    pub total_credentials: Option<u64>,
    /// The last list `/v1/models` answered with: a failed fetch keeps the one before (a
    /// remote's blip must not turn its models into 404s), unless the endpoint changed.
    pub models: Vec<RemoteModel>,
    /// The `base_url` the models were read from.
    pub models_from: String,
    /// Models the remote reports no available credential for.
    pub unavailable_models: HashSet<String>,
}

impl RemoteStatus {
    /// Whether the remote said it cannot serve `model` right now.
    pub fn refuses(&self, model: &str) -> bool {
        self.reachable
            && (self.credentials_available == Some(0) || self.unavailable_models.contains(model))
    }

    pub fn serves(&self, model: &str) -> bool {
        self.models.iter().any(|m| m.id == model)
    }
}

/// The latest snapshot of every proxy credential's remote, by credential name.
#[derive(Default)]
pub struct RemoteHealth {
    snapshot: ArcSwap<HashMap<String, Arc<RemoteStatus>>>,
    /// Wakes the sync task early (a new config may have new proxies).
    wake: Notify,
    /// How many snapshots were published: requests waiting for a sync watch it.
    published: watch::Sender<u64>,
}

impl RemoteHealth {
    pub fn get(&self, credential: &str) -> Option<Arc<RemoteStatus>> {
        self.snapshot.load().get(credential).cloned()
    }

    /// True when selection should skip this proxy credential for `model`.
    pub fn refuses(&self, credential: &str, model: &str) -> bool {
        self.snapshot
            .load()
            .get(credential)
            .is_some_and(|s| s.refuses(model))
    }

    /// Proxy credentials whose remote lists `model`.
    pub fn credentials_serving(&self, model: &str) -> Vec<String> {
        self.snapshot
            .load()
            .iter()
            .filter(|(_, s)| s.serves(model))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Every remote model, deduplicated by id, for `/v1/models`.
    pub fn models(&self) -> Vec<RemoteModel> {
        let snapshot = self.snapshot.load();
        let mut names: Vec<_> = snapshot.keys().collect();
        names.sort();
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for name in names {
            for m in &snapshot[name].models {
                if seen.insert(m.id.clone()) {
                    out.push(m.clone());
                }
            }
        }
        out
    }

    /// Asks the sync task to run now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    pub fn publish(&self, snapshot: HashMap<String, Arc<RemoteStatus>>) {
        self.snapshot.store(Arc::new(snapshot));
        self.published.send_modify(|n| *n += 1);
    }

    /// Whether the first sync after start has ended, or there is nothing to sync. Readiness
    /// waits for it; later syncs (a pushed config with a new proxy) do not take a ready
    /// pod out of its Service.
    pub fn started(&self, rt: &Runtime) -> bool {
        *self.published.borrow() > 0 || !rt.credentials.iter().any(is_proxy)
    }

    /// Whether every proxy of `rt` has been synced at its current `base_url` (successfully
    /// or not): what the snapshot says about `rt`'s remotes is then all there is to know.
    pub fn covers(&self, rt: &Runtime) -> bool {
        let snapshot = self.snapshot.load();
        rt.credentials.iter().filter(|c| is_proxy(c)).all(|c| {
            snapshot
                .get(&*c.name)
                .is_some_and(|s| s.models_from == c.base_url)
        })
    }

    /// Waits until a sync covers `rt` (see [`Self::covers`]), for at most [`SYNC_WAIT`].
    pub async fn synced(&self, rt: &Runtime) {
        // Subscribing before the check: a publish between the two still wakes us.
        let mut published = self.published.subscribe();
        let wait = async {
            while !self.covers(rt) {
                if published.changed().await.is_err() {
                    return;
                }
            }
        };
        if tokio::time::timeout(SYNC_WAIT, wait).await.is_err() {
            debug!("no remote sync covered the config in time; answering with what is known");
        }
    }

    /// Runs forever: sync, then sleep `health_sync_interval` of the current config (or until
    /// woken).
    pub async fn run(self: Arc<Self>, current: impl Fn() -> Arc<Runtime>, client: Client) {
        loop {
            let rt = current();
            let interval = rt.config.server.health_sync_interval;
            let proxies: Vec<&Credential> = rt.credentials.iter().filter(|c| is_proxy(c)).collect();
            if !proxies.is_empty() {
                let previous = self.snapshot.load_full();
                let syncs = proxies.iter().map(|c| {
                    let last = previous
                        .get(&*c.name)
                        .filter(|s| s.models_from == c.base_url);
                    sync_one(&client, c, last.map(|s| &s.models))
                });
                let results = join_all(syncs).await;
                let snapshot: HashMap<String, Arc<RemoteStatus>> = proxies
                    .iter()
                    .zip(results)
                    .map(|(c, status)| (c.name.to_string(), Arc::new(status)))
                    .collect();
                self.publish(snapshot);
            } else {
                self.publish(HashMap::new());
            }
            drop(rt);
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = self.wake.notified() => debug!("remote health sync woken by a config change"),
            }
        }
    }
}

fn is_proxy(cred: &Credential) -> bool {
    cred.kind == CredentialType::Proxy
}

/// Reads one proxy credential's remote; `last_models`: what its `/v1/models` said last time.
async fn sync_one(
    client: &Client,
    cred: &Credential,
    last_models: Option<&Vec<RemoteModel>>,
) -> RemoteStatus {
    let mut status = RemoteStatus {
        synced_at: Some(SystemTime::now()),
        models: last_models.cloned().unwrap_or_default(),
        models_from: cred.base_url.clone(),
        ..Default::default()
    };
    let (health, models) = tokio::join!(
        fetch(client, cred, "/health"),
        fetch(client, cred, "/v1/models")
    );
    match health.and_then(|body| {
        serde_json::from_slice::<HealthDoc>(&body)
            .map_err(|e| format!("/health is not a health document: {e}"))
    }) {
        Ok(doc) => {
            status.reachable = true;
            status.unavailable_models = doc.unavailable_models();
            status.status = doc.status;
            status.credentials_available = doc.credentials_available;
            status.total_credentials = doc.total_credentials;
        }
        Err(e) => status.error = Some(e),
    }
    match models.and_then(|body| {
        serde_json::from_slice::<ModelsDoc>(&body)
            .map_err(|e| format!("/v1/models is not a model list: {e}"))
    }) {
        Ok(doc) => {
            status.models = doc
                .data
                .into_iter()
                .map(|m| RemoteModel {
                    id: m.id,
                    created: m.created,
                    owned_by: m.owned_by.filter(|o| !o.is_empty()),
                })
                .collect();
        }
        Err(e) => {
            status.error.get_or_insert(e);
        }
    }
    match &status.error {
        None => {
            debug!(credential = %cred.name, models = status.models.len(), available = ?status.credentials_available, "remote synced")
        }
        Some(e) => {
            warn!(credential = %cred.name, error = %e, models = status.models.len(), "remote sync failed")
        }
    }
    if status.reachable && status.credentials_available == Some(0) {
        info!(credential = %cred.name, "remote reports no available credential; skipping it until the next sync");
    }
    status
}

/// GET `<base_url><path>` with the credential's key, bounded in time and size.
async fn fetch(client: &Client, cred: &Credential, path: &str) -> Result<Bytes, String> {
    let uri = format!("{}{path}", cred.base_url);
    let mut req = Request::builder()
        .method(Method::GET)
        .uri(&uri)
        .body(Full::new(Bytes::new()))
        .map_err(|e| format!("bad URL {uri}: {e}"))?;
    if let Some(auth) = &cred.authorization {
        req.headers_mut()
            .insert(header::AUTHORIZATION, auth.clone());
    }
    let work = async {
        let resp = client
            .request(cred.http_version, req)
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_REMOTE_BODY)
            .collect()
            .await
            .map_err(|e| format!("GET {path}: reading the body: {e}"))?
            .to_bytes();
        // /health answers 503 with a full document when nothing is available.
        if status.is_success() || (path == "/health" && status.as_u16() == 503) {
            Ok(body)
        } else {
            Err(format!("GET {path}: status {status}"))
        }
    };
    tokio::time::timeout(FETCH_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "GET {path}: no answer within {}s",
                FETCH_TIMEOUT.as_secs()
            ))
        })
}

/// The parts of a remote `/health` (airouter's or Auto AI Router's: the same shape) we use.
#[derive(Deserialize)]
struct HealthDoc {
    status: Option<String>,
    credentials_available: Option<u64>,
    total_credentials: Option<u64>,
    #[serde(default)]
    credentials: HashMap<String, RemoteCred>,
    #[serde(default)]
    models: HashMap<String, RemotePair>,
}

#[derive(Deserialize)]
struct RemoteCred {
    #[serde(default)]
    current_rpm: i64,
    #[serde(default)]
    current_tpm: i64,
    #[serde(default = "unlimited")]
    limit_rpm: i64,
    #[serde(default = "unlimited")]
    limit_tpm: i64,
}

#[derive(Deserialize)]
struct RemotePair {
    credential: Option<String>,
    model: String,
    #[serde(default)]
    is_banned: bool,
    #[serde(default)]
    current_rpm: i64,
    #[serde(default)]
    current_tpm: i64,
    #[serde(default = "unlimited")]
    limit_rpm: i64,
    #[serde(default = "unlimited")]
    limit_tpm: i64,
}

fn unlimited() -> i64 {
    -1
}

fn full(current: i64, limit: i64) -> bool {
    limit > 0 && current >= limit
}

impl HealthDoc {
    /// Models every one of whose remote pairs is banned or at a limit (its own or its
    /// credential's). A model the remote does not list is not judged.
    fn unavailable_models(&self) -> HashSet<String> {
        let cred_full = |name: &Option<String>| {
            name.as_ref()
                .and_then(|n| self.credentials.get(n))
                .is_some_and(|c| {
                    full(c.current_rpm, c.limit_rpm) || full(c.current_tpm, c.limit_tpm)
                })
        };
        let mut by_model: HashMap<&str, bool> = HashMap::new();
        for pair in self.models.values() {
            let available = !pair.is_banned
                && !full(pair.current_rpm, pair.limit_rpm)
                && !full(pair.current_tpm, pair.limit_tpm)
                && !cred_full(&pair.credential);
            *by_model.entry(&pair.model).or_insert(false) |= available;
        }
        by_model
            .into_iter()
            .filter(|(_, available)| !available)
            .map(|(m, _)| m.to_owned())
            .collect()
    }
}

#[derive(Deserialize)]
struct ModelsDoc {
    data: Vec<ModelEntry>,
}

#[derive(Deserialize)]
struct ModelEntry {
    id: String,
    created: Option<i64>,
    owned_by: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judges_models_from_remote_pairs() {
        let doc: HealthDoc = serde_json::from_str(
            r#"{"status":"healthy","credentials_available":2,"total_credentials":2,
            "credentials":{"a":{"current_rpm":5,"limit_rpm":5},"b":{"current_rpm":0,"limit_rpm":-1}},
            "models":{
              "a:m1":{"credential":"a","model":"m1","is_banned":false,"current_rpm":0,"limit_rpm":-1},
              "b:m1":{"credential":"b","model":"m1","is_banned":true},
              "a:m2":{"credential":"a","model":"m2"},
              "b:m3":{"credential":"b","model":"m3","current_rpm":3,"limit_rpm":3},
              "b:m4":{"credential":"b","model":"m4"}
            }}"#,
        )
        .unwrap();
        let mut got: Vec<_> = doc.unavailable_models().into_iter().collect();
        got.sort();
        // m1: a is at its credential limit, b is banned; m2: only a; m3: pair full; m4 fine.
        assert_eq!(got, ["m1", "m2", "m3"]);
    }

    #[test]
    fn refuses_only_when_reachable() {
        let mut s = RemoteStatus {
            credentials_available: Some(0),
            ..Default::default()
        };
        assert!(
            !s.refuses("m"),
            "an unreachable remote is not judged by stale numbers"
        );
        s.reachable = true;
        assert!(s.refuses("m"));
    }
}
