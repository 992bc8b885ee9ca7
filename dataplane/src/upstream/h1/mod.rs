//! HTTP/1.1 connections to upstream origins, kept for reuse.
//!
//! A connection is lent to one request at a time and goes back to its origin's idle list the
//! moment the response body has been read to its end — by the body itself, so no task waits
//! for it. A response body dropped before its end takes the connection with it (it closes:
//! the rest of that response is still on the wire).
//!
//! This is not hyper's HTTP/1.1 client. That one gives every connection a task, a request
//! channel (a 9 KB block) and 8 KiB read and write buffers it never shrinks, and hands every
//! chunk of an answer from that task to the one that forwards it through a body channel:
//! ~27 KB reserved and a task switch per chunk for each open stream, which put 5,000 open
//! streams at 163 MB (`bench/NOTES.md`, eleventh round). Here the request is written and the
//! response read by whoever polls it, through a 2 KiB buffer that grows only for larger
//! answers. Parsing is `httparse` (hyper's parser); [`codec`] holds the framing rules, kept
//! apart from the I/O in [`conn`].

mod codec;
mod conn;

use std::{
    future::poll_fn,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::FutureExt;
use http::{header::HOST, HeaderValue, Request, Response};
use http_body_util::BodyExt as _;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use parking_lot::Mutex;
use tower_service::Service;
use tracing::debug;

pub use conn::{Body, BodyError};

use super::{
    client::chain,
    origin::{sweep, ByOrigin, Origin},
};
use conn::{Conn, Lent};

/// Why a request could not be sent over HTTP/1.1.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to {origin}: {reason}")]
    Connect { origin: String, reason: String },
    #[error("HTTP/1.1 request to {origin} failed: {reason}")]
    Request { origin: String, reason: String },
}

/// Pool settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// An idle connection is closed after this.
    pub idle_timeout: Duration,
    /// Idle connections kept per origin; more are closed as they come back.
    pub max_idle_per_origin: usize,
    /// Bounds connecting: TCP and TLS together.
    pub connect_timeout: Duration,
}

/// Idle HTTP/1.1 connections by origin.
pub struct Pool {
    origins: Arc<ByOrigin<Arc<OriginIdle>>>,
    /// Set once the task that closes idle connections runs (started by the first request,
    /// which is on the runtime).
    sweeping: std::sync::Once,
    /// TLS offering only `http/1.1` in ALPN, or plain TCP.
    connector: HttpsConnector<HttpConnector>,
    settings: Settings,
    /// The zero of the idle clocks.
    epoch: Instant,
}

/// One origin's idle connections, most recently used last.
pub struct OriginIdle {
    origin: Origin,
    host: HeaderValue,
    idle: Mutex<Vec<Idle>>,
    max_idle: usize,
    idle_ms: u64,
    epoch: Instant,
}

struct Idle {
    conn: Conn,
    /// Milliseconds since [`Pool::epoch`] when it came back.
    since_ms: u64,
}

impl OriginIdle {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn is_fresh(&self, idle: &Idle, now_ms: u64) -> bool {
        now_ms.saturating_sub(idle.since_ms) < self.idle_ms
    }

    /// The most recently used idle connection that has not expired and that the upstream
    /// has not closed.
    fn checkout(&self) -> Option<Conn> {
        let now_ms = self.now_ms();
        loop {
            let mut idle = self.idle.lock().pop()?;
            if !self.is_fresh(&idle, now_ms) {
                continue;
            }
            if idle.conn.is_usable() {
                return Some(idle.conn);
            }
            debug!(origin = %self.origin, "idle HTTP/1.1 connection closed by the upstream; dropping it");
        }
    }

    /// Takes back a connection whose response has ended.
    fn checkin(&self, conn: Conn) {
        let since_ms = self.now_ms();
        let mut idle = self.idle.lock();
        if idle.len() < self.max_idle {
            idle.push(Idle { conn, since_ms });
        }
    }

    /// Closes expired connections and those the upstream closed. Whether this origin is
    /// still of use: it has idle connections, or some are lent out.
    fn prune(self: &Arc<Self>, now_ms: u64) -> bool {
        let mut idle = self.idle.lock();
        idle.retain_mut(|c| self.is_fresh(c, now_ms) && c.conn.is_usable());
        !idle.is_empty() || Arc::strong_count(self) > 1
    }
}

