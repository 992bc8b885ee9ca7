//! Streaming responses: bytes flow to the client as they arrive; usage is counted on the way.
//!
//! [`UsageTap`] wraps an upstream SSE body. In pass-through mode (the client asked for usage,
//! or the body is not SSE) every chunk is forwarded untouched the moment it arrives and a copy
//! is scanned. In strip mode (the router asked for the usage chunk, the client did not) events
//! are forwarded as soon as they are complete, except the usage-only event. When the body ends
//! or is dropped (client gone), the tokens seen are charged once. Dropping the tap drops the
//! upstream body, which closes the upstream connection: a client disconnect cancels the
//! generation.

use std::{
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use serde::Deserialize;

use crate::body::{BoxError, RespBody};

#[derive(Deserialize)]
struct UsageChunk {
    usage: Option<Usage>,
    choices: Option<Vec<serde::de::IgnoredAny>>,
    response: Option<ResponseUsage>,
}

#[derive(Deserialize)]
struct ResponseUsage {
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Usage {
    total_tokens: Option<u64>,
    #[serde(alias = "input_tokens")]
    prompt_tokens: Option<u64>,
    #[serde(alias = "output_tokens")]
    completion_tokens: Option<u64>,
}

/// Tokens a provider reported. Only `total` is charged to TPM (as upstream).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenUsage {
    pub prompt: u64,
    pub completion: u64,
    pub total: u64,
}

impl Usage {
    fn tokens(&self) -> Option<TokenUsage> {
        let total = self.total_tokens.filter(|&t| t > 0)?;
        Some(TokenUsage {
            prompt: self.prompt_tokens.unwrap_or(0),
            completion: self.completion_tokens.unwrap_or(0),
            total,
        })
    }
}

/// `usage` (or `response.usage`, Responses API) of a JSON body, when it reports tokens.
pub fn usage(json: &[u8]) -> Option<TokenUsage> {
    let chunk: UsageChunk = serde_json::from_slice(json).ok()?;
    chunk
        .usage
        .or(chunk.response.and_then(|r| r.usage))
        .and_then(|u| u.tokens())
}

/// What one SSE event is, for accounting.
#[derive(Debug, PartialEq, Eq)]
struct EventInfo {
    tokens: Option<TokenUsage>,
    /// Carries usage and no choices: the chunk `include_usage` adds.
    usage_only: bool,
}

fn inspect_event(event: &[u8]) -> EventInfo {
    let mut info = EventInfo {
        tokens: None,
        usage_only: false,
    };
    for line in event.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            continue;
        };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        // Cheap pre-check: most chunks carry no usage (or `"usage":null`).
        if !contains(data, b"\"usage\"") {
            continue;
        }
        let Ok(chunk) = serde_json::from_slice::<UsageChunk>(data) else {
            continue;
        };
        let choices_empty = chunk.choices.as_ref().is_none_or(Vec::is_empty);
        if let Some(t) = chunk.usage.as_ref().and_then(Usage::tokens).or_else(|| {
            chunk
                .response
                .as_ref()
                .and_then(|r| r.usage.as_ref())
                .and_then(Usage::tokens)
        }) {
            info.tokens = Some(max_usage(info.tokens.unwrap_or_default(), t));
            info.usage_only |= chunk.usage.is_some() && choices_empty && chunk.response.is_none();
        }
    }
    info
}

