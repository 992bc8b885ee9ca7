//! The listener: accepts connections (HTTP/1.1 with keep-alive, or HTTP/2 without TLS),
//! serves them with [`proxy::handle`], and shuts down gracefully: stop accepting, let
//! in-flight requests and streams finish (bounded by a grace period), then return.
//!
//! The protocol is told from the connection's first bytes with `MSG_PEEK`, so they stay in
//! the socket for hyper. (hyper-util's automatic builder reads them into a buffer of its own
//! and hands them back first: hyper then sees a 24-byte partial head and doubles its 8 KiB
//! read buffer for every HTTP/1.1 connection — 8 KiB more per open stream.)

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    server::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use pin_project_lite::pin_project;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use crate::{
    admin,
    app::App,
    body::{BoxError, RespBody},
    drain::{Drain, Watch},
    proxy,
    stall::StallLimit,
};

/// An HTTP/2 client connection is pinged this often, and closed when a ping goes unanswered
/// for [`H2_PING_TIMEOUT`].
const H2_PING_INTERVAL: Option<Duration> = Some(Duration::from_secs(30));
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// Probes an idle client connection after 60 s, then every 10 s; 3 unanswered: closed.
const TCP_KEEPALIVE: socket2::TcpKeepalive = socket2::TcpKeepalive::new()
    .with_time(Duration::from_secs(60))
    .with_interval(Duration::from_secs(10))
    .with_retries(3);

/// A connection whose first bytes are a strict prefix of the HTTP/2 preface is looked at again
/// after this, then twice as long each time up to [`UNDECIDED_POLL_MAX`] (clients send the
/// preface whole; this is for the odd one that does not, or one that stops half-way).
const UNDECIDED_POLL: Duration = Duration::from_millis(5);
const UNDECIDED_POLL_MAX: Duration = Duration::from_secs(1);

/// The HTTP/2 connection preface (RFC 9113 §3.4) an h2c client opens with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a connection's first bytes say about its protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Detected {
    Http1,
    Http2,
    /// A strict prefix of the HTTP/2 preface: more bytes are needed to tell.
    Undecided,
    /// The peer closed without sending anything.
    Closed,
}

fn detect(first: &[u8]) -> Detected {
    let n = first.len().min(H2_PREFACE.len());
    if n == 0 {
        Detected::Closed
    } else if first[..n] != H2_PREFACE[..n] {
        Detected::Http1
    } else if n == H2_PREFACE.len() {
        Detected::Http2
    } else {
        Detected::Undecided
    }
}

/// The connection builders, configured once per listener.
///
/// `server.idle_timeout` bounds how long a client connection may be idle: until its first
/// bytes tell its protocol, between requests on a keep-alive HTTP/1.1 connection, while a
/// request head arrives (hyper has one timer for the last two), and with no stream open on an
/// HTTP/2 connection ([`IdleClosing`]); so a slow-loris client is bounded whatever it speaks.
/// It should exceed a load balancer's own idle timeout (60 s for nginx and AWS ALB; the
/// default is 120 s), so that it is the balancer that closes an idle connection, never the
/// router while the balancer sends a request into it.
struct Protocols {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    idle: Duration,
}

impl Protocols {
    fn new(idle: Duration) -> Protocols {
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .keep_alive(true)
            .header_read_timeout(idle);
        // HTTP/2 pings find a client that vanished from a connection it keeps open (a
        // multiplexing client rarely closes one).
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .keep_alive_interval(H2_PING_INTERVAL)
            .keep_alive_timeout(H2_PING_TIMEOUT);
        Protocols { http1, http2, idle }
    }

