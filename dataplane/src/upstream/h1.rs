//! HTTP/1.1 connections to upstream origins, kept for reuse.
//!
//! A connection is lent to one request at a time and goes back to its origin's idle list the
//! moment the response body has been read to its end — by the body itself, so no task waits
//! for it. A response body dropped before its end takes the connection with it (hyper closes
//! it: the rest of that response is still on the wire).
//!
//! This replaces hyper-util's pooled client, which per request hashes its pool key with
//! SipHash several times, formats the `Host` header, and spawns a task to return the
//! connection: 9.2k of the 64k instructions airouter spent on a request (`bench/NOTES.md`).

use std::{
    future::poll_fn,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::FutureExt;
use http::{header::HOST, uri::PathAndQuery, HeaderValue, Request, Response, Uri};
use http_body_util::Full;
use hyper::{body::Incoming, client::conn::http1};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use parking_lot::Mutex;
use tower_service::Service;
use tracing::debug;

use super::{
    client::chain,
    origin::{sweep, ByOrigin, Origin},
};

/// How long an idle connection that is not ready at once may take to become so.
const READY_WAIT: Duration = Duration::from_millis(100);

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
    builder: http1::Builder,
    settings: Settings,
    /// The zero of the idle clocks.
    epoch: Instant,
}

/// One origin's idle connections, most recently used last.
struct OriginIdle {
    origin: Origin,
    host: HeaderValue,
    idle: Mutex<Vec<Idle>>,
    max_idle: usize,
    idle_ms: u64,
    epoch: Instant,
}

struct Idle {
    send: http1::SendRequest<Full<Bytes>>,
    /// Milliseconds since [`Pool::epoch`] when it came back.
    since_ms: u64,
}

impl OriginIdle {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn is_fresh(&self, idle: &Idle, now_ms: u64) -> bool {
        !idle.send.is_closed() && now_ms.saturating_sub(idle.since_ms) < self.idle_ms
    }

    /// The most recently used idle connection that is still open and ready for a request.
    /// It usually is at once; one whose last response has just ended may need its task to run
    /// once more, so it gets [`READY_WAIT`]. One still writing a request body the upstream
    /// answered early and stopped reading would never be: it is dropped (closed), not waited
    /// on until `request_timeout`.
    async fn checkout(&self) -> Option<http1::SendRequest<Full<Bytes>>> {
        let now_ms = self.now_ms();
        loop {
            let mut idle = self.idle.lock().pop()?;
            if !self.is_fresh(&idle, now_ms) {
                continue;
            }
            let ready = match idle.send.ready().now_or_never() {
                Some(ready) => ready.is_ok(),
                // Boxed: the timer is for the rare case and stays out of every request's
                // future.
                None => matches!(
                    Box::pin(tokio::time::timeout(READY_WAIT, idle.send.ready())).await,
                    Ok(Ok(()))
                ),
            };
            if ready {
                return Some(idle.send);
            }
            debug!(origin = %self.origin, "idle HTTP/1.1 connection not ready; closing it");
        }
    }

    /// Takes back a connection whose response has ended.
    fn checkin(&self, send: http1::SendRequest<Full<Bytes>>) {
        if send.is_closed() {
            return;
        }
        let since_ms = self.now_ms();
        let mut idle = self.idle.lock();
        if idle.len() < self.max_idle {
            idle.push(Idle { send, since_ms });
        }
    }

    /// Closes expired connections (dropping the handle ends the connection's task). Whether
    /// this origin is still of use: it has idle connections, or some are lent out.
    fn prune(self: &Arc<Self>, now_ms: u64) -> bool {
        let mut idle = self.idle.lock();
        idle.retain(|c| self.is_fresh(c, now_ms));
        !idle.is_empty() || Arc::strong_count(self) > 1
    }
}

/// A connection lent to one request. [`Lent::finished`] gives it back; dropped before that,
/// it closes.
pub struct Lent {
    send: Option<http1::SendRequest<Full<Bytes>>>,
    origin: Arc<OriginIdle>,
}

impl Lent {
    /// The response body has ended: the connection can carry another request.
    pub fn finished(&mut self) {
        if let Some(send) = self.send.take() {
            self.origin.checkin(send);
        }
    }
}

impl Pool {
    pub fn new(connector: HttpsConnector<HttpConnector>, settings: Settings) -> Pool {
        Pool {
            origins: Arc::default(),
            sweeping: std::sync::Once::new(),
            connector,
            builder: http1::Builder::new(),
            settings,
            epoch: Instant::now(),
        }
    }

    /// Sends `req` (an absolute URI of `origin`) on an idle connection, or a new one.
    pub async fn send(
        &self,
        origin: Origin,
        mut req: Request<Full<Bytes>>,
    ) -> Result<Response<(Incoming, Lent)>, Error> {
        let conns = self.origin(origin);
        // HTTP/1.1 wants the origin form (`/path?query`) and a `Host` header.
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(path);
        req.headers_mut().insert(HOST, conns.host.clone());
        // An idle connection the peer closed before the request went out hands the request
        // back; it goes on the next one. Each turn takes one idle connection or opens one, so
        // this ends.
        loop {
            let (mut send, reused) = match conns.checkout().await {
                Some(send) => (send, true),
                // Boxed: connecting is rare, and its state would otherwise enlarge every
                // request's future (moved several times on the way down).
                None => (Box::pin(self.connect(&conns.origin)).await?, false),
            };
            match send.try_send_request(req).await {
                Ok(resp) => {
                    let lent = Lent {
                        send: Some(send),
                        origin: conns,
                    };
                    return Ok(resp.map(|body| (body, lent)));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => {
                        debug!(origin = %conns.origin, error = %e.error(), "idle HTTP/1.1 connection unusable; sending on another");
                        req = unsent;
                    }
                    _ => {
                        return Err(Error::Request {
                            origin: conns.origin.to_string(),
                            reason: chain(e.error()),
                        })
                    }
                },
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

    /// A new connection to `origin`, ready for a request; its task runs until it closes.
    async fn connect(&self, origin: &Origin) -> Result<http1::SendRequest<Full<Bytes>>, Error> {
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
            let (mut send, connection) = self
                .builder
                .handshake::<_, Full<Bytes>>(io)
                .await
                .map_err(|e| failed(&e))?;
            // A combinator, not an `async move` block: a block stores the captured connection
            // and the one it awaits separately (3.5 KB instead of 1.8 KB per connection).
            let named = origin.clone();
            tokio::spawn(connection.map(move |ended| match ended {
                Ok(()) => debug!(origin = %named, "HTTP/1.1 connection closed"),
                Err(e) => debug!(origin = %named, error = %e, "HTTP/1.1 connection ended"),
            }));
            send.ready().await.map_err(|e| failed(&e))?;
            Ok(send)
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
