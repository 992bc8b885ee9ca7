//! HTTP/1.1 messages on the wire, without I/O: a request head out, a response head in
//! (parsed by `httparse`, hyper's own parser), and the response body's framing (RFC 9112 §6).

use std::io::Write;

use bytes::{Buf, Bytes, BytesMut};
use http::{
    header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING},
    HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version,
};

/// Most header fields a response head may have (hyper's default too).
const MAX_HEADERS: usize = 100;
/// Longest response head accepted (hyper's default read buffer limit is about this).
const MAX_HEAD: usize = 400 * 1024;
/// Longest chunk-size line (with extensions) or trailer section accepted.
const MAX_CHUNK_LINE: usize = 4 * 1024;
const MAX_TRAILERS: usize = 64 * 1024;

/// Why a response could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("invalid response head: {0}")]
    Head(&'static str),
    #[error("response head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("invalid content-length")]
    ContentLength,
    #[error("invalid chunked body: {0}")]
    Chunked(&'static str),
    #[error("connection closed {0}")]
    Incomplete(&'static str),
}

/// The request head: `METHOD path HTTP/1.1`, the fields, and a `content-length` when there
/// is a body, and `content-length: 0` for an empty one of a method that usually carries one
/// (`POST`…): some servers answer such a request without it with 411 Length Required.
pub fn encode_head(method: &Method, path: &str, headers: &HeaderMap, body_len: usize) -> Vec<u8> {
    let fields: usize = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    let mut out = Vec::with_capacity(method.as_str().len() + path.len() + fields + 48);
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let bodiless = matches!(
        *method,
        Method::GET
            | Method::HEAD
            | Method::DELETE
            | Method::OPTIONS
            | Method::CONNECT
            | Method::TRACE
    );
    if !headers.contains_key(CONTENT_LENGTH) && (body_len > 0 || !bodiless) {
        // Writing to a Vec cannot fail.
        let _ = write!(out, "content-length: {body_len}\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// A parsed response head and how its body is framed.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Decoder,
    /// The connection may carry another request once this body has been read.
    pub reusable: bool,
}

/// Parses a complete response head at the start of `buf` and removes it (and any interim
/// `1xx` heads before it). `Ok(None)`: more bytes are needed.
pub fn parse_head(buf: &mut BytesMut, method: &Method) -> Result<Option<Head>, FrameError> {
    loop {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut fields);
        let len = match resp.parse(buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
                return Err(FrameError::HeadTooLarge)
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(FrameError::Head("more than 100 header fields"))
            }
            Err(e) => return Err(FrameError::Head(parse_error(e))),
        };
        let code = resp.code.ok_or(FrameError::Head("no status"))?;
        let status = StatusCode::from_u16(code).map_err(|_| FrameError::Head("bad status code"))?;
        let version = match resp.version {
            Some(1) => Version::HTTP_11,
            _ => Version::HTTP_10,
        };
        if status.is_informational() {
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(FrameError::Head("unexpected 101 Switching Protocols"));
            }
            // 100 Continue, 103 Early Hints: the final answer follows.
            buf.advance(len);
            continue;
        }
        let mut headers = HeaderMap::with_capacity(resp.headers.len());
        for field in resp.headers.iter() {
            let name = HeaderName::from_bytes(field.name.as_bytes())
                .map_err(|_| FrameError::Head("bad header name"))?;
            let value = HeaderValue::from_bytes(field.value)
                .map_err(|_| FrameError::Head("bad header value"))?;
            headers.append(name, value);
        }
        buf.advance(len);
        let (body, delimited) = framing(method, status, &headers)?;
        let reusable = version == Version::HTTP_11 && delimited && !closes(&headers);
        return Ok(Some(Head {
            status,
            version,
            headers,
            body,
            reusable,
        }));
    }
}

fn parse_error(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "bad header name",
        httparse::Error::HeaderValue => "bad header value",
        httparse::Error::NewLine => "bad line ending",
        httparse::Error::Status => "bad status",
        httparse::Error::Token => "bad token",
        httparse::Error::Version => "not HTTP/1.x",
        httparse::Error::TooManyHeaders => "more than 100 header fields",
    }
}