    /// Serves one connection to its end (or until shutdown has drained it).
    async fn serve(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        mut service: Service,
        mut watch: Watch,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let Some(detected) = self.detect(&stream, &mut watch).await? else {
            return Ok(()); // shutting down before the protocol was known: nothing to finish
        };
        // Read per connection, so a pushed config applies to the connections after it.
        let write_timeout =
            Some(service.app.current().config.server.write_timeout).filter(|t| !t.is_zero());
        let io = TokioIo::new(StallLimit::new(stream, write_timeout, peer));
        match detected {
            // (`detect` returns a protocol once the bytes tell it.)
            Detected::Closed | Detected::Undecided => Ok(()),
            Detected::Http1 => Ok(watch
                .serve(
                    self.http1.serve_connection(io, service),
                    http1::Connection::graceful_shutdown,
                )
                .await?),
            Detected::Http2 => {
                let streams = Arc::new(Streams::new());
                service.streams = Some(streams.clone());
                let conn = IdleClosing {
                    conn: self.http2.serve_connection(io, service),
                    idle: idle_for(streams, self.idle),
                    finish: Some(http2::Connection::graceful_shutdown),
                };
                Ok(watch.serve(conn, IdleClosing::finish).await?)
            }
        }
    }

    /// Reads (without consuming) the connection's first bytes until they tell its protocol,
    /// within `idle_timeout`; `None` when shutdown began first.
    async fn detect(
        &self,
        stream: &TcpStream,
        watch: &mut Watch,
    ) -> Result<Option<Detected>, Box<dyn std::error::Error + Send + Sync>> {
        let deadline = tokio::time::Instant::now() + self.idle;
        let mut first = [0u8; H2_PREFACE.len()];
        let mut pause = UNDECIDED_POLL;
        loop {
            let peeked = tokio::select! {
                peeked = tokio::time::timeout_at(deadline, stream.peek(&mut first)) => peeked,
                () = watch.draining() => return Ok(None),
            };
            let n = match peeked {
                Ok(read) => read?,
                Err(_) => return Err("no request within idle_timeout".into()),
            };
            match detect(&first[..n]) {
                // A peek returns at once while bytes wait, so wait a little before the next.
                Detected::Undecided => {
                    let now = tokio::time::Instant::now();
                    if now >= deadline {
                        return Err("no request within idle_timeout".into());
                    }
                    tokio::time::sleep_until((now + pause).min(deadline)).await;
                    pause = (pause * 2).min(UNDECIDED_POLL_MAX);
                }
                detected => return Ok(Some(detected)),
            }
        }
    }
}

/// The requests in flight on one HTTP/2 connection, and when that count last changed.
struct Streams(Mutex<(usize, Instant)>);

impl Streams {
    fn new() -> Streams {
        Streams(Mutex::new((0, Instant::now())))
    }

    fn open(self: &Arc<Self>) -> StreamGuard {
        let mut state = self.0.lock();
        *state = (state.0 + 1, Instant::now());
        StreamGuard(self.clone())
    }

    /// Since when no stream has been open; `None` while one is.
    fn idle_since(&self) -> Option<Instant> {
        let (open, changed) = *self.0.lock();
        (open == 0).then_some(changed)
    }
}

/// One request in flight, until its response body is dropped (sent or abandoned).
struct StreamGuard(Arc<Streams>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut state = self.0 .0.lock();
        *state = (state.0 - 1, Instant::now());
    }
}

/// Resolves once no stream has been open on the connection for `idle`.
async fn idle_for(streams: Arc<Streams>, idle: Duration) {
    loop {
        let wake = match streams.idle_since() {
            Some(since) if since.elapsed() >= idle => return,
            Some(since) => since + idle,
            None => Instant::now() + idle,
        };
        tokio::time::sleep_until(wake.into()).await;
    }
}

pin_project! {
    /// An HTTP/2 connection that is shut down gracefully once it has been idle (hyper closes
    /// an idle HTTP/1.1 connection itself, but keeps an HTTP/2 one whose client answers pings
    /// for ever).
    struct IdleClosing<C, F> {
        #[pin]
        conn: C,
        #[pin]
        idle: F,
        // Taken when called, by the idle timer or by shutdown.
        finish: Option<fn(Pin<&mut C>)>,
    }
}

impl<C, F> IdleClosing<C, F> {
    fn finish(self: Pin<&mut Self>) {
        let this = self.project();
        if let Some(finish) = this.finish.take() {
            finish(this.conn);
        }
    }
}

