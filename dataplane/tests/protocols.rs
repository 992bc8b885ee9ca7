//! One port serves HTTP/1.1 with keep-alive and HTTP/2 without TLS (h2c, prior knowledge).

mod common;

use common::*;
use serde_json::Value;

fn yaml() -> String {
    yaml_with(&[])
}

/// A mock credential, and `server` lines of its own.
fn yaml_with(server: &[&str]) -> String {
    server_yaml(0, server) + "credentials:\n  - name: m\n    type: mock\n    mock: {chunks: 3}\n"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_is_served() {
    let router = Router::start(&yaml()).await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for _ in 0..3 {
        let resp = client
            .post(router.url("/v1/chat/completions"))
            .bearer_auth(MASTER_KEY)
            .json(&chat_body("gpt-4o-mini"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.version(), reqwest::Version::HTTP_2);
        assert_eq!(resp.status().as_u16(), 200);
        assert!(resp.headers().contains_key("x-request-id"));
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["usage"]["total_tokens"], 30, "{v}");
    }
}

/// A raw TCP connection to the router's public listener.
async fn connect(router: &Router) -> tokio::net::TcpStream {
    tokio::net::TcpStream::connect(("127.0.0.1", router.port))
        .await
        .expect("connect to the router")
}

/// Writes `request` on `sock` and reads one whole answer (head, then `Content-Length` bytes);
/// `None` when the router closed the connection instead. The head is lowercased.
async fn exchange(sock: &mut tokio::net::TcpStream, request: &[u8]) -> Option<(String, Vec<u8>)> {
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    sock.write_all(request).await.ok()?;
    let mut buf = Vec::new();
    for _ in 0..100 {
        let mut chunk = [0u8; 4096];
        let read = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut chunk)).await;
        let n = read.expect("an answer or a close within 5 s").unwrap_or(0);
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .expect("content-length")
                .trim()
                .parse()
                .unwrap();
            if buf.len() >= end + 4 + len {
                return Some((head, buf[end + 4..end + 4 + len].to_vec()));
            }
        }
    }
    panic!("no whole answer in 100 reads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_keep_alive_serves_several_requests_on_one_socket() {
    let router = Router::start(&yaml()).await;
    let mut sock = connect(&router).await;
    let body = serde_json::to_string(&chat_body("gpt-4o-mini")).unwrap();
    for i in 0..3 {
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {MASTER_KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let Some((head, body)) = exchange(&mut sock, req.as_bytes()).await else {
            panic!("the router closed the connection after {i} responses");
        };
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(!head.contains("connection: close"), "{head}");
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["object"], "chat.completion");
    }
}

/// `GET /health` on `sock`: whether it was answered (200) rather than the connection closed.
async fn health_on(sock: &mut tokio::net::TcpStream) -> bool {
    let answer = exchange(sock, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await;
    answer.is_some_and(|(head, _)| head.starts_with("http/1.1 200"))
}

/// `server.idle_timeout` is how long a client connection may wait for its first or next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_connection_is_closed_after_idle_timeout() {
    use std::time::{Duration, Instant};
    use tokio::io::AsyncReadExt;
    let router = Router::start(&yaml_with(&["idle_timeout: 2s"])).await;
    let mut sock = connect(&router).await;
    assert!(health_on(&mut sock).await);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(health_on(&mut sock).await, "1.2 s idle is within 2 s");
    let idle_from = Instant::now();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(10), sock.read(&mut byte)).await;
    assert_eq!(
        read.expect("closed within 10 s").unwrap_or(0),
        0,
        "closed, not answered"
    );
    let idle = idle_from.elapsed();
    assert!(
        (Duration::from_millis(1800)..Duration::from_secs(5)).contains(&idle),
        "closed after {idle:?} idle, idle_timeout is 2 s"
    );

    // A connection that never sends a request gets the same time.
    let silent_from = Instant::now();
    let mut silent = connect(&router).await;
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut byte)).await;
    assert_eq!(read.expect("closed within 10 s").unwrap_or(0), 0);
    let idle = silent_from.elapsed();
    assert!(
        (Duration::from_millis(1800)..Duration::from_secs(5)).contains(&idle),
        "a silent connection closed after {idle:?}, idle_timeout is 2 s"
    );
}

/// A client that stops sending its body half-way gets a 408 once `idle_timeout` passes
/// without a byte, instead of holding its task and buffer for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_that_stalls_gets_408() {
    use std::time::{Duration, Instant};
    let router = Router::start(&yaml_with(&["idle_timeout: 1s"])).await;
    let mut sock = connect(&router).await;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {MASTER_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"model\":"
    );
    let sent = Instant::now();
    let (head, body) = exchange(&mut sock, head.as_bytes())
        .await
        .expect("an answer, not a silent close");
    let waited = sent.elapsed();
    assert!(head.starts_with("http/1.1 408"), "{head}");
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains("stalled") && body.contains("idle_timeout"),
        "{body}"
    );
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(5)).contains(&waited),
        "answered after {waited:?}, idle_timeout is 1 s"
    );
}

/// A client that sends part of the HTTP/2 preface and stops is closed after `idle_timeout`
/// like any silent client (the protocol is not known yet, but the clock runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_http2_preface_is_closed_after_idle_timeout() {
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let router = Router::start(&yaml_with(&["idle_timeout: 1s"])).await;
    let mut sock = connect(&router).await;
    let sent = Instant::now();
    sock.write_all(b"PRI * HTTP").await.unwrap();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(10), sock.read(&mut byte)).await;
    assert_eq!(read.expect("closed within 10 s").unwrap_or(0), 0);
    let after = sent.elapsed();
    assert!(
        (Duration::from_millis(800)..Duration::from_secs(5)).contains(&after),
        "closed after {after:?}, idle_timeout is 1 s"
    );
}

