//! A mock OpenAI provider built to never be the bottleneck: canned bytes, no JSON parsing
//! (a byte search decides streaming and `include_usage`).

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use clap::Parser;
use http::{header, HeaderValue, Request, Response};
use http_body::Frame;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::Incoming;

#[derive(Parser, Clone)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Content chunks per streamed reply.
    #[arg(long, default_value_t = 20)]
    chunks: usize,
    /// Delay between streamed chunks, in milliseconds.
    #[arg(long, default_value_t = 0)]
    chunk_interval_ms: u64,
    /// HTTP/2 streams allowed per connection (`SETTINGS_MAX_CONCURRENT_STREAMS`); 256 is
    /// what large providers' edges commonly announce.
    #[arg(long, default_value_t = 256)]
    h2_max_streams: u32,
}

type Body = UnsyncBoxBody<Bytes, std::convert::Infallible>;

const COMPLETION: &[u8] = br#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the benchmark mock."},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":8,"total_tokens":20}}"#;
const CHUNK: &[u8] = b"data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"token \"},\"finish_reason\":null}],\"usage\":null}\n\n";
const USAGE: &[u8] = b"data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":20,\"total_tokens\":32}}\n\n";
const DONE: &[u8] = b"data: [DONE]\n\n";
const MODELS: &[u8] = br#"{"object":"list","data":[{"id":"gpt-4o-mini","object":"model","created":1700000000,"owned_by":"bench"}]}"#;

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn strip_spaces(b: &[u8]) -> Vec<u8> {
    b.iter()
        .copied()
        .filter(|c| !c.is_ascii_whitespace())
        .collect()
}

async fn handle(args: Args, req: Request<Incoming>) -> Response<Body> {
    if req.method() == http::Method::GET {
        let mut resp = Response::new(Full::new(Bytes::from_static(MODELS)).boxed_unsync());
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        return resp;
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let compact = strip_spaces(&body);
    if !contains(&compact, b"\"stream\":true") {
        let mut resp = Response::new(Full::new(Bytes::from_static(COMPLETION)).boxed_unsync());
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        return resp;
    }
    let usage = contains(&compact, b"\"include_usage\":true");
    let mut frames: Vec<&'static [u8]> = vec![CHUNK; args.chunks];
    if usage {
        frames.push(USAGE);
    }
    frames.push(DONE);
    let interval = Duration::from_millis(args.chunk_interval_ms);
    let stream = futures::stream::unfold(
        (frames.into_iter(), true),
        move |(mut it, first)| async move {
            let frame = it.next()?;
            if !first && !interval.is_zero() {
                tokio::time::sleep(interval).await;
            }
            Some((Ok(Frame::data(Bytes::from_static(frame))), (it, false)))
        },
    );
    let mut resp = Response::new(StreamBody::new(stream).boxed_unsync());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    resp
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (listen, h2_max_streams) = (args.listen, args.h2_max_streams);
    airouter_bench::serve_with(listen, h2_max_streams, move |req| handle(args.clone(), req)).await
}
