//! `server.write_timeout`: a client that takes no bytes for that long is let go.
//!
//! A client that stops reading (a hung process, a stuck proxy in front) while its stream
//! goes on fills its socket; hyper then stops polling the response body, so nothing of ours
//! runs again, and TCP keep-alive does not help either: the client's kernel still answers
//! (with a zero window). The stream, its upstream request and its connection would be held
//! for as long as the client's TCP connection lives. The limit is on progress, not on the
//! whole answer: a slow client that keeps taking bytes is never cut off, as a long stream
//! must not be (the upstream router gives every chunk's write 60 s).
//!
//! [`StallLimit`] watches a client socket. HTTP/2 can stall one stream while its socket
//! moves (the client grants that stream no window, but answers pings and reads its other
//! streams), so [`StreamStallGuard`] watches each HTTP/2 stream's body too.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, LazyLock, Weak,
    },
    task::{ready, Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::HeaderValue;
use hyper::body::{Body, Frame};
use parking_lot::Mutex;
use pin_project_lite::pin_project;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};
use tracing::info;

use crate::body::BoxError;

pin_project! {
    /// A client socket whose writes fail once it has taken no bytes for `limit`.
    pub struct StallLimit<S> {
        #[pin]
        io: S,
        limit: Option<Duration>,
        peer: SocketAddr,
        // Made at the first write that had to wait; reset at each later one after progress.
        timer: Option<Pin<Box<Sleep>>>,
        // Whether `timer` counts the current wait (progress disarms it).
        armed: bool,
    }
}

impl<S> StallLimit<S> {
    /// `limit: None` never closes.
    pub fn new(io: S, limit: Option<Duration>, peer: SocketAddr) -> StallLimit<S> {
        StallLimit {
            io,
            limit,
            peer,
            timer: None,
            armed: false,
        }
    }
}

impl<S: AsyncWrite> StallLimit<S> {
    /// Passes a write's result on; a write that waits starts (or goes on with) the clock.
    fn watch<T>(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        let this = self.project();
        let Poll::Pending = polled else {
            *this.armed = false;
            return polled;
        };
        let Some(limit) = *this.limit else {
            return Poll::Pending;
        };
        let timer = match this.timer {
            Some(timer) if *this.armed => timer,
            Some(timer) => {
                timer.as_mut().reset(Instant::now() + limit);
                timer
            }
            None => this.timer.insert(Box::pin(tokio::time::sleep(limit))),
        };
        *this.armed = true;
        ready!(timer.as_mut().poll(cx));
        info!(peer = %this.peer, limit_seconds = limit.as_secs_f64(), "client took no bytes for server.write_timeout; closing its connection");
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the client took no bytes for {limit:?} (server.write_timeout)"),
        )))
    }
}

impl<S: AsyncRead> AsyncRead for StallLimit<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl<S: AsyncWrite> AsyncWrite for StallLimit<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = self.as_mut().project().io.poll_write(cx, buf);
        self.watch(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = self.as_mut().project().io.poll_write_vectored(cx, bufs);
        self.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

/// A response body of an HTTP/2 stream, ended when hyper does not come back for the next
/// frame within `limit` of taking one. hyper takes a frame and comes back once the frame
/// before it is sent whole, so the limit is on each chunk: a client must take a whole chunk
/// per `limit` (SSE chunks are small; a 64 KiB one at 60 s asks for ~1 KiB/s).
///
/// hyper polls an HTTP/2 body only while its stream has send window, so a stalled stream is
/// not seen from inside the body: one reaper task looks at every guarded body four times a
/// second and drops the body of one that waited too long. That ends its upstream
/// request and writes its access line (`client_gone`); hyper's stream keeps the one frame it
/// holds until the client grants window (the body then answers an error: hyper resets the
/// stream) or closes the connection.
pub struct StreamStallGuard<B> {
    shared: Arc<Guarded<B>>,
}

struct Guarded<B> {
    body: Mutex<Option<Pin<Box<B>>>>,
    /// When (ms on the reaper's clock) the body last handed over a frame and has not been
    /// polled since; 0 while it is not waiting on the client.
    waiting_since: AtomicU64,
    limit: Duration,
    request_id: HeaderValue,
    reaper: &'static Reaper,
}

/// How often the reaper looks; a stalled stream is ended at most this long after its limit.
const REAP_TICK: Duration = Duration::from_millis(250);

impl<B> StreamStallGuard<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Send + 'static,
{
    pub fn new(body: B, limit: Duration, request_id: HeaderValue) -> StreamStallGuard<B> {
        Self::watched_by(&REAPER, body, limit, request_id)
    }

    fn watched_by(
        reaper: &'static Reaper,
        body: B,
        limit: Duration,
        request_id: HeaderValue,
    ) -> StreamStallGuard<B> {
        let shared = Arc::new(Guarded {
            body: Mutex::new(Some(Box::pin(body))),
            waiting_since: AtomicU64::new(0),
            limit,
            request_id,
            reaper,
        });
        let weak: Weak<dyn Reap> = Arc::downgrade(&shared) as Weak<dyn Reap>;
        reaper.watch(weak);
        StreamStallGuard { shared }
    }
}

impl<B> Body for StreamStallGuard<B>
where
    B: Body<Data = Bytes, Error = BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let shared = &self.shared;
        let mut body = shared.body.lock();
        let Some(inner) = body.as_mut() else {
            return Poll::Ready(Some(Err(StreamStalled(shared.limit).into())));
        };
        let polled = inner.as_mut().poll_frame(cx);
        let since = match &polled {
            Poll::Ready(Some(Ok(_))) => shared.reaper.now_ms(),
            _ => 0,
        };
        // Stored under the lock, so the reaper's second look sees this poll's outcome.
        shared.waiting_since.store(since, Ordering::Relaxed);
        polled
    }
}

