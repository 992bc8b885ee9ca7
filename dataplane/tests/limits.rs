//! Authentication, request validation and RPM/TPM limits.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_key_rejections() {
    let mock = MockUpstream::start().await;
    let yaml =
        server_yaml(0, &[]) + &creds_yaml(&[cred("c1", "openai", "sk-c1", &mock.url(), &[])]);
    let router = Router::start(&yaml).await;
    let url = router.url("/v1/chat/completions");
    let body = chat_body("gpt-4o");

    let cases: Vec<(Option<String>, &str)> = vec![
        (None, "Missing Authorization header"),
        (
            Some(format!("Basic {MASTER_KEY}")),
            "Invalid Authorization header format",
        ),
        (
            Some(MASTER_KEY.to_string()),
            "Invalid Authorization header format",
        ),
        (
            Some("Bearer sk-wrong-0000".to_string()),
            "Invalid master key",
        ),
    ];
    for (header, expected) in cases {
        let mut req = router.client().post(&url).json(&body);
        if let Some(h) = &header {
            req = req.header("authorization", h);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 401, "header {header:?}");
        let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.starts_with("application/json"), "content-type {ct}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(error_of(&v).0, expected, "header {header:?}: {v}");
        assert!(v["error"]["type"].is_string(), "{v}");
    }
    assert_eq!(
        mock.count(),
        0,
        "rejected requests must not reach an upstream"
    );
    assert_eq!(router.chat_status("gpt-4o").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_size_limit() {
    let mock = MockUpstream::start().await;
    let yaml = server_yaml(0, &["max_body_size_mb: 1"])
        + &creds_yaml(&[cred("c1", "openai", "sk-c1", &mock.url(), &[])]);
    let router = Router::start(&yaml).await;

    let limit = 1024 * 1024;
    let padded = |len: usize| {
        let head = "{\"model\":\"gpt-4o\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]";
        let mut s = String::with_capacity(len);
        s.push_str(head);
        s.push_str(&" ".repeat(len - head.len() - 1));
        s.push('}');
        assert_eq!(s.len(), len);
        s
    };

    let ok = router.post_raw("/v1/chat/completions", padded(limit)).await;
    assert_eq!(ok.status().as_u16(), 200, "exactly 1 MiB must be accepted");
    assert_eq!(mock.count(), 1);
    assert_eq!(mock.requests()[0].body.len(), limit);

    let too_big = router
        .post_raw("/v1/chat/completions", padded(limit + 1))
        .await;
    assert_eq!(too_big.status().as_u16(), 413);
    assert_eq!(
        mock.count(),
        1,
        "an oversized body must not reach an upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_field_is_required() {
    let mock = MockUpstream::start().await;
    let yaml =
        server_yaml(0, &[]) + &creds_yaml(&[cred("c1", "openai", "sk-c1", &mock.url(), &[])]);
    let router = Router::start(&yaml).await;

    for body in [
        json!({"messages": []}),
        json!({"model": 42, "messages": []}),
        json!({"model": null}),
    ] {
        let resp = router.post("/v1/chat/completions", &body).await;
        assert_eq!(resp.status().as_u16(), 400, "{body}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(error_of(&v).0, "model field is required", "{v}");
    }
    let resp = router.post_raw("/v1/chat/completions", "not json").await;
    assert_eq!(resp.status().as_u16(), 400);
    assert_eq!(mock.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpm_is_exact_under_concurrency() {
    let mock = MockUpstream::start().await;
    let url = mock.url();
    let yaml = server_yaml(0, &[])
        + &creds_yaml(&[
            cred("c1", "openai", "sk-c1", &url, &["rpm: 10"]),
            cred("c2", "openai", "sk-c2", &url, &["rpm: 10"]),
            cred("c3", "openai", "sk-c3", &url, &["rpm: 10"]),
        ]);
    let router = Arc::new(Router::start(&yaml).await);

    const TOTAL: usize = 200;
    const WORKERS: usize = 64;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..WORKERS {
        let router = router.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < TOTAL {
                statuses.push(router.chat_status("gpt-4o").await);
            }
            statuses
        }));
    }
    let mut ok = 0;
    let mut refused = 0;
    let mut other = Vec::new();
    for t in tasks {
        let statuses = tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("bounded")
            .expect("task");
        for s in statuses {
            match s {
                200 => ok += 1,
                503 => refused += 1,
                s => other.push(s),
            }
        }
    }
    assert!(other.is_empty(), "unexpected statuses {other:?}");
    assert_eq!(ok, 30, "3 credentials × rpm 10");
    assert_eq!(refused, TOTAL - 30);
    for key in ["sk-c1", "sk-c2", "sk-c3"] {
        assert_eq!(mock.count_bearer(key), 10, "{key}");
    }
    assert_eq!(mock.count(), 30);
}

async fn wait_tpm(router: &Router, cred: &str, at_least: i64) {
    // TPM is charged after the response; wait (bounded) for it to show.
    router
        .wait_health(Duration::from_secs(2), |h| {
            h["credentials"][cred]["current_tpm"].as_i64().unwrap_or(0) >= at_least
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_charged_from_usage_non_streamed() {
    let mock = MockUpstream::start().await;
    let yaml = server_yaml(0, &[])
        + &creds_yaml(&[cred("c1", "openai", "sk-c1", &mock.url(), &["tpm: 20"])]);
    let router = Router::start(&yaml).await;

    assert_eq!(router.chat_status("gpt-4o").await, 200);
    wait_tpm(&router, "c1", 12).await;
    assert_eq!(router.chat_status("gpt-4o").await, 200, "12 < 20: admitted");
    wait_tpm(&router, "c1", 24).await;
    let resp = router.chat("gpt-4o").await;
    assert_eq!(resp.status().as_u16(), 503, "24 ≥ 20: refused");
    assert!(retry_after(&resp).is_some_and(|s| s >= 1));
    let v: Value = resp.json().await.unwrap();
    assert_eq!(error_of(&v).2, Some("all_credentials_rate_limited"), "{v}");
    assert_eq!(mock.count(), 2);

    let (_, h) = router.health().await;
    assert_eq!(h["credentials"]["c1"]["current_tpm"], json!(24), "{h}");
    assert_eq!(h["credentials"]["c1"]["limit_tpm"], json!(20), "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_charged_from_usage_streamed() {
    let mock = MockUpstream::start().await;
    let yaml = server_yaml(0, &[])
        + &creds_yaml(&[cred("c1", "openai", "sk-c1", &mock.url(), &["tpm: 20"])]);
    let router = Router::start(&yaml).await;

    for expected_tpm in [12, 24] {
        let start = std::time::Instant::now();
        let resp = router
            .post("/v1/chat/completions", &chat_stream_body("gpt-4o"))
            .await;
        assert_eq!(resp.status().as_u16(), 200);
        let sse = read_sse(resp, start, None, Duration::from_secs(5)).await;
        assert!(sse.has_done(), "stream should complete: {}", sse.raw);
        wait_tpm(&router, "c1", expected_tpm).await;
    }
    let resp = router
        .post("/v1/chat/completions", &chat_stream_body("gpt-4o"))
        .await;
    assert_eq!(resp.status().as_u16(), 503, "24 ≥ 20: refused");
    assert_eq!(mock.count(), 2);
    let (_, h) = router.health().await;
    assert_eq!(h["credentials"]["c1"]["current_tpm"], json!(24), "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_pair_tpm_from_models_section() {
    let mock = MockUpstream::start().await;
    let yaml = server_yaml(0, &[])
        + &creds_yaml(&[cred("c1", "openai", "sk-c1", &mock.url(), &[])])
        + "models:\n  - name: gpt-4o\n    credential: c1\n    tpm: 10\n  - name: other\n";
    let router = Router::start(&yaml).await;

    assert_eq!(router.chat_status("gpt-4o").await, 200);
    router
        .wait_health(Duration::from_secs(2), |h| {
            h["models"]["c1:gpt-4o"]["current_tpm"]
                .as_i64()
                .unwrap_or(0)
                >= 12
        })
        .await;
    assert_eq!(router.chat_status("gpt-4o").await, 503);
    assert_eq!(router.chat_status("other").await, 200);
}
