//! Self-tests of the mock upstream used by the other integration tests
//! (they talk to the mock directly, without the router).

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_records_and_honours_requests() {
    let mock = MockUpstream::start().await;
    let client = http_client();
    let url = format!("{}/v1/chat/completions?x=1", mock.url());

    let resp = client
        .post(&url)
        .bearer_auth("sk-a")
        .json(&chat_body("m"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["usage"]["total_tokens"], json!(12));

    // stream: true without include_usage → 3 chunks, no usage chunk.
    let start = Instant::now();
    let resp = client
        .post(&url)
        .json(&chat_stream_body("m"))
        .send()
        .await
        .unwrap();
    let sse = read_sse(resp, start, None, Duration::from_secs(5)).await;
    assert_eq!(sse.choice_chunks().len(), 3);
    assert!(sse.usage_chunks().is_empty());
    assert!(sse.has_done());

    // with include_usage → usage chunk.
    let body = json!({"model": "m", "stream": true, "stream_options": {"include_usage": true}});
    let resp = client.post(&url).json(&body).send().await.unwrap();
    let sse = read_sse(resp, Instant::now(), None, Duration::from_secs(5)).await;
    assert_eq!(sse.usage_chunks().len(), 1);

    let reqs = mock.requests();
    assert_eq!(reqs.len(), 3);
    assert_eq!(reqs[0].method, "POST");
    assert_eq!(reqs[0].path, "/v1/chat/completions?x=1");
    assert_eq!(reqs[0].bearer().as_deref(), Some("sk-a"));
    assert_eq!(reqs[0].model(), "m");
    assert_eq!(mock.bearers(), vec!["sk-a", "<none>", "<none>"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_scripted_replies_in_order() {
    let mock = MockUpstream::start().await;
    let client = http_client();
    let url = format!("{}/v1/chat/completions", mock.url());
    mock.push(Reply::error(500, "first").with_header("retry-after", "7"));
    mock.push(Reply::delay(
        Duration::from_millis(200),
        Reply::ok_with_usage(3),
    ));
    mock.set_default(Reply::error(418, "default"));

    let resp = client
        .post(&url)
        .json(&chat_body("m"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 500);
    assert_eq!(resp.headers()["retry-after"], "7");
    let start = Instant::now();
    let resp = client
        .post(&url)
        .json(&chat_body("m"))
        .send()
        .await
        .unwrap();
    assert!(start.elapsed() >= Duration::from_millis(180));
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["usage"]["total_tokens"], json!(3));
    let resp = client
        .post(&url)
        .json(&chat_body("m"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 418);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_stream_is_incremental_and_detects_disconnect() {
    let mock = MockUpstream::start().await;
    let client = http_client();
    let url = format!("{}/v1/chat/completions", mock.url());

    mock.push(Reply::stream(
        openai_stream(4, false, 0),
        Duration::from_millis(60),
    ));
    let start = Instant::now();
    let resp = client
        .post(&url)
        .json(&chat_body("m"))
        .send()
        .await
        .unwrap();
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let sse = read_sse(resp, start, None, Duration::from_secs(5)).await;
    let t: Vec<Duration> = sse.choice_chunks().iter().map(|(t, _)| *t).collect();
    assert_eq!(t.len(), 4);
    assert!(t[3] - t[0] >= Duration::from_millis(150), "{t:?}");
    assert_eq!(mock.streams_completed(), 1);

    mock.push(Reply::stream(
        openai_stream(100, false, 0),
        Duration::from_millis(30),
    ));
    let resp = client
        .post(&url)
        .json(&chat_body("m"))
        .send()
        .await
        .unwrap();
    let sse = read_sse(resp, Instant::now(), Some(2), Duration::from_secs(5)).await;
    assert_eq!(sse.events.len(), 2);
    assert!(mock.wait_stream_aborted(Duration::from_secs(2)).await);
    assert!(mock.events_sent() < 4 + 1 + 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_stream_cut_and_hangup_and_dead_url() {
    let mock = MockUpstream::start().await;
    let client = http_client();
    let url = format!("{}/v1/chat/completions", mock.url());

    let events: Vec<String> = openai_stream(5, false, 0).into_iter().take(2).collect();
    mock.push(Reply::StreamCut {
        events,
        interval: Duration::from_millis(20),
    });
    let resp = client
        .post(&url)
        .json(&chat_body("m"))
        .send()
        .await
        .unwrap();
    let sse = read_sse(resp, Instant::now(), None, Duration::from_secs(5)).await;
    assert_eq!(sse.content(), "c0 c1 ");
    assert!(
        sse.error.is_some(),
        "a cut stream ends with a transport error"
    );

    mock.push(Reply::Hangup);
    assert!(client
        .post(&url)
        .json(&chat_body("m"))
        .send()
        .await
        .is_err());

    let dead = format!("{}/v1/chat/completions", dead_url());
    assert!(client
        .post(&dead)
        .json(&chat_body("m"))
        .send()
        .await
        .is_err());
}