/// The error a stream the reaper ended answers hyper with, should hyper poll it again.
#[derive(Debug, thiserror::Error)]
#[error("the client took no bytes of this HTTP/2 stream for {0:?} (server.write_timeout)")]
struct StreamStalled(Duration);

trait Reap: Send + Sync {
    /// Whether the stream's last frame has waited on the client for its limit by `now_ms`.
    fn overdue(&self, now_ms: u64) -> bool;
    /// Ends the stream if it is still overdue.
    fn reap(&self, now_ms: u64);
}

impl<B: Send> Reap for Guarded<B> {
    fn overdue(&self, now_ms: u64) -> bool {
        let since = self.waiting_since.load(Ordering::Relaxed);
        since != 0 && now_ms.saturating_sub(since) >= self.limit.as_millis() as u64
    }

    fn reap(&self, now_ms: u64) {
        let mut body = self.body.lock();
        if !self.overdue(now_ms) {
            return; // polled meanwhile
        }
        let ended = body.take();
        drop(body);
        let request_id = self.request_id.to_str().unwrap_or("-");
        info!(
            request_id,
            limit_seconds = self.limit.as_secs_f64(),
            "client took no bytes of an HTTP/2 stream for server.write_timeout; ending the stream"
        );
        // Dropped outside the lock: it writes the access line and closes the upstream request.
        drop(ended);
    }
}

/// The streams being watched, and the task that watches them (running while there are any).
struct Reaper {
    epoch: Instant,
    watched: Mutex<Watched>,
}

#[derive(Default)]
struct Watched {
    streams: Vec<Weak<dyn Reap>>,
    running: bool,
}

static REAPER: LazyLock<Reaper> = LazyLock::new(Reaper::new);

impl Reaper {
    fn new() -> Reaper {
        Reaper {
            epoch: Instant::now(),
            watched: Mutex::default(),
        }
    }

    /// Milliseconds since the epoch, at least 1 (0 means "not waiting").
    fn now_ms(&self) -> u64 {
        (self.epoch.elapsed().as_millis() as u64).max(1)
    }

    fn watch(&'static self, stream: Weak<dyn Reap>) {
        let mut watched = self.watched.lock();
        watched.streams.push(stream);
        if !watched.running {
            watched.running = true;
            tokio::spawn(self.run());
        }
    }

