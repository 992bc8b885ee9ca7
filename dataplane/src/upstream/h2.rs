//! HTTP/2 connections to upstream origins, opened as their streams run out.
//!
//! hyper-util's pooled client keeps one HTTP/2 connection per origin and queues every request
//! past the peer's `SETTINGS_MAX_CONCURRENT_STREAMS` until a stream on it ends
//! (hyperium/hyper#3623). LLM streams last tens of seconds, so behind a provider that allows
//! 100 streams per connection the 101st concurrent request would wait for a whole stream to
//! finish — long enough to hit `request_timeout` and be counted against the credential. This
//! pool counts the streams it has started on each connection, reads the peer's limit from the
//! connection as it changes, and opens another connection when every open one is full (as
//! Go's `http2.Transport` and Envoy do).
//!
//! Until a new connection's peer has sent its SETTINGS, 100 streams are assumed (hyper's
//! and Go's initial value); a peer that allows fewer queues the excess of that first burst in
//! hyper until its streams end.

use std::{
    future::{poll_fn, Future},
    pin::pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::{
    future::{BoxFuture, Shared},
    FutureExt,
};
use http::{Request, Response};
use http_body_util::Full;
use hyper::{body::Incoming, client::conn::http2};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::{
    client::legacy::connect::{Connection as _, HttpConnector},
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use parking_lot::Mutex;
use tokio::net::TcpStream;
use tower_service::Service;
use tracing::debug;

use super::origin::{sweep, ByOrigin, Origin};

/// Streams a connection is assumed to take before its peer's SETTINGS arrive.
const ASSUMED_STREAMS: usize = 100;
/// An upstream HTTP/2 connection is pinged this often, and closed when a ping goes unanswered
/// for [`PING_TIMEOUT`].
const PING_INTERVAL: Option<Duration> = Some(Duration::from_secs(30));
const PING_TIMEOUT: Duration = Duration::from_secs(20);
/// How many connections one request may wait for before it gives up. Each wait is for a
/// connection that was expected to have room for it; more than a few means the peer takes
/// far fewer streams than assumed.
const MAX_OPENINGS_PER_REQUEST: usize = 8;

/// Why a request could not be sent over HTTP/2. Cloneable: one failed connection attempt is
/// the answer for every request that waited for it.
#[derive(Clone, Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to {origin}: {reason}")]
    Connect { origin: String, reason: Arc<str> },
    #[error("{origin} did not agree to HTTP/2 (TLS ALPN chose HTTP/1.1 or nothing); set the credential's http_version to auto or http1")]
    NotHttp2 { origin: String },
    #[error("no HTTP/2 stream free at {origin} after opening {MAX_OPENINGS_PER_REQUEST} connections for this request (it allows far fewer than {ASSUMED_STREAMS} streams per connection); set the credential's http_version to http1")]
    NoStream { origin: String },
    #[error("{origin} closed two HTTP/2 connections before the request could be sent on either")]
    Closing { origin: String },
    /// The peer reset the stream with `REFUSED_STREAM`, or sent `GOAWAY` before answering it:
    /// it did not process the request (RFC 9113 §8.7), so sending it again is safe.
    #[error("{origin} refused the HTTP/2 stream without processing it: {source}")]
    Refused {
        origin: String,
        source: Arc<hyper::Error>,
    },
    #[error("HTTP/2 request to {origin} failed: {source}")]
    Request {
        origin: String,
        source: Arc<hyper::Error>,
    },
}

/// One origin's HTTP/2 connections, as `/metrics` shows them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Http2Origin {
    /// `scheme://host[:port]`.
    pub origin: String,
    pub connections: usize,
    pub streams: usize,
}

/// What [`Pool::send`] gives back when it did not send the request.
pub enum SendError {
    /// `https` origin without HTTP/2 in ALPN: the request, unsent, for HTTP/1.1.
    NotHttp2(Box<Request<Full<Bytes>>>),
    Failed(Error),
}

/// Pool settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// A connection with no stream for this long is closed.
    pub idle_timeout: Duration,
    /// Bounds connecting: TCP, TLS and the HTTP/2 handshake together.
    pub connect_timeout: Duration,
}

