//! One HTTP/1.1 connection to an upstream: a request written and its response head read in
//! one future ([`Conn::exchange`]), then the body read by the response body itself
//! ([`Body`]), on the task that forwards it. No task of its own and no channel: an open
//! stream costs its socket, a small read buffer and this struct (`bench/NOTES.md`, eleventh
//! round).

use std::{
    future::poll_fn,
    io::{self, IoSlice},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use futures::task::noop_waker_ref;
use http::Method;
use http_body::{Frame, SizeHint};
use hyper_rustls::MaybeHttpsStream;
use hyper_util::rt::TokioIo;
use tokio::{io::AsyncWrite, net::TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_util::{either::Either, io::poll_read_buf};

use super::{
    codec::{self, Decoded, Decoder, FrameError, Head},
    OriginIdle,
};

/// TCP, or TLS over TCP (boxed: a TLS session is over a kilobyte, and a plain connection
/// should not carry its room).
pub type Io = Either<TcpStream, Box<TlsStream<TokioIo<TokioIo<TcpStream>>>>>;

/// The connector's stream, without the adapters to hyper's I/O traits.
pub fn io(stream: MaybeHttpsStream<TokioIo<TcpStream>>) -> Io {
    match stream {
        MaybeHttpsStream::Http(tcp) => Either::Left(tcp.into_inner()),
        MaybeHttpsStream::Https(tls) => Either::Right(Box::new(tls.into_inner())),
    }
}

/// The first read buffer. An SSE event or a response head fits; a larger answer doubles it
/// read by read (up to [`READ_MAX`]). Small, because an open stream keeps it.
const READ_START: usize = 2 * 1024;
const READ_MAX: usize = 64 * 1024;

pub struct Conn {
    io: Io,
    /// What has been read and not yet handed on.
    buf: BytesMut,
    /// How much room the next read gets.
    read_size: usize,
}

/// Why an exchange failed, and whether any of the request went out (if none did, it may go
/// on another connection).
#[derive(Debug)]
pub struct ExchangeError {
    pub error: ConnError,
    pub written: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

impl Conn {
    pub fn new(io: Io) -> Conn {
        Conn {
            io,
            buf: BytesMut::new(),
            read_size: READ_START,
        }
    }

    /// Reads more into the buffer; `Ok(0)`: the peer closed.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < self.read_size / 2 {
            // Reuses the buffer from its start once what was split off has been dropped
            // (sent on), else takes a new one.
            self.buf.reserve(self.read_size);
        }
        let room = self.buf.capacity() - self.buf.len();
        let n = std::task::ready!(poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf))?;
        if n >= room && self.read_size < READ_MAX {
            self.read_size *= 2;
        } else if n < self.read_size / 4 && self.read_size > READ_START {
            self.read_size /= 2;
        }
        Poll::Ready(Ok(n))
    }

    /// Whether an idle connection can carry a request: the peer has neither closed it nor
    /// sent anything unasked. (Nothing watches an idle connection, so this is looked at when
    /// it is taken from the pool, and by the pool's sweep.)
    pub fn is_usable(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(noop_waker_ref());
        // TLS records without data (session tickets) are taken and leave it pending.
        self.poll_fill(&mut cx).is_pending()
    }

    /// Writes `head` and `body` and reads the response head. The response is read while the
    /// request is still going out: an upstream that answers early (a 413 for a body it will
    /// not read) is heard instead of waited on; the connection is then not reused.
    pub async fn exchange(
        &mut self,
        head: &[u8],
        body: &[u8],
        method: &Method,
    ) -> Result<Head, ExchangeError> {
        let total = head.len() + body.len();
        let mut written = 0;
        let mut flushed = false;
        let failed = |error: ConnError, written: usize| ExchangeError {
            error,
            written: written > 0,
        };
        poll_fn(|cx| loop {
            let mut progress = false;
            if written < total {
                let bufs = if written < head.len() {
                    [IoSlice::new(&head[written..]), IoSlice::new(body)]
                } else {
                    [
                        IoSlice::new(&body[written - head.len()..]),
                        IoSlice::new(&[]),
                    ]
                };
                match Pin::new(&mut self.io).poll_write_vectored(cx, &bufs) {
                    Poll::Ready(Ok(0)) => {
                        let e = io::Error::from(io::ErrorKind::WriteZero);
                        return Poll::Ready(Err(failed(e.into(), written)));
                    }
                    Poll::Ready(Ok(n)) => {
                        written += n;
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(failed(e.into(), written))),
                    Poll::Pending => {}
                }
            } else if !flushed {
                match Pin::new(&mut self.io).poll_flush(cx) {
                    Poll::Ready(Ok(())) => {
                        flushed = true;
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(failed(e.into(), written))),
                    Poll::Pending => {}
                }
            }
            if !self.buf.is_empty() {
                match codec::parse_head(&mut self.buf, method) {
                    Ok(Some(mut head)) => {
                        if !flushed {
                            head.reusable = false;
                        }
                        return Poll::Ready(Ok(head));
                    }
                    Ok(None) => {}
                    Err(e) => return Poll::Ready(Err(failed(e.into(), written))),
                }
            }
            match self.poll_fill(cx) {
                Poll::Ready(Ok(0)) => {
                    let e = io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed before the response head",
                    );
                    return Poll::Ready(Err(failed(e.into(), written)));
                }
                Poll::Ready(Ok(_)) => progress = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(failed(e.into(), written))),
                Poll::Pending => {}
            }
            if !progress {
                return Poll::Pending;
            }
        })
        .await
    }
}

