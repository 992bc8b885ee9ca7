//! `server.write_timeout`: a client connection that takes no bytes for that long is closed.
//!
//! A client that stops reading (a hung process, a stuck proxy in front) while its stream
//! goes on fills its socket; hyper then stops polling the response body, so nothing of ours
//! runs again, and TCP keep-alive does not help either: the client's kernel still answers
//! (with a zero window). The stream, its upstream request and its connection would be held
//! for as long as the client's TCP connection lives. The limit is on progress, not on the
//! whole answer: a slow client that keeps taking bytes is never cut off, as a long stream
//! must not be (the upstream router gives every chunk's write 60 s).

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    task::{ready, Context, Poll},
    time::Duration,
};

use pin_project_lite::pin_project;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};
use tracing::info;

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
}