/// HTTP/2 connections by origin.
pub struct Pool {
    origins: Arc<ByOrigin<Arc<OriginConns>>>,
    /// Set once the task that closes idle connections runs (started by the first request,
    /// which is on the runtime).
    sweeping: std::sync::Once,
    /// TLS with ALPN `h2` and `http/1.1` (so an `auto` origin that lacks h2 can say so), or
    /// plain TCP for `http` origins (prior knowledge).
    connector: HttpsConnector<HttpConnector>,
    builder: http2::Builder<TokioExecutor>,
    settings: Settings,
    /// The zero of the idle clocks.
    epoch: Instant,
}

/// The connections to one origin.
struct OriginConns {
    origin: Origin,
    state: Mutex<State>,
}

impl OriginConns {
    /// Forgets connections that ended, and closes those idle for `idle_ms` (dropping the last
    /// handle of a connection ends it). Whether anything is left here.
    fn prune(&self, now_ms: u64, idle_ms: u64) -> bool {
        let mut state = self.state.lock();
        state.conns.retain(|c| {
            c.is_open()
                && !(c.state.streams.load(Ordering::Acquire) == 0
                    && now_ms.saturating_sub(c.state.idle_since_ms.load(Ordering::Acquire))
                        >= idle_ms)
        });
        !(state.conns.is_empty() && state.openings.is_empty())
    }
}

#[derive(Default)]
struct State {
    conns: Vec<Arc<Conn>>,
    /// Connections being opened, each shared by the requests waiting for it.
    openings: Vec<Opening>,
    next_opening: u64,
}

struct Opening {
    id: u64,
    /// Requests that chose to wait for this connection (at most [`ASSUMED_STREAMS`]).
    joined: usize,
    done: Shared<BoxFuture<'static, Result<(), Error>>>,
}

/// One HTTP/2 connection.
struct Conn {
    send: http2::SendRequest<Full<Bytes>>,
    /// Shared with the connection's task, which must not hold `send`: the connection ends
    /// when the pool drops its last handle.
    state: Arc<ConnState>,
}

struct ConnState {
    /// Streams started here by this pool and not yet finished.
    streams: AtomicUsize,
    /// The peer's `SETTINGS_MAX_CONCURRENT_STREAMS`, kept current by the connection's task.
    max_streams: AtomicUsize,
    /// Set by the connection's task when the connection has ended.
    ended: AtomicBool,
    /// Milliseconds since [`Pool::epoch`] when `streams` last dropped to 0.
    idle_since_ms: AtomicU64,
}

impl Conn {
    fn is_open(&self) -> bool {
        !self.state.ended.load(Ordering::Acquire) && !self.send.is_closed()
    }

    /// Takes a stream if the peer allows one more.
    fn try_take(&self) -> bool {
        let max = self.state.max_streams.load(Ordering::Acquire);
        self.is_open()
            && self
                .state
                .streams
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < max).then_some(n + 1)
                })
                .is_ok()
    }
}

/// A stream taken on a connection; the stream count drops when this does (when the response
/// body is finished or dropped).
pub struct StreamSlot {
    conn: Arc<Conn>,
    epoch: Instant,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let state = &self.conn.state;
        if state.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            state
                .idle_since_ms
                .store(self.epoch.elapsed().as_millis() as u64, Ordering::Release);
        }
    }
}

impl Pool {
    pub fn new(connector: HttpsConnector<HttpConnector>, settings: Settings) -> Pool {
        let mut builder = http2::Builder::new(TokioExecutor::new());
        // Pings find a connection that died without a FIN (a dropped NAT entry, a killed
        // node) while streams wait on it, instead of each waiting out `request_timeout` (or
        // for ever, once its stream started). Not while idle: some servers answer pings on a
        // connection without streams with GOAWAY, and the pool closes idle ones anyway.
        builder
            .timer(TokioTimer::new())
            .initial_max_send_streams(ASSUMED_STREAMS)
            .keep_alive_interval(PING_INTERVAL)
            .keep_alive_timeout(PING_TIMEOUT)
            .keep_alive_while_idle(false);
        Pool {
            origins: Arc::default(),
            sweeping: std::sync::Once::new(),
            connector,
            builder,
            settings,
            epoch: Instant::now(),
        }
    }

