//! Router chaining: real router processes forwarding to each other through
//! `proxy` credentials (hop counting, request ids, remote model sync, remote
//! availability, loop refusal).

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// Router B's master key (what A's proxy credential sends as its api_key).
const B_KEY: &str = "sk-b-master-91c2d7";
/// How long a remote sync may take to show (interval 300 ms).
const SYNC_DEADLINE: Duration = Duration::from_secs(5);

/// `server:` section with the admin API, a 300 ms health sync and no provider
/// retries, for a router whose master key is `key`.
fn server(key: &str, extra: &[&str]) -> String {
    server_retries(key, 0, extra)
}

fn server_retries(key: &str, retries: u32, extra: &[&str]) -> String {
    let mut lines = vec!["health_sync_interval: 300ms"];
    lines.extend_from_slice(extra);
    admin_server_yaml(retries, &lines).replace(MASTER_KEY, key)
}

/// POST a chat completion with `x-request-id: <id>` (if given) → (status,
/// response x-request-id, body).
async fn chat_with_id(router: &Router, model: &str, id: Option<&str>) -> (u16, String, Value) {
    let mut req = router
        .client()
        .post(router.url("/v1/chat/completions"))
        .bearer_auth(router.master_key())
        .json(&chat_body(model));
    if let Some(id) = id {
        req = req.header("x-request-id", id);
    }
    let resp = req.send().await.expect("request to router");
    let status = resp.status().as_u16();
    let rid = resp
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = resp.json::<Value>().await.unwrap_or(Value::Null);
    (status, rid, body)
}

/// Upstream attempts a router made with credential `cred` (its metrics).
async fn attempts(router: &Router, cred: &str) -> f64 {
    metric_sum(
        &router.admin_metrics().await,
        "auto_ai_router_requests_total",
        &[("credential", cred)],
    )
}

/// Every header value a recorded request carries, as one string.
fn all_header_values(rec: &Recorded) -> String {
    rec.headers
        .iter()
        .map(|(k, v)| format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())))
        .collect()
}

// ---------------------------------------------------------------------------
// (1) A's rate-limited primary falls back to router B
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_through_router_b_keeps_request_id_and_swaps_keys() {
    let x = MockUpstream::start().await;
    let y = MockUpstream::start().await;
    let b = Router::start_with(
        &(server(B_KEY, &[]) + &creds_yaml(&[cred("y", "openai", "sk-y", &y.url(), &[])])),
        StartOpts::default().master_key(B_KEY),
    )
    .await;
    let a = Router::start(
        &(server(MASTER_KEY, &[])
            + &creds_yaml(&[
                cred("c1", "openai", "sk-c1", &x.url(), &["rpm: 1"]),
                cred("p1", "proxy", B_KEY, &b.url(""), &["is_fallback: true"]),
            ])),
    )
    .await;

    // First request: A's primary, upstream X.
    let (status, rid, body) = chat_with_id(&a, "gpt-4o", Some("req-chain-1")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(rid, "req-chain-1", "x-request-id returned to the client");
    assert_eq!(x.bearers(), vec!["sk-c1"]);
    let rx = &x.requests()[0];
    assert_eq!(rx.header("x-request-id").as_deref(), Some("req-chain-1"));
    assert_eq!(
        rx.header("x-airouter-hops"),
        None,
        "no hop header to openai"
    );
    assert_eq!(y.count(), 0);

    // Second request: c1 is at rpm 1 → A's fallback proxy → router B → upstream Y.
    let (status, rid, body) = chat_with_id(&a, "gpt-4o", Some("req-chain-2")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        json!("Hello from the mock upstream")
    );
    assert_eq!(rid, "req-chain-2");
    assert_eq!(x.count(), 1);
    assert_eq!(y.count(), 1, "the fallback must reach Y via B");
    let ry = &y.requests()[0];
    assert_eq!(
        ry.bearer().as_deref(),
        Some("sk-y"),
        "Y sees B's credential key"
    );
    assert_eq!(ry.header("x-request-id").as_deref(), Some("req-chain-2"));
    assert_eq!(
        ry.header("x-airouter-hops"),
        None,
        "B forwards to an openai credential without the hop header"
    );
    let headers = all_header_values(ry);
    for secret in [MASTER_KEY, B_KEY, "sk-c1"] {
        assert!(!headers.contains(secret), "Y received {secret}:\n{headers}");
    }
    assert_eq!(ry.model(), "gpt-4o");
    assert_eq!(attempts(&a, "p1").await, 1.0);
    assert_eq!(attempts(&b, "y").await, 1.0);

    // Without a client id, A makes one; the same id reaches Y and comes back.
    let (status, rid, _) = chat_with_id(&a, "gpt-4o", None).await;
    assert_eq!(status, 200);
    assert_eq!(rid.len(), 36, "a UUID: {rid:?}");
    assert_eq!(y.count(), 2);
    assert_eq!(y.requests()[1].header("x-request-id"), Some(rid.clone()));

    // A stream through the chain arrives whole.
    let start = Instant::now();
    let resp = a
        .client()
        .post(a.url("/v1/chat/completions"))
        .bearer_auth(a.master_key())
        .header("x-request-id", "req-chain-stream")
        .json(&chat_stream_body("gpt-4o"))
        .send()
        .await
        .expect("stream request");
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("req-chain-stream")
    );
    let sse = read_sse(resp, start, None, Duration::from_secs(5)).await;
    assert!(sse.error.is_none() && !sse.timed_out, "{sse:?}");
    assert!(sse.has_done(), "raw:\n{}", sse.raw);
    assert_eq!(sse.content(), "c0 c1 c2 ");
    assert_eq!(y.count(), 3);
    assert_eq!(
        y.requests()[2].header("x-request-id").as_deref(),
        Some("req-chain-stream")
    );
}

