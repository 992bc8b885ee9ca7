//! The built-in `mock` credential type answers locally.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn mock_cred_yaml() -> String {
    server_yaml(0, &[])
        + "credentials:\n  - name: m\n    type: mock\n    mock:\n      latency: 0s\n      \
           chunk_interval: 20ms\n      chunks: 5\n      prompt_tokens: 10\n      completion_tokens: 20\n"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_credential_answers_chat() {
    let router = Router::start(&mock_cred_yaml()).await;
    let resp = router.chat("gpt-4o-mini").await;
    assert_eq!(resp.status().as_u16(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], json!("chat.completion"), "{v}");
    assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
    assert_eq!(
        v["choices"][0]["message"]["role"],
        json!("assistant"),
        "{v}"
    );
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}),
        "{v}"
    );
    let charged = router
        .wait_health(Duration::from_secs(2), |h| {
            h["credentials"]["m"]["current_tpm"] == json!(30)
        })
        .await;
    assert!(
        charged,
        "mock usage not charged: {}",
        router.health().await.1
    );
    let (_, h) = router.health().await;
    assert_eq!(h["credentials"]["m"]["type"], json!("mock"), "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_credential_streams() {
    let router = Router::start(&mock_cred_yaml()).await;

    // Without include_usage: content chunks and [DONE], no usage chunk.
    let start = Instant::now();
    let resp = router
        .post("/v1/chat/completions", &chat_stream_body("gpt-4o-mini"))
        .await;
    assert_eq!(resp.status().as_u16(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/event-stream"), "content-type {ct}");
    let sse = read_sse(resp, start, None, Duration::from_secs(5)).await;
    let with_content: Vec<Duration> = sse
        .choice_chunks()
        .iter()
        .filter(|(_, v)| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
        })
        .map(|(t, _)| *t)
        .collect();
    assert_eq!(with_content.len(), 5, "chunks: 5 — raw: {}", sse.raw);
    assert!(
        with_content[4] - with_content[0] >= Duration::from_millis(40),
        "mock chunks not spaced by chunk_interval: {with_content:?}"
    );
    assert!(sse.has_done(), "raw: {}", sse.raw);
    assert!(sse.usage_chunks().is_empty(), "raw: {}", sse.raw);
    for (_, v) in sse.choice_chunks() {
        assert_eq!(v["object"], json!("chat.completion.chunk"), "{v}");
    }

    // With include_usage: a final usage chunk with the configured tokens.
    let body = json!({"model": "gpt-4o-mini", "stream": true, "stream_options": {"include_usage": true},
                      "messages": [{"role": "user", "content": "hi"}]});
    let start = Instant::now();
    let resp = router.post("/v1/chat/completions", &body).await;
    assert_eq!(resp.status().as_u16(), 200);
    let sse = read_sse(resp, start, None, Duration::from_secs(5)).await;
    let usage = sse.usage_chunks();
    assert_eq!(usage.len(), 1, "raw: {}", sse.raw);
    assert_eq!(usage[0]["usage"]["total_tokens"], json!(30));
    assert!(sse.has_done());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_credential_answers_embeddings() {
    let router = Router::start(&mock_cred_yaml()).await;
    let resp = router
        .post(
            "/v1/embeddings",
            &json!({"model": "text-embedding-3-small", "input": "hello"}),
        )
        .await;
    assert_eq!(resp.status().as_u16(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], json!("list"), "{v}");
    let first = &v["data"][0];
    assert_eq!(first["object"], json!("embedding"), "{v}");
    let emb = first["embedding"].as_array().expect("embedding array");
    assert!(!emb.is_empty());
    assert!(emb.iter().all(Value::is_number), "{v}");
    assert!(v["usage"]["prompt_tokens"].is_u64(), "{v}");
}
