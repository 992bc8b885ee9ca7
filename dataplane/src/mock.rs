//! The built-in `mock` credential type: answers like an OpenAI provider would, locally, so
//! the quickstart, demos and benchmarks run with no network. Its responses go through the
//! same pipeline as a real upstream's (limits, usage accounting, stream handling).

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use serde_json::json;

use crate::{
    body::{full, BoxError, RespBody},
    config::MockConfig,
};

const WORDS: &[&str] = &[
    "This ", "is ", "a ", "mock ", "reply ", "from ", "airouter", ". ",
];

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// What the mock needs to know about the request it answers.
pub struct MockRequest<'a> {
    pub path: &'a str,
    /// The model name as forwarded (after alias and real-name rewriting).
    pub model: &'a str,
    pub stream: bool,
    /// The forwarded body asks for a final usage chunk.
    pub include_usage: bool,
}

pub async fn respond(cfg: &MockConfig, req: MockRequest<'_>) -> Response<RespBody> {
    if !cfg.latency.is_zero() {
        tokio::time::sleep(cfg.latency).await;
    }
    let id = format!("chatcmpl-mock-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let usage = json!({
        "prompt_tokens": cfg.prompt_tokens,
        "completion_tokens": cfg.completion_tokens,
        "total_tokens": cfg.prompt_tokens + cfg.completion_tokens,
    });
    if req.path.ends_with("/embeddings") {
        let body = json!({
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.0125, -0.25, 0.5, 0.75]}],
            "model": req.model,
            "usage": {"prompt_tokens": cfg.prompt_tokens, "total_tokens": cfg.prompt_tokens},
        });
        return json(body);
    }
    let text: String = (0..cfg.chunks)
        .map(|i| WORDS[i as usize % WORDS.len()])
        .collect();
    if !req.stream {
        let body = if req.path.ends_with("/completions") && !req.path.ends_with("/chat/completions")
        {
            json!({
                "id": id, "object": "text_completion", "created": created, "model": req.model,
                "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": null}],
                "usage": usage,
            })
        } else {
            json!({
                "id": id, "object": "chat.completion", "created": created, "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": usage,
            })
        };
        return json(body);
    }

    let chunk = |delta: serde_json::Value, finish: Option<&str>| {
        json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": req.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        })
    };
    let mut events = Vec::with_capacity(cfg.chunks as usize + 4);
    events.push(chunk(json!({"role": "assistant", "content": ""}), None));
    for i in 0..cfg.chunks {
        events.push(chunk(
            json!({"content": WORDS[i as usize % WORDS.len()]}),
            None,
        ));
    }
    events.push(chunk(json!({}), Some("stop")));
    if req.include_usage {
        events.push(json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": req.model,
            "choices": [], "usage": usage,
        }));
    }
    let mut frames: Vec<Bytes> = events
        .iter()
        .map(|e| Bytes::from(format!("data: {e}\n\n")))
        .collect();
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    let interval = cfg.chunk_interval;
    let stream =
        futures::stream::unfold(frames.into_iter().enumerate(), move |mut it| async move {
            let (i, frame) = it.next()?;
            if i > 0 && !interval.is_zero() {
                tokio::time::sleep(interval).await;
            }
            Some((Ok::<_, BoxError>(Frame::data(frame)), it))
        });
    let mut resp = Response::new(StreamBody::new(stream).boxed_unsync());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

fn json(body: serde_json::Value) -> Response<RespBody> {
    let mut resp = Response::new(full(
        serde_json::to_vec(&body).expect("mock JSON serialises"),
    ));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