// ---------------------------------------------------------------------------
// (1b) The hop header
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_forward_increments_hops_and_max_hops_refuses() {
    let z = MockUpstream::start().await;
    let a = Router::start(
        &(server(MASTER_KEY, &["max_hops: 5"])
            + &creds_yaml(&[cred("p", "proxy", "sk-z", &z.url(), &[])])),
    )
    .await;
    let send = |hops: Option<&'static str>| {
        let mut req = a
            .client()
            .post(a.url("/v1/chat/completions"))
            .bearer_auth(a.master_key())
            .json(&chat_body("gpt-4o"));
        if let Some(h) = hops {
            req = req.header("x-airouter-hops", h);
        }
        req.send()
    };

    let resp = send(None).await.expect("request");
    assert_eq!(resp.status().as_u16(), 200);
    let resp = send(Some("2")).await.expect("request");
    assert_eq!(resp.status().as_u16(), 200);
    let resp = send(Some("4")).await.expect("request");
    assert_eq!(resp.status().as_u16(), 200);
    let hops: Vec<Option<String>> = z
        .requests()
        .iter()
        .map(|r| r.header("x-airouter-hops"))
        .collect();
    let want = |s: &str| Some(s.to_string());
    assert_eq!(hops, vec![want("1"), want("3"), want("5")]);
    assert_eq!(z.bearers(), vec!["sk-z"; 3]);

    // hops >= max_hops: refused locally with 508, nothing forwarded.
    for h in ["5", "9"] {
        let resp = send(Some(h)).await.expect("request");
        assert_eq!(resp.status().as_u16(), 508, "hops {h}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(error_of(&v).2, Some("loop_detected"), "{v}");
    }
    assert_eq!(z.count(), 3);

    // The health sync reads the remote's /health and /v1/models with the proxy's key.
    let deadline = Instant::now() + SYNC_DEADLINE;
    let synced = |path: &str| {
        z.all_requests()
            .iter()
            .any(|r| r.method == "GET" && r.path == path && r.bearer().as_deref() == Some("sk-z"))
    };
    for _ in 0..200 {
        if (synced("/health") && synced("/v1/models")) || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let gets: Vec<(String, Option<String>)> = z
        .all_requests()
        .iter()
        .filter(|r| r.method == "GET")
        .map(|r| (r.path.clone(), r.bearer()))
        .collect();
    assert!(
        synced("/health") && synced("/v1/models"),
        "sync GETs with Bearer sk-z expected: {gets:?}"
    );
    assert!(
        gets.iter().all(|(_, b)| b.as_deref() == Some("sk-z")),
        "{gets:?}"
    );

    // A router behind a proxy really receives hops = 1: with max_hops 1 it refuses.
    let y = MockUpstream::start().await;
    let b = Router::start_with(
        &(server(B_KEY, &["max_hops: 1"])
            + &creds_yaml(&[cred("y", "openai", "sk-y", &y.url(), &[])])),
        StartOpts::default().master_key(B_KEY),
    )
    .await;
    let a2 = Router::start(
        &(server(MASTER_KEY, &[]) + &creds_yaml(&[cred("p", "proxy", B_KEY, &b.url(""), &[])])),
    )
    .await;
    let resp = a2.chat("gpt-4o").await;
    assert_eq!(resp.status().as_u16(), 508);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(error_of(&v).2, Some("loop_detected"), "{v}");
    assert_eq!(y.count(), 0);
    // B itself (hops 0) still serves.
    assert_eq!(b.chat_status("gpt-4o").await, 200);
    assert_eq!(y.count(), 1);
}

// ---------------------------------------------------------------------------
// (2) Remote models are listed and routed to the proxy
// ---------------------------------------------------------------------------

/// Router B: one credential on `y`, and a model only B names.
async fn router_b_serving_only_on_b(y: &MockUpstream) -> Router {
    Router::start_with(
        &(server(B_KEY, &[])
            + &creds_yaml(&[cred("y", "openai", "sk-y", &y.url(), &[])])
            + "models:\n  - name: only-on-b\n"),
        StartOpts::default().master_key(B_KEY),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_models_are_listed_and_routed_through_the_proxy() {
    let x = MockUpstream::start().await;
    let y = MockUpstream::start().await;
    let b = router_b_serving_only_on_b(&y).await;
    let a = Router::start(
        &(server(MASTER_KEY, &[])
            + &creds_yaml(&[
                cred("c1", "openai", "sk-c1", &x.url(), &[]),
                cred("p1", "proxy", B_KEY, &b.url(""), &["is_fallback: true"]),
            ])
            + "models:\n  - name: gpt-4o\n"),
    )
    .await;

    let model_ids = |v: &Value| -> Vec<String> {
        v["data"]
            .as_array()
            .map(|d| {
                d.iter()
                    .filter_map(|m| m["id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let deadline = Instant::now() + SYNC_DEADLINE;
    let mut listed = Vec::new();
    for _ in 0..200 {
        let resp = a.get("/v1/models").await;
        assert_eq!(resp.status().as_u16(), 200);
        listed = model_ids(&resp.json().await.expect("models JSON"));
        if listed.iter().any(|m| m == "only-on-b") || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        listed.contains(&"only-on-b".to_string()),
        "A's /v1/models must list B's model after a sync: {listed:?}"
    );
    assert!(listed.contains(&"gpt-4o".to_string()), "{listed:?}");

    let (_, health) = a.health().await;
    let remote = &health["credentials"]["p1"]["remote"];
    assert_eq!(remote["reachable"], json!(true), "{health}");
    assert_eq!(remote["credentials_available"], json!(1), "{health}");
    assert!(remote["status"].is_string(), "{health}");
    assert!(
        remote["models"]
            .as_array()
            .is_some_and(|m| m.contains(&json!("only-on-b"))),
        "{health}"
    );
    // Never a key.
    assert!(!health.to_string().contains(B_KEY), "{health}");

    // A request for the remote-only model goes to B (and on to Y), never to X.
    let (status, _, body) = chat_with_id(&a, "only-on-b", Some("req-remote")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(x.count(), 0);
    assert_eq!(y.count(), 1);
    let ry = &y.requests()[0];
    assert_eq!(ry.model(), "only-on-b");
    assert_eq!(ry.bearer().as_deref(), Some("sk-y"));
    assert_eq!(ry.header("x-request-id").as_deref(), Some("req-remote"));

    // A's own model stays on A's own credential.
    assert_eq!(a.chat_status("gpt-4o").await, 200);
    assert_eq!(x.count(), 1);
    assert_eq!(y.count(), 1);

    // A model nobody serves is A's 404, nothing forwarded.
    let resp = a.chat("on-nobody").await;
    assert_eq!(resp.status().as_u16(), 404);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(error_of(&v).2, Some("model_not_found"), "{v}");
    assert_eq!(x.count() + y.count(), 2);
}

/// A remote that stops answering keeps the models it listed last: requests for them still go
/// to the proxy (and fail as a failed upstream does), never A's 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_that_stops_answering_keeps_its_models_routed() {
    let y = MockUpstream::start().await;
    let mut b = router_b_serving_only_on_b(&y).await;
    let a = Router::start(
        &(server(MASTER_KEY, &[])
            + &creds_yaml(&[cred("p1", "proxy", B_KEY, &b.url(""), &[])])
            + "models:\n  - name: gpt-4o\n"),
    )
    .await;
    let remote_models = |h: &Value| h["credentials"]["p1"]["remote"]["models"].clone();
    let listed = a
        .wait_health(SYNC_DEADLINE, |h| remote_models(h) == json!(["only-on-b"]))
        .await;
    assert!(listed, "A never synced B's models");
    assert_eq!(a.chat_status("only-on-b").await, 200);

    b.shutdown();
    let failed = a
        .wait_health(SYNC_DEADLINE, |h| {
            h["credentials"]["p1"]["remote"]["reachable"] == json!(false)
        })
        .await;
    assert!(failed, "A's sync never noticed B stopped");
    let (_, health) = a.health().await;
    assert_eq!(remote_models(&health), json!(["only-on-b"]), "{health}");
    let resp = a.chat("only-on-b").await;
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.unwrap();
    assert!(matches!(status, 502 | 503), "{status}: {v}");
    assert_ne!(error_of(&v).2, Some("model_not_found"), "{v}");
    let listed = a.get("/v1/models").await.json::<Value>().await.unwrap();
    assert!(listed.to_string().contains("only-on-b"), "{listed}");
    assert_eq!(y.count(), 1);
}

/// A mock playing a remote router that serves `model`, whose `/v1/models` answers only after
/// `delay`.
async fn slow_remote(model: &str, delay: Duration) -> MockUpstream {
    let r = MockUpstream::start().await;
    r.serve_get(
        "/health",
        Reply::json(
            200,
            json!({"status": "healthy", "credentials_available": 1, "total_credentials": 1}),
        ),
    );
    let models =
        json!({"object": "list", "data": [{"id": model, "object": "model", "owned_by": "r"}]});
    r.serve_get("/v1/models", Reply::delay(delay, Reply::json(200, models)));
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_model_is_served_while_the_first_sync_is_still_running() {
    const SLOW: Duration = Duration::from_secs(2);
    let r1 = slow_remote("only-on-r1", SLOW).await;
    let r2 = slow_remote("only-on-r2", SLOW).await;
    let config = |remotes: &[&MockUpstream]| {
        let creds: Vec<String> = remotes
            .iter()
            .enumerate()
            .map(|(i, r)| cred(&format!("p{i}"), "proxy", B_KEY, &r.url(), &[]))
            .collect();
        server(MASTER_KEY, &[]) + &creds_yaml(&creds) + "models:\n  - name: gpt-4o\n"
    };
    let a = Router::start_with(&config(&[&r1]), StartOpts::default().answering()).await;
    let readiness = |a: &Router| {
        let url = a.url("/health/readiness");
        let client = a.client().clone();
        async move {
            let resp = client.get(url).send().await.expect("readiness");
            let status = resp.status().as_u16();
            (
                status,
                resp.json::<Value>().await.unwrap()["status"].clone(),
            )
        }
    };

    // At start: not ready until the remote's models are known; a request for one of them
    // waits for the sync instead of getting a 404.
    assert_eq!(readiness(&a).await, (503, json!("starting")));
    assert_eq!(a.chat_status("only-on-r1").await, 200, "{}", a.logs());
    assert_eq!(r1.count(), 1);
    assert_eq!(readiness(&a).await, (200, json!("healthy")));

    // A pushed config with a new proxy: the pod stays ready, and the new remote's model and
    // its /v1/models entry wait for the new proxy's first sync in the same way.
    let (status, body) = a.push_config(&a.fill(&config(&[&r1, &r2]))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(readiness(&a).await.0, 200);
    let listed = a.get("/v1/models").await.json::<Value>().await.unwrap();
    assert!(listed.to_string().contains("only-on-r2"), "{listed}");
    assert_eq!(a.chat_status("only-on-r2").await, 200, "{}", a.logs());
    assert_eq!(r2.count(), 1);

    // A model no remote lists is still a 404 once every proxy is synced.
    assert_eq!(a.chat_status("nowhere").await, 404);
}

// ---------------------------------------------------------------------------
// (3) A → B → A loops are cut by max_hops
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loop_between_two_routers_is_refused_with_508() {
    const A_KEY: &str = MASTER_KEY;
    let a_ports = Ports::pick();
    let b = Router::start_with(
        &(server_retries(B_KEY, 2, &["max_hops: 5"])
            + &creds_yaml(&[cred("to_a", "proxy", A_KEY, &a_ports.url(), &[])])),
        StartOpts::default().master_key(B_KEY),
    )
    .await;
    let a = Router::start_with(
        &(server_retries(A_KEY, 2, &["max_hops: 5"])
            + &creds_yaml(&[cred("to_b", "proxy", B_KEY, &b.url(""), &[])])),
        StartOpts::default().ports(a_ports),
    )
    .await;

    let started = Instant::now();
    let resp = a.chat("gpt-4o").await;
    let took = started.elapsed();
    assert_eq!(resp.status().as_u16(), 508);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(error_of(&v).2, Some("loop_detected"), "{v}");
    assert!(took < Duration::from_secs(3), "refusal took {took:?}");

    // Hops 0..=5: A receives 0, 2, 4 and forwards each; B receives 1, 3 (forwarded)
    // and 5 (refused). At most max_hops forwards, max_hops + 1 requests received.
    let a_fwd = attempts(&a, "to_b").await;
    let b_fwd = attempts(&b, "to_a").await;
    assert!(
        (1.0..=3.0).contains(&a_fwd) && (0.0..=3.0).contains(&b_fwd),
        "forwards: A {a_fwd}, B {b_fwd}"
    );
    assert!(
        a_fwd + b_fwd <= 5.0,
        "more than max_hops forwards: A {a_fwd}, B {b_fwd}"
    );
    // Nothing keeps circling in the background.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(attempts(&a, "to_b").await, a_fwd);
    assert_eq!(attempts(&b, "to_a").await, b_fwd);
}

// ---------------------------------------------------------------------------
// (4) A skips a proxy whose remote reports nothing available
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_without_available_credentials_is_skipped_after_sync() {
    let y = MockUpstream::start().await;
    let b = Router::start_with(
        &(server(B_KEY, &[]) + &creds_yaml(&[cred("y", "openai", "sk-y", &y.url(), &["rpm: 1"])])),
        StartOpts::default().master_key(B_KEY),
    )
    .await;
    let a = Router::start(
        &(server(MASTER_KEY, &[]) + &creds_yaml(&[cred("p1", "proxy", B_KEY, &b.url(""), &[])])),
    )
    .await;

    // Through A to B: uses B's only request of the minute.
    assert_eq!(a.chat_status("gpt-4o").await, 200);
    assert_eq!(y.count(), 1);
    assert_eq!(attempts(&a, "p1").await, 1.0);

    // After A's next sync, A knows B has nothing available…
    let synced = a
        .wait_health(SYNC_DEADLINE, |h| {
            h["credentials"]["p1"]["remote"]["credentials_available"] == json!(0)
        })
        .await;
    assert!(
        synced,
        "A's /health never showed B's credentials_available: 0"
    );
    let (_, health) = a.health().await;
    assert_eq!(
        health["credentials"]["p1"]["remote"]["reachable"],
        json!(true),
        "{health}"
    );

    // …and answers 503 itself instead of forwarding.
    let b_metrics_before = b.admin_metrics().await;
    for _ in 0..2 {
        let resp = a.chat("gpt-4o").await;
        assert_eq!(resp.status().as_u16(), 503);
        let retry_after: u64 = resp.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(retry_after >= 1, "the next sync may change the answer");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(error_of(&v).2, Some("remote_unavailable"), "{v}");
    }
    assert_eq!(
        attempts(&a, "p1").await,
        1.0,
        "A forwarded to a remote with nothing available"
    );
    assert_eq!(y.count(), 1);
    let b_metrics = b.admin_metrics().await;
    for name in ["airouter_exhausted_total", "auto_ai_router_requests_total"] {
        assert_eq!(
            metric_sum(&b_metrics, name, &[]),
            metric_sum(&b_metrics_before, name, &[]),
            "B saw more requests ({name})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_model_at_its_limit_is_skipped_for_that_model_only() {
    let y = MockUpstream::start().await;
    let b = Router::start_with(
        &(server(B_KEY, &[])
            + &creds_yaml(&[cred("y", "openai", "sk-y", &y.url(), &[])])
            + "models:\n  - {name: m1, rpm: 1}\n  - {name: m2}\n"),
        StartOpts::default().master_key(B_KEY),
    )
    .await;
    let a = Router::start(
        &(server(MASTER_KEY, &[]) + &creds_yaml(&[cred("p1", "proxy", B_KEY, &b.url(""), &[])])),
    )
    .await;

    assert_eq!(a.chat_status("m1").await, 200);
    assert_eq!(y.count(), 1);
    let synced = a
        .wait_health(SYNC_DEADLINE, |h| {
            h["credentials"]["p1"]["remote"]["unavailable_models"]
                .as_array()
                .is_some_and(|m| m.contains(&json!("m1")))
        })
        .await;
    assert!(synced, "A's /health never showed m1 unavailable at B");

    let resp = a.chat("m1").await;
    assert_eq!(resp.status().as_u16(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    let v: Value = resp.json().await.unwrap();
    assert_eq!(error_of(&v).2, Some("remote_unavailable"), "{v}");
    assert_eq!(attempts(&a, "p1").await, 1.0, "m1 must not be forwarded");
    assert_eq!(y.count(), 1);

    // The other model still goes through.
    assert_eq!(a.chat_status("m2").await, 200);
    assert_eq!(y.count(), 2);
    assert_eq!(y.requests()[1].model(), "m2");
}
