//! `rate_limit.backend: redis`: replicas share RPM/TPM windows and bans through a real
//! `redis-server`, and enforce their local share while it cannot be reached.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const MODELS: &str = "models:\n  - name: gpt-4o\n    credential: c1\n";

/// A `rate_limit` section with a key prefix of its own and a generous timeout (a loaded
/// machine must not push a call past it into the local fallback these tests do not test).
fn redis_section(url: &str, replicas: u32) -> String {
    format!(
        "rate_limit:\n  backend: redis\n  redis_url: \"{url}\"\n  key_prefix: test-{}\n  replicas: {replicas}\n  timeout: 5s\n",
        free_port()
    )
}

/// The `rate_limit` section of a replica of 2 on the Redis Cluster node at `url` (`cluster:
/// false`: as if it were a single server).
fn cluster_section(url: &str, prefix: &str, cluster: bool) -> String {
    format!(
        "rate_limit:\n  backend: redis\n  redis_url: \"{url}\"\n  cluster: {cluster}\n  key_prefix: {prefix}\n  replicas: 2\n  timeout: 5s\n"
    )
}

/// Expects a 503 whose `Retry-After` is within `1..=max_secs` and whose error code is `code`.
async fn expect_exhausted(router: &Router, max_secs: u64, code: &str, why: &str) {
    let resp = router.chat("gpt-4o").await;
    assert_eq!(resp.status().as_u16(), 503, "{why}");
    let ra = retry_after(&resp).expect("a Retry-After");
    assert!((1..=max_secs).contains(&ra), "Retry-After {ra}: {why}");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(error_of(&v).2, Some(code), "{v}");
}