/// Some providers repeat cumulative usage in every chunk: keep the largest, never the sum.
fn max_usage(a: TokenUsage, b: TokenUsage) -> TokenUsage {
    if b.total >= a.total {
        b
    } else {
        a
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Finds the end of the first complete event in `buf` (index just past its blank line).
fn event_end(buf: &[u8]) -> Option<usize> {
    let mut line_start = 0;
    for (i, &b) in buf.iter().enumerate() {
        if b == b'\n' {
            let line = &buf[line_start..i];
            if line.is_empty() || line == b"\r" {
                return Some(i + 1);
            }
            line_start = i + 1;
        }
    }
    None
}

/// Called once with the tokens a stream reported, when it ends or is dropped.
pub type OnDone = Box<dyn FnOnce(TokenUsage) + Send>;

pin_project_lite::pin_project! {
    pub struct UsageTap {
        #[pin]
        inner: RespBody,
        strip: bool,
        // False for streams that are not SSE: bytes pass untouched and unscanned.
        scan: bool,
        // Strip mode: bytes of the event not yet complete. Pass mode: a copy for scanning.
        pending: BytesMut,
        tokens: TokenUsage,
        on_done: Option<OnDone>,
    }

    impl PinnedDrop for UsageTap {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(done) = this.on_done.take() {
                done(*this.tokens);
            }
        }
    }
}

impl UsageTap {
    /// `strip`: remove the usage-only event (the router injected `include_usage`); `scan`:
    /// the body is SSE (otherwise it is passed on untouched).
    pub fn new(inner: RespBody, strip: bool, scan: bool, on_done: OnDone) -> Self {
        Self {
            inner,
            strip: strip && scan,
            scan,
            pending: BytesMut::new(),
            tokens: TokenUsage::default(),
            on_done: Some(on_done),
        }
    }
}

/// Upper bound on an incomplete event kept for scanning; beyond it the event is passed on
/// unscanned (a malformed stream must not grow memory).
const MAX_EVENT: usize = 1 << 20;

impl Body for UsageTap {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        loop {
            match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => {
                    let data = match frame.into_data() {
                        Ok(data) => data,
                        Err(frame) => return Poll::Ready(Some(Ok(frame))),
                    };
                    if !*this.scan {
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    this.pending.extend_from_slice(&data);
                    let mut out = BytesMut::new();
                    while let Some(end) = event_end(this.pending) {
                        let event = this.pending.split_to(end);
                        let info = inspect_event(&event);
                        if let Some(t) = info.tokens {
                            *this.tokens = max_usage(*this.tokens, t);
                        }
                        if *this.strip && !(info.usage_only) {
                            out.extend_from_slice(&event);
                        }
                    }
                    if !*this.strip {
                        if this.pending.len() > MAX_EVENT {
                            this.pending.clear();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    if this.pending.len() > MAX_EVENT {
                        out.extend_from_slice(&this.pending.split());
                    }
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out.freeze()))));
                    }
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => {
                    if let Some(done) = this.on_done.take() {
                        done(*this.tokens);
                    }
                    if *this.strip && !this.pending.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(this.pending.split().freeze()))));
                    }
                    return Poll::Ready(None);
                }
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    };

    use http_body_util::{BodyExt, StreamBody};

    use super::*;

    const EVENTS: &[&str] = &[
        "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7,\"total_tokens\":12}}\n\n",
        "data: [DONE]\n\n",
    ];

    async fn run(strip: bool, pieces: Vec<&'static str>) -> (String, u64) {
        let seen = Arc::new(AtomicU64::new(u64::MAX));
        let s = seen.clone();
        let stream = futures::stream::iter(
            pieces
                .into_iter()
                .map(|p| Ok::<_, BoxError>(Frame::data(Bytes::from(p)))),
        );
        let inner = StreamBody::new(stream).boxed_unsync();
        let tap = UsageTap::new(
            inner,
            strip,
            true,
            Box::new(move |t: TokenUsage| s.store(t.total, Ordering::SeqCst)),
        );
        let bytes = tap.collect().await.unwrap().to_bytes();
        (
            String::from_utf8(bytes.to_vec()).unwrap(),
            seen.load(Ordering::SeqCst),
        )
    }

    #[tokio::test]
    async fn pass_mode_forwards_everything_and_counts() {
        let (out, tokens) = run(false, EVENTS.to_vec()).await;
        assert_eq!(out, EVENTS.concat());
        assert_eq!(tokens, 12);
    }

    #[tokio::test]
    async fn strip_mode_drops_only_the_usage_event_even_when_split() {
        let all = EVENTS.concat();
        let (a, b) = all.split_at(70);
        let (b, c) = b.split_at(40);
        let pieces = vec![
            &*a.to_owned().leak(),
            &*b.to_owned().leak(),
            &*c.to_owned().leak(),
        ];
        let (out, tokens) = run(true, pieces).await;
        assert_eq!(out, format!("{}{}", EVENTS[0], EVENTS[2]));
        assert_eq!(tokens, 12);
    }

    #[test]
    fn usage_of_bodies() {
        let total = |b: &[u8]| usage(b).map(|u| u.total);
        assert_eq!(total(br#"{"usage":{"total_tokens":30}}"#), Some(30));
        assert_eq!(
            total(br#"{"response":{"usage":{"total_tokens":3}}}"#),
            Some(3)
        );
        assert_eq!(total(br#"{"usage":{"total_tokens":0}}"#), None);
        assert_eq!(total(b"nope"), None);
        let u = usage(br#"{"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#)
            .unwrap();
        assert_eq!((u.prompt, u.completion, u.total), (5, 7, 12));
    }
}
