//! Streaming responses: bytes flow to the client as they arrive; usage is counted on the way.
//!
//! [`UsageTap`] wraps an upstream SSE body. In pass-through mode (the client asked for usage,
//! or the body is not SSE) every chunk is forwarded untouched the moment it arrives and is
//! scanned where it lies (only an unfinished last event is copied, to be read whole with the
//! next chunk). In strip mode (the router asked for the usage chunk, the client did not) events
//! are forwarded as soon as they are complete, except the usage-only event. When the body ends
//! or is dropped (client gone), the tokens seen are charged once. Dropping the tap drops the
//! upstream body, which closes the upstream connection: a client disconnect cancels the
//! generation. A [`Watchdog`] ends a stream whose upstream stops sending without closing.

use std::{
    future::Future,
    pin::Pin,
    sync::LazyLock,
    task::{ready, Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use memchr::memmem;
use serde::Deserialize;

use crate::body::BoxError;

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

#[derive(Default, Deserialize)]
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

/// The fields of a response body or SSE chunk that accounting reads.
struct ChunkUsage {
    usage: Option<Usage>,
    /// `choices` is missing, `null` or `[]`.
    choices_empty: bool,
    /// `response` is an object (Responses API).
    has_response: bool,
    response_usage: Option<Usage>,
}

/// Reads [`UsageChunk`]'s fields. The common well-formed case is scanned without building
/// anything; anything unusual goes through `serde_json`, so the answer is always serde's.
fn parse_chunk(json: &[u8]) -> Option<ChunkUsage> {
    let Some([usage, choices, response]) =
        crate::json::top_level(json, [b"usage", b"choices", b"response"])
    else {
        let chunk: UsageChunk = serde_json::from_slice(json).ok()?;
        return Some(ChunkUsage {
            choices_empty: chunk.choices.as_ref().is_none_or(Vec::is_empty),
            has_response: chunk.response.is_some(),
            response_usage: chunk.response.and_then(|r| r.usage),
            usage: chunk.usage,
        });
    };
    let usage = match usage {
        Some(raw) => usage_value(raw)?,
        None => None,
    };
    let choices_empty = match choices {
        None => true,
        Some(raw) if crate::json::is_null(raw) => true,
        // An array (the scanner checked it is well-formed): empty when `]` follows `[`.
        Some(raw) if raw[0] == b'[' => {
            raw[1..].iter().find(|b| !b.is_ascii_whitespace()) == Some(&b']')
        }
        Some(_) => return None, // not a sequence: serde refuses the whole chunk
    };
    let (has_response, response_usage) = match response {
        None => (false, None),
        Some(raw) if crate::json::is_null(raw) => (false, None),
        Some(raw) => (true, response_usage(raw)?),
    };
    Some(ChunkUsage {
        usage,
        choices_empty,
        has_response,
        response_usage,
    })
}

/// An `Option<Usage>` value as serde reads it (`None`: serde refuses it). The usual shape —
/// an object whose token fields are plain integers or `null`, each given once — is read
/// directly; anything else goes through serde.
fn usage_value(raw: &[u8]) -> Option<Option<Usage>> {
    if crate::json::is_null(raw) {
        return Some(None);
    }
    let mut fields: [Option<Option<u64>>; 3] = [None; 3];
    let plain = crate::json::fields(raw, 0, |key, value| {
        let slot = match key {
            b"total_tokens" => 0,
            b"prompt_tokens" | b"input_tokens" => 1,
            b"completion_tokens" | b"output_tokens" => 2,
            _ => return Some(()),
        };
        if fields[slot].is_some() {
            return None; // given twice (or by both names): serde's error to report
        }
        fields[slot] = Some(if crate::json::is_null(value) {
            None
        } else {
            Some(crate::json::plain_u64(value)?)
        });
        Some(())
    });
    if plain == Some(raw.len()) {
        let [total_tokens, prompt_tokens, completion_tokens] = fields.map(Option::flatten);
        return Some(Some(Usage {
            total_tokens,
            prompt_tokens,
            completion_tokens,
        }));
    }
    serde_json::from_slice::<Option<Usage>>(raw).ok()
}

/// `response.usage` of a non-null `response` value (outer `None`: serde refuses it).
fn response_usage(raw: &[u8]) -> Option<Option<Usage>> {
    let mut usage: Option<&[u8]> = None;
    let plain = crate::json::fields(raw, 0, |key, value| {
        if key == b"usage" {
            if usage.is_some() {
                return None;
            }
            usage = Some(value);
        }
        Some(())
    });
    if plain == Some(raw.len()) {
        return match usage {
            Some(raw) => usage_value(raw),
            None => Some(None),
        };
    }
    serde_json::from_slice::<ResponseUsage>(raw)
        .ok()
        .map(|r| r.usage)
}

/// `usage` (or `response.usage`, Responses API) of a JSON body, when it reports tokens.
pub fn usage(json: &[u8]) -> Option<TokenUsage> {
    let chunk = parse_chunk(json)?;
    chunk
        .usage
        .or(chunk.response_usage)
        .and_then(|u| u.tokens())
}

/// What one SSE event is, for accounting.
#[derive(Debug, Default, PartialEq, Eq)]
struct EventInfo {
    tokens: Option<TokenUsage>,
    /// Carries usage and no choices: the chunk `include_usage` adds.
    usage_only: bool,
}

const USAGE_KEY: &[u8] = b"\"usage\"";

/// A searcher for [`USAGE_KEY`], built once: `memmem::find` builds one per call, which on a
/// chunk of a few hundred bytes costs more than the search.
fn usage_key_in(hay: &[u8]) -> Option<usize> {
    static FINDER: LazyLock<memmem::Finder<'static>> =
        LazyLock::new(|| memmem::Finder::new(USAGE_KEY));
    FINDER.find(hay)
}

/// Where the [`USAGE_KEY`] that has its `g` at `g` starts, if `buf` has one there.
/// [`next_event`] stops at every `g` (in its one `memchr` pass for the line ends and
/// escapes it needs anyway) instead of searching for the key separately.
#[inline(always)]
fn usage_key_through(buf: &[u8], g: usize) -> Option<usize> {
    let start = g.checked_sub(4)?;
    (buf.get(start..g + 3)? == USAGE_KEY).then_some(start)
}

/// Every `"usage"` in `event` (from `first` on) is followed by `: null`. Then no line of it
/// can report tokens — neither a top-level `usage` nor `response.usage` — unless a key is
/// spelled with a `\u` escape, which the caller rules out. (OpenAI sends `"usage":null` in
/// every chunk of a stream that asked for usage.)
fn usage_always_null(event: &[u8], first: usize) -> bool {
    let mut at = first;
    loop {
        let mut i = at + USAGE_KEY.len();
        let ws = |i: &mut usize| {
            while event
                .get(*i)
                .is_some_and(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
            {
                *i += 1;
            }
        };
        ws(&mut i);
        if event.get(i) != Some(&b':') {
            return false;
        }
        i += 1;
        ws(&mut i);
        if event.get(i..i + 4) != Some(b"null") {
            return false;
        }
        let rest = &event[i + 4..];
        match usage_key_in(rest) {
            Some(next) => at = i + 4 + next,
            None => return true,
        }
    }
}

/// The tokens `event` reports. [`scan_frame`] calls it only for events [`next_event`] found
/// could report any (a `"usage"` not always `null`, or a `\u` escape), so it does not repeat
/// that pre-check; on any other event it finds nothing, just more slowly.
fn inspect_event(event: &[u8]) -> EventInfo {
    let data_lines = || event.split(|&b| b == b'\n').filter_map(data_of);
    let mut lines = data_lines();
    let Some(first) = lines.next() else {
        return EventInfo::default();
    };
    let Some(second) = lines.next() else {
        return inspect_data(first);
    };
    // Several `data:` lines are one payload, joined by newlines (the SSE rule)…
    let mut joined = [first, second].join(&b'\n');
    for line in lines {
        joined.push(b'\n');
        joined.extend_from_slice(line);
    }
    let info = inspect_data(&joined);
    if info.tokens.is_some() {
        return info;
    }
    // …though a provider may also put a document on each.
    data_lines()
        .map(inspect_data)
        .fold(EventInfo::default(), |acc, info| EventInfo {
            tokens: match (acc.tokens, info.tokens) {
                (Some(a), Some(b)) => Some(max_usage(a, b)),
                (a, b) => a.or(b),
            },
            usage_only: acc.usage_only || info.usage_only,
        })
}

/// The payload of an SSE `data:` line (one optional space after the colon dropped).
fn data_of(line: &[u8]) -> Option<&[u8]> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let data = line.strip_prefix(b"data:")?;
    Some(data.strip_prefix(b" ").unwrap_or(data))
}

/// The tokens one `data:` payload reports.
fn inspect_data(data: &[u8]) -> EventInfo {
    let mut info = EventInfo::default();
    if usage_key_in(data).is_none() {
        return info;
    }
    let Some(chunk) = parse_chunk(data) else {
        return info;
    };
    if let Some(t) = chunk
        .usage
        .as_ref()
        .and_then(Usage::tokens)
        .or_else(|| chunk.response_usage.as_ref().and_then(Usage::tokens))
    {
        info.tokens = Some(t);
        info.usage_only = chunk.usage.is_some() && chunk.choices_empty && !chunk.has_response;
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

/// In one pass over `buf`: the end of its first complete event (index just past its blank
/// line), and whether [`inspect_event`] could find usage in it — false when the event has
/// no `"usage"`, or only `"usage": null` and no `\u` escape (see [`usage_always_null`]).
fn next_event(buf: &[u8]) -> Option<(usize, bool)> {
    let mut line_start = 0;
    let mut first_usage: Option<usize> = None;
    let mut unicode_escape = false;
    // Handles a `\n`, `g` or `\\` at `i`; returns the event's end when `i` ends it.
    let mut hit = |i: usize, line_start: &mut usize| -> Option<usize> {
        match buf[i] {
            b'\n' => {
                let line = &buf[*line_start..i];
                if line.is_empty() || line == b"\r" {
                    return Some(i + 1);
                }
                *line_start = i + 1;
            }
            b'g' => {
                if first_usage.is_none() {
                    first_usage = usage_key_through(buf, i);
                }
            }
            _ => unicode_escape |= buf.get(i + 1) == Some(&b'u'),
        }
        None
    };
    let mut end = None;
    for k in memchr::memchr3_iter(b'\n', b'g', b'\\', buf) {
        if let Some(e) = hit(k, &mut line_start) {
            end = Some(e);
            break;
        }
    }
    let end = end?;
    let inspect = match first_usage {
        None => false,
        Some(first) => unicode_escape || !usage_always_null(&buf[..end], first),
    };
    Some((end, inspect))
}

/// How a stream ended.
#[derive(Debug, PartialEq, Eq)]
pub enum StreamEnd {
    /// The upstream's body ended.
    Complete,
    /// The upstream's body failed: its connection broke, or it fell silent ([`Watchdog`]).
    Failed(String),
    /// The client went away (or the response was dropped) first.
    Abandoned,
}

impl StreamEnd {
    pub fn as_str(&self) -> &'static str {
        match self {
            StreamEnd::Complete => "complete",
            StreamEnd::Failed(_) => "upstream_error",
            StreamEnd::Abandoned => "client_gone",
        }
    }
}

/// Called once with the tokens a stream reported and how it ended.
pub type OnDone = Box<dyn FnOnce(TokenUsage, StreamEnd) + Send>;

pin_project_lite::pin_project! {
    /// Generic over the upstream body, so the upstream's body is polled directly rather than
    /// through another boxed layer on every chunk.
    pub struct UsageTap<B> {
        #[pin]
        inner: B,
        strip: bool,
        // False for streams that are not SSE: bytes pass untouched and unscanned.
        scan: bool,
        // The unfinished last event seen (both modes); strip mode forwards it once complete.
        pending: BytesMut,
        tokens: TokenUsage,
        on_done: Option<OnDone>,
        watchdog: Option<Watchdog>,
    }

    impl<B> PinnedDrop for UsageTap<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(done) = this.on_done.take() {
                done(*this.tokens, StreamEnd::Abandoned);
            }
        }
    }
}

impl<B> UsageTap<B> {
    /// `strip`: remove the usage-only event (the router injected `include_usage`); `scan`:
    /// the body is SSE (otherwise it is passed on untouched).
    pub fn new(inner: B, strip: bool, scan: bool, on_done: OnDone) -> Self {
        Self {
            inner,
            strip: strip && scan,
            scan,
            pending: BytesMut::new(),
            tokens: TokenUsage::default(),
            on_done: Some(on_done),
            watchdog: None,
        }
    }

    /// Ends the stream when its upstream falls silent ([`Watchdog`]).
    pub fn watched(mut self, watchdog: Option<Watchdog>) -> Self {
        self.watchdog = watchdog;
        self
    }
}

/// Upper bound on an incomplete event kept for scanning; beyond it the event is passed on
/// unscanned (a malformed stream must not grow memory).
const MAX_EVENT: usize = 1 << 20;

/// `data` ends with a blank line, so it splits into complete events with nothing left over.
fn ends_events(data: &[u8]) -> bool {
    let Some(body) = data.strip_suffix(b"\n") else {
        return false;
    };
    let body = body.strip_suffix(b"\r").unwrap_or(body);
    body.is_empty() || body.ends_with(b"\n")
}

/// Whether some event of `data` could report usage: it has a `"usage"` not followed by
/// `: null`, or a `\u` escape anywhere (the cheap, conservative answer: a key could spell
/// `usage` with one). Two searches — for a backslash (rare in a chunk) and for the key (once,
/// near the end of an OpenAI chunk) — cost less than one pass that stops at every `g`.
fn may_report_usage(data: &[u8]) -> bool {
    if memchr::memchr_iter(b'\\', data).any(|k| data.get(k + 1) == Some(&b'u')) {
        return true;
    }
    usage_key_in(data).is_some_and(|first| !usage_always_null(data, first))
}

/// Accounts every event that `data` completes (after the incomplete one `pending` holds)
/// and returns what to forward now (`None`: nothing yet). Pass mode forwards `data` itself;
/// strip mode forwards the complete events except usage-only ones. When no event is split
/// across frames (the usual case) nothing is copied but an incomplete last event.
fn scan_frame(
    data: Bytes,
    pending: &mut BytesMut,
    strip: bool,
    tokens: &mut TokenUsage,
) -> Option<Bytes> {
    let mut account = |event: &[u8], inspect: bool| {
        if !inspect {
            return false; // no usage in it: nothing to count, not a usage-only event
        }
        let info = inspect_event(event);
        if let Some(t) = info.tokens {
            *tokens = max_usage(*tokens, t);
        }
        info.usage_only
    };
    if !pending.is_empty() {
        // An event spans frames: complete it in `pending`. Only a frame with a newline can
        // complete one, so one without is not scanned again with all that is held (a large
        // event, a base64 image say, comes in many such frames: each would rescan the lot).
        pending.extend_from_slice(&data);
        let mut out = BytesMut::new();
        let may_complete = memchr::memchr(b'\n', &data).is_some();
        while let Some((end, inspect)) = may_complete.then(|| next_event(pending)).flatten() {
            let event = pending.split_to(end);
            if !account(&event, inspect) && strip {
                out.extend_from_slice(&event);
            }
        }
        if !strip {
            if pending.len() > MAX_EVENT {
                pending.clear();
            }
            return Some(data);
        }
        if pending.len() > MAX_EVENT {
            out.extend_from_slice(&pending.split());
        }
        return (!out.is_empty()).then(|| out.freeze());
    }
    if ends_events(&data) && !may_report_usage(&data) {
        // Whole events, none with usage: nothing to count or strip (the usual chunk).
        return Some(data);
    }
    let mut at = 0;
    // Strip mode, once an event was dropped: the events kept so far.
    let mut kept: Option<BytesMut> = None;
    while let Some((len, inspect)) = next_event(&data[at..]) {
        let event = &data[at..at + len];
        let usage_only = account(event, inspect);
        if strip {
            if usage_only {
                kept.get_or_insert_with(|| BytesMut::from(&data[..at]));
            } else if let Some(kept) = &mut kept {
                kept.extend_from_slice(event);
            }
        }
        at += len;
    }
    let tail = &data[at..];
    if !strip {
        pending.extend_from_slice(tail);
        if pending.len() > MAX_EVENT {
            pending.clear();
        }
        return Some(data);
    }
    if tail.len() > MAX_EVENT {
        // Too long to be an event: pass it on unscanned.
        return Some(match kept {
            Some(mut kept) => {
                kept.extend_from_slice(tail);
                kept.freeze()
            }
            None => data,
        });
    }
    pending.extend_from_slice(tail);
    match kept {
        Some(kept) => (!kept.is_empty()).then(|| kept.freeze()),
        None => (at > 0).then(|| data.slice(..at)),
    }
}

impl<B> Body for UsageTap<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        loop {
            let polled = match this.inner.as_mut().poll_frame(cx) {
                Poll::Ready(polled) => {
                    if let Some(watchdog) = this.watchdog {
                        watchdog.frame();
                    }
                    polled.map(|frame| frame.map_err(Into::into))
                }
                Poll::Pending => {
                    let Some(watchdog) = this.watchdog else {
                        return Poll::Pending;
                    };
                    let silent: BoxError = ready!(watchdog.poll_silent(cx)).into();
                    Some(Err(silent))
                }
            };
            match polled {
                Some(Ok(frame)) => {
                    let data = match frame.into_data() {
                        Ok(data) => data,
                        Err(frame) => return Poll::Ready(Some(Ok(frame))),
                    };
                    if !*this.scan {
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    if let Some(out) = scan_frame(data, this.pending, *this.strip, this.tokens) {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
                Some(Err(e)) => {
                    if let Some(done) = this.on_done.take() {
                        done(*this.tokens, StreamEnd::Failed(e.to_string()));
                    }
                    return Poll::Ready(Some(Err(e)));
                }
                None => {
                    if let Some(done) = this.on_done.take() {
                        done(*this.tokens, StreamEnd::Complete);
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

/// The error a silent stream ends with.
#[derive(Debug, thiserror::Error)]
#[error("the upstream sent nothing for {0:?} (server.request_timeout); stream ended")]
pub struct Silent(Duration);

/// Ends a stream (with [`Silent`]) whose upstream has sent nothing for `limit`, at most twice
/// that. Part of [`UsageTap`] rather than a body layer of its own, and cheap per chunk: frames
/// are counted, not timed (no clock read); the timer is reset only when it fires, and polled
/// only when it has fired or the task changed (it keeps the waker it was polled with).
pub struct Watchdog {
    limit: Duration,
    frames: u64,
    // `frames` when the timer was last set.
    seen: u64,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    // The waker the timer was last polled with.
    waker: Option<std::task::Waker>,
}

impl Watchdog {
    pub fn new(limit: Duration) -> Self {
        Self {
            limit,
            frames: 0,
            seen: 0,
            timer: None,
            waker: None,
        }
    }

    fn frame(&mut self) {
        self.frames += 1;
    }

    /// The upstream has nothing now: `Ready` once it has been silent too long.
    fn poll_silent(&mut self, cx: &mut Context<'_>) -> Poll<Silent> {
        let (frames, limit) = (self.frames, self.limit);
        let seen = &mut self.seen;
        let timer = self.timer.get_or_insert_with(|| {
            *seen = frames;
            Box::pin(tokio::time::sleep(limit))
        });
        let same_task = self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
        if same_task && !timer.is_elapsed() {
            return Poll::Pending;
        }
        self.waker = Some(cx.waker().clone());
        loop {
            ready!(timer.as_mut().poll(cx));
            if self.frames == self.seen {
                return Poll::Ready(Silent(limit));
            }
            self.seen = self.frames;
            timer.as_mut().reset(tokio::time::Instant::now() + limit);
        }
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
            Box::new(move |t: TokenUsage, _| s.store(t.total, Ordering::SeqCst)),
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

    /// A body that sends `pieces`, each after its delay.
    fn paced(pieces: Vec<(u64, &'static str)>) -> impl Body<Data = Bytes, Error = BoxError> {
        StreamBody::new(futures::stream::unfold(
            pieces.into_iter(),
            |mut it| async move {
                let (ms, piece) = it.next()?;
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Some((Ok::<_, BoxError>(Frame::data(Bytes::from(piece))), it))
            },
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_ends_a_silent_stream_and_only_that() {
        let ended = Arc::new(parking_lot::Mutex::new(None));
        let tap = |pieces, ended: Arc<parking_lot::Mutex<Option<StreamEnd>>>| {
            UsageTap::new(
                paced(pieces),
                false,
                true,
                Box::new(move |_, end| *ended.lock() = Some(end)),
            )
            .watched(Some(Watchdog::new(Duration::from_secs(1))))
        };
        // Chunks 900 ms apart: never a second of silence.
        let steady = vec![
            (0, EVENTS[0]),
            (900, EVENTS[0]),
            (900, EVENTS[0]),
            (900, EVENTS[2]),
        ];
        let started = tokio::time::Instant::now();
        assert!(tap(steady, ended.clone()).collect().await.is_ok());
        assert_eq!(started.elapsed(), Duration::from_millis(2700));
        assert_eq!(*ended.lock(), Some(StreamEnd::Complete));

        // One chunk, then 10 s of nothing: ended after 1 to 2 s of silence.
        let stalled = vec![(0, EVENTS[0]), (10_000, EVENTS[2])];
        let started = tokio::time::Instant::now();
        let err = tap(stalled, ended.clone()).collect().await.unwrap_err();
        let silent = started.elapsed();
        assert!(err.to_string().contains("sent nothing for 1s"), "{err}");
        assert!(
            (Duration::from_secs(1)..=Duration::from_secs(2)).contains(&silent),
            "{silent:?}"
        );
        assert!(matches!(*ended.lock(), Some(StreamEnd::Failed(_))));
    }

    /// The accounting before the byte-level fast paths, kept as the reference.
    mod reference {
        use super::super::*;

        pub fn usage(json: &[u8]) -> Option<TokenUsage> {
            let chunk: UsageChunk = serde_json::from_slice(json).ok()?;
            chunk
                .usage
                .or(chunk.response.and_then(|r| r.usage))
                .and_then(|u| u.tokens())
        }

        pub fn inspect_event(event: &[u8]) -> (Option<TokenUsage>, bool) {
            let (mut tokens, mut usage_only) = (None, false);
            for line in event.split(|&b| b == b'\n') {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let Some(data) = line.strip_prefix(b"data:") else {
                    continue;
                };
                let data = data.strip_prefix(b" ").unwrap_or(data);
                if !data.windows(7).any(|w| w == b"\"usage\"") {
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
                    tokens = Some(max_usage(tokens.unwrap_or_default(), t));
                    usage_only |=
                        chunk.usage.is_some() && choices_empty && chunk.response.is_none();
                }
            }
            (tokens, usage_only)
        }
    }

    const BODIES: &[&str] = &[
        r#"{"choices":[{"delta":{"content":"Hi"}}],"usage":null}"#,
        r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#,
        r#"{"choices":[ ],"usage":{"input_tokens":1,"total_tokens":2}}"#,
        r#"{"choices":[{"x":1}],"usage":{"total_tokens":9}}"#,
        r#"{"usage":{"total_tokens":0},"response":{"usage":{"total_tokens":4}}}"#,
        r#"{"type":"response.completed","response":{"id":"r","usage":{"input_tokens":2,"output_tokens":3,"total_tokens":5}}}"#,
        r#"{"response":null,"usage":{"total_tokens":3}}"#,
        r#"{"choices":{},"usage":{"total_tokens":3}}"#,
        r#"{"usage":{"total_tokens":-1}}"#,
        r#"{"usage":{"total_tokens":1.5}}"#,
        r#"{"usage":{"total_tokens":3},"usage":{"total_tokens":4}}"#,
        r#"{"\u0075sage":{"total_tokens":6}}"#,
        r#"{"usage" : null, "response": {"usage": null}}"#,
        r#"{"usage":null,"response":{"\u0075sage":{"total_tokens":8}}}"#,
        r#"{"text":"say \"usage\": {\"total_tokens\": 99}","usage":null}"#,
        r#"[{"total_tokens":5}]"#,
        r#"{"usage":{"total_tokens":7}} trailing"#,
        r#"{"usage":{"total_tokens":7},}"#,
        r#"{"usage":{"total_tokens":7,"prompt_tokens_details":{"cached_tokens":0}},"x":[1,{"y":"\u00e9"}]}"#,
        r#"{"type":"usage","usage":{"total_tokens":11}}"#,
        r#"{"usage":{"prompt_tokens":1,"input_tokens":2,"total_tokens":3}}"#,
        r#"{"usage":{"total_tokens":null,"prompt_tokens":4}}"#,
        r#"{"usage":{"total_tokens":18446744073709551615}}"#,
        r#"{"usage":{"total_tokens":18446744073709551616}}"#,
        r#"{"usage":{"total_tokens":00}}"#,
        r#"{"usage":{"total_tokens":5,"total_tokens":6}}"#,
        r#"{"usage":{"\u0074otal_tokens":5}}"#,
        r#"{"usage":5}"#,
        r#"{"usage":{}}"#,
        r#"{"response":5,"usage":{"total_tokens":1}}"#,
        r#"{"response":{"usage":{"total_tokens":2},"usage":null}}"#,
        r#"{"response":{"output":[{"content":"x"}],"usage":{"output_tokens":2,"total_tokens":2}}}"#,
        "not json \"usage\"",
    ];

    #[test]
    fn accounting_matches_the_reference() {
        for body in BODIES {
            assert_eq!(
                usage(body.as_bytes()),
                reference::usage(body.as_bytes()),
                "{body}"
            );
        }
        for a in BODIES {
            for b in BODIES {
                for (sep, end) in [("\n", "\n\n"), ("\r\n", "\r\n\r\n")] {
                    let event = format!("event: x{sep}data: {a}{sep}data:{b}{end}");
                    let info = inspect_event(event.as_bytes());
                    let expect = reference::inspect_event(event.as_bytes());
                    assert_eq!((info.tokens, info.usage_only), expect, "{event:?}");
                    let (end, inspect) = next_event(event.as_bytes()).unwrap();
                    assert_eq!(end, event.len(), "{event:?}");
                    assert!(inspect || expect == (None, false), "skipped: {event:?}");
                    assert!(ends_events(event.as_bytes()));
                    let may = may_report_usage(event.as_bytes());
                    assert!(may || expect == (None, false), "skipped: {event:?}");
                }
            }
        }
    }

    #[tokio::test]
    async fn every_split_gives_the_same_stream_and_tokens() {
        let stream = concat!(
            ": comment\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}],\"usage\":null}\r\n\r\n",
            "data: {\"choices\":[],\"usage\":{\"total_tokens\":12}}\n\n",
            "data: [DONE]\n\n",
        );
        let without_usage = stream.replace(
            "data: {\"choices\":[],\"usage\":{\"total_tokens\":12}}\n\n",
            "",
        );
        for strip in [false, true] {
            let expect = if strip { &without_usage } else { stream };
            for i in 0..stream.len() {
                for j in i..stream.len() {
                    let pieces = vec![
                        &*stream[..i].to_owned().leak(),
                        &*stream[i..j].to_owned().leak(),
                        &*stream[j..].to_owned().leak(),
                    ];
                    let (out, tokens) = run(strip, pieces).await;
                    assert_eq!(&out, expect, "strip={strip} split at {i},{j}");
                    assert_eq!(tokens, 12, "strip={strip} split at {i},{j}");
                }
            }
        }
    }

    #[tokio::test]
    async fn a_payload_over_several_data_lines_is_read_joined() {
        let split_usage = "data: {\"choices\":[],\ndata: \"usage\":{\"total_tokens\":12}}\n\n";
        let stream = format!("{}{split_usage}{}", EVENTS[0], EVENTS[2]);
        for strip in [false, true] {
            let (out, tokens) = run(strip, vec![&*stream.clone().leak()]).await;
            let expect = if strip {
                stream.replace(split_usage, "")
            } else {
                stream.clone()
            };
            assert_eq!(out, expect, "strip={strip}");
            assert_eq!(tokens, 12, "strip={strip}");
        }
        // A document on each line is still read (not the SSE rule, but seen).
        let two =
            "data: {\"usage\":{\"total_tokens\":3}}\ndata: {\"usage\":{\"total_tokens\":9}}\n\n";
        assert_eq!(
            inspect_event(two.as_bytes()).tokens.map(|t| t.total),
            Some(9)
        );
    }

    #[tokio::test]
    async fn a_large_event_in_many_frames_is_passed_on_whole_and_counted() {
        // A 600 KB event (a base64 image, say) in 1 KB frames with no newline until its end,
        // then the usage event: the same bytes out, the tokens counted, in both modes.
        let image = format!(
            "data: {{\"type\":\"image\",\"b64\":\"{}\"}}\n\n",
            "QUJD".repeat(150_000)
        );
        let usage = "data: {\"choices\":[],\"usage\":{\"total_tokens\":12}}\n\n";
        let stream = format!("{image}{usage}data: [DONE]\n\n");
        let pieces: Vec<&'static str> = stream
            .as_bytes()
            .chunks(1024)
            .map(|c| &*std::str::from_utf8(c).unwrap().to_owned().leak())
            .collect();
        for strip in [false, true] {
            let (out, tokens) = run(strip, pieces.clone()).await;
            let expect = if strip {
                stream.replace(usage, "")
            } else {
                stream.clone()
            };
            assert!(out == expect, "strip={strip}: {} bytes out", out.len());
            assert_eq!(tokens, 12, "strip={strip}");
        }
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
