//! Credential selection, model resolution, rewriting, hop handling and the
//! informational endpoints.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn three_creds(url: &str, c2_extra: &[&str]) -> String {
    creds_yaml(&[
        cred("c1", "openai", "sk-c1", url, &[]),
        cred("c2", "openai", "sk-c2", url, c2_extra),
        cred("c3", "openai", "sk-c3", url, &[]),
    ])
}

async fn send_n(router: &Router, model: &str, n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(router.chat_status(model).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_in_config_order() {
    let mock = MockUpstream::start().await;
    let yaml = server_yaml(0, &[]) + &three_creds(&mock.url(), &[]);
    let router = Router::start(&yaml).await;

    let statuses = send_n(&router, "gpt-4o", 4).await;
    assert_eq!(statuses, vec![200; 4]);
    assert_eq!(mock.bearers(), vec!["sk-c1", "sk-c2", "sk-c3", "sk-c1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_skips_rate_limited_credential() {
    let mock = MockUpstream::start().await;
    let yaml = server_yaml(0, &[]) + &three_creds(&mock.url(), &["rpm: 1"]);
    let router = Router::start(&yaml).await;

    // First round uses c2's only request of the minute.
    assert_eq!(send_n(&router, "gpt-4o", 3).await, vec![200; 3]);
    assert_eq!(mock.bearers(), vec!["sk-c1", "sk-c2", "sk-c3"]);

    // c2 is now rate-limited: it is skipped, the others alternate.
    assert_eq!(send_n(&router, "gpt-4o", 4).await, vec![200; 4]);
    assert_eq!(mock.bearers()[3..], ["sk-c1", "sk-c3", "sk-c1", "sk-c3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_model_has_its_own_cursor() {
    let mock = MockUpstream::start().await;
    let yaml = server_yaml(0, &[])
        + &creds_yaml(&[
            cred("c1", "openai", "sk-c1", &mock.url(), &[]),
            cred("c2", "openai", "sk-c2", &mock.url(), &[]),
        ])
        + "models:\n  - name: model-a\n  - name: model-b\n";
    let router = Router::start(&yaml).await;

    for model in [
        "model-a", "model-b", "model-a", "model-b", "model-a", "model-b",
    ] {
        assert_eq!(router.chat_status(model).await, 200, "model {model}");
    }
    let reqs = mock.requests();
    let order = |model: &str| -> Vec<String> {
        reqs.iter()
            .filter(|r| r.model() == model)
            .map(|r| r.bearer().unwrap_or_default())
            .collect()
    };
    assert_eq!(order("model-a"), vec!["sk-c1", "sk-c2", "sk-c1"]);
    assert_eq!(order("model-b"), vec!["sk-c1", "sk-c2", "sk-c1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallbacks_only_after_all_primaries_exhausted() {
    let mock = MockUpstream::start().await;
    let url = mock.url();
    let yaml = server_yaml(0, &[])
        + &creds_yaml(&[
            cred("fb1", "proxy", "sk-fb1", &url, &["is_fallback: true"]),
            cred("c1", "openai", "sk-c1", &url, &["rpm: 1"]),
            cred("fb2", "openai", "sk-fb2", &url, &["is_fallback: true"]),
            cred("c2", "openai", "sk-c2", &url, &["rpm: 1"]),
        ]);
    let router = Router::start(&yaml).await;

    assert_eq!(send_n(&router, "gpt-4o", 6).await, vec![200; 6]);
    assert_eq!(
        mock.bearers(),
        vec!["sk-c1", "sk-c2", "sk-fb1", "sk-fb2", "sk-fb1", "sk-fb2"],
        "primaries first (round-robin), then fallbacks round-robin"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_credentials_rate_limited_gives_503_with_retry_after() {
    let mock = MockUpstream::start().await;
    let yaml = server_yaml(0, &[])
        + &creds_yaml(&[
            cred("c1", "openai", "sk-c1", &mock.url(), &["rpm: 1"]),
            cred("c2", "openai", "sk-c2", &mock.url(), &["rpm: 1"]),
        ]);
    let router = Router::start(&yaml).await;

    assert_eq!(send_n(&router, "gpt-4o", 2).await, vec![200, 200]);
    let resp = router.chat("gpt-4o").await;
    assert_eq!(resp.status().as_u16(), 503);
    let ra = retry_after(&resp).expect("integer Retry-After header on 503");
    assert!(
        (1..=61).contains(&ra),
        "Retry-After {ra} should be within the 60 s window"
    );
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("application/json"), "content-type {ct}");
    let body: Value = resp.json().await.unwrap();
    let (msg, kind, code) = error_of(&body);
    assert_eq!(kind, "service_unavailable", "body {body}");
    assert_eq!(code, Some("all_credentials_rate_limited"), "body {body}");
    assert!(!msg.is_empty());
    assert!(body["error"].as_object().unwrap().contains_key("param"));
    assert_eq!(
        mock.count(),
        2,
        "the refused request must not reach an upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_model_is_404() {
    let mock = MockUpstream::start().await;
    let yaml = server_yaml(0, &[])
        + &creds_yaml(&[cred("c1", "openai", "sk-c1", &mock.url(), &[])])
        + "models:\n  - name: gpt-4o\n";
    let router = Router::start(&yaml).await;

    let resp = router.chat("no-such-model").await;
    assert_eq!(resp.status().as_u16(), 404);
    let body: Value = resp.json().await.unwrap();
    let (_, kind, code) = error_of(&body);
    assert_eq!(kind, "not_found_error", "body {body}");
    assert_eq!(code, Some("model_not_found"), "body {body}");
    assert_eq!(mock.count(), 0);

    assert_eq!(router.chat_status("gpt-4o").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_credential_model_limit_applies_to_that_pair_only() {
    let mock = MockUpstream::start().await;
    let yaml = server_yaml(0, &[])
        + &creds_yaml(&[
            cred("c1", "openai", "sk-c1", &mock.url(), &[]),
            cred("c2", "openai", "sk-c2", &mock.url(), &[]),
        ])
        + "models:\n  - name: gpt-4o\n  - name: gpt-4o\n    credential: c1\n    rpm: 1\n  - name: other\n";
    let router = Router::start(&yaml).await;

    assert_eq!(send_n(&router, "gpt-4o", 4).await, vec![200; 4]);
    assert_eq!(mock.bearers(), vec!["sk-c1", "sk-c2", "sk-c2", "sk-c2"]);
    // c1 still serves the other model.
    assert_eq!(router.chat_status("other").await, 200);
    assert_eq!(mock.bearers()[4], "sk-c1");

    let (_, health) = router.health().await;
    assert_eq!(
        health["models"]["c1:gpt-4o"]["limit_rpm"],
        json!(1),
        "{health}"
    );
    assert_eq!(
        health["models"]["c1:gpt-4o"]["current_rpm"],
        json!(1),
        "{health}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_models_rpm_applies_to_listed_pairs() {
    let mock = MockUpstream::start().await;
    let yaml = server_yaml(0, &["default_models_rpm: 1"])
        + &creds_yaml(&[cred("c1", "openai", "sk-c1", &mock.url(), &[])])
        + "models:\n  - name: gpt-4o\n  - name: free\n    rpm: -1\n";
    let router = Router::start(&yaml).await;

    assert_eq!(send_n(&router, "gpt-4o", 2).await, vec![200, 503]);
    assert_eq!(send_n(&router, "free", 3).await, vec![200; 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alias_and_real_name_are_rewritten_upstream() {
    let mock = MockUpstream::start().await;
    let yaml = server_yaml(0, &[])
        + &creds_yaml(&[cred("c1", "openai", "sk-c1", &mock.url(), &[])])
        + "models:\n  - name: gpt-4o\n  - name: small\n    model: gpt-4o-mini-2024\n"
        + "model_alias:\n  fast: small\n";
    let router = Router::start(&yaml).await;

    let body = json!({"model": "fast", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.5});
    let resp = router.post("/v1/chat/completions", &body).await;
    assert_eq!(resp.status().as_u16(), 200);
    let body2 = json!({"model": "small", "messages": [{"role": "user", "content": "yo"}]});
    assert_eq!(
        router
            .post("/v1/chat/completions", &body2)
            .await
            .status()
            .as_u16(),
        200
    );

    let reqs = mock.requests();
    assert_eq!(reqs.len(), 2);
    let up0 = reqs[0].json();
    assert_eq!(
        up0["model"],
        json!("gpt-4o-mini-2024"),
        "alias → target → real name"
    );
    assert_eq!(up0["messages"], body["messages"]);
    assert_eq!(up0["temperature"], json!(0.5));
    assert_eq!(reqs[1].json()["model"], json!("gpt-4o-mini-2024"));
    assert_eq!(reqs[0].path, "/v1/chat/completions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_passes_through_byte_identical_and_keys_are_swapped() {
    let mock = MockUpstream::start().await;
    // base_url with a trailing /v1 must not double the prefix.
    let base = format!("{}/v1", mock.url());
    let yaml = server_yaml(0, &[]) + &creds_yaml(&[cred("c1", "openai", "sk-c1", &base, &[])]);
    let router = Router::start(&yaml).await;

    let raw = "{\"model\":\"gpt-4o\",   \"messages\":[{\"role\":\"user\",\"content\":\"h\u{e9}llo\"}],\n \"temperature\":0.50 ,\"n\":1}";
    let resp = router
        .client()
        .post(router.url("/v1/chat/completions?trace=1"))
        .bearer_auth(MASTER_KEY)
        .header("content-type", "application/json")
        .body(raw)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let out: Value = resp.json().await.unwrap();
    assert_eq!(out["usage"]["total_tokens"], json!(12));

    let reqs = mock.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.method, "POST");
    assert!(
        r.path.starts_with("/v1/chat/completions"),
        "path {}",
        r.path
    );
    assert_eq!(
        r.body.as_ref(),
        raw.as_bytes(),
        "body must be forwarded byte-identical"
    );
    assert_eq!(r.header("authorization").as_deref(), Some("Bearer sk-c1"));
    let all_headers = format!("{:?}", r.headers);
    assert!(
        !all_headers.contains(MASTER_KEY),
        "master key forwarded upstream: {all_headers}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_endpoints_are_forwarded() {
    let mock = MockUpstream::start().await;
    let yaml =
        server_yaml(0, &[]) + &creds_yaml(&[cred("c1", "openai", "sk-c1", &mock.url(), &[])]);
    let router = Router::start(&yaml).await;

    let paths = [
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/images/generations",
    ];
    for path in paths {
        let resp = router
            .post(
                path,
                &json!({"model": "gpt-4o", "input": "x", "prompt": "x"}),
            )
            .await;
        assert_eq!(resp.status().as_u16(), 200, "{path}");
    }
    let seen: Vec<String> = mock.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(seen, paths.to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_limit_refused_with_508() {
    let mock = MockUpstream::start().await;
    let yaml = server_yaml(0, &["max_hops: 5"])
        + &creds_yaml(&[cred("c1", "openai", "sk-c1", &mock.url(), &[])]);
    let router = Router::start(&yaml).await;

    let send = |hops: &'static str| {
        router
            .client()
            .post(router.url("/v1/chat/completions"))
            .bearer_auth(MASTER_KEY)
            .header("x-airouter-hops", hops)
            .json(&chat_body("gpt-4o"))
            .send()
    };
    let resp = send("5").await.unwrap();
    assert_eq!(resp.status().as_u16(), 508);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(error_of(&body).2, Some("loop_detected"), "body {body}");
    assert_eq!(mock.count(), 0);

    let resp = send("4").await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(mock.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_upstream_sees_incremented_hops() {
    let mock = MockUpstream::start().await;
    let keyless = MockUpstream::start().await;
    let yaml = server_yaml(0, &[])
        + &creds_yaml(&[cred("p1", "proxy", "sk-p1", &mock.url(), &[])])
        + &format!(
            "  - name: p2\n    type: proxy\n    base_url: \"{}\"\n    is_fallback: true\n",
            keyless.url()
        );
    let router = Router::start(&yaml).await;

    let resp = router
        .client()
        .post(router.url("/v1/chat/completions"))
        .bearer_auth(MASTER_KEY)
        .header("x-airouter-hops", "2")
        .json(&chat_body("gpt-4o"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(router.chat_status("gpt-4o").await, 200);

    let reqs = mock.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].header("x-airouter-hops").as_deref(), Some("3"));
    assert_eq!(reqs[1].header("x-airouter-hops").as_deref(), Some("1"));
    assert_eq!(
        reqs[0].header("authorization").as_deref(),
        Some("Bearer sk-p1")
    );
    assert_eq!(keyless.count(), 0);

    // max_hops defaults to 5.
    let resp = router
        .client()
        .post(router.url("/v1/chat/completions"))
        .bearer_auth(MASTER_KEY)
        .header("x-airouter-hops", "5")
        .json(&chat_body("gpt-4o"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 508);
    assert_eq!(mock.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_without_api_key_sends_no_authorization() {
    let mock = MockUpstream::start().await;
    let yaml = server_yaml(0, &[]) + &creds_yaml(&[cred("p1", "proxy", "", &mock.url(), &[])]);
    let router = Router::start(&yaml).await;

    assert_eq!(router.chat_status("gpt-4o").await, 200);
    let reqs = mock.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(
        reqs[0].header("authorization"),
        None,
        "headers {:?}",
        reqs[0].headers
    );
    assert_eq!(reqs[0].header("x-airouter-hops").as_deref(), Some("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_endpoint_lists_configured_names() {
    let mock = MockUpstream::start().await;
    let yaml = server_yaml(0, &[])
        + &creds_yaml(&[
            cred("c1", "openai", "sk-c1", &mock.url(), &[]),
            cred("c2", "openai", "sk-c2", &mock.url(), &[]),
        ])
        + "models:\n  - name: gpt-4o\n    rpm: 50\n  - name: gpt-4o\n    credential: c1\n    rpm: 2\n"
        + "  - name: small\n    model: gpt-4o-mini-2024\n"
        + "model_alias:\n  fast: small\n";
    let router = Router::start(&yaml).await;

    // No Authorization header at all.
    let resp = router.get("/v1/models").await;
    assert_eq!(resp.status().as_u16(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["object"], json!("list"));
    let data = body["data"].as_array().expect("data array");
    let mut ids: Vec<&str> = data.iter().map(|m| m["id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        vec!["gpt-4o", "small"],
        "distinct names, no aliases, no real names"
    );
    for m in data {
        assert_eq!(m["object"], json!("model"));
        assert_eq!(m["owned_by"], json!("system"));
        assert!(
            m["created"].is_u64() || m["created"].is_i64(),
            "created: {m}"
        );
    }
    assert_eq!(mock.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_credentials_and_limits() {
    let mock = MockUpstream::start().await;
    let yaml = server_yaml(0, &[])
        + &creds_yaml(&[
            cred(
                "c1",
                "openai",
                "sk-c1-health-secret",
                &mock.url(),
                &["rpm: 100", "tpm: -1"],
            ),
            cred(
                "fb",
                "proxy",
                "sk-fb-health-secret",
                &mock.url(),
                &["is_fallback: true"],
            ),
        ])
        + "models:\n  - name: gpt-4o\n    rpm: 50\n";
    let router = Router::start(&yaml).await;

    assert_eq!(router.chat_status("gpt-4o").await, 200);
    // TPM is charged after the response: give it a bounded moment.
    router
        .wait_health(Duration::from_secs(2), |h| {
            h["credentials"]["c1"]["current_tpm"] == json!(12)
        })
        .await;

    let resp = router.get("/health").await;
    assert_eq!(resp.status().as_u16(), 200);
    let text = resp.text().await.unwrap();
    for secret in ["sk-c1-health-secret", "sk-fb-health-secret", MASTER_KEY] {
        assert!(!text.contains(secret), "/health leaks a secret: {text}");
    }
    let h: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(h["status"], json!("healthy"));
    assert_eq!(h["total_credentials"], json!(2));
    assert_eq!(h["credentials_available"], json!(2));
    assert_eq!(h["credentials_banned"], json!(0));
    let c1 = &h["credentials"]["c1"];
    assert_eq!(c1["type"], json!("openai"));
    assert_eq!(c1["is_fallback"], json!(false));
    assert_eq!(c1["is_banned"], json!(false));
    assert_eq!(c1["current_rpm"], json!(1));
    assert_eq!(c1["current_tpm"], json!(12));
    assert_eq!(c1["limit_rpm"], json!(100));
    assert_eq!(c1["limit_tpm"], json!(-1));
    let fb = &h["credentials"]["fb"];
    assert_eq!(fb["type"], json!("proxy"));
    assert_eq!(fb["is_fallback"], json!(true));
    assert_eq!(fb["limit_rpm"], json!(-1));
    let pair = &h["models"]["c1:gpt-4o"];
    assert_eq!(pair["credential"], json!("c1"));
    assert_eq!(pair["model"], json!("gpt-4o"));
    assert_eq!(pair["is_banned"], json!(false));
    assert_eq!(pair["current_rpm"], json!(1));
    assert_eq!(pair["limit_rpm"], json!(50));
    assert_eq!(h["models"]["fb:gpt-4o"]["current_rpm"], json!(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_are_404() {
    let mock = MockUpstream::start().await;
    let yaml =
        server_yaml(0, &[]) + &creds_yaml(&[cred("c1", "openai", "sk-c1", &mock.url(), &[])]);
    let router = Router::start(&yaml).await;

    assert_eq!(router.get("/nope").await.status().as_u16(), 404);
    assert_eq!(router.get("/v1/unknown").await.status().as_u16(), 404);
    assert_eq!(
        router
            .post("/v2/chat/completions", &chat_body("gpt-4o"))
            .await
            .status()
            .as_u16(),
        404
    );
    let ready = router.get("/health/readiness").await;
    assert_eq!(ready.status().as_u16(), 200);
    let _: Value = ready.json().await.expect("readiness answers JSON");
    assert_eq!(mock.count(), 0);
}