    /// Sends `req` (an absolute URI of `origin`) on a connection with a free stream, opening
    /// one if every connection is full.
    pub async fn send(
        &self,
        origin: Origin,
        mut req: Request<Full<Bytes>>,
    ) -> Result<Response<(Incoming, StreamSlot)>, SendError> {
        let conns = self.conns(origin);
        // A connection that went away between choosing it and sending hands the request
        // back; it is sent once more, on another connection.
        for _ in 0..2 {
            let slot = match self.take_stream(&conns).await {
                Ok(slot) => slot,
                Err(Error::NotHttp2 { .. }) => return Err(SendError::NotHttp2(Box::new(req))),
                Err(e) => return Err(SendError::Failed(e)),
            };
            let mut send = slot.conn.send.clone();
            match send.try_send_request(req).await {
                Ok(resp) => return Ok(resp.map(|body| (body, slot))),
                Err(mut e) => match e.take_message() {
                    Some(unsent) => {
                        debug!(origin = %conns.origin, error = %e.error(), "HTTP/2 connection unusable; sending on another");
                        slot.conn.state.ended.store(true, Ordering::Release);
                        req = unsent;
                    }
                    None => {
                        let (origin, source) = (conns.origin.to_string(), e.into_error());
                        return Err(SendError::Failed(match refusal(&source) {
                            Some(refusal) => {
                                if refusal == Refusal::GoingAway {
                                    // No new stream on it; the ones it kept run to their end.
                                    slot.conn.state.ended.store(true, Ordering::Release);
                                }
                                Error::Refused {
                                    origin,
                                    source: Arc::new(source),
                                }
                            }
                            None => Error::Request {
                                origin,
                                source: Arc::new(source),
                            },
                        }));
                    }
                },
            }
        }
        Err(SendError::Failed(Error::Closing {
            origin: conns.origin.to_string(),
        }))
    }

