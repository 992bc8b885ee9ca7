//! One port serves HTTP/1.1 with keep-alive and HTTP/2 without TLS (h2c, prior knowledge).

mod common;

use common::*;
use serde_json::Value;

fn yaml() -> String {
    server_yaml(0, &[]) + "credentials:\n  - name: m\n    type: mock\n    mock: {chunks: 3}\n"
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_keep_alive_serves_several_requests_on_one_socket() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let router = Router::start(&yaml()).await;
    let mut sock = tokio::net::TcpStream::connect(("127.0.0.1", router.port))
        .await
        .unwrap();
    let body = serde_json::to_string(&chat_body("gpt-4o-mini")).unwrap();
    for i in 0..3 {
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {MASTER_KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        sock.write_all(req.as_bytes()).await.unwrap();
        // Read one whole response: headers, then Content-Length bytes of body.
        let mut buf = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let (head_end, len) = loop {
            assert!(
                std::time::Instant::now() < deadline,
                "response {i} incomplete"
            );
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut chunk))
                .await
                .unwrap()
                .unwrap();
            assert!(
                n > 0,
                "the router closed the connection after {i} responses"
            );
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                assert!(head.starts_with("http/1.1 200"), "{head}");
                assert!(!head.contains("connection: close"), "{head}");
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .expect("content-length")
                    .trim()
                    .parse()
                    .unwrap();
                if buf.len() >= end + 4 + len {
                    break (end + 4, len);
                }
            }
        };
        let v: Value = serde_json::from_slice(&buf[head_end..head_end + len]).unwrap();
        assert_eq!(v["object"], "chat.completion");
    }
}