/// Whether `Connection: close` is among the fields.
fn closes(headers: &HeaderMap) -> bool {
    headers
        .get_all(CONNECTION)
        .iter()
        .any(|v| has_token(v.as_bytes(), b"close"))
}

fn has_token(list: &[u8], token: &[u8]) -> bool {
    list.split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// How the body after this head ends (RFC 9112 §6.3), and whether that end is known without
/// closing the connection.
fn framing(
    method: &Method,
    status: StatusCode,
    headers: &HeaderMap,
) -> Result<(Decoder, bool), FrameError> {
    if *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok((Decoder::Length(0), true));
    }
    let mut codings = headers.get_all(TRANSFER_ENCODING).iter().peekable();
    if codings.peek().is_some() {
        let last = codings
            .last()
            .and_then(|v| v.as_bytes().rsplit(|&b| b == b',').next())
            .map(<[u8]>::trim_ascii)
            .unwrap_or_default();
        return Ok(if last.eq_ignore_ascii_case(b"chunked") {
            // With a content-length beside it the message was made to smuggle: read it by
            // its chunks and close the connection after.
            (
                Decoder::Chunked(Chunk::Size),
                !headers.contains_key(CONTENT_LENGTH),
            )
        } else {
            (Decoder::Eof, false)
        });
    }
    let mut length = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        for part in value.as_bytes().split(|&b| b == b',') {
            let n = parse_length(part.trim_ascii()).ok_or(FrameError::ContentLength)?;
            if length.is_some_and(|l| l != n) {
                return Err(FrameError::ContentLength);
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(n) => (Decoder::Length(n), true),
        None => (Decoder::Eof, false),
    })
}

fn parse_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Where a response body is in its framing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoder {
    /// This many bytes are still to come.
    Length(u64),
    Chunked(Chunk),
    /// Everything until the connection closes.
    Eof,
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chunk {
    /// At a chunk-size line.
    Size,
    /// Within a chunk's data: this many bytes left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: trailer fields (dropped) up to an empty line.
    Trailers,
}

/// What [`Decoder::decode`] found in the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    /// The body has ended.
    End,
    /// More bytes are needed.
    More,
}

impl Decoder {
    pub fn is_done(&self) -> bool {
        *self == Decoder::Done
    }

    /// Bytes still to come, when known.
    pub fn remaining(&self) -> Option<u64> {
        match *self {
            Decoder::Length(n) => Some(n),
            Decoder::Done => Some(0),
            _ => None,
        }
    }