/// Polls `check` until it holds or `within` has passed (at most 100 tries); returns whether
/// it held. For effects written after an answer (token charges, strike resets).
async fn eventually(within: Duration, check: impl AsyncFn() -> bool) -> bool {
    let deadline = Instant::now() + within;
    for _ in 0..100 {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Two routers (replicas) on one config.
async fn replicas(yaml: &str) -> (Router, Router) {
    (Router::start(yaml).await, Router::start(yaml).await)
}

/// A Redis, a mock provider and two replicas sharing one credential `c1` (with `limits`),
/// `gpt-4o` bound to it in `models[]` when `bound`.
/// (Keep `redis` bound for the whole test: dropping it stops the server.)
struct Pool {
    redis: RedisServer,
    mock: MockUpstream,
    a: Router,
    b: Router,
}

impl Pool {
    async fn start(limits: &[&str], bound: bool) -> Pool {
        let redis = RedisServer::start().await;
        let mock = MockUpstream::start().await;
        let yaml = server_yaml(0, &[])
            + &creds_yaml(&[cred("c1", "openai", "sk-c1", &mock.url(), limits)])
            + if bound { MODELS } else { "" }
            + &redis_section(&redis.url(), 2);
        let (a, b) = replicas(&yaml).await;
        Pool { redis, mock, a, b }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_one_rpm_window() {
    let Pool {
        redis: _redis,
        mock,
        a,
        b,
    } = Pool::start(&["rpm: 4"], false).await;

    for (router, n) in [(&a, 3), (&b, 1)] {
        for _ in 0..n {
            assert_eq!(router.chat_status("gpt-4o").await, 200);
        }
    }
    for router in [&a, &b] {
        let why = "the pool's 4 RPM are used";
        expect_exhausted(router, 60, "all_credentials_rate_limited", why).await;
    }
    assert_eq!(
        mock.count(),
        4,
        "never more than the limit, across replicas"
    );

    // Each replica reports what it admitted itself.
    let used = |h: &Value| h["credentials"]["c1"]["current_rpm"].as_i64();
    assert_eq!(used(&a.health().await.1), Some(3));
    assert_eq!(used(&b.health().await.1), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpm_is_exact_when_replicas_race() {
    let redis = RedisServer::start().await;
    let mock = MockUpstream::start().await;
    let url = mock.url();
    let yaml = server_yaml(0, &[])
        + &creds_yaml(&[
            cred("c1", "openai", "sk-c1", &url, &["rpm: 7"]),
            cred("c2", "openai", "sk-c2", &url, &["rpm: 5"]),
        ])
        + &redis_section(&redis.url(), 2);
    let (a, b) = replicas(&yaml).await;

    let mut tasks = Vec::new();
    for i in 0..40 {
        let router = if i % 2 == 0 { &a } else { &b };
        tasks.push(router.spawn_chat_status("gpt-4o"));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            200 => ok += 1,
            503 => {}
            s => panic!("unexpected status {s}"),
        }
    }
    assert_eq!(ok, 12, "7 + 5 admitted across both replicas, no more");
    assert_eq!(mock.count_bearer("sk-c1"), 7);
    assert_eq!(mock.count_bearer("sk-c2"), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_one_replica_was_charged_fill_the_others_window() {
    // Each answer reports 12 tokens: two fill a TPM of 20.
    let Pool { redis, mock, a, b } = Pool::start(&["tpm: 20"], false).await;

    assert_eq!(a.chat_status("gpt-4o").await, 200);
    assert_eq!(a.chat_status("gpt-4o").await, 200, "12 < 20");
    // The charge is written after the answer: wait (bounded) until Redis holds both.
    let sum = format!("{{{}}}:c:2:c1:tpm:sum", key_prefix(&a));
    let charged = async || redis.command_value(&["GET", &sum]).await.as_deref() == Some("24");
    assert!(
        eventually(Duration::from_secs(3), charged).await,
        "12 + 12 tokens in the shared window"
    );
    let why = "24 ≥ 20 tokens, charged by the other replica";
    expect_exhausted(&b, 60, "all_credentials_rate_limited", why).await;
    assert_eq!(mock.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_token_window_frees_when_enough_of_its_oldest_tokens_expire() {
    // TPM 30: 17 answers of 1 token, 3 s later 12 more, 3 s later one of 20 (admitted at 29).
    // The window (49) drops below 30 only once the first burst and 3 of the second have
    // expired: the Retry-After counts from the second burst, 20 entries into the window
    // (past the first page the admission script reads).
    let Pool {
        redis,
        mock,
        a,
        b: _b,
    } = Pool::start(&["tpm: 30"], false).await;
    mock.set_default(Reply::ok_with_usage(1));
    let sum = format!("{{{}}}:c:2:c1:tpm:sum", key_prefix(&a));
    let charged = |n: u64| {
        let (redis, sum) = (&redis, &sum);
        async move || redis.command_value(&["GET", sum]).await == Some(n.to_string())
    };
    for (requests, total) in [(17, 17), (12, 29)] {
        for _ in 0..requests {
            assert_eq!(a.chat_status("gpt-4o").await, 200);
        }
        assert!(eventually(Duration::from_secs(3), charged(total)).await);
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    mock.push(Reply::ok_with_usage(20));
    assert_eq!(a.chat_status("gpt-4o").await, 200, "29 < 30");
    assert!(eventually(Duration::from_secs(3), charged(49)).await);

    let resp = a.chat("gpt-4o").await;
    assert_eq!(resp.status().as_u16(), 503);
    let ra = retry_after(&resp).expect("a Retry-After");
    assert!(
        (56..=58).contains(&ra),
        "Retry-After {ra}: the second burst frees the window ~57 s from now"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_earned_across_replicas_holds_on_every_replica() {
    // Default fail2ban: three 401s ban the pair for 5 minutes.
    let Pool {
        redis: _redis,
        mock,
        a,
        b,
    } = Pool::start(&[], true).await;

    for router in [&a, &b, &a] {
        mock.push(Reply::error(401, "invalid api key"));
        assert_eq!(router.chat_status("gpt-4o").await, 401);
    }
    for router in [&b, &a] {
        let why = "a 5-minute ban, for every replica";
        expect_exhausted(router, 301, "all_credentials_banned", why).await;
    }
    assert_eq!(mock.count(), 3, "no request reached the banned pair");
    // The replica that never saw the third 401 shows the ban it was refused by.
    let (_, h) = b.health().await;
    assert_eq!(h["credentials"]["c1"]["is_banned"], json!(true), "{h}");
    assert_eq!(h["credentials_available"], json!(0), "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_redis_no_longer_holds_is_not_shown_or_kept_by_the_replicas() {
    // Three 401s ban the pair in Redis, and each replica keeps a copy; then Redis loses its
    // data (a restart without persistence, a flush). Redis admits the pair again, and a
    // replica's copy goes with that admission instead of showing a ban that is gone.
    let Pool { redis, mock, a, b } = Pool::start(&[], true).await;
    for router in [&a, &b, &a] {
        mock.push(Reply::error(401, "invalid api key"));
        assert_eq!(router.chat_status("gpt-4o").await, 401);
    }
    expect_exhausted(&b, 301, "all_credentials_banned", "banned in Redis").await;
    let (_, h) = b.health().await;
    assert_eq!(h["credentials"]["c1"]["is_banned"], json!(true), "{h}");

    assert_eq!(redis.command(&["FLUSHALL"]).await.as_deref(), Some("+OK"));
    assert_eq!(b.chat_status("gpt-4o").await, 200, "Redis holds no ban now");
    let (_, h) = b.health().await;
    assert_eq!(h["credentials"]["c1"]["is_banned"], json!(false), "{h}");
}

/// The usual cure for a ban earned with a bad key is a new key: the bans are kept under a
/// fingerprint of the key, so a replica given the new one is not refused by the old key's ban
/// — and a replica still on the old key is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_leaves_the_old_keys_ban_behind_on_every_replica() {
    let redis = RedisServer::start().await;
    let mock = MockUpstream::start().await;
    let config = |key: &str| {
        admin_server_yaml(0, &[])
            + &creds_yaml(&[cred("c1", "openai", key, &mock.url(), &[])])
            + MODELS
            + "fail2ban:\n  max_attempts: 1\n  ban_duration: 0\n  error_codes: [401]\n"
    };
    let shared = redis_section(&redis.url(), 2);
    let (a, b) = replicas(&(config("sk-old") + &shared)).await;

    mock.push(Reply::error(401, "invalid api key"));
    assert_eq!(a.chat_status("gpt-4o").await, 401);
    for router in [&a, &b] {
        let resp = router.chat("gpt-4o").await;
        assert_eq!(
            resp.status().as_u16(),
            503,
            "a permanent ban, on every replica"
        );
        let v: Value = resp.json().await.unwrap();
        assert_eq!(error_of(&v).2, Some("all_credentials_banned"), "{v}");
    }
    let old_ban = pair_key(&redis, &a, "c1", "ban").await;

    let (status, body) = a.push_config(&a.fill(&(config("sk-new") + &shared))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        a.chat_status("gpt-4o").await,
        200,
        "the new key is not banned"
    );
    assert_eq!(mock.bearers().last().map(String::as_str), Some("sk-new"));
    let resp = b.chat("gpt-4o").await;
    assert_eq!(resp.status().as_u16(), 503, "b still has the banned key");
    assert_eq!(
        redis.command(&["EXISTS", &old_ban]).await.as_deref(),
        Some(":1"),
        "the old key's ban stays for the replicas that still use it"
    );
    let (status, body) = b.push_config(&b.fill(&(config("sk-new") + &shared))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(b.chat_status("gpt-4o").await, 200, "b has the new key now");
    assert_eq!(mock.bearers(), ["sk-old", "sk-new", "sk-new"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_success_on_one_replica_resets_the_strikes_of_all() {
    let Pool { redis, mock, a, b } = Pool::start(&[], true).await;

    for _ in 0..2 {
        mock.push(Reply::error(401, "invalid api key"));
        assert_eq!(a.chat_status("gpt-4o").await, 401);
    }
    let strikes = pair_key(&redis, &a, "c1", "strikes").await;
    assert_eq!(
        redis
            .command_value(&["HGET", &strikes, "401"])
            .await
            .as_deref(),
        Some("2")
    );
    assert_eq!(b.chat_status("gpt-4o").await, 200);
    // The reset is written after the answer: wait (bounded) for it.
    let reset = async || redis.command(&["EXISTS", &strikes]).await.as_deref() == Some(":0");
    assert!(
        eventually(Duration::from_secs(3), reset).await,
        "b's success reset a's strikes"
    );
    mock.push(Reply::error(401, "invalid api key"));
    assert_eq!(
        a.chat_status("gpt-4o").await,
        401,
        "a third 401, but the count restarted"
    );
    assert_eq!(a.chat_status("gpt-4o").await, 200, "not banned");
}

/// Script calls Redis has run since its statistics were reset (`EVALSHA` and `EVAL`; a
/// script's first `EVALSHA` fails with `NOSCRIPT` and is counted as `failed_calls`, not here).
async fn script_calls(redis: &RedisServer) -> u64 {
    let info = redis
        .command_value(&["INFO", "commandstats"])
        .await
        .unwrap_or_default();
    info.lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_success_without_strikes_costs_two_redis_calls() {
    // Admission and token charge (12 tokens per answer); no strike reset: there are none.
    let Pool {
        redis,
        mock: _mock,
        a,
        b: _b,
    } = Pool::start(&["tpm: 1000000"], true).await;
    assert_eq!(a.chat_status("gpt-4o").await, 200, "loads the scripts");
    let sum = format!("{{{}}}:c:2:c1:tpm:sum", key_prefix(&a));
    let charged = |n: &'static str| {
        let (redis, sum) = (&redis, &sum);
        async move || redis.command_value(&["GET", sum]).await.as_deref() == Some(n)
    };
    assert!(eventually(Duration::from_secs(3), charged("12")).await);
    redis.command(&["CONFIG", "RESETSTAT"]).await;

    for _ in 0..5 {
        assert_eq!(a.chat_status("gpt-4o").await, 200);
    }
    assert!(eventually(Duration::from_secs(3), charged("72")).await);
    // A success's reset would be written in the background too: give it time to show.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(script_calls(&redis).await, 10, "5 admissions and 5 charges");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_moves_a_replica_onto_the_shared_windows_and_off_them() {
    let redis = RedisServer::start().await;
    let mock = MockUpstream::start().await;
    let local = admin_server_yaml(0, &[])
        + &creds_yaml(&[cred("c1", "openai", "sk-c1", &mock.url(), &["rpm: 4"])])
        + MODELS;
    let shared = local.clone() + &redis_section(&redis.url(), 2);
    let a = Router::start(&local).await;
    let b = Router::start(&shared).await;
    assert_eq!(
        a.admin_state().await["rate_limit"]["backend"],
        json!("local")
    );
    assert_eq!(a.chat_status("gpt-4o").await, 200, "a's own window: 1 of 4");

    let (status, body) = a.push_config(&a.fill(&shared)).await;
    assert_eq!(status, 200, "{body}");
    let state = a.admin_state().await;
    assert_eq!(state["rate_limit"]["backend"], json!("redis"), "{state}");
    for router in [&a, &b, &a, &b] {
        assert_eq!(router.chat_status("gpt-4o").await, 200);
    }
    for router in [&a, &b] {
        let why = "4 requests in the shared window (a's earlier local one is not in it)";
        expect_exhausted(router, 60, "all_credentials_rate_limited", why).await;
    }

    let (status, body) = a.push_config(&a.fill(&local)).await;
    assert_eq!(status, 200, "{body}");
    redis.command(&["CONFIG", "RESETSTAT"]).await;
    // Back on its own windows, which kept the 3 requests it admitted: one more fits in 4.
    assert_eq!(a.chat_status("gpt-4o").await, 200);
    let why = "a's own window is full again";
    expect_exhausted(&a, 60, "all_credentials_rate_limited", why).await;
    assert_eq!(script_calls(&redis).await, 0, "a no longer asks Redis");
    expect_exhausted(&b, 60, "all_credentials_rate_limited", "b still shares").await;
    assert_eq!(mock.count(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_their_windows_in_a_redis_cluster() {
    let cluster = RedisCluster::start().await;
    let mock = MockUpstream::start().await;
    let creds = creds_yaml(&[cred("c1", "openai", "sk-c1", &mock.url(), &["rpm: 4"])]);
    let prefix = format!("test-{}", free_port());
    let section = |url: String, cluster: bool| cluster_section(&url, &prefix, cluster);
    // Each replica knows a different node; the client finds the slot's owner from either.
    let a =
        Router::start(&(server_yaml(0, &[]) + &creds + MODELS + &section(cluster.url(0), true)))
            .await;
    let b =
        Router::start(&(server_yaml(0, &[]) + &creds + MODELS + &section(cluster.url(1), true)))
            .await;
    for router in [&a, &b, &a, &b] {
        assert_eq!(router.chat_status("gpt-4o").await, 200);
    }
    for router in [&a, &b] {
        let why = "4 requests in the window the cluster holds";
        expect_exhausted(router, 60, "all_credentials_rate_limited", why).await;
    }
    assert_eq!(mock.count(), 4);
    let counts = cluster.key_counts();
    assert_eq!(
        counts.iter().filter(|&&n| n > 0).count(),
        1,
        "every key of the pool in one slot, on one node: {counts:?}"
    );

    // Without `cluster`, a node that does not own the slot answers MOVED: the replica says so
    // and enforces its local share (2 of 4) instead of the shared window.
    let owner = counts.iter().position(|&n| n > 0).unwrap();
    let other = cluster.url((owner + 1) % 3);
    let c = Router::start(&(server_yaml(0, &[]) + &creds + MODELS + &section(other, false))).await;
    for _ in 0..2 {
        assert_eq!(c.chat_status("gpt-4o").await, 200, "its local share");
    }
    expect_exhausted(&c, 60, "all_credentials_rate_limited", "2 of 4 locally").await;
    let logs = c.logs();
    assert!(logs.to_lowercase().contains("moved"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_moved_to_another_node_keeps_its_window() {
    let cluster = RedisCluster::start().await;
    let mock = MockUpstream::start().await;
    let prefix = format!("test-{}", free_port());
    let yaml = server_yaml(0, &[])
        + &creds_yaml(&[cred("c1", "openai", "sk-c1", &mock.url(), &["rpm: 6"])])
        + MODELS
        + &cluster_section(&cluster.url(0), &prefix, true);
    let (a, b) = replicas(&yaml).await;
    // All on `a`: its local share (3 of 6) is used up, so only the shared window lets it
    // admit again below.
    for _ in 0..3 {
        assert_eq!(a.chat_status("gpt-4o").await, 200);
    }

    // Every key of the pool carries the hash tag `{prefix}`: one slot, moved with its keys
    // (a reshard, or an operator rebalancing the cluster) while `a`'s client still maps the
    // slot to the old owner.
    let slot = cluster.slot_of(&prefix);
    let from = cluster.owner_of(slot);
    let to = (from + 1) % 3;
    let before = cluster.key_counts();
    assert!(before[from] > 0 && before[to] == 0, "{before:?}");
    cluster.move_slot(slot, from, to);
    let after = cluster.key_counts();
    assert!(
        after[from] == 0 && after[to] == before[from],
        "{before:?} -> {after:?}"
    );

    // The old owner answers MOVED; the replicas follow it to the new one, where the window
    // already holds the 3 requests: 3 more fit, not 6 — and `a` takes part, which its local
    // share would not let it.
    for router in [&a, &b, &a] {
        assert_eq!(router.chat_status("gpt-4o").await, 200, "{}", router.logs());
    }
    for router in [&a, &b] {
        let why = "6 requests in the window the moved slot carried";
        expect_exhausted(router, 60, "all_credentials_rate_limited", why).await;
    }
    assert_eq!(mock.count(), 6);
    let counts = cluster.key_counts();
    assert!(counts[from] == 0 && counts[to] > 0, "{counts:?}");
}

/// Managed cluster-mode Redis usually requires TLS in transit: `rediss://` to one node, and
/// every node the client learns of is reached over TLS too, verified like the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_is_reached_over_tls_on_every_node() {
    let pki = pki();
    let cluster = RedisCluster::start_tls(&pki).await;
    let mock = MockUpstream::start().await;
    let prefix = format!("test-{}", free_port());
    let creds = creds_yaml(&[cred("c1", "openai", "sk-c1", &mock.url(), &["rpm: 4"])]);
    let yaml = |node: usize| {
        admin_server_yaml(0, &[])
            + &creds
            + MODELS
            + &cluster_section(&cluster.url(node), &prefix, true)
    };
    let trusting = || StartOpts::default().env("SSL_CERT_FILE", &pki.ca_file);
    // Seeded with different nodes: at least one replica reaches the slot's owner through a
    // node it learned of, not the one in its URL.
    let a = Router::start_with(&yaml(0), trusting()).await;
    let b = Router::start_with(&yaml(1), trusting()).await;
    for router in [&a, &b, &a, &b] {
        assert_eq!(router.chat_status("gpt-4o").await, 200);
    }
    for router in [&a, &b] {
        let why = "4 requests in the window the TLS cluster holds";
        expect_exhausted(router, 60, "all_credentials_rate_limited", why).await;
        let state = router.admin_state().await;
        assert_eq!(state["rate_limit"]["shared"], json!(true), "{state}");
        assert_eq!(state["rate_limit"]["errors"], json!(0), "{state}");
    }
    assert_eq!(mock.count(), 4);
    let counts = cluster.key_counts();
    assert_eq!(counts.iter().filter(|&&n| n > 0).count(), 1, "{counts:?}");

    // Without the CA no node is trusted: the router says why and uses its local share.
    expect_untrusted(&yaml(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_that_is_down_at_start_is_used_once_it_answers() {
    let ports = free_ports();
    let mock = MockUpstream::start().await;
    let url = format!("redis://127.0.0.1:{}", ports[0]);
    let yaml = server_yaml(0, &[])
        + &creds_yaml(&[cred("c1", "openai", "sk-c1", &mock.url(), &["rpm: 4"])])
        + MODELS
        + &cluster_section(&url, &format!("test-{}", free_port()), true);
    let (a, b) = replicas(&yaml).await;
    assert_eq!(
        a.chat_status("gpt-4o").await,
        200,
        "no cluster yet: the local share"
    );

    let cluster = RedisCluster::start_on(ports).await;
    // Past the retry pause, both replicas reach the cluster and share one window of 4 (a's
    // earlier request was counted only locally).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut admitted = 0;
    for router in [&a, &b, &a, &b, &a, &b] {
        if router.chat_status("gpt-4o").await == 200 {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 4, "the shared window: {:?}", cluster.key_counts());
    assert!(cluster.key_counts().iter().any(|&n| n > 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_each_replica_enforces_its_share_until_redis_answers() {
    let port = free_port();
    let mock = MockUpstream::start().await;
    let url = format!("redis://127.0.0.1:{port}/0");
    let yaml = admin_server_yaml(0, &[])
        + &creds_yaml(&[cred("c1", "openai", "sk-c1", &mock.url(), &["rpm: 4"])])
        + &redis_section(&url, 2);
    let router = Router::start(&yaml).await;

    // Nothing listens on the port: this replica admits its share, 4 / 2.
    assert_eq!(router.chat_status("gpt-4o").await, 200);
    assert_eq!(router.chat_status("gpt-4o").await, 200);
    assert_eq!(
        router.chat_status("gpt-4o").await,
        503,
        "the local share is 2"
    );
    let state = router.admin_state().await;
    assert_eq!(state["rate_limit"]["backend"], json!("redis"), "{state}");
    assert_eq!(state["rate_limit"]["shared"], json!(false), "{state}");
    assert!(state["rate_limit"]["errors"].as_u64() >= Some(1), "{state}");
    let metrics = router.admin_metrics().await;
    assert_eq!(
        metric_sum(
            &metrics,
            "airouter_rate_limit_backend_up",
            &[("backend", "redis")]
        ),
        0.0
    );
    let logs = router.logs();
    assert!(
        logs.contains("rate-limit backend failed") && logs.contains("refused"),
        "the log says why: {logs}"
    );
    assert!(!logs.contains(&url), "the Redis URL is never logged");

    // Redis comes up: after the retry pause the shared window (empty) decides again.
    let redis = RedisServer::start_on(port).await;
    let served = async || router.chat_status("gpt-4o").await == 200;
    assert!(
        eventually(Duration::from_secs(5), served).await,
        "Redis answers again: its window has room"
    );
    let state = router.admin_state().await;
    assert_eq!(state["rate_limit"]["shared"], json!(true), "{state}");
    assert_eq!(
        redis
            .command(&["EXISTS", &format!("{{{}}}:seq", key_prefix(&router))])
            .await
            .as_deref(),
        Some(":1"),
        "the admission was recorded in Redis"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_urls_speak_tls_verified_against_ssl_cert_file() {
    let pki = pki();
    let redis = RedisServer::start_tls(&pki.cert_file, &pki.key_file).await;
    let mock = MockUpstream::start().await;
    let url = format!("rediss://127.0.0.1:{}/0", redis.port);
    let yaml = admin_server_yaml(0, &[])
        + &creds_yaml(&[cred("c1", "openai", "sk-c1", &mock.url(), &["rpm: 4"])])
        + &redis_section(&url, 2);

    let trusting = Router::start_with(
        &yaml,
        StartOpts::default().env("SSL_CERT_FILE", &pki.ca_file),
    )
    .await;
    assert_eq!(trusting.chat_status("gpt-4o").await, 200);
    let state = trusting.admin_state().await;
    assert_eq!(state["rate_limit"]["shared"], json!(true), "{state}");
    assert_eq!(state["rate_limit"]["errors"], json!(0), "{state}");

    // Without the CA the handshake fails: the router says why and uses its local share.
    expect_untrusted(&yaml).await;
}

/// A router started on `yaml` without the test CA in `SSL_CERT_FILE` cannot verify its
/// `rediss://` backend: it still answers (its local share), reports the backend as not shared, and its
/// log names the certificate as the reason.
async fn expect_untrusted(yaml: &str) {
    let untrusting = Router::start(yaml).await;
    assert_eq!(untrusting.chat_status("gpt-4o").await, 200);
    let state = untrusting.admin_state().await;
    assert_eq!(state["rate_limit"]["shared"], json!(false), "{state}");
    let logs = untrusting.logs();
    assert!(
        logs.contains("rate-limit backend failed") && logs.contains("UnknownIssuer"),
        "the log says the certificate is not trusted: {logs}"
    );
}

/// The Redis key of `credential`'s `what` (`ban`, `strikes`) for `gpt-4o`, found by pattern:
/// its name carries a fingerprint of the credential's key.
async fn pair_key(redis: &RedisServer, router: &Router, credential: &str, what: &str) -> String {
    let pattern = format!(
        "{{{}}}:p:*:{credential}#*:gpt-4o:{what}",
        key_prefix(router)
    );
    let first = "local k = redis.call('KEYS', ARGV[1]); return #k == 1 and k[1] or #k";
    let found = redis.command_value(&["EVAL", first, "0", &pattern]).await;
    found.unwrap_or_else(|| panic!("not exactly one key matches {pattern}"))
}

/// The `key_prefix` of a router started with [`redis_section`].
fn key_prefix(router: &Router) -> String {
    let config = std::fs::read_to_string(&router.config_path).unwrap();
    config
        .lines()
        .find_map(|l| l.trim().strip_prefix("key_prefix: "))
        .unwrap()
        .to_string()
}

#[test]
fn a_bad_redis_section_is_refused_naming_the_field_without_echoing_the_url() {
    let check = |rate_limit: &str| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        let doc = "server: {master_key: k}\ncredentials: [{name: c, type: mock}]\n";
        std::fs::write(&path, format!("{doc}rate_limit: {rate_limit}\n")).unwrap();
        let args = ["check-config", path.to_str().unwrap()];
        run_cli(&args, &[], Duration::from_secs(10)).combined()
    };
    let text = check(r#"{backend: redis, redis_url: "http://:hunter2@cache:6379", replicas: 0}"#);
    assert!(
        text.contains("rate_limit.redis_url: not a Redis URL"),
        "{text}"
    );
    assert!(
        text.contains("rate_limit.replicas: invalid replicas: 0"),
        "{text}"
    );
    assert!(
        !text.contains("hunter2"),
        "the URL's password leaked: {text}"
    );

    let text = check("{backend: redis}");
    let missing = "rate_limit.redis_url: required when rate_limit.backend is redis";
    assert!(text.contains(missing), "{text}");
}