/// A connection lent to one response: back to its origin's idle list when the body has been
/// read to its end and the connection can carry another request; closed when dropped
/// before that.
pub struct Lent {
    pub conn: Conn,
    pub origin: Arc<OriginIdle>,
}

/// An HTTP/1.1 response body, read from its connection as it is polled.
pub struct Body {
    /// `None` once the body has ended (the connection given back or closed).
    lent: Option<Lent>,
    decoder: Decoder,
    reusable: bool,
}

impl Body {
    /// The body after `head`, read from `lent`. One that is empty ends now, so its connection
    /// goes back at once (a body known to be empty is never polled).
    pub fn new(lent: Lent, decoder: Decoder, reusable: bool) -> Body {
        let mut body = Body {
            lent: Some(lent),
            decoder,
            reusable,
        };
        if decoder == Decoder::Length(0) {
            body.decoder = Decoder::Done;
            body.finish();
        }
        body
    }

    fn finish(&mut self) {
        if let Some(Lent { conn, origin }) = self.lent.take() {
            // Bytes after the body's end are not an answer to anything: not reused.
            if self.reusable && conn.buf.is_empty() {
                origin.checkin(conn);
            }
        }
    }

    fn fail(&mut self, error: ConnError) -> BodyError {
        let origin = self
            .lent
            .take()
            .map(|lent| lent.origin.origin.to_string())
            .unwrap_or_default();
        BodyError { origin, error }
    }
}

/// A response body that could not be read to its end.
#[derive(Debug, thiserror::Error)]
#[error("reading the HTTP/1.1 response body from {origin}: {error}")]
pub struct BodyError {
    origin: String,
    error: ConnError,
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        loop {
            let Some(lent) = this.lent.as_mut() else {
                return Poll::Ready(None);
            };
            match this.decoder.decode(&mut lent.conn.buf) {
                Ok(Decoded::Data(data)) => {
                    if this.decoder.is_done() {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Decoded::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Decoded::More) => {}
                Err(e) => return Poll::Ready(Some(Err(this.fail(e.into())))),
            }
            match lent.conn.poll_fill(cx) {
                Poll::Ready(Ok(0)) => {
                    this.reusable = false;
                    match this.decoder.eof() {
                        Ok(()) => {
                            this.finish();
                            return Poll::Ready(None);
                        }
                        Err(e) => return Poll::Ready(Some(Err(this.fail(e.into())))),
                    }
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(this.fail(e.into())))),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder.remaining() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}
