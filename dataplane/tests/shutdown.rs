//! Graceful shutdown on SIGTERM: readiness off at once, new connections served
//! during `shutdown_grace`, then the listener closes while in-flight requests
//! and streams run to completion, and the process exits 0.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio::task::JoinHandle;

/// A client that opens a new connection for every request (no pooling), so a
/// probe really tests whether the listener still accepts.
fn fresh_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .expect("reqwest client")
}

/// Start `n` streaming requests for `model`; returns their handles once every
/// one has its response headers (bounded by 10 s). `done` counts finished reads.
async fn start_streams(
    router: &Router,
    model: &str,
    n: usize,
    done: Arc<AtomicUsize>,
) -> Vec<JoinHandle<(u16, SseRead)>> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(n);
    let start = Instant::now();
    let mut handles = Vec::with_capacity(n);
    for _ in 0..n {
        let client = router.client().clone();
        let url = router.url("/v1/chat/completions");
        let key = router.master_key().to_string();
        let body = chat_stream_body(model);
        let tx = tx.clone();
        let done = done.clone();
        handles.push(tokio::spawn(async move {
            let resp = client
                .post(url)
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .expect("stream request");
            let status = resp.status().as_u16();
            let _ = tx.send(()).await;
            let sse = read_sse(resp, start, None, Duration::from_secs(15)).await;
            done.fetch_add(1, Ordering::SeqCst);
            (status, sse)
        }));
    }
    drop(tx);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for i in 0..n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(())) => {}
            other => panic!("only {i} of {n} streams started ({other:?})"),
        }
    }
    handles
}

/// Content chunks (non-empty `delta.content`) of a stream.
fn content_chunks(sse: &SseRead) -> usize {
    sse.choice_chunks()
        .iter()
        .filter(|(_, v)| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
        })
        .count()
}

