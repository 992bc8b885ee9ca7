//! HTTP/1.1 connection reuse to upstreams: a connection goes back to the pool when its
//! response has ended and is reused; one whose response was abandoned, that the peer closed,
//! or that is past `max_idle_conns_per_host` or `idle_conn_timeout` is not.
//!
//! The upstream is a real hyper HTTP/1.1 server on loopback that records every connection,
//! the request target and `Host` of every request, and can close its idle connections.

mod common;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::*;
use futures::StreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::{body::Frame, Request, Response};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::{net::TcpListener, sync::watch};

#[derive(Default)]
struct Seen {
    connections: usize,
    closed: usize,
    /// Request target and `Host` header of every request.
    requests: Vec<(String, String)>,
}

struct Upstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    release: watch::Sender<bool>,
    /// Bumped to close every open connection.
    close: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (release, released) = watch::channel(false);
        let (close, closing) = watch::channel(0u64);
        let seen2 = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                seen2.lock().connections += 1;
                let (seen, released) = (seen2.clone(), released.clone());
                let (closed, mut closing) = (seen.clone(), closing.clone());
                closing.mark_unchanged();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        handle(req, seen.clone(), released.clone())
                    });
                    let serve = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service);
                    tokio::select! {
                        _ = serve => {}
                        _ = closing.changed() => {}
                    }
                    closed.lock().closed += 1;
                });
            }
        });
        Upstream {
            addr,
            seen,
            release,
            close,
            task,
        }
    }

    fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn connections(&self) -> usize {
        self.seen.lock().connections
    }

    /// Waits (at most 10 s) until `n` connections have closed.
    async fn wait_closed(&self, n: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.seen.lock().closed < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.seen.lock().closed
    }
}

type Body = BoxBody<Bytes, Infallible>;

const CHUNK: &str = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n";
const USAGE: &str = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4,\"total_tokens\":7}}\n\n";

/// By model: `close` answers with `Connection: close`; `big` with a 256 KiB completion sent
/// in pieces; a stream sends one chunk at once and the rest once released; anything else
/// gets a plain completion.
async fn handle(
    req: Request<hyper::body::Incoming>,
    seen: Arc<Mutex<Seen>>,
    mut released: watch::Receiver<bool>,
) -> Result<Response<Body>, Infallible> {
    let host = req
        .headers()
        .get("host")
        .map(|h| h.to_str().unwrap().to_owned())
        .unwrap_or_default();
    seen.lock().requests.push((req.uri().to_string(), host));
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let completion = |content: &str| {
        serde_json::json!({
            "id": "c", "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
        })
        .to_string()
    };
    if body["stream"] == true {
        let stream =
            futures::stream::once(async { Ok(Frame::data(Bytes::from_static(CHUNK.as_bytes()))) })
                .chain(futures::stream::once(async move {
                    let _ = released.wait_for(|r| *r).await;
                    Ok(Frame::data(Bytes::from(format!("{USAGE}data: [DONE]\n\n"))))
                }));
        return Ok(Response::builder()
            .header("content-type", "text/event-stream")
            .body(BodyExt::boxed(StreamBody::new(stream)))
            .unwrap());
    }
    let resp = Response::builder().header("content-type", "application/json");
    Ok(match body["model"].as_str() {
        Some("close") => resp
            .header("connection", "close")
            .body(Full::new(Bytes::from(completion("bye"))).boxed()),
        Some("big") => {
            let text = completion(&"x".repeat(256 * 1024));
            let pieces: Vec<Result<Frame<Bytes>, Infallible>> = text
                .into_bytes()
                .chunks(16 * 1024)
                .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
                .collect();
            resp.body(BodyExt::boxed(StreamBody::new(futures::stream::iter(
                pieces,
            ))))
        }
        _ => resp.body(Full::new(Bytes::from(completion("hi"))).boxed()),
    }
    .unwrap())
}

async fn start_router(up: &Upstream, extra: &[&str]) -> Router {
    let mut server = vec!["request_timeout: 20s"];
    server.extend_from_slice(extra);
    let yaml = server_yaml(0, &server)
        + &creds_yaml(&[cred("up", "openai", "sk-up", &up.base_url(), &[])]);
    Router::start(&yaml).await
}