    /// Looks at every stream each tick; ends when none is left to watch.
    async fn run(&'static self) {
        // Should the task be dropped instead (its runtime shutting down), the next stream
        // starts another.
        struct Cancelled(Option<&'static Reaper>);
        impl Drop for Cancelled {
            fn drop(&mut self) {
                if let Some(reaper) = self.0 {
                    reaper.watched.lock().running = false;
                }
            }
        }
        let mut cancelled = Cancelled(Some(self));
        let mut tick = tokio::time::interval(REAP_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = self.now_ms();
            // Upgraded under the list's lock, let go and reaped outside it: a stream that ends
            // meanwhile is dropped here, and dropping or ending one writes its access line.
            let (overdue, _rest): (Vec<Arc<dyn Reap>>, Vec<_>) = {
                let mut watched = self.watched.lock();
                watched.streams.retain(|s| s.strong_count() > 0);
                if watched.streams.is_empty() {
                    // Under the lock: a stream watched after this starts a new task.
                    watched.running = false;
                    cancelled.0 = None;
                    return;
                }
                let streams = watched.streams.iter().filter_map(Weak::upgrade);
                streams.partition(|s| s.overdue(now))
            };
            for stream in overdue {
                stream.reap(now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn peer() -> SocketAddr {
        "127.0.0.1:1".parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_stops_is_cut_off_after_the_limit_and_not_before() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut io = StallLimit::new(near, Some(Duration::from_secs(60)), peer());
        io.write_all(&[1; 64]).await.unwrap();
        let started = Instant::now();
        let err = io.write_all(&[2; 64]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(60) && waited < Duration::from_secs(61),
            "{waited:?}"
        );
        assert!(err.to_string().contains("server.write_timeout"), "{err}");
        let mut got = [0; 64];
        far.read_exact(&mut got).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_reading_is_never_cut_off() {
        let (near, mut far) = tokio::io::duplex(64);
        let reader = tokio::spawn(async move {
            let mut total = 0;
            let mut buf = [0; 64];
            while total < 64 * 20 {
                // Each wait is under the limit; all of them together are far over it.
                tokio::time::sleep(Duration::from_secs(50)).await;
                total += far.read(&mut buf).await.unwrap();
            }
            total
        });
        let mut io = StallLimit::new(near, Some(Duration::from_secs(60)), peer());
        for _ in 0..20 {
            io.write_all(&[3; 64]).await.unwrap();
        }
        assert_eq!(reader.await.unwrap(), 64 * 20);
    }

    #[tokio::test(start_paused = true)]
    async fn no_limit_waits_for_ever() {
        let (near, _far) = tokio::io::duplex(8);
        let mut io = StallLimit::new(near, None, peer());
        io.write_all(&[4; 8]).await.unwrap();
        let blocked = tokio::time::timeout(Duration::from_secs(3600), io.write_all(&[5; 8])).await;
        assert!(blocked.is_err(), "still waiting after an hour");
    }

    mod stream_stall {
        use super::super::*;
        use futures::{channel::mpsc, SinkExt};
        use http_body_util::{BodyExt, StreamBody};

        type Sent = Result<Frame<Bytes>, BoxError>;

        /// A guarded body fed by the returned sender (its upstream), watched by a reaper of
        /// the test's own (paused) clock.
        fn guarded(
            limit: Duration,
        ) -> (
            mpsc::Sender<Sent>,
            StreamStallGuard<impl Body<Data = Bytes, Error = BoxError>>,
            &'static Reaper,
        ) {
            let reaper: &'static Reaper = Box::leak(Box::new(Reaper::new()));
            let (tx, rx) = mpsc::channel(8);
            let id = HeaderValue::from_static("req-1");
            (
                tx,
                StreamStallGuard::watched_by(reaper, StreamBody::new(rx), limit, id),
                reaper,
            )
        }

        fn chunk() -> Sent {
            Ok(Frame::data(Bytes::from_static(b"data: {}\n\n")))
        }

        #[tokio::test(start_paused = true)]
        async fn a_frame_the_client_does_not_take_ends_the_stream_after_the_limit() {
            let (mut upstream, mut body, _) = guarded(Duration::from_secs(60));
            upstream.send(chunk()).await.unwrap();
            body.frame().await.unwrap().unwrap();
            // hyper holds that frame for a stream without window, and polls no more.
            tokio::time::sleep(Duration::from_secs(59)).await;
            assert!(!upstream.is_closed(), "ended before the limit");
            tokio::time::sleep(Duration::from_secs(2)).await;
            assert!(upstream.is_closed(), "the upstream body was dropped");
            let err = body.frame().await.unwrap().unwrap_err();
            assert!(err.to_string().contains("server.write_timeout"), "{err}");
        }

        #[tokio::test(start_paused = true)]
        async fn a_client_that_keeps_taking_frames_is_never_cut_off() {
            let (mut upstream, mut body, _) = guarded(Duration::from_secs(60));
            for _ in 0..20 {
                upstream.send(chunk()).await.unwrap();
                body.frame().await.unwrap().unwrap();
                // Each wait is under the limit; all of them together are far over it.
                tokio::time::sleep(Duration::from_secs(50)).await;
            }
            assert!(!upstream.is_closed());
        }

        #[tokio::test(start_paused = true)]
        async fn an_upstream_that_sends_nothing_is_not_the_clients_stall() {
            let (mut upstream, mut body, _) = guarded(Duration::from_secs(60));
            upstream.send(chunk()).await.unwrap();
            body.frame().await.unwrap().unwrap();
            // The next poll waits on the upstream (request_timeout's business, not this).
            let waited = tokio::time::timeout(Duration::from_secs(3600), body.frame()).await;
            assert!(waited.is_err(), "still waiting after an hour");
            assert!(!upstream.is_closed());
        }

        #[tokio::test(start_paused = true)]
        async fn the_reaper_stops_when_no_stream_is_left() {
            let (_upstream, body, reaper) = guarded(Duration::from_secs(60));
            tokio::time::sleep(REAP_TICK * 2).await;
            assert!(reaper.watched.lock().running);
            drop(body);
            tokio::time::sleep(REAP_TICK * 2).await;
            {
                let watched = reaper.watched.lock();
                assert!(!watched.running && watched.streams.is_empty());
            }

            // The next stream starts it again, and is watched.
            let (mut upstream, rx) = mpsc::channel(8);
            let id = HeaderValue::from_static("req-2");
            let limit = Duration::from_secs(60);
            let mut body = StreamStallGuard::watched_by(reaper, StreamBody::new(rx), limit, id);
            assert!(reaper.watched.lock().running);
            upstream.send(chunk()).await.unwrap();
            body.frame().await.unwrap().unwrap();
            tokio::time::sleep(Duration::from_secs(61)).await;
            assert!(upstream.is_closed(), "reaped by the new task");
        }
    }
}