impl<C: Future, F: Future<Output = ()>> Future for IdleClosing<C, F> {
    type Output = C::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        if self.finish.is_some() && self.as_mut().project().idle.poll(cx).is_ready() {
            debug!("HTTP/2 connection idle for idle_timeout; closing it");
            self.as_mut().finish();
        }
        self.project().conn.poll(cx)
    }
}

pin_project! {
    /// A response body that holds its stream's place in [`Streams`] until it is dropped.
    struct Tracked {
        #[pin]
        body: RespBody,
        _guard: StreamGuard,
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Serves until `shutdown` resolves, then drains connections for at most
/// `server.shutdown_timeout` (of the config current then): idle keep-alive connections are
/// closed, in-flight requests and streams run to their end.
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    role: Role,
    shutdown: impl Future<Output = ()>,
) {
    let protocols = Arc::new(Protocols::new(app.current().config.server.idle_timeout));
    let drain = Drain::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Usually EMFILE: back off briefly instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                // A client that vanished without a FIN (a dropped network, a killed VM) is
                // noticed by the kernel's probes instead of holding its connection for hours.
                let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&TCP_KEEPALIVE);
                let service = Service { app: app.clone(), role, streams: None };
                // Registered now, so a shutdown that starts before the protocol is known
                // still reaches the connection.
                let watch = drain.watch();
                let protocols = protocols.clone();
                tokio::spawn(async move {
                    if let Err(e) = protocols.serve(stream, peer, service, watch).await {
                        debug!(peer = %peer, error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    let grace = app.current().config.server.shutdown_timeout;
    info!(listener = ?role, connections = drain.open(), "listener closed: draining in-flight requests");
    tokio::select! {
        () = drain.shutdown() => info!("all connections closed"),
        () = tokio::time::sleep(grace) => warn!(grace_seconds = grace.as_secs(), "grace period over; closing remaining connections"),
    }
}

/// Binds the public listener.
pub async fn bind(host: &str, port: u16) -> std::io::Result<TcpListener> {
    let addr: SocketAddr = format!("{host}:{port}")
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    TcpListener::bind(addr).await
}

/// Which API a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Public,
    Admin,
}

/// The per-connection service. A named type with a boxed future (rather than `service_fn`)
/// so the future's `Send` bound is checked once, here.
#[derive(Clone)]
struct Service {
    app: Arc<App>,
    role: Role,
    /// On an HTTP/2 connection: its requests in flight, for its idle timer.
    streams: Option<Arc<Streams>>,
}

impl hyper::service::Service<Request<Incoming>> for Service {
    type Response = Response<RespBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let app = self.app.clone();
        let role = self.role;
        let Some(streams) = &self.streams else {
            return match role {
                Role::Public => Box::pin(async move { Ok(proxy::handle(app, req).await) }),
                Role::Admin => Box::pin(async move { Ok(admin::handle(app, req).await) }),
            };
        };
        let guard = streams.open();
        Box::pin(async move {
            let resp = match role {
                Role::Public => proxy::handle(app, req).await,
                Role::Admin => admin::handle(app, req).await,
            };
            Ok(resp.map(|body| {
                Tracked {
                    body,
                    _guard: guard,
                }
                .boxed_unsync()
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_bytes_tell_the_protocol() {
        assert_eq!(detect(b""), Detected::Closed);
        assert_eq!(
            detect(b"POST /v1/chat/completions HTTP/1.1\r\n"),
            Detected::Http1
        );
        assert_eq!(detect(b"G"), Detected::Http1);
        assert_eq!(detect(b"PRI * HTTP/1.1\r\n"), Detected::Http1);
        assert_eq!(detect(b"PRI * HTTP/2"), Detected::Undecided);
        assert_eq!(detect(H2_PREFACE), Detected::Http2);
        let mut more = H2_PREFACE.to_vec();
        more.extend_from_slice(b"\0\0\x12\x04");
        assert_eq!(detect(&more), Detected::Http2);
    }
}