/// Starts a stream and reads it to its first content chunk.
async fn first_chunk(router: &Router) -> reqwest::Response {
    let mut resp = router
        .post("/v1/chat/completions", &chat_stream_body("m"))
        .await;
    assert_eq!(resp.status().as_u16(), 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("\"content\":\"hi\"") {
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(left, resp.chunk())
            .await
            .expect("no first chunk within 10 s")
            .unwrap()
            .expect("stream ended before its first chunk");
        got.extend_from_slice(&chunk);
    }
    resp
}

async fn rest(resp: reqwest::Response) {
    let body = tokio::time::timeout(Duration::from_secs(10), resp.text())
        .await
        .expect("stream did not finish within 10 s")
        .unwrap();
    assert!(body.contains("[DONE]"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_responses_give_their_connection_back_for_the_next_request() {
    let up = Upstream::start().await;
    let router = start_router(&up, &[]).await;
    for _ in 0..4 {
        assert_eq!(router.chat_status("m").await, 200);
    }
    // A large body read in many pieces, and a stream read to its end, give it back too.
    let resp = router.chat("big").await;
    assert_eq!(resp.status().as_u16(), 200);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .len(),
        256 * 1024
    );
    up.release.send(true).unwrap();
    rest(first_chunk(&router).await).await;
    assert_eq!(router.chat_status("m").await, 200);
    assert_eq!(up.connections(), 1, "every request went on one connection");
    let seen = up.seen.lock();
    let host = up.addr.to_string();
    assert_eq!(seen.requests.len(), 7);
    for (target, h) in &seen.requests {
        assert_eq!(target, "/v1/chat/completions", "origin-form request target");
        assert_eq!(h, &host);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_stream_closes_its_connection() {
    let up = Upstream::start().await;
    let router = start_router(&up, &[]).await;
    // The client goes away mid-stream: the rest of that response is still on the wire, so
    // the connection cannot carry another request.
    drop(first_chunk(&router).await);
    assert_eq!(
        up.wait_closed(1).await,
        1,
        "the upstream connection is closed"
    );
    assert_eq!(router.chat_status("m").await, 200);
    assert_eq!(up.connections(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_the_peer_closes_are_not_reused() {
    let up = Upstream::start().await;
    let router = start_router(&up, &[]).await;
    // `Connection: close` on the response.
    assert_eq!(router.chat_status("close").await, 200);
    assert_eq!(router.chat_status("m").await, 200);
    assert_eq!(up.connections(), 2);
    // The peer closes idle connections (its own idle timeout, a restart): the next request
    // finds the pooled one closed and goes on a new one. (A request written in the instant
    // the peer closes fails as before, not resent: the peer may have read it, and resending
    // a completion can bill it twice. Failover across credentials handles that case.)
    for round in 0..3 {
        up.close.send_modify(|n| *n += 1);
        assert_eq!(up.wait_closed(2 + round).await, 2 + round);
        assert_eq!(router.chat_status("m").await, 200, "round {round}");
    }
    assert_eq!(up.connections(), 5);
    let logs = router.logs();
    assert!(
        !logs.contains("upstream request failed"),
        "no request failed: {logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_past_the_limit_or_the_timeout_are_closed() {
    let up = Upstream::start().await;
    let router = start_router(
        &up,
        &["max_idle_conns_per_host: 1", "idle_conn_timeout: 1s"],
    )
    .await;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(first_chunk(&router).await);
    }
    assert_eq!(up.connections(), 3);
    up.release.send(true).unwrap();
    for resp in open {
        rest(resp).await;
    }
    // One is kept idle; the two past the limit are closed as they come back.
    assert_eq!(up.wait_closed(2).await, 2);
    assert_eq!(router.chat_status("m").await, 200);
    assert_eq!(up.connections(), 3, "the idle one was reused");
    // idle_conn_timeout is 1 s: the last one closes too (bounded wait), and a new one opens
    // on demand.
    assert_eq!(up.wait_closed(3).await, 3);
    assert_eq!(router.chat_status("m").await, 200);
    assert_eq!(up.connections(), 4);
}

/// An upstream that answers `401` to a request with a body over 1 MiB before reading it, and
/// keeps that connection open without reading on (as some servers do); every other request
/// gets a completion. Returns its address and how many connections it accepted.
async fn early_answering_upstream() -> (SocketAddr, Arc<Mutex<usize>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(Mutex::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            *count.lock() += 1;
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 16 * 1024];
                loop {
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    if length > 1024 * 1024 {
                        let body =
                            r#"{"error":{"message":"bad key","type":"invalid_request_error"}}"#;
                        let resp = format!("HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                        let _ = tcp.write_all(resp.as_bytes()).await;
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        return;
                    }
                    while buf.len() < head_end + length {
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..head_end + length);
                    let body = serde_json::json!({
                        "id": "c", "object": "chat.completion",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
                    })
                    .to_string();
                    let resp = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                    if tcp.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_still_sending_a_body_the_upstream_refused_is_not_lent_again() {
    // The upstream answers 401 before reading a 32 MiB prompt and stops reading: that
    // connection is busy writing the rest for as long as the upstream keeps it open. The
    // next request must go on another connection, not wait there for `request_timeout`.
    let (addr, accepted) = early_answering_upstream().await;
    let yaml = server_yaml(0, &["request_timeout: 20s", "max_body_size_mb: 64"])
        + &creds_yaml(&[cred(
            "up",
            "openai",
            "sk-up",
            &format!("http://{addr}"),
            &[],
        )]);
    let router = Router::start(&yaml).await;
    let mut big = chat_body("m");
    big["messages"][0]["content"] = "x".repeat(32 * 1024 * 1024).into();
    let resp = router.post("/v1/chat/completions", &big).await;
    assert_eq!(resp.status().as_u16(), 401);

    let started = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(10), router.chat_status("m"))
        .await
        .expect("the next request waited on the busy connection");
    assert_eq!(status, 200, "{}", router.logs());
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(*accepted.lock(), 2, "a second connection");
}
