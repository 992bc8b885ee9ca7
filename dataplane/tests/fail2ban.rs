//! Fail2ban (configured and default) and provider retries.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const MODELS: &str = "models:\n  - name: gpt-4o\n  - name: gpt-4o-mini\n";

fn pair_banned(h: &Value, pair: &str) -> Option<bool> {
    h["models"][pair]["is_banned"].as_bool()
}

async fn expect_503(router: &Router, model: &str) -> Value {
    let resp = router.chat(model).await;
    assert_eq!(resp.status().as_u16(), 503, "{model} should be refused");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(error_of(&v).1, "service_unavailable", "{v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail2ban_rule_bans_pair_and_expires() {
    let mock = MockUpstream::start().await;
    let yaml = server_yaml(0, &[])
        + "fail2ban:\n  max_attempts: 3\n  ban_duration: 1s\n  error_codes: [500, 429]\n  \
           error_code_rules:\n    - {code: 401, max_attempts: 1, ban_duration: 1s}\n"
        + &creds_yaml(&[cred("c1", "openai", "sk-c1", &mock.url(), &[])])
        + MODELS;
    let router = Router::start(&yaml).await;

    mock.push(Reply::error(401, "bad upstream key"));
    assert_eq!(router.chat_status("gpt-4o").await, 401);
    let banned_at = Instant::now();

    // One 401 reaches the rule's threshold: the pair is banned…
    let v = expect_503(&router, "gpt-4o").await;
    assert_eq!(error_of(&v).2, Some("all_credentials_banned"), "{v}");
    assert_eq!(mock.count(), 1);
    let (_, h) = router.health().await;
    assert_eq!(pair_banned(&h, "c1:gpt-4o"), Some(true), "{h}");
    assert_eq!(pair_banned(&h, "c1:gpt-4o-mini"), Some(false), "{h}");

    // …but only for that model.
    assert_eq!(router.chat_status("gpt-4o-mini").await, 200);
    assert_eq!(mock.count(), 2);

    // The ban lifts after ban_duration (1 s).
    let lifted = router
        .wait_health(Duration::from_secs(4), |h| {
            pair_banned(h, "c1:gpt-4o") == Some(false)
        })
        .await;
    assert!(lifted, "ban did not lift within 4 s");
    assert!(
        banned_at.elapsed() >= Duration::from_millis(900),
        "ban lifted too early"
    );
    assert_eq!(router.chat_status("gpt-4o").await, 200);
    assert_eq!(mock.count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail2ban_counts_each_code_separately_and_resets_on_expiry() {
    let mock = MockUpstream::start().await;
    let yaml = server_yaml(0, &[])
        + "fail2ban:\n  max_attempts: 3\n  ban_duration: 1s\n  error_codes: [500, 429]\n"
        + &creds_yaml(&[cred("c1", "openai", "sk-c1", &mock.url(), &[])])
        + MODELS;
    let router = Router::start(&yaml).await;

    // 2 × 500 and 2 × 429: four errors, but no code reached 3.
    for status in [500, 429, 500, 429] {
        mock.push(Reply::error(status, "upstream trouble"));
        assert_eq!(router.chat_status("gpt-4o").await, status);
    }
    assert_eq!(mock.count(), 4, "independent counters: nothing banned yet");
    let (_, h) = router.health().await;
    assert_eq!(pair_banned(&h, "c1:gpt-4o"), Some(false), "{h}");

    // Third 500 → banned.
    mock.push(Reply::error(500, "upstream trouble"));
    assert_eq!(router.chat_status("gpt-4o").await, 500);
    expect_503(&router, "gpt-4o").await;
    assert_eq!(mock.count(), 5);

    let lifted = router
        .wait_health(Duration::from_secs(4), |h| {
            pair_banned(h, "c1:gpt-4o") == Some(false)
        })
        .await;
    assert!(lifted, "ban did not lift within 4 s");

    // The expired ban took its counters with it: two more 500s do not ban.
    for _ in 0..2 {
        mock.push(Reply::error(500, "upstream trouble"));
        assert_eq!(router.chat_status("gpt-4o").await, 500);
    }
    assert_eq!(router.chat_status("gpt-4o").await, 200);
    assert_eq!(mock.count(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail2ban_success_resets_counters() {
    let mock = MockUpstream::start().await;
    let yaml = server_yaml(0, &[])
        + "fail2ban:\n  max_attempts: 3\n  ban_duration: 5s\n  error_codes: [500]\n"
        + &creds_yaml(&[cred("c1", "openai", "sk-c1", &mock.url(), &[])])
        + MODELS;
    let router = Router::start(&yaml).await;

    for status in [500, 500, 200, 500, 500, 200] {
        if status != 200 {
            mock.push(Reply::error(status, "boom"));
        }
        assert_eq!(router.chat_status("gpt-4o").await, status);
    }
    assert_eq!(mock.count(), 6);
    // Three in a row now do ban.
    for _ in 0..3 {
        mock.push(Reply::error(500, "boom"));
        assert_eq!(router.chat_status("gpt-4o").await, 500);
    }
    expect_503(&router, "gpt-4o").await;
    assert_eq!(mock.count(), 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail2ban_permanent_ban_stays() {
    let mock = MockUpstream::start().await;
    let yaml = server_yaml(0, &[])
        + "fail2ban:\n  max_attempts: 1\n  ban_duration: permanent\n  error_codes: [403]\n"
        + &creds_yaml(&[
            cred("c1", "openai", "sk-c1", &mock.url(), &[]),
            cred("c2", "openai", "sk-c2", &mock.url(), &[]),
        ])
        + MODELS;
    let router = Router::start(&yaml).await;

    mock.push(Reply::error(403, "forbidden"));
    assert_eq!(router.chat_status("gpt-4o").await, 403);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for _ in 0..3 {
        assert_eq!(router.chat_status("gpt-4o").await, 200);
    }
    assert_eq!(mock.bearers(), vec!["sk-c1", "sk-c2", "sk-c2", "sk-c2"]);
    let (_, h) = router.health().await;
    assert_eq!(pair_banned(&h, "c1:gpt-4o"), Some(true), "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_fail2ban_bans_after_three_401() {
    let mock = MockUpstream::start().await;
    let yaml = server_yaml(0, &[])
        + &creds_yaml(&[cred("c1", "openai", "sk-c1", &mock.url(), &[])])
        + MODELS;
    let router = Router::start(&yaml).await;

    for _ in 0..3 {
        mock.push(Reply::error(401, "invalid api key"));
        assert_eq!(router.chat_status("gpt-4o").await, 401);
    }
    assert_eq!(mock.count(), 3, "the third 401 still reached the upstream");
    let resp = router.chat("gpt-4o").await;
    assert_eq!(resp.status().as_u16(), 503);
    let ra = retry_after(&resp).expect("Retry-After for a temporary ban");
    assert!((1..=301).contains(&ra), "Retry-After {ra} for a 5 min ban");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(error_of(&v).2, Some("all_credentials_banned"), "{v}");
    assert_eq!(mock.count(), 3);
    assert_eq!(
        router.chat_status("gpt-4o-mini").await,
        200,
        "other model unaffected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_429_cools_down_for_upstream_retry_after() {
    let mock = MockUpstream::start().await;
    let yaml = server_yaml(0, &[])
        + &creds_yaml(&[cred("c1", "openai", "sk-c1", &mock.url(), &[])])
        + MODELS;
    let router = Router::start(&yaml).await;

    mock.push(Reply::error(429, "slow down").with_header("retry-after", "1"));
    assert_eq!(router.chat_status("gpt-4o").await, 429);
    let cooled_at = Instant::now();

    let resp = router.chat("gpt-4o").await;
    assert_eq!(resp.status().as_u16(), 503, "cooling down");
    let ra = retry_after(&resp).expect("Retry-After during cool-down");
    assert!((1..=2).contains(&ra), "Retry-After {ra}, upstream said 1");
    let v: Value = resp.json().await.unwrap();
    let code = error_of(&v).2.unwrap_or("").to_string();
    assert!(
        [
            "all_credentials_rate_limited",
            "all_credentials_banned",
            "no_credentials_available"
        ]
        .contains(&code.as_str()),
        "{v}"
    );
    assert_eq!(mock.count(), 1);

    // Poll (bounded) until the pair is served again.
    let mut served = false;
    for _ in 0..40 {
        if router.chat_status("gpt-4o").await == 200 {
            served = true;
            break;
        }
        if cooled_at.elapsed() > Duration::from_secs(4) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served, "cool-down did not end within 4 s");
    assert!(
        cooled_at.elapsed() >= Duration::from_millis(900),
        "cool-down ended too early"
    );
    assert_eq!(
        mock.count(),
        2,
        "requests refused during the cool-down never reach the upstream"
    );
}

/// A provider's `Retry-After` is taken at its word only up to an hour: a far-off value must
/// not park the key for years, and one past the clock's range must not fail the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_far_off_upstream_retry_after_cools_down_for_an_hour_at_most() {
    let mock = MockUpstream::start().await;
    let yaml = server_yaml(0, &[])
        + &creds_yaml(&[cred("c1", "openai", "sk-c1", &mock.url(), &[])])
        + MODELS;
    let router = Router::start(&yaml).await;

    for (model, asked) in [("gpt-4o", u64::MAX), ("gpt-4o-mini", 31_536_000)] {
        mock.push(Reply::error(429, "slow down").with_header("retry-after", &asked.to_string()));
        assert_eq!(
            router.chat_status(model).await,
            429,
            "{model}: the 429 is passed on"
        );
        let resp = router.chat(model).await;
        assert_eq!(resp.status().as_u16(), 503, "{model}: cooling down");
        let ra = retry_after(&resp).expect("Retry-After during cool-down");
        assert!(
            (3590..=3600).contains(&ra),
            "{model}: Retry-After {ra}, the upstream said {asked}"
        );
    }
    assert_eq!(mock.count(), 2);
}

// ---------------------------------------------------------------------------
// Retries
// ---------------------------------------------------------------------------

fn two_creds(retries: u32, url1: &str, url2: &str) -> String {
    server_yaml(retries, &[])
        + &creds_yaml(&[
            cred("c1", "openai", "sk-c1", url1, &[]),
            cred("c2", "openai", "sk-c2", url2, &[]),
        ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_next_credential_on_500() {
    let mock = MockUpstream::start().await;
    let router = Router::start(&two_creds(2, &mock.url(), &mock.url())).await;

    mock.push(Reply::error(500, "internal"));
    let resp = router.chat("gpt-4o").await;
    assert_eq!(resp.status().as_u16(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["usage"]["total_tokens"], json!(12));
    assert_eq!(mock.bearers(), vec!["sk-c1", "sk-c2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_next_credential_on_429() {
    let mock = MockUpstream::start().await;
    let router = Router::start(&two_creds(2, &mock.url(), &mock.url())).await;

    mock.push(Reply::error(429, "rate limited"));
    assert_eq!(router.chat_status("gpt-4o").await, 200);
    assert_eq!(mock.bearers(), vec!["sk-c1", "sk-c2"]);
}

/// Out of attempts, the client gets the last answer an upstream gave (its status, body and
/// `Retry-After`), not the connection failure of a later attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_retries_the_last_upstream_answer_wins_over_a_later_connect_failure() {
    let mock = MockUpstream::start().await;
    let router = Router::start(&two_creds(1, &mock.url(), &dead_url())).await;

    mock.push(Reply::error(429, "slow down").with_header("retry-after", "20"));
    let resp = router.chat("gpt-4o").await;
    assert_eq!(resp.status().as_u16(), 429);
    assert_eq!(retry_after(&resp), Some(20));
    let v: Value = resp.json().await.unwrap();
    assert_eq!(error_of(&v).0, "slow down", "{v}");
    assert_eq!(mock.bearers(), vec!["sk-c1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_next_credential_on_connection_refused() {
    let mock = MockUpstream::start().await;
    let router = Router::start(&two_creds(2, &dead_url(), &mock.url())).await;

    for _ in 0..2 {
        assert_eq!(router.chat_status("gpt-4o").await, 200);
    }
    assert_eq!(mock.bearers(), vec!["sk-c2", "sk-c2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_next_credential_on_401_and_403() {
    let mock = MockUpstream::start().await;
    let url = mock.url();
    let yaml = server_yaml(2, &[])
        + &creds_yaml(&[
            cred("c1", "openai", "sk-c1", &url, &[]),
            cred("c2", "openai", "sk-c2", &url, &[]),
            cred("c3", "openai", "sk-c3", &url, &[]),
        ]);
    let router = Router::start(&yaml).await;

    mock.push(Reply::error(401, "invalid key"));
    mock.push(Reply::error(403, "forbidden"));
    assert_eq!(router.chat_status("gpt-4o").await, 200);
    assert_eq!(mock.bearers(), vec!["sk-c1", "sk-c2", "sk-c3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attempt_reserves_rpm() {
    let mock = MockUpstream::start().await;
    let url = mock.url();
    let yaml = server_yaml(1, &[])
        + &creds_yaml(&[
            cred("c1", "openai", "sk-c1", &url, &["rpm: 1"]),
            cred("c2", "openai", "sk-c2", &url, &["rpm: 10"]),
        ]);
    let router = Router::start(&yaml).await;

    mock.push(Reply::error(500, "internal"));
    assert_eq!(router.chat_status("gpt-4o").await, 200);
    let (_, h) = router.health().await;
    assert_eq!(h["credentials"]["c1"]["current_rpm"], json!(1), "{h}");
    assert_eq!(h["credentials"]["c2"]["current_rpm"], json!(1), "{h}");
    // c1's only request of the minute went to the failed attempt.
    assert_eq!(router.chat_status("gpt-4o").await, 200);
    assert_eq!(mock.bearers(), vec!["sk-c1", "sk-c2", "sk-c2"]);
}

/// With no upstream answer at all, only connection failures, the client gets our 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_transport_errors_give_502() {
    let router = Router::start(&two_creds(1, &dead_url(), &dead_url())).await;
    let resp = router.chat("gpt-4o").await;
    assert_eq!(resp.status().as_u16(), 502);
    let v: Value = resp.json().await.expect("JSON error body");
    assert!(v["error"]["message"].is_string(), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_on_hangup_then_fallback() {
    let mock = MockUpstream::start().await;
    let yaml = server_yaml(1, &[])
        + &creds_yaml(&[
            cred("c1", "openai", "sk-c1", &mock.url(), &[]),
            cred("fb", "openai", "sk-fb", &mock.url(), &["is_fallback: true"]),
        ]);
    let router = Router::start(&yaml).await;

    mock.push(Reply::Hangup);
    assert_eq!(router.chat_status("gpt-4o").await, 200);
    assert_eq!(mock.bearers(), vec!["sk-c1", "sk-fb"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_upstream_error_returned_when_attempts_run_out() {
    let mock = MockUpstream::start().await;
    let url = mock.url();
    let yaml = server_yaml(1, &[])
        + &creds_yaml(&[
            cred("c1", "openai", "sk-c1", &url, &[]),
            cred("c2", "openai", "sk-c2", &url, &[]),
            cred("c3", "openai", "sk-c3", &url, &[]),
        ]);
    let router = Router::start(&yaml).await;

    let second =
        r#"{"error":{"message":"second upstream failure","type":"server_error","code":"x-2"}}"#;
    mock.push(Reply::error(500, "first upstream failure"));
    mock.push(Reply::Json {
        status: 503,
        body: second.to_string(),
        headers: vec![],
    });
    let resp = router.chat("gpt-4o").await;
    assert_eq!(resp.status().as_u16(), 503);
    assert_eq!(
        resp.text().await.unwrap(),
        second,
        "body of the last upstream response"
    );
    assert_eq!(
        mock.bearers(),
        vec!["sk-c1", "sk-c2"],
        "max_provider_retries: 1 → 2 attempts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_upstream_error_returned_when_credentials_run_out() {
    let mock = MockUpstream::start().await;
    let router = Router::start(&two_creds(5, &mock.url(), &mock.url())).await;

    mock.push(Reply::error(502, "first"));
    mock.push(Reply::error(500, "second and last"));
    let resp = router.chat("gpt-4o").await;
    assert_eq!(resp.status().as_u16(), 500);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["message"], json!("second and last"));
    assert_eq!(mock.count(), 2, "each credential is tried once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_retryable_errors_returned_at_once() {
    let mock = MockUpstream::start().await;
    let router = Router::start(&two_creds(2, &mock.url(), &mock.url())).await;

    for status in [400, 404, 422] {
        mock.push(Reply::error(status, "client problem"));
        let before = mock.count();
        let resp = router.chat("gpt-4o").await;
        assert_eq!(resp.status().as_u16(), status);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["message"], json!("client problem"));
        assert_eq!(mock.count(), before + 1, "{status} must not be retried");
    }
    // A 5xx about the context length is not retried either.
    mock.push(Reply::error(
        500,
        "This model's maximum context length is 8192 tokens, however you requested 9000 tokens",
    ));
    let before = mock.count();
    assert_eq!(router.chat_status("gpt-4o").await, 500);
    assert_eq!(mock.count(), before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_transport_errors_give_502() {
    let router = Router::start(&two_creds(3, &dead_url(), &dead_url())).await;
    let resp = router.chat("gpt-4o").await;
    assert_eq!(resp.status().as_u16(), 502);
    let v: Value = resp.json().await.expect("JSON error body");
    assert!(v["error"]["message"].is_string(), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_timeout_gives_408() {
    let mock = MockUpstream::start().await;
    let yaml = server_yaml(0, &["request_timeout: 1s"])
        + &creds_yaml(&[cred("c1", "openai", "sk-c1", &mock.url(), &[])]);
    let router = Router::start(&yaml).await;

    mock.push(Reply::delay(Duration::from_secs(4), Reply::ok()));
    let start = Instant::now();
    let resp = router.chat("gpt-4o").await;
    assert_eq!(resp.status().as_u16(), 408);
    assert!(
        start.elapsed() < Duration::from_millis(3500),
        "took {:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_of_a_replaced_key_still_in_flight_do_not_ban_the_new_one() {
    // Three requests on the old key are answered 401 (the default rule's threshold) only
    // after the key has been rotated: they must not ban the pair for the new key.
    let mock = MockUpstream::start().await;
    let config = |key: &str| {
        admin_server_yaml(0, &[]) + &creds_yaml(&[cred("c1", "openai", key, &mock.url(), &[])])
    };
    let router = Router::start(&config("sk-old")).await;
    for _ in 0..3 {
        mock.push(Reply::delay(
            Duration::from_millis(1500),
            Reply::error(401, "revoked"),
        ));
    }
    let in_flight: Vec<_> = (0..3).map(|_| router.spawn_chat_status("gpt-4o")).collect();
    assert!(mock.wait_requests(3, Duration::from_secs(5)).await);
    let (status, body) = router.push_config(&router.fill(&config("sk-new"))).await;
    assert_eq!(status, 200, "{body}");
    for request in in_flight {
        assert_eq!(request.await.unwrap(), 401);
    }

    assert_eq!(router.chat_status("gpt-4o").await, 200, "{}", router.logs());
    assert_eq!(mock.bearers().last().map(String::as_str), Some("sk-new"));
    let (_, health) = router.health().await;
    assert_eq!(
        health["credentials"]["c1"]["is_banned"],
        json!(false),
        "{health}"
    );
}
