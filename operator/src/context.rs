//! What every reconcile shares: the API client, the watched objects (reflector stores), the
//! push client, metrics, the Event recorder, and the little state kept between reconciles
//! (admin tokens for the live-state poller, live state, per-object error backoff).

use std::{collections::HashMap, sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::{
    runtime::{
        events::{Event, Recorder},
        reflector::{ObjectRef, Store},
    },
    Client,
};
use parking_lot::Mutex;
use tracing::warn;

use crate::{
    credential::live::LiveIndex,
    metrics::Metrics,
    router_pool::{desired::Defaults, push::PushClient, status::Note},
    triggers::{Cred, Pool},
};

/// Operator settings (command-line flags and chart values).
#[derive(Clone, Debug)]
pub struct Settings {
    pub defaults: Defaults,
    /// How long one pod may take to answer a push.
    pub push_timeout: Duration,
    /// How often pods' `/admin/state` is read for Credential status.
    pub live_interval: Duration,
    /// How often a healthy object is looked at again with no event (drift repair).
    pub resync: Duration,
}

pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    pub push_client: PushClient,
    pub pools: Store<Pool>,
    pub credentials: Store<Cred>,
    pub pods: Store<Pod>,
    /// Each pool's admin token, learnt while reconciling it, for the live-state poller.
    pub admin_tokens: Mutex<HashMap<ObjectRef<Pool>, String>>,
    pub live: LiveIndex,
    /// Consecutive transient failures per object, for exponential backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        settings: Settings,
        metrics: Arc<Metrics>,
        recorder: Recorder,
        pools: Store<Pool>,
        credentials: Store<Cred>,
        pods: Store<Pod>,
    ) -> Context {
        Context {
            client,
            settings,
            metrics,
            recorder,
            push_client: crate::router_pool::push::client(),
            pools,
            credentials,
            pods,
            admin_tokens: Mutex::default(),
            live: LiveIndex::default(),
            failures: Mutex::default(),
        }
    }

    /// Publishes an Event on `regarding`; a failure is logged, never fatal.
    pub async fn publish(&self, regarding: &ObjectReference, note: Note) {
        let event = Event {
            type_: note.type_,
            reason: note.reason,
            note: Some(truncate(note.message, 1000)),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, regarding).await {
            warn!(error = %e, object = ?regarding.name, "cannot publish an Event");
        }
    }

    /// The delay before retrying `key` after a transient failure: 1 s, doubling, at most 5 min.
    pub fn backoff(&self, key: String) -> Duration {
        let mut failures = self.failures.lock();
        let n = failures.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        backoff_delay(*n)
    }

    /// Forgets `key`'s failures after a success.
    pub fn succeeded(&self, key: &str) {
        self.failures.lock().remove(key);
    }
}

/// The wait after the `failures`-th failure in a row: 1 s, doubling, at most 5 min.
fn backoff_delay(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(9);
    Duration::from_secs(1 << doublings).min(Duration::from_secs(300))
}

fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

/// Now, as the RFC 3339 text conditions carry.
pub fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_a_second_to_five_minutes() {
        let secs: Vec<u64> = (1..=12).map(|n| backoff_delay(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(backoff_delay(u32::MAX).as_secs(), 300);
    }
}