    /// Takes the next piece of body from the front of `buf`: data is split off without
    /// copying.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, FrameError> {
        loop {
            match self {
                Decoder::Done => return Ok(Decoded::End),
                Decoder::Length(0) => {
                    *self = Decoder::Done;
                    return Ok(Decoded::End);
                }
                Decoder::Length(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let take = (*left).min(buf.len() as u64);
                    *left -= take;
                    if *left == 0 {
                        *self = Decoder::Done;
                    }
                    return Ok(Decoded::Data(buf.split_to(take as usize).freeze()));
                }
                Decoder::Eof => {
                    return Ok(if buf.is_empty() {
                        Decoded::More
                    } else {
                        Decoded::Data(buf.split().freeze())
                    })
                }
                Decoder::Chunked(chunk) => match chunk {
                    Chunk::Size => match httparse::parse_chunk_size(buf) {
                        Ok(httparse::Status::Complete((len, size))) => {
                            buf.advance(len);
                            *chunk = if size == 0 {
                                Chunk::Trailers
                            } else {
                                Chunk::Data(size)
                            };
                        }
                        Ok(httparse::Status::Partial) if buf.len() > MAX_CHUNK_LINE => {
                            return Err(FrameError::Chunked("chunk-size line too long"))
                        }
                        Ok(httparse::Status::Partial) => return Ok(Decoded::More),
                        Err(_) => return Err(FrameError::Chunked("bad chunk size")),
                    },
                    Chunk::Data(left) => {
                        if buf.is_empty() {
                            return Ok(Decoded::More);
                        }
                        let take = (*left).min(buf.len() as u64);
                        *left -= take;
                        if *left == 0 {
                            *chunk = Chunk::DataEnd;
                        }
                        let data = buf.split_to(take as usize).freeze();
                        // The usual chunk arrives whole: step over its CRLF now, so a body
                        // whose last chunk is already here ends with this frame.
                        if *chunk == Chunk::DataEnd {
                            self.skip_ahead(buf)?;
                        }
                        return Ok(Decoded::Data(data));
                    }
                    Chunk::DataEnd => {
                        if !self.step_data_end(buf)? {
                            return Ok(Decoded::More);
                        }
                    }
                    Chunk::Trailers => {
                        if !self.step_trailers(buf)? {
                            return Ok(Decoded::More);
                        }
                    }
                },
            }
        }
    }

    /// After a chunk's data: steps over what is already buffered of its CRLF, the
    /// terminating `0` chunk and an empty trailer section, so [`Decoder::is_done`] is true
    /// as soon as the body's last bytes are here.
    fn skip_ahead(&mut self, buf: &mut BytesMut) -> Result<(), FrameError> {
        if !self.step_data_end(buf)? {
            return Ok(());
        }
        if let Ok(httparse::Status::Complete((len, 0))) = httparse::parse_chunk_size(buf) {
            buf.advance(len);
            *self = Decoder::Chunked(Chunk::Trailers);
            self.step_trailers(buf)?;
        }
        Ok(())
    }

    /// Consumes a chunk's closing CRLF; false: not all here yet.
    fn step_data_end(&mut self, buf: &mut BytesMut) -> Result<bool, FrameError> {
        match buf.get(..2) {
            Some(b"\r\n") => {}
            Some(_) => return Err(FrameError::Chunked("no CRLF after chunk data")),
            None if buf.first().is_some_and(|&b| b != b'\r') => {
                return Err(FrameError::Chunked("no CRLF after chunk data"))
            }
            None => return Ok(false),
        }
        buf.advance(2);
        *self = Decoder::Chunked(Chunk::Size);
        Ok(true)
    }

    /// Drops trailer fields up to the empty line that ends the body; false: not all here.
    fn step_trailers(&mut self, buf: &mut BytesMut) -> Result<bool, FrameError> {
        loop {
            let Some(end) = memchr::memchr(b'\n', buf) else {
                if buf.len() > MAX_TRAILERS {
                    return Err(FrameError::Chunked("trailer section too long"));
                }
                return Ok(false);
            };
            let empty = end == 0 || (end == 1 && buf[0] == b'\r');
            buf.advance(end + 1);
            if empty {
                *self = Decoder::Done;
                return Ok(true);
            }
        }
    }

    /// The connection closed: the end of an [`Decoder::Eof`] body, otherwise a body cut
    /// short.
    pub fn eof(&mut self) -> Result<(), FrameError> {
        match self {
            Decoder::Eof | Decoder::Done => {
                *self = Decoder::Done;
                Ok(())
            }
            Decoder::Length(_) => Err(FrameError::Incomplete("before the content-length")),
            Decoder::Chunked(_) => Err(FrameError::Incomplete("before the last chunk")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(bytes: &str) -> Result<Option<Head>, FrameError> {
        parse_head(&mut BytesMut::from(bytes), &Method::POST)
    }

    /// Decodes `wire` fed in pieces of `step` bytes: the data and whether the body ended.
    fn feed(mut d: Decoder, wire: &[u8], step: usize) -> Result<(Vec<u8>, bool), FrameError> {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in wire.chunks(step) {
            buf.extend_from_slice(piece);
            loop {
                match d.decode(&mut buf)? {
                    Decoded::Data(b) => out.extend_from_slice(&b),
                    Decoded::End => return Ok((out, true)),
                    Decoded::More => break,
                }
            }
        }
        Ok((out, false))
    }

    #[test]
    fn the_request_head_has_the_fields_and_a_content_length() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("api.example:8080"));
        h.insert("x-request-id", HeaderValue::from_static("r1"));
        let out = encode_head(&Method::POST, "/v1/chat/completions", &h, 12);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /v1/chat/completions HTTP/1.1\r\nhost: api.example:8080\r\nx-request-id: r1\r\ncontent-length: 12\r\n\r\n"
        );
        let get = encode_head(&Method::GET, "/v1/models", &HeaderMap::new(), 0);
        assert_eq!(get, b"GET /v1/models HTTP/1.1\r\n\r\n");
        let post = encode_head(&Method::POST, "/", &HeaderMap::new(), 0);
        assert!(String::from_utf8(post)
            .unwrap()
            .contains("content-length: 0\r\n"));
    }

    #[test]
    fn a_head_is_parsed_once_complete_and_taken_off_the_buffer() {
        let mut buf = BytesMut::from("HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-a: b\r\n");
        assert!(parse_head(&mut buf, &Method::POST).unwrap().is_none());
        buf.extend_from_slice(b"\r\nhi");
        let h = parse_head(&mut buf, &Method::POST).unwrap().unwrap();
        assert_eq!(h.status, 200);
        assert_eq!(h.headers["x-a"], "b");
        assert_eq!(h.body, Decoder::Length(2));
        assert!(h.reusable);
        assert_eq!(&buf[..], b"hi");
    }

    #[test]
    fn interim_heads_are_skipped() {
        let h = head("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.status, 201);
        assert!(!h.headers.contains_key("link"));
        assert!(head("HTTP/1.1 100 Continue\r\n\r\n").unwrap().is_none());
        assert_eq!(
            head("HTTP/1.1 101 Switching Protocols\r\n\r\n").unwrap_err(),
            FrameError::Head("unexpected 101 Switching Protocols")
        );
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let chunked = Decoder::Chunked(Chunk::Size);
        // (head fields after the status line, framing, reusable)
        let cases = [
            ("transfer-encoding: gzip, chunked", chunked, true),
            // Content-length beside chunked: the chunks win, and the connection is not reused.
            (
                "transfer-encoding: chunked\r\ncontent-length: 5",
                chunked,
                false,
            ),
            ("transfer-encoding: gzip", Decoder::Eof, false),
            ("x-none: 1", Decoder::Eof, false),
            ("content-length: 7, 7", Decoder::Length(7), true),
            (
                "content-length: 3\r\nconnection: Keep-Alive, Close",
                Decoder::Length(3),
                false,
            ),
        ];
        for (fields, body, reusable) in cases {
            let h = head(&format!("HTTP/1.1 200 OK\r\n{fields}\r\n\r\n"))
                .unwrap()
                .unwrap();
            assert_eq!((h.body, h.reusable), (body, reusable), "{fields}");
        }
        for (status, reusable) in [
            ("HTTP/1.1 204 No Content", true),
            ("HTTP/1.1 304 Not Modified\r\ncontent-length: 9", true),
        ] {
            let h = head(&format!("{status}\r\n\r\n")).unwrap().unwrap();
            assert_eq!(
                (h.body, h.reusable),
                (Decoder::Length(0), reusable),
                "{status}"
            );
        }
        let h = head("HTTP/1.0 200 OK\r\ncontent-length: 3\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            (h.body, h.reusable),
            (Decoder::Length(3), false),
            "HTTP/1.0"
        );
        let mut buf = BytesMut::from("HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n");
        assert_eq!(
            parse_head(&mut buf, &Method::HEAD).unwrap().unwrap().body,
            Decoder::Length(0)
        );
        for bad in [
            "content-length: 3, 4",
            "content-length: -1",
            "content-length: 0x10",
            "content-length: ",
        ] {
            assert_eq!(
                head(&format!("HTTP/1.1 200 OK\r\n{bad}\r\n\r\n")).unwrap_err(),
                FrameError::ContentLength,
                "{bad}"
            );
        }
    }

    #[test]
    fn a_bad_or_oversized_head_is_an_error_naming_it() {
        assert_eq!(
            head("HTTX/1.1 200 OK\r\n\r\n").unwrap_err(),
            FrameError::Head("not HTTP/1.x")
        );
        assert_eq!(
            head("HTTP/1.1 200 OK\r\nbad name: x\r\n\r\n").unwrap_err(),
            FrameError::Head("bad header name")
        );
        let many: String = (0..101).map(|i| format!("x-{i}: v\r\n")).collect();
        assert_eq!(
            head(&format!("HTTP/1.1 200 OK\r\n{many}\r\n")).unwrap_err(),
            FrameError::Head("more than 100 header fields")
        );
        let huge = format!("HTTP/1.1 200 OK\r\nset-cookie: {}", "a".repeat(MAX_HEAD));
        assert_eq!(head(&huge).unwrap_err(), FrameError::HeadTooLarge);
        // Large but within the limit: a provider's cookies.
        let big = format!(
            "HTTP/1.1 200 OK\r\nset-cookie: {}\r\ncontent-length: 0\r\n\r\n",
            "a".repeat(32 * 1024)
        );
        assert_eq!(
            head(&big).unwrap().unwrap().headers["set-cookie"].len(),
            32 * 1024
        );
    }

    #[test]
    fn a_length_body_ends_at_its_length_whatever_the_pieces() {
        for step in [1, 3, 100] {
            assert_eq!(
                feed(Decoder::Length(5), b"hello", step).unwrap(),
                (b"hello".to_vec(), true)
            );
        }
        let mut d = Decoder::Length(3);
        let mut buf = BytesMut::from("abcNEXT");
        assert_eq!(
            d.decode(&mut buf).unwrap(),
            Decoded::Data(Bytes::from_static(b"abc"))
        );
        assert!(
            d.is_done(),
            "done with the frame that carried its last byte"
        );
        assert_eq!(&buf[..], b"NEXT");
        assert_eq!(
            Decoder::Length(3).eof(),
            Err(FrameError::Incomplete("before the content-length"))
        );
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_and_trailers_in_any_pieces() {
        let wire = b"5;name=value\r\nhello\r\n7\r\n, world\r\n0\r\nx-trailer: 1\r\n\r\n";
        for step in [1, 2, 5, 7, wire.len()] {
            assert_eq!(
                feed(Decoder::Chunked(Chunk::Size), wire, step).unwrap(),
                (b"hello, world".to_vec(), true),
                "step {step}"
            );
        }
        assert_eq!(
            Decoder::Chunked(Chunk::Data(2)).eof(),
            Err(FrameError::Incomplete("before the last chunk"))
        );
    }

    #[test]
    fn a_whole_chunked_body_is_done_with_its_last_data_frame() {
        let mut d = Decoder::Chunked(Chunk::Size);
        let mut buf = BytesMut::from("2\r\nhi\r\n0\r\n\r\nNEXT");
        assert_eq!(
            d.decode(&mut buf).unwrap(),
            Decoded::Data(Bytes::from_static(b"hi"))
        );
        assert!(d.is_done());
        assert_eq!(&buf[..], b"NEXT");
    }

    #[test]
    fn bad_chunked_framing_is_an_error() {
        let bad = |wire: &[u8]| feed(Decoder::Chunked(Chunk::Size), wire, wire.len()).unwrap_err();
        assert_eq!(bad(b"zz\r\n"), FrameError::Chunked("bad chunk size"));
        assert_eq!(
            bad(b"2\r\nhiX"),
            FrameError::Chunked("no CRLF after chunk data")
        );
        assert_eq!(
            bad(&[b'1'; MAX_CHUNK_LINE + 1]),
            FrameError::Chunked("bad chunk size")
        );
        let long_ext = format!("1;{}", "e".repeat(MAX_CHUNK_LINE + 1));
        assert_eq!(
            bad(long_ext.as_bytes()),
            FrameError::Chunked("chunk-size line too long")
        );
    }

    #[test]
    fn an_eof_body_is_everything_until_close() {
        let mut d = Decoder::Eof;
        let mut buf = BytesMut::from("abc");
        assert_eq!(
            d.decode(&mut buf).unwrap(),
            Decoded::Data(Bytes::from_static(b"abc"))
        );
        assert_eq!(d.decode(&mut buf).unwrap(), Decoded::More);
        assert_eq!(d.eof(), Ok(()));
        assert_eq!(d.decode(&mut buf).unwrap(), Decoded::End);
    }
}