/// Poll readiness on new connections until it answers 503 (→ time since `t0`).
async fn wait_not_ready(url: &str, t0: Instant, timeout: Duration) -> Option<Duration> {
    let client = fresh_client();
    let deadline = Instant::now() + timeout;
    for _ in 0..(timeout.as_millis() / 10 + 2) {
        if let Ok(resp) = client.get(url).send().await {
            if resp.status().as_u16() == 503 {
                return Some(t0.elapsed());
            }
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// Poll on new connections until a connection is refused (→ time since `t0`
/// and how many streams had finished by then).
async fn wait_refused(
    url: &str,
    t0: Instant,
    timeout: Duration,
    done: &AtomicUsize,
) -> Option<(Duration, usize)> {
    let client = fresh_client();
    let deadline = Instant::now() + timeout;
    for _ in 0..(timeout.as_millis() / 20 + 2) {
        let finished = done.load(Ordering::SeqCst);
        match client.get(url).send().await {
            Err(e) if e.is_connect() => return Some((t0.elapsed(), finished)),
            _ => {}
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_50_streams_serves_grace_and_exits_zero() {
    const STREAMS: usize = 50;
    const GRACE: Duration = Duration::from_millis(500);
    // 1 role chunk + 20 content chunks + finish chunk + [DONE], 50 ms apart ≈ 1.1 s.
    let yaml = server_yaml(0, &["shutdown_grace: 500ms", "shutdown_timeout: 10s"])
        + &creds_yaml(&[cred(
            "m",
            "mock",
            "",
            "",
            &["mock: {latency: 0s, chunk_interval: 50ms, chunks: 20}"],
        )]);
    let mut router = Router::start(&yaml).await;
    let ready_url = router.url("/health/readiness");
    let chat_url = router.url("/v1/chat/completions");

    let done = Arc::new(AtomicUsize::new(0));
    let streams = start_streams(&router, "gpt-4o", STREAMS, done.clone()).await;

    let t0 = Instant::now();
    router.signal("TERM");

    // Readiness turns 503 at once…
    let not_ready = wait_not_ready(&ready_url, t0, Duration::from_millis(300)).await;
    let not_ready = not_ready.unwrap_or_else(|| {
        panic!(
            "readiness not 503 within 300 ms of SIGTERM; logs:\n{}",
            router.logs()
        )
    });
    // …while a request on a new connection is still served during the grace.
    let sent_at = t0.elapsed();
    let resp = fresh_client()
        .post(&chat_url)
        .bearer_auth(router.master_key())
        .json(&chat_body("gpt-4o"))
        .send()
        .await;
    assert!(
        sent_at < GRACE,
        "test too slow: grace request sent {sent_at:?} after SIGTERM"
    );
    let resp = resp.unwrap_or_else(|e| panic!("request during the grace failed: {e}"));
    assert_eq!(resp.status().as_u16(), 200, "request during the grace");
    let _ = resp.bytes().await;

    // Then the listener closes, while streams are still running.
    let refused = wait_refused(&ready_url, t0, GRACE + Duration::from_secs(3), &done).await;
    let (refused_at, finished) =
        refused.unwrap_or_else(|| panic!("listener still accepting long after the grace"));
    assert!(
        refused_at >= GRACE,
        "listener closed {refused_at:?} after SIGTERM, before the {GRACE:?} grace"
    );

    // Every stream runs to its end.
    let mut failures = Vec::new();
    for (i, handle) in streams.into_iter().enumerate() {
        let (status, sse) = handle.await.expect("stream task");
        let chunks = content_chunks(&sse);
        if status != 200 || sse.error.is_some() || sse.timed_out || !sse.has_done() || chunks != 20
        {
            failures.push(format!(
                "stream {i}: status {status}, {chunks}/20 chunks, done {}, error {:?}, timed out {}",
                sse.has_done(),
                sse.error,
                sse.timed_out
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {STREAMS} streams cut:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        finished < STREAMS,
        "all streams had ended before the listener closed ({refused_at:?}); \
         the drain of in-flight streams was not exercised"
    );

    // The process exits 0 within grace + stream time + margin.
    let status = router
        .wait_exit(Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("airouter still running 5 s after the streams ended"));
    let exited_at = t0.elapsed();
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(
        exited_at < GRACE + Duration::from_millis(1100) + Duration::from_secs(3),
        "exit took {exited_at:?}"
    );
    eprintln!(
        "not ready after {not_ready:?}, refused after {refused_at:?} ({finished} streams done), \
         exited after {exited_at:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_proxied_upstream_streams_finish() {
    const STREAMS: usize = 10;
    let mock = MockUpstream::start().await;
    // 21 events, 60 ms apart ≈ 1.2 s per stream.
    mock.set_default(Reply::stream(
        openai_stream(20, false, 0),
        Duration::from_millis(60),
    ));
    let yaml = server_yaml(0, &["shutdown_grace: 200ms", "shutdown_timeout: 10s"])
        + &creds_yaml(&[cred("c1", "openai", "sk-c1", &mock.url(), &[])]);
    let mut router = Router::start(&yaml).await;

    let done = Arc::new(AtomicUsize::new(0));
    let streams = start_streams(&router, "gpt-4o", STREAMS, done.clone()).await;
    let t0 = Instant::now();
    router.signal("TERM");

    let want: String = (0..20).map(|i| format!("c{i} ")).collect();
    for (i, handle) in streams.into_iter().enumerate() {
        let (status, sse) = handle.await.expect("stream task");
        assert_eq!(status, 200, "stream {i}");
        assert!(
            sse.error.is_none() && !sse.timed_out,
            "stream {i} cut: {sse:?}"
        );
        assert!(sse.has_done(), "stream {i} without [DONE]");
        assert_eq!(sse.content(), want, "stream {i}");
    }
    assert!(
        t0.elapsed() > Duration::from_millis(200),
        "streams ended before the grace was over; nothing was drained"
    );
    assert_eq!(mock.streams_completed(), STREAMS);
    assert_eq!(
        mock.streams_aborted(),
        0,
        "the router dropped upstream streams"
    );
    let status = router
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("airouter did not exit");
    assert_eq!(status.code(), Some(0), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_router_serves_through_the_grace_then_exits_zero() {
    const GRACE: Duration = Duration::from_millis(800);
    let mock = MockUpstream::start().await;
    let yaml = server_yaml(0, &["shutdown_grace: 800ms", "shutdown_timeout: 10s"])
        + &creds_yaml(&[cred("c1", "openai", "sk-c1", &mock.url(), &[])]);
    let mut router = Router::start(&yaml).await;
    let ready_url = router.url("/health/readiness");
    let chat_url = router.url("/v1/chat/completions");

    let t0 = Instant::now();
    router.signal("TERM");
    assert!(
        wait_not_ready(&ready_url, t0, Duration::from_millis(300))
            .await
            .is_some(),
        "readiness not 503 after SIGTERM"
    );
    // Several requests on new connections across the grace period all succeed.
    let mut served = 0;
    for _ in 0..40 {
        if t0.elapsed() + Duration::from_millis(150) >= GRACE {
            break;
        }
        let resp = fresh_client()
            .post(&chat_url)
            .bearer_auth(router.master_key())
            .json(&chat_body("gpt-4o"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("request {:?} after SIGTERM failed: {e}", t0.elapsed()));
        assert_eq!(resp.status().as_u16(), 200);
        served += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served >= 3, "only {served} requests fit in the grace");
    assert_eq!(mock.count(), served);

    let status = router
        .wait_exit(GRACE + Duration::from_secs(2))
        .await
        .expect("airouter did not exit after the grace");
    let exited_at = t0.elapsed();
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(
        exited_at >= GRACE,
        "exited {exited_at:?} after SIGTERM, before the grace"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_timeout_bounds_the_drain() {
    // A 6 s stream, but only 200 ms grace + 1 s to drain: the router exits 0 anyway. The 1 s
    // comes with a pushed config: the drain uses the config current at SIGTERM.
    let yaml = |timeout: &str| {
        admin_server_yaml(0, &["shutdown_grace: 200ms", timeout])
            + &creds_yaml(&[cred(
                "m",
                "mock",
                "",
                "",
                &["mock: {latency: 0s, chunk_interval: 300ms, chunks: 20}"],
            )])
    };
    let mut router = Router::start(&yaml("shutdown_timeout: 30s")).await;
    let (status, body) = router
        .push_config(&router.fill(&yaml("shutdown_timeout: 1s")))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["warnings"],
        serde_json::json!([]),
        "applied at once: {body}"
    );
    let done = Arc::new(AtomicUsize::new(0));
    let streams = start_streams(&router, "gpt-4o", 1, done).await;
    let t0 = Instant::now();
    router.signal("TERM");
    let status = router
        .wait_exit(Duration::from_secs(4))
        .await
        .unwrap_or_else(|| panic!("still running 4 s after SIGTERM; logs:\n{}", router.logs()));
    let exited_at = t0.elapsed();
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(
        exited_at >= Duration::from_millis(1100),
        "exited after {exited_at:?}, before grace + shutdown_timeout"
    );
    for handle in streams {
        let (status, sse) = handle.await.expect("stream task");
        assert_eq!(status, 200);
        assert!(!sse.has_done(), "a 6 s stream cannot have finished");
    }
}
