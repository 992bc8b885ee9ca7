//! I/O: push a rendered config to every ready data-plane pod (`PUT /admin/config` on its admin
//! port), all pods at once, each bounded by a timeout. The per-pod outcomes feed
//! `status.syncedReplicas` and the `ConfigSynced` condition; a pod that cannot be reached now
//! is retried on the next reconcile (and picks the config up from its mounted Secret anyway).

use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use http::{header, Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use serde::Deserialize;

/// The HTTP client pushes go through.
pub type PushClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> PushClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(2)));
    Client::builder(TokioExecutor::new()).build(http)
}

/// A ready pod's admin endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodTarget {
    pub name: String,
    pub ip: String,
    pub port: u16,
}

/// What one pod answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodOutcome {
    /// The pod serves the config with this hash.
    Synced { hash: String },
    /// The pod refused the document (its message lists the fields).
    Rejected { status: u16, message: String },
    /// No answer (connection refused, timeout, unreadable reply).
    Unreachable { error: String },
}

/// Every pod's outcome, in the order given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PushReport {
    pub pods: Vec<(String, PodOutcome)>,
}

impl PushReport {
    /// Pods now serving `hash`.
    pub fn synced(&self, hash: &str) -> usize {
        self.pods
            .iter()
            .filter(|(_, o)| matches!(o, PodOutcome::Synced { hash: h } if h == hash))
            .count()
    }

    /// The first failure, for a condition message (never contains the document).
    pub fn first_failure(&self) -> Option<String> {
        self.pods.iter().find_map(|(pod, o)| match o {
            PodOutcome::Synced { .. } => None,
            PodOutcome::Rejected { status, message } => Some(format!(
                "pod {pod} refused the config ({status}): {message}"
            )),
            PodOutcome::Unreachable { error } => Some(format!("pod {pod} unreachable: {error}")),
        })
    }
}

#[derive(Deserialize)]
struct Applied {
    hash: String,
}

/// A pod's refusal: its message, and for a refused document every problem with its field.
#[derive(Deserialize)]
struct Refusal {
    error: RefusalError,
    #[serde(default)]
    problems: Vec<RefusedField>,
}

#[derive(Deserialize)]
struct RefusalError {
    message: String,
}

#[derive(Deserialize)]
struct RefusedField {
    field: String,
    message: String,
}

impl Refusal {
    /// The message, then each problem as `field: message` (the pod's parser never shows a
    /// secret in them).
    fn describe(self) -> String {
        let fields: Vec<String> = (self.problems.iter())
            .map(|p| format!("{}: {}", p.field, p.message))
            .collect();
        match fields.is_empty() {
            true => self.error.message,
            false => format!("{} — {}", self.error.message, fields.join("; ")),
        }
    }
}

/// Pushes `document` to every pod concurrently.
pub async fn push(
    client: &PushClient,
    pods: &[PodTarget],
    document: &str,
    admin_token: &str,
    timeout: Duration,
) -> PushReport {
    let body = Bytes::from(document.to_owned());
    let outcomes = join_all(
        pods.iter()
            .map(|pod| push_one(client, pod, body.clone(), admin_token, timeout)),
    )
    .await;
    PushReport {
        pods: pods.iter().map(|p| p.name.clone()).zip(outcomes).collect(),
    }
}

async fn push_one(
    client: &PushClient,
    pod: &PodTarget,
    body: Bytes,
    admin_token: &str,
    timeout: Duration,
) -> PodOutcome {
    let unreachable = |error: String| PodOutcome::Unreachable { error };
    let host = if pod.ip.contains(':') {
        format!("[{}]", pod.ip)
    } else {
        pod.ip.clone()
    };
    let request = Request::builder()
        .method(Method::PUT)
        .uri(format!("http://{host}:{}/admin/config", pod.port))
        .header(header::AUTHORIZATION, format!("Bearer {admin_token}"))
        .header(header::CONTENT_TYPE, "application/yaml")
        .body(Full::new(body));
    let request = match request {
        Ok(r) => r,
        Err(e) => return unreachable(format!("bad pod address: {e}")),
    };
    let exchange = async {
        let resp = client.request(request).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), 1 << 20)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok::<_, String>((status, body))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Err(_) => unreachable(format!("no answer within {} ms", timeout.as_millis())),
        Ok(Err(e)) => unreachable(e),
        Ok(Ok((status, body))) if status.is_success() => {
            match serde_json::from_slice::<Applied>(&body) {
                Ok(applied) => PodOutcome::Synced { hash: applied.hash },
                Err(e) => unreachable(format!("unreadable answer: {e}")),
            }
        }
        Ok(Ok((status, body))) => PodOutcome::Rejected {
            status: status.as_u16(),
            message: serde_json::from_slice::<Refusal>(&body)
                .map(Refusal::describe)
                .unwrap_or_else(|_| {
                    String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned()
                }),
        },
    }
}