/// An HTTP/2 connection with no stream open for `idle_timeout` is closed (hyper keeps one
/// whose client answers pings for ever); one whose stream outlasts `idle_timeout` is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_but_not_while_a_stream_runs() {
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use std::time::{Duration, Instant};
    let router = Router::start(
        &(server_yaml(0, &["idle_timeout: 1s"])
            + "credentials:\n  - name: m\n    type: mock\n    mock: {chunks: 3, chunk_interval: 800ms}\n"),
    )
    .await;
    let tcp = connect(&router).await;
    let (mut send, conn) = hyper::client::conn::http2::handshake::<_, _, Full<bytes::Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let (ended_tx, ended) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _ = conn.await;
        let _ = ended_tx.send(Instant::now());
    });

    // A stream of 3 chunks 800 ms apart: 2.4 s on a connection with a 1 s idle_timeout.
    let body = serde_json::to_vec(&chat_stream_body("gpt-4o-mini")).unwrap();
    let req = hyper::Request::post(router.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {MASTER_KEY}"))
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let started = Instant::now();
    let text = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .expect("the stream finished within 10 s")
        .expect("the stream ran to its end")
        .to_bytes();
    assert!(started.elapsed() > Duration::from_millis(1500));
    assert!(String::from_utf8_lossy(&text).contains("[DONE]"));

    // Then nothing: the router closes the connection about 1 s after the stream ended.
    let idle_from = Instant::now();
    let ended_at = tokio::time::timeout(Duration::from_secs(10), ended)
        .await
        .expect("closed within 10 s")
        .unwrap();
    let idle = ended_at.saturating_duration_since(idle_from);
    assert!(
        (Duration::from_millis(500)..Duration::from_secs(5)).contains(&idle),
        "closed after {idle:?} idle, idle_timeout is 1 s (at once: the stream did not hold it open)"
    );
}

/// One established IPv4 socket as `/proc/net/tcp` shows it.
#[derive(Clone, Copy, Debug)]
struct TcpRow {
    local_port: u16,
    remote_port: u16,
    /// The kernel's `tr` column: 2 while the keep-alive timer is pending, 0 with no timer.
    timer: u8,
    /// When that timer fires, in 1/100 s.
    when: u64,
}

/// The established sockets on 127.0.0.1 (state `01`), from `/proc/net/tcp`.
fn established() -> Vec<TcpRow> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let port = |addr: &str| u16::from_str_radix(addr.split(':').nth(1)?, 16).ok();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.get(3) != Some(&"01") {
                return None;
            }
            let (timer, when) = f.get(5)?.split_once(':')?;
            Some(TcpRow {
                local_port: port(f[1])?,
                remote_port: port(f[2])?,
                timer: timer.parse().ok()?,
                when: u64::from_str_radix(when, 16).ok()?,
            })
        })
        .collect()
}

/// A connection that dies without a FIN (a dropped NAT entry, a powered-off peer) is found by
/// TCP keep-alive on both sides: the router's socket to its client and to its upstream probe
/// after 60 s idle. `/proc/net/tcp` shows the pending keep-alive timer; the test client's own
/// socket, which does not ask for keep-alive, shows none — the check tells the two apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_and_upstream_sockets_use_tcp_keep_alive() {
    let mock = MockUpstream::start().await;
    let mock_port: u16 = mock.url().rsplit(':').next().unwrap().parse().unwrap();
    let yaml = server_yaml(0, &[])
        + &creds_yaml(&[cred("c1", "openai", "sk-c1", &mock.url(), &[])])
        + "models:\n  - name: gpt-4o\n";
    let router = Router::start(&yaml).await;
    let mut sock = connect(&router).await;
    let client_port = sock.local_addr().unwrap().port();
    let body = serde_json::to_string(&chat_body("gpt-4o")).unwrap();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {MASTER_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (head, _) = exchange(&mut sock, req.as_bytes())
        .await
        .expect("an answer");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(mock.count(), 1);

    // Both connections stay open: the client's is kept alive, the upstream's pooled. A socket
    // whose last bytes are not acknowledged yet shows its retransmit timer instead (1): read
    // again until that has passed, for at most 2 s.
    let find = |rows: &[TcpRow], local: Option<u16>, remote: u16| {
        *rows
            .iter()
            .find(|r| r.remote_port == remote && local.is_none_or(|l| r.local_port == l))
            .unwrap_or_else(|| panic!("no socket to port {remote} in {rows:?}"))
    };
    let mut rows = established();
    for _ in 0..100 {
        let routers = [(Some(router.port), client_port), (None, mock_port)];
        if routers.iter().all(|&(l, r)| find(&rows, l, r).timer != 1) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        rows = established();
    }
    let to_client = find(&rows, Some(router.port), client_port);
    let to_upstream = find(&rows, None, mock_port);
    let ours = find(&rows, Some(client_port), router.port);
    for (what, row) in [
        ("to the client", to_client),
        ("to the upstream", to_upstream),
    ] {
        assert_eq!(
            row.timer, 2,
            "the router's socket {what} has a keep-alive timer: {row:?}"
        );
        assert!(
            (30 * 100..=60 * 100).contains(&row.when),
            "it fires after the 60 s idle time: {row:?}"
        );
    }
    assert_eq!(
        ours.timer, 0,
        "the test client's socket has no timer: {ours:?}"
    );
}
