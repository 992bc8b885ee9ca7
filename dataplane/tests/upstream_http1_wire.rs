//! The HTTP/1.1 upstream client against answers as they come off the wire: heads and chunks
//! split into pieces of a few bytes, chunk extensions and trailers, interim `1xx` heads,
//! bodies delimited by the connection's close, and answers that are cut short or malformed.
//!
//! The upstream is a raw TCP server on loopback that reads each request (head and
//! `content-length` body) and writes the bytes its test scripts, in the pieces it says.

mod common;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use common::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// One scripted answer: the bytes, written `step` bytes at a time (0: at once), and whether
/// the upstream closes the connection after it.
#[derive(Clone)]
struct Answer {
    wire: Vec<u8>,
    step: usize,
    close: bool,
}

impl Answer {
    fn whole(wire: &str) -> Answer {
        Answer {
            wire: wire.as_bytes().to_vec(),
            step: 0,
            close: false,
        }
    }

    fn in_pieces(mut self, step: usize) -> Answer {
        self.step = step;
        self
    }

    fn then_close(mut self) -> Answer {
        self.close = true;
        self
    }
}

struct Upstream {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    /// Answers every request with `answer`.
    async fn start(answer: Answer) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(tcp, answer.clone()));
            }
        });
        Upstream {
            addr,
            connections,
            task,
        }
    }

    fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// Reads requests (at most 100 per connection) and writes `answer` to each.
async fn serve(mut tcp: TcpStream, answer: Answer) {
    let mut buf = Vec::new();
    for _ in 0..100 {
        let Some(request_len) = read_request(&mut tcp, &mut buf).await else {
            return;
        };
        buf.drain(..request_len);
        if answer.step == 0 {
            if tcp.write_all(&answer.wire).await.is_err() {
                return;
            }
        } else {
            for piece in answer.wire.chunks(answer.step) {
                if tcp.write_all(piece).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        if answer.close {
            return;
        }
    }
}

/// Reads one whole request into `buf`; its length, or `None` once the client closed.
async fn read_request(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let body: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            let total = end + 4 + body;
            if buf.len() >= total {
                return Some(total);
            }
        }
        let mut chunk = [0u8; 4096];
        let n = tcp.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

const COMPLETION: &str = r#"{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hello, world"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;

/// `COMPLETION` as chunks of at most `size` bytes, each with an extension, then a trailer.
fn chunked(size: usize) -> String {
    let mut wire = String::from(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n",
    );
    for piece in COMPLETION.as_bytes().chunks(size) {
        wire.push_str(&format!("{:x};ext=1\r\n", piece.len()));
        wire.push_str(std::str::from_utf8(piece).unwrap());
        wire.push_str("\r\n");
    }
    wire.push_str("0\r\nx-checksum: 1\r\n\r\n");
    wire
}

fn with_length(extra_headers: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra_headers}\r\n{COMPLETION}",
        COMPLETION.len()
    )
}

async fn router_for(up: &Upstream) -> Router {
    let yaml = server_yaml(0, &["request_timeout: 10s"])
        + &creds_yaml(&[cred("up", "openai", "sk-up", &up.base_url(), &[])]);
    Router::start(&yaml).await
}

async fn chat_text(router: &Router) -> (u16, String) {
    let resp = router.chat("m").await;
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_answers_in_pieces_of_a_few_bytes_arrive_whole_and_the_connection_is_reused() {
    for step in [1, 3, 7] {
        let up = Upstream::start(Answer::whole(&chunked(16)).in_pieces(step)).await;
        let router = router_for(&up).await;
        for _ in 0..3 {
            assert_eq!(
                chat_text(&router).await,
                (200, COMPLETION.to_owned()),
                "step {step}"
            );
        }
        assert_eq!(
            up.connections(),
            1,
            "step {step}: one connection for all three"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_delimited_by_close_arrives_whole_and_its_connection_is_not_reused() {
    let wire = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{COMPLETION}");
    let up = Upstream::start(Answer::whole(&wire).in_pieces(50).then_close()).await;
    let router = router_for(&up).await;
    for _ in 0..2 {
        assert_eq!(chat_text(&router).await, (200, COMPLETION.to_owned()));
    }
    assert_eq!(up.connections(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interim_heads_are_skipped_and_connection_close_is_honoured() {
    let wire = format!(
        "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n{}",
        with_length("connection: close\r\n")
    );
    let up = Upstream::start(Answer::whole(&wire)).await;
    let router = router_for(&up).await;
    for _ in 0..2 {
        let resp = router.chat("m").await;
        assert_eq!(resp.status().as_u16(), 200);
        assert!(
            resp.headers().get("link").is_none(),
            "an interim head's fields are not the answer's"
        );
        assert_eq!(resp.text().await.unwrap(), COMPLETION);
    }
    assert_eq!(up.connections(), 2, "connection: close is not reused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_head_within_the_limit_is_read() {
    let cookie = format!("set-cookie: session={}\r\n", "c".repeat(48 * 1024));
    let up = Upstream::start(Answer::whole(&with_length(&cookie)).in_pieces(4096)).await;
    let router = router_for(&up).await;
    let resp = router.chat("m").await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.text().await.unwrap(), COMPLETION);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_cut_short_is_a_transport_failure_naming_the_cause() {
    let full = with_length("");
    let cut = &full[..full.len() - 10];
    let up = Upstream::start(Answer::whole(cut).then_close()).await;
    let router = router_for(&up).await;
    assert_eq!(router.chat_status("m").await, 502);
    let logs = router.logs();
    assert!(
        logs.contains("connection closed before the content-length"),
        "{logs}"
    );
    assert!(!logs.contains("sk-up"), "no key in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_head_is_a_transport_failure_naming_the_cause() {
    let cases = [
        (
            "HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
            "invalid response head: bad header name",
        ),
        (
            "HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\nhello",
            "invalid content-length",
        ),
        (
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            "invalid chunked body: bad chunk size",
        ),
        ("SSH-2.0-OpenSSH\r\n\r\n", "invalid response head"),
    ];
    for (wire, cause) in cases {
        let up = Upstream::start(Answer::whole(wire).then_close()).await;
        let router = router_for(&up).await;
        assert_eq!(router.chat_status("m").await, 502, "{wire:?}");
        let logs = router.logs();
        assert!(logs.contains(cause), "{wire:?}: {logs}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_in_small_pieces_reaches_the_client_whole() {
    let events = [
        r#"data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hel"}}]}"#,
        r#"data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"lo"}}]}"#,
        r#"data: {"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#,
        "data: [DONE]",
    ];
    let mut wire = String::from(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
    );
    for e in events {
        let event = format!("{e}\n\n");
        wire.push_str(&format!("{:x}\r\n{event}\r\n", event.len()));
    }
    wire.push_str("0\r\n\r\n");
    let up = Upstream::start(Answer::whole(&wire).in_pieces(5)).await;
    let router = router_for(&up).await;
    for _ in 0..2 {
        let resp = router
            .post("/v1/chat/completions", &chat_stream_body("m"))
            .await;
        assert_eq!(resp.status().as_u16(), 200);
        let text = resp.text().await.unwrap();
        assert!(
            text.contains("\"hel\"")
                && text.contains("\"lo\"")
                && text.ends_with("data: [DONE]\n\n"),
            "{text}"
        );
    }
    assert_eq!(
        up.connections(),
        1,
        "the stream's connection is reused after its end"
    );
}