    /// Open connections and streams in flight, by origin (for `/metrics`).
    pub fn snapshot(&self) -> Vec<Http2Origin> {
        let origins = self.origins.lock();
        let mut out: Vec<Http2Origin> = origins
            .values()
            .map(|o| {
                let state = o.state.lock();
                let open = state.conns.iter().filter(|c| c.is_open());
                Http2Origin {
                    origin: o.origin.to_string(),
                    connections: open.clone().count(),
                    streams: open.map(|c| c.state.streams.load(Ordering::Acquire)).sum(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.origin.cmp(&b.origin));
        out
    }

    fn conns(&self, origin: Origin) -> Arc<OriginConns> {
        self.sweeping.call_once(|| {
            let idle_ms = self.settings.idle_timeout.as_millis() as u64;
            tokio::spawn(sweep(
                Arc::downgrade(&self.origins),
                self.epoch,
                self.settings.idle_timeout,
                move |conns: &Arc<OriginConns>, now_ms| conns.prune(now_ms, idle_ms),
            ));
        });
        let mut origins = self.origins.lock();
        origins
            .entry(origin)
            .or_insert_with_key(|origin| {
                Arc::new(OriginConns {
                    origin: origin.clone(),
                    state: Mutex::default(),
                })
            })
            .clone()
    }

    async fn take_stream(&self, conns: &Arc<OriginConns>) -> Result<StreamSlot, Error> {
        for _ in 0..MAX_OPENINGS_PER_REQUEST {
            // Ended connections are skipped by `try_take` and forgotten by the sweeper.
            let done = {
                let mut state = conns.state.lock();
                if let Some(conn) = state.conns.iter().find(|c| c.try_take()) {
                    return Ok(StreamSlot {
                        conn: conn.clone(),
                        epoch: self.epoch,
                    });
                }
                match state
                    .openings
                    .iter_mut()
                    .find(|o| o.joined < ASSUMED_STREAMS)
                {
                    Some(opening) => {
                        opening.joined += 1;
                        opening.done.clone()
                    }
                    None => {
                        let id = state.next_opening;
                        state.next_opening += 1;
                        let done = self.open(conns.clone(), id);
                        state.openings.push(Opening {
                            id,
                            joined: 1,
                            done: done.clone(),
                        });
                        done
                    }
                }
            };
            done.await?;
        }
        Err(Error::NoStream {
            origin: conns.origin.to_string(),
        })
    }

    /// Opens a connection in a task of its own (so it completes even if every request that
    /// waits for it is cancelled), adds it to `conns` and ends opening `id`.
    fn open(
        &self,
        conns: Arc<OriginConns>,
        id: u64,
    ) -> Shared<BoxFuture<'static, Result<(), Error>>> {
        let mut connector = self.connector.clone();
        let builder = self.builder.clone();
        let (timeout, epoch) = (self.settings.connect_timeout, self.epoch);
        let named = conns.origin.to_string();
        let task = tokio::spawn(async move {
            let origin = conns.origin.clone();
            let connected = tokio::time::timeout(timeout, async {
                poll_fn(|cx| connector.poll_ready(cx))
                    .await
                    .map_err(|e| connect_error(&origin, &*e))?;
                let io = connector
                    .call(origin.uri())
                    .await
                    .map_err(|e| connect_error(&origin, &*e))?;
                if origin.is_https() && !io.connected().is_negotiated_h2() {
                    return Err(Error::NotHttp2 {
                        origin: origin.to_string(),
                    });
                }
                builder
                    .handshake(io)
                    .await
                    .map_err(|e| connect_error(&origin, &e))
            })
            .await
            .unwrap_or_else(|_| {
                Err(Error::Connect {
                    origin: origin.to_string(),
                    reason: Arc::from(format!("not connected within {timeout:?}")),
                })
            });
            let result = connected.map(|(send, connection)| {
                let state = Arc::new(ConnState {
                    streams: AtomicUsize::new(0),
                    max_streams: AtomicUsize::new(connection.current_max_send_streams()),
                    ended: AtomicBool::new(false),
                    idle_since_ms: AtomicU64::new(epoch.elapsed().as_millis() as u64),
                });
                tokio::spawn(drive(connection, state.clone(), origin.clone()));
                let conn = Arc::new(Conn { send, state });
                debug!(origin = %origin, "HTTP/2 connection opened");
                conn
            });
            let mut state = conns.state.lock();
            state.openings.retain(|o| o.id != id);
            result.map(|conn| state.conns.push(conn))
        });
        async move {
            task.await.unwrap_or_else(|e| {
                Err(Error::Connect {
                    origin: named,
                    reason: Arc::from(format!("the connecting task failed: {e}")),
                })
            })
        }
        .boxed()
        .shared()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    /// `RST_STREAM` with `REFUSED_STREAM`: the connection stays usable.
    Stream,
    /// `GOAWAY` from the peer before the answer's head: the connection takes no new streams.
    GoingAway,
}

/// Whether the peer said it did not process the request. A `GOAWAY` names the last stream the
/// peer will process, and h2 fails exactly the streams past it with the `GOAWAY`'s error; a
/// peer that then drops the connection with streams it kept still unanswered fails those with
/// it too, which cannot be told apart here — the request is sent again then as well (as it
/// would go to the next credential without this), once, and never after its answer started.
fn refusal(e: &hyper::Error) -> Option<Refusal> {
    let h2 = std::error::Error::source(e)?.downcast_ref::<h2::Error>()?;
    if !h2.is_remote() {
        None
    } else if h2.is_go_away() {
        Some(Refusal::GoingAway)
    } else if h2.is_reset() && h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
        Some(Refusal::Stream)
    } else {
        None
    }
}

fn connect_error(origin: &Origin, e: &dyn std::error::Error) -> Error {
    Error::Connect {
        origin: origin.to_string(),
        reason: Arc::from(super::client::chain(e)),
    }
}

/// A connection as the connector and hyper make it.
type Connection =
    http2::Connection<MaybeHttpsStream<TokioIo<TcpStream>>, Full<Bytes>, TokioExecutor>;

/// Runs a connection until it ends, publishing the peer's stream limit after every poll
/// (a SETTINGS frame may change it at any time).
async fn drive(connection: Connection, state: Arc<ConnState>, origin: Origin) {
    let mut connection = pin!(connection);
    let ended = poll_fn(|cx| {
        let polled = connection.as_mut().poll(cx);
        state
            .max_streams
            .store(connection.current_max_send_streams(), Ordering::Release);
        polled
    })
    .await;
    state.ended.store(true, Ordering::Release);
    match ended {
        Ok(()) => debug!(origin = %origin, "HTTP/2 connection closed"),
        Err(e) => debug!(origin = %origin, error = %e, "HTTP/2 connection ended"),
    }
}