impl Pool {
    pub fn new(connector: HttpsConnector<HttpConnector>, settings: Settings) -> Pool {
        Pool {
            origins: Arc::default(),
            sweeping: std::sync::Once::new(),
            connector,
            settings,
            epoch: Instant::now(),
        }
    }

    /// Sends `req` (an absolute URI of `origin`) on an idle connection, or a new one.
    pub async fn send(
        &self,
        origin: Origin,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<Body>, Error> {
        let conns = self.origin(origin);
        let (mut parts, mut body) = req.into_parts();
        // A `Full` body is ready at once: its one frame, or none when empty.
        let body = body
            .frame()
            .now_or_never()
            .flatten()
            .and_then(|frame| frame.ok()?.into_data().ok())
            .unwrap_or_default();
        // HTTP/1.1 wants the origin form (`/path?query`) and a `Host` header.
        let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        parts.headers.insert(HOST, conns.host.clone());
        let head = codec::encode_head(&parts.method, path, &parts.headers, body.len());
        // An idle connection the upstream closed as the request went out (none of it
        // written) takes the request to the next one. Each turn takes one idle connection or
        // opens one, so this ends.
        loop {
            let (mut conn, reused) = match conns.checkout() {
                Some(conn) => (conn, true),
                // Boxed: connecting is rare, and its state would otherwise enlarge every
                // request's future (moved several times on the way down).
                None => (Box::pin(self.connect(&conns.origin)).await?, false),
            };
            match conn.exchange(&head, &body, &parts.method).await {
                Ok(head) => {
                    let lent = Lent {
                        conn,
                        origin: conns,
                    };
                    let mut resp = Response::new(Body::new(lent, head.body, head.reusable));
                    *resp.status_mut() = head.status;
                    *resp.version_mut() = head.version;
                    *resp.headers_mut() = head.headers;
                    return Ok(resp);
                }
                Err(e) if reused && !e.written => {
                    debug!(origin = %conns.origin, error = %e.error, "idle HTTP/1.1 connection unusable; sending on another");
                }
                Err(e) => {
                    return Err(Error::Request {
                        origin: conns.origin.to_string(),
                        reason: chain(&e.error),
                    })
                }
            }
        }
    }

    fn origin(&self, origin: Origin) -> Arc<OriginIdle> {
        self.sweeping.call_once(|| {
            tokio::spawn(sweep(
                Arc::downgrade(&self.origins),
                self.epoch,
                self.settings.idle_timeout,
                |conns: &Arc<OriginIdle>, now_ms| conns.prune(now_ms),
            ));
        });
        let mut origins = self.origins.lock();
        if let Some(conns) = origins.get(&origin) {
            return conns.clone();
        }
        let conns = Arc::new(OriginIdle {
            host: origin.host_header(),
            origin: origin.clone(),
            idle: Mutex::default(),
            max_idle: self.settings.max_idle_per_origin,
            idle_ms: self.settings.idle_timeout.as_millis() as u64,
            epoch: self.epoch,
        });
        origins.insert(origin, conns.clone());
        conns
    }

    /// A new connection to `origin` (TCP, and TLS for `https`).
    async fn connect(&self, origin: &Origin) -> Result<Conn, Error> {
        let timeout = self.settings.connect_timeout;
        let failed = |e: &dyn std::error::Error| Error::Connect {
            origin: origin.to_string(),
            reason: chain(e),
        };
        let mut connector = self.connector.clone();
        let connected = tokio::time::timeout(timeout, async {
            poll_fn(|cx| connector.poll_ready(cx))
                .await
                .map_err(|e| failed(&*e))?;
            let io = connector
                .call(origin.uri())
                .await
                .map_err(|e| failed(&*e))?;
            Ok(Conn::new(conn::io(io)))
        })
        .await;
        connected.unwrap_or_else(|_| {
            Err(Error::Connect {
                origin: origin.to_string(),
                reason: format!("not connected within {timeout:?}"),
            })
        })
    }
}
