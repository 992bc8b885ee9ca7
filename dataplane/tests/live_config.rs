//! The live config: admin pushes, state that survives a reload, the file watcher
//! (Kubernetes-style symlink swaps) and SIGHUP.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio::task::JoinHandle;

/// How long a file change / SIGHUP may take to show in `/admin/config/hash`.
const RELOAD_DEADLINE: Duration = Duration::from_secs(5);

fn is_hash(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn reloads(metrics: &str, source: &str, result: &str) -> f64 {
    metric_sum(
        metrics,
        "airouter_config_reloads_total",
        &[("source", source), ("result", result)],
    )
}

/// `credentials[name].pairs[model]` of an `/admin/state` document.
fn pair<'a>(state: &'a Value, cred: &str, model: &str) -> &'a Value {
    let c = credential(state, cred);
    c["pairs"]
        .as_array()
        .and_then(|pairs| pairs.iter().find(|p| p["model"] == json!(model)))
        .unwrap_or_else(|| panic!("no pair {cred}:{model} in {state}"))
}

fn credential<'a>(state: &'a Value, name: &str) -> &'a Value {
    state["credentials"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == json!(name)))
        .unwrap_or_else(|| panic!("no credential {name} in {state}"))
}

/// Start a streaming chat completion on the router; the handle resolves to
/// (status, everything read). `headers_rx` fires once the response headers are
/// in, i.e. once the router has routed the request.
fn spawn_stream(
    router: &Router,
    model: &str,
    start: Instant,
) -> (
    JoinHandle<(u16, SseRead)>,
    tokio::sync::oneshot::Receiver<()>,
) {
    let client = router.client().clone();
    let url = router.url("/v1/chat/completions");
    let key = router.master_key().to_string();
    let body = chat_stream_body(model);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let handle = tokio::spawn(async move {
        let resp = client
            .post(url)
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .expect("stream request");
        let status = resp.status().as_u16();
        let _ = tx.send(());
        (
            status,
            read_sse(resp, start, None, Duration::from_secs(10)).await,
        )
    });
    (handle, rx)
}

/// Chunks carrying non-empty `delta.content`.
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

fn assert_complete(what: &str, status: u16, sse: &SseRead) {
    assert_eq!(status, 200, "{what}: status");
    assert!(sse.error.is_none(), "{what}: cut: {:?}", sse.error);
    assert!(!sse.timed_out, "{what}: timed out; raw:\n{}", sse.raw);
    assert!(sse.has_done(), "{what}: no [DONE]; raw:\n{}", sse.raw);
}

// ---------------------------------------------------------------------------
// (1) A push changes routing at once; in-flight streams finish on the old config
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_reroutes_next_request_while_inflight_streams_finish_untouched() {
    let x = MockUpstream::start().await;
    let y = MockUpstream::start().await;
    let slow =
        |chunks: u32| format!("mock: {{latency: 0s, chunk_interval: 100ms, chunks: {chunks}}}");
    let v1 = admin_server_yaml(0, &[])
        + &creds_yaml(&[
            cred("c1", "openai", "sk-c1", &x.url(), &[]),
            cred("s", "mock", "", "", &[&slow(20)]),
        ])
        + "models:\n  - {name: gpt-4o, credential: c1}\n  - {name: slow, credential: s}\n";
    // c1 is gone, gpt-4o is served by c2 (another upstream), the mock streams 3 chunks.
    let v2 = admin_server_yaml(0, &[])
        + &creds_yaml(&[
            cred("c2", "openai", "sk-c2", &y.url(), &[]),
            cred("s", "mock", "", "", &[&slow(3)]),
        ])
        + "models:\n  - {name: gpt-4o, credential: c2}\n  - {name: slow, credential: s}\n";
    let router = Router::start(&v1).await;
    let h1 = router.config_hash().await;
    assert!(is_hash(&h1), "hash {h1:?}");

    // Two ~2 s streams: one proxied to c1's upstream, one from the mock credential.
    x.push(Reply::stream(
        openai_stream(20, false, 0),
        Duration::from_millis(100),
    ));
    let start = Instant::now();
    let (up_stream, up_started) = spawn_stream(&router, "gpt-4o", start);
    let (mock_stream, mock_started) = spawn_stream(&router, "slow", start);
    for rx in [up_started, mock_started] {
        tokio::time::timeout(Duration::from_secs(3), rx)
            .await
            .expect("stream headers within 3 s")
            .expect("stream task alive");
    }
    assert!(
        x.wait_events(2, Duration::from_secs(3)).await,
        "upstream stream did not start"
    );

    let (status, body) = router.push_config(&router.fill(&v2)).await;
    let pushed_at = start.elapsed();
    assert_eq!(status, 200, "push: {body}");
    assert_eq!(body["changed"], json!(true), "{body}");
    assert!(body["warnings"].is_array(), "{body}");
    let h2 = body["hash"].as_str().unwrap_or_default().to_string();
    assert!(is_hash(&h2), "{body}");
    assert_ne!(h2, h1);
    assert_eq!(router.config_hash().await, h2);
    assert_eq!(
        x.streams_completed(),
        0,
        "the push must happen while the stream is in flight"
    );

    // The next request uses the new config.
    let resp = router.chat("gpt-4o").await;
    assert_eq!(resp.status().as_u16(), 200);
    let _ = resp.bytes().await;
    assert_eq!(y.bearers(), vec!["sk-c2"], "next request goes to c2");
    assert_eq!(x.count(), 1, "nothing new reaches c1's upstream");
    let (status, fresh) = {
        let (h, _) = spawn_stream(&router, "slow", Instant::now());
        h.await.expect("fresh stream task")
    };
    assert_complete("stream started after the push", status, &fresh);
    assert_eq!(content_chunks(&fresh), 3, "new mock config: 3 chunks");

    // Both streams that started before the push complete untouched.
    let (status, sse) = up_stream.await.expect("upstream stream task");
    assert_complete("proxied stream", status, &sse);
    let want: String = (0..20).map(|i| format!("c{i} ")).collect();
    assert_eq!(sse.content(), want, "every chunk, in order");
    let last = sse.events.last().expect("events").at;
    assert!(last > pushed_at, "stream ended before the push ({last:?})");
    assert_eq!(x.streams_completed(), 1);
    assert_eq!(x.streams_aborted(), 0, "the upstream stream was cut");

    let (status, sse) = mock_stream.await.expect("mock stream task");
    assert_complete("mock-credential stream", status, &sse);
    assert_eq!(
        content_chunks(&sse),
        20,
        "the in-flight stream keeps the config it started with"
    );
    assert!(sse.events.last().expect("events").at > pushed_at);

    // The same document again (as JSON this time) changes nothing.
    let as_json: Value = serde_yaml::from_str(&router.fill(&v2)).expect("v2 is YAML");
    let (status, body) = router.push_config(&as_json.to_string()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["changed"], json!(false), "{body}");
    assert_eq!(body["hash"], json!(h2), "{body}");

    let metrics = router.admin_metrics().await;
    assert!(reloads(&metrics, "admin", "success") >= 1.0, "{metrics}");
    assert_eq!(
        metric_sum(&metrics, "airouter_config_info", &[("hash", &h2)]),
        1.0,
        "{metrics}"
    );
}

// ---------------------------------------------------------------------------
// (2) Invalid pushes and bad tokens change nothing
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_push_lists_every_problem_and_changes_nothing() {
    let x = MockUpstream::start().await;
    let y = MockUpstream::start().await;
    let v1 = admin_server_yaml(0, &[])
        + &creds_yaml(&[cred("c1", "openai", "sk-c1", &x.url(), &[])])
        + "models:\n  - {name: gpt-4o}\n";
    // Would route gpt-4o to c2 if it were accepted; five fields are invalid.
    let bad = admin_server_yaml(0, &["logging_level: LOUD"])
        + &creds_yaml(&[
            cred("c1", "openai", "sk-c1", &x.url(), &["rpm: 0"]),
            cred("c2", "openai", "sk-c2", &y.url(), &[]),
            cred("c3", "nonsense", "sk-c3", "", &[]),
            cred("c4", "openai", "sk-c4", "ftp://127.0.0.1:9", &[]),
        ])
        + "models:\n  - {name: gpt-4o, credential: c2}\n  - {name: other, tpm: -5}\n";
    let good_v2 = admin_server_yaml(0, &[])
        + &creds_yaml(&[cred("c2", "openai", "sk-c2", &y.url(), &[])])
        + "models:\n  - {name: gpt-4o}\n";
    let router = Router::start(&v1).await;
    let h1 = router.config_hash().await;

    let (status, body) = router.push_config(&router.fill(&bad)).await;
    assert_eq!(status, 422, "{body}");
    let (msg, kind, code) = error_of(&body);
    assert_eq!(kind, "invalid_request_error", "{body}");
    assert_eq!(code, Some("invalid_config"), "{body}");
    assert!(!msg.is_empty(), "{body}");
    let problems = body["problems"].as_array().expect("problems array");
    let fields: Vec<&str> = problems
        .iter()
        .map(|p| p["field"].as_str().unwrap_or(""))
        .collect();
    for want in [
        "server.logging_level",
        "credentials[0].rpm",
        "credentials[2].type",
        "credentials[3].base_url",
        "models[1].tpm",
    ] {
        assert!(fields.contains(&want), "missing {want} in {fields:?}");
    }
    for p in problems {
        assert!(
            p["message"].as_str().is_some_and(|m| !m.is_empty()),
            "problem without a message: {p}"
        );
    }

    // Nothing changed: hash, routing.
    assert_eq!(router.config_hash().await, h1);
    assert_eq!(router.chat_status("gpt-4o").await, 200);
    assert_eq!(x.bearers(), vec!["sk-c1"]);
    assert_eq!(y.count(), 0);
    let metrics = router.admin_metrics().await;
    assert!(reloads(&metrics, "admin", "failure") >= 1.0, "{metrics}");
    assert_eq!(
        metric_sum(&metrics, "airouter_config_info", &[("hash", &h1)]),
        1.0,
        "{metrics}"
    );

    // A valid document with a wrong or missing token is refused (401) and not applied.
    let put = reqwest::Method::PUT;
    let get = reqwest::Method::GET;
    let doc = router.fill(&good_v2);
    for token in [Some("wrong-token"), None, Some(router.master_key())] {
        let resp = router
            .admin_request(put.clone(), "/admin/config", token, Some(doc.clone()))
            .await;
        assert_eq!(resp.status().as_u16(), 401, "PUT with token {token:?}");
    }
    for path in ["/admin/config/hash", "/admin/state", "/metrics"] {
        for token in [Some("wrong-token"), None] {
            let resp = router.admin_request(get.clone(), path, token, None).await;
            assert_eq!(resp.status().as_u16(), 401, "GET {path} with {token:?}");
            let text = resp.text().await.unwrap_or_default();
            assert!(!text.contains(&h1), "{path} leaked the hash: {text}");
        }
    }
    // The public port does not take config pushes either.
    for token in [ADMIN_TOKEN, router.master_key()] {
        let resp = router
            .client()
            .put(router.url("/admin/config"))
            .bearer_auth(token)
            .body(doc.clone())
            .send()
            .await
            .expect("PUT on the public port");
        assert!(
            !resp.status().is_success(),
            "public port accepted a config push: {}",
            resp.status()
        );
    }
    assert_eq!(router.config_hash().await, h1);
    assert_eq!(router.chat_status("gpt-4o").await, 200);
    assert_eq!(x.count(), 2);
    assert_eq!(y.count(), 0);
}

// ---------------------------------------------------------------------------
// (3) Bans and windows survive a reload; a rotated key clears the ban
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bans_and_windows_survive_reload_and_key_rotation_clears_ban() {
    let up = MockUpstream::start().await;
    let url = up.url();
    let config = |c1_key: &str, c2_rpm: u32, c3_key: &str| {
        admin_server_yaml(0, &[])
            + "fail2ban:\n  max_attempts: 1\n  ban_duration: 10m\n  error_codes: [500]\n"
            + &creds_yaml(&[
                cred("c1", "openai", c1_key, &url, &[]),
                cred("c2", "openai", "sk-c2", &url, &[&format!("rpm: {c2_rpm}")]),
                cred("c3", "openai", c3_key, &url, &["rpm: 2"]),
            ])
            + "models:\n  - {name: gpt-4o, credential: c1}\n  - {name: gpt-4o, credential: c2}\n  \
               - {name: w, credential: c3}\n"
    };
    let router = Router::start(&config("sk-c1", 50, "sk-c3")).await;

    // c1 (first in the round-robin) answers 500 once: banned for 10 minutes.
    up.push(Reply::error(500, "upstream exploded"));
    assert_eq!(router.chat_status("gpt-4o").await, 500);
    assert_eq!(router.chat_status("gpt-4o").await, 200);
    assert_eq!(up.bearers(), vec!["sk-c1", "sk-c2"]);
    // c3 (rpm: 2) is used up.
    assert_eq!(router.chat_status("w").await, 200);
    assert_eq!(router.chat_status("w").await, 200);
    assert_eq!(router.chat_status("w").await, 503);
    assert_eq!(up.count(), 4);

    let state = router.admin_state().await;
    let p = pair(&state, "c1", "gpt-4o");
    assert_eq!(p["banned"], json!(true), "{state}");
    assert_eq!(p["ban"]["code"], json!(500), "{state}");

    // An unrelated change (c2's rpm) is applied…
    let (status, body) = router
        .push_config(&router.fill(&config("sk-c1", 100, "sk-c3")))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["changed"], json!(true), "{body}");

    // …and the ban and the windows are still there.
    let state = router.admin_state().await;
    assert_eq!(state["config_hash"], body["hash"], "{state}");
    let p = pair(&state, "c1", "gpt-4o");
    assert_eq!(p["banned"], json!(true), "ban lost on reload: {state}");
    assert_eq!(p["ban"]["code"], json!(500), "{state}");
    assert_eq!(p["ban"]["permanent"], json!(false), "{state}");
    assert!(p["ban"]["until"].is_string(), "{state}");
    assert_eq!(
        credential(&state, "c1")["available"],
        json!(false),
        "{state}"
    );
    assert_eq!(
        credential(&state, "c2")["rpm"]["limit"],
        json!(100),
        "{state}"
    );
    let c3 = credential(&state, "c3");
    assert_eq!(
        c3["rpm"],
        json!({"used": 2, "limit": 2}),
        "window lost: {state}"
    );
    for secret in ["sk-c1", "sk-c2", "sk-c3", MASTER_KEY, ADMIN_TOKEN] {
        assert!(
            !state.to_string().contains(secret),
            "/admin/state shows a secret: {state}"
        );
    }

    // Requests skip the banned pair and the full window.
    assert_eq!(router.chat_status("gpt-4o").await, 200);
    assert_eq!(router.chat_status("gpt-4o").await, 200);
    assert_eq!(up.bearers()[4..], ["sk-c2", "sk-c2"], "c1 must stay banned");
    let resp = router.chat("w").await;
    assert_eq!(resp.status().as_u16(), 503, "c3's window must carry over");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(error_of(&v).2, Some("all_credentials_rate_limited"), "{v}");
    assert_eq!(up.count(), 6);

    // Rotating c1's key lifts its ban; rotating c3's keeps its window.
    let (status, body) = router
        .push_config(&router.fill(&config("sk-c1-rotated", 100, "sk-c3-rotated")))
        .await;
    assert_eq!(status, 200, "{body}");
    let state = router.admin_state().await;
    let p = pair(&state, "c1", "gpt-4o");
    assert_eq!(
        p["banned"],
        json!(false),
        "rotated key still banned: {state}"
    );
    assert!(p.get("ban").is_none_or(Value::is_null), "{state}");
    assert!(
        credential(&state, "c1")["rpm"]["used"].as_u64() >= Some(1),
        "c1's window must be kept: {state}"
    );
    assert_eq!(
        credential(&state, "c3")["rpm"],
        json!({"used": 2, "limit": 2}),
        "c3's window must be kept across a key rotation: {state}"
    );
    assert_eq!(router.chat_status("gpt-4o").await, 200);
    assert_eq!(router.chat_status("gpt-4o").await, 200);
    let recent = &up.bearers()[6..];
    assert!(
        recent.contains(&"sk-c1-rotated".to_string()),
        "c1 must be selected again with its new key: {recent:?}"
    );
    assert_eq!(router.chat_status("w").await, 503);
    assert_eq!(up.count(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_cursor_survives_reload_and_push_reports_warnings() {
    let up = MockUpstream::start().await;
    let url = up.url();
    let config = |c3_rpm: u32, extra: &str| {
        admin_server_yaml(0, &[])
            + &creds_yaml(&[
                cred("c1", "openai", "sk-c1", &url, &[]),
                cred("c2", "openai", "sk-c2", &url, &[]),
                cred("c3", "openai", "sk-c3", &url, &[&format!("rpm: {c3_rpm}")]),
            ])
            + extra
    };
    let router = Router::start(&config(50, "")).await;
    assert_eq!(router.chat_status("gpt-4o").await, 200);
    assert_eq!(up.bearers(), vec!["sk-c1"]);

    // An unrelated change plus a key the router does not know: applied, with a warning.
    let (status, body) = router
        .push_config(&router.fill(&config(60, "surprise_section: 1\n")))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["changed"], json!(true), "{body}");
    let warnings = body["warnings"].as_array().expect("warnings array");
    assert!(
        warnings
            .iter()
            .any(|w| w["field"] == json!("surprise_section")
                && w["message"].as_str().is_some_and(|m| !m.is_empty())),
        "{body}"
    );

    // The round-robin continues where it was: c2, c3, then c1.
    for _ in 0..3 {
        assert_eq!(router.chat_status("gpt-4o").await, 200);
    }
    assert_eq!(up.bearers(), vec!["sk-c1", "sk-c2", "sk-c3", "sk-c1"]);
}

/// A pushed `logging_level` changes what this process logs at once; the settings read only at
/// start are named in the push's warnings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_logging_level_applies_at_once_and_restart_settings_are_named() {
    use tokio::io::AsyncWriteExt;
    let config = |server: &[&str]| {
        admin_server_yaml(0, server) + &creds_yaml(&[cred("m", "mock", "", "", &[])])
    };
    let router = Router::start(&config(&[])).await;
    // A connection hyper cannot parse ends with an error, logged at debug level.
    let garbage = async || {
        let mut sock = tokio::net::TcpStream::connect(("127.0.0.1", router.port))
            .await
            .unwrap();
        sock.write_all(b"NOT HTTP\r\n\r\n").await.unwrap();
        let mut rest = Vec::new();
        let read = tokio::io::AsyncReadExt::read_to_end(&mut sock, &mut rest);
        let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
    };
    const DEBUG_LINE: &str = "connection ended with an error";
    garbage().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !router.logs().contains(DEBUG_LINE),
        "info level logs no debug line"
    );

    let (status, body) = router
        .push_config(&router.fill(&config(&["logging_level: debug", "idle_timeout: 90s"])))
        .await;
    assert_eq!(status, 200, "{body}");
    let fields: Vec<&str> = body["warnings"]
        .as_array()
        .expect("warnings array")
        .iter()
        .filter_map(|w| w["field"].as_str())
        .collect();
    assert_eq!(fields, ["server.idle_timeout"], "{body}");
    garbage().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !router.logs().contains(DEBUG_LINE) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        router.logs().contains(DEBUG_LINE),
        "debug level now:\n{}",
        router.logs()
    );
}

// ---------------------------------------------------------------------------
// (4) The file watcher: Kubernetes-style symlink swaps
// ---------------------------------------------------------------------------

/// Writes `<dir>/..2026_<version>/config.yaml` and points `..data` at it the way
/// the kubelet does (`..data_tmp` symlink, then `rename` over `..data`); the
/// previous version directory, if given, is removed afterwards.
fn k8s_publish(dir: &Path, version: &str, content: &str, previous: Option<&str>) {
    let data_dir = format!("..2026_{version}");
    std::fs::create_dir(dir.join(&data_dir)).expect("create data dir");
    std::fs::write(dir.join(&data_dir).join("config.yaml"), content).expect("write config");
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(&data_dir, &tmp).expect("symlink ..data_tmp");
    std::fs::rename(&tmp, dir.join("..data")).expect("rename ..data_tmp over ..data");
    if let Some(prev) = previous {
        std::fs::remove_dir_all(dir.join(format!("..2026_{prev}"))).expect("remove old dir");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_symlink_swap_is_applied_and_invalid_file_is_rejected() {
    let x = MockUpstream::start().await;
    let y = MockUpstream::start().await;
    let on = |name: &str, key: &str, url: &str| {
        admin_server_yaml(0, &[])
            + &creds_yaml(&[cred(name, "openai", key, url, &[])])
            + "models:\n  - {name: gpt-4o}\n"
    };
    let v1 = on("c1", "sk-c1", &x.url());
    let v2 = on("c2", "sk-c2", &y.url());
    let invalid = admin_server_yaml(0, &[])
        + &creds_yaml(&[cred("c1", "openai", "sk-c1", &x.url(), &["rpm: 0"])]);

    let mount = tempfile::tempdir().expect("tempdir");
    let dir = mount.path();
    let config_path = dir.join("config.yaml");
    let router = Router::start_managed(&config_path, StartOpts::default(), |ports| {
        // (Re)build the initial mount for these ports.
        for entry in ["config.yaml", "..data"] {
            let _ = std::fs::remove_file(dir.join(entry));
        }
        let _ = std::fs::remove_dir_all(dir.join("..2026_a"));
        k8s_publish(dir, "a", &ports.fill(&v1), None);
        std::os::unix::fs::symlink("..data/config.yaml", dir.join("config.yaml"))
            .expect("config.yaml symlink");
    })
    .await;
    let h1 = router.config_hash().await;
    assert_eq!(router.chat_status("gpt-4o").await, 200);
    assert_eq!(x.bearers(), vec!["sk-c1"]);

    // A swap to v2 is picked up and routing follows.
    k8s_publish(dir, "b", &router.fill(&v2), Some("a"));
    let h2 = router
        .wait_hash(RELOAD_DEADLINE, |h| h != h1)
        .await
        .unwrap_or_else(|| panic!("symlink swap not applied; logs:\n{}", router.logs()));
    assert_eq!(router.chat_status("gpt-4o").await, 200);
    assert_eq!(y.bearers(), vec!["sk-c2"]);
    assert_eq!(x.count(), 1);
    let metrics = router.admin_metrics().await;
    assert!(reloads(&metrics, "file", "success") >= 1.0, "{metrics}");

    // An invalid file is rejected: counted as a failure, the running config stays.
    k8s_publish(dir, "c", &router.fill(&invalid), Some("b"));
    let metrics = router
        .wait_metrics(RELOAD_DEADLINE, |m| reloads(m, "file", "failure") >= 1.0)
        .await
        .unwrap_or_else(|| panic!("invalid file not reported; logs:\n{}", router.logs()));
    assert_eq!(
        metric_sum(&metrics, "airouter_config_info", &[("hash", &h2)]),
        1.0,
        "{metrics}"
    );
    assert_eq!(router.config_hash().await, h2);
    assert_eq!(router.chat_status("gpt-4o").await, 200);
    assert_eq!(y.count(), 2, "still routed by v2");
    assert_eq!(x.count(), 1);

    // A later valid file (v1 again) applies: the same document has the same hash.
    k8s_publish(dir, "d", &router.fill(&v1), Some("c"));
    let h3 = router
        .wait_hash(RELOAD_DEADLINE, |h| h != h2)
        .await
        .unwrap_or_else(|| panic!("valid file after an invalid one not applied"));
    assert_eq!(h3, h1, "v1 again must hash as v1");
    assert_eq!(router.chat_status("gpt-4o").await, 200);
    assert_eq!(x.count(), 2);
    assert_eq!(y.count(), 2);
    let metrics = router.admin_metrics().await;
    assert!(reloads(&metrics, "file", "success") >= 2.0, "{metrics}");
}

// ---------------------------------------------------------------------------
// (5) SIGHUP re-reads the file
// ---------------------------------------------------------------------------

/// Replace `path` atomically (write a sibling, rename over it).
fn replace_file(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).expect("write tmp");
    std::fs::rename(&tmp, path).expect("rename over the file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rereads_the_config_file() {
    let x = MockUpstream::start().await;
    let y = MockUpstream::start().await;
    let on = |name: &str, key: &str, url: &str| {
        admin_server_yaml(0, &[])
            + &creds_yaml(&[cred(name, "openai", key, url, &[])])
            + "models:\n  - {name: gpt-4o}\n"
    };
    let v1 = on("c1", "sk-c1", &x.url());
    let v2 = on("c2", "sk-c2", &y.url());
    let invalid = admin_server_yaml(0, &[])
        + &creds_yaml(&[cred("c2", "openai", "sk-c2", &y.url(), &["tpm: -7"])]);

    // The router reads <dir>/config.yaml, a symlink to a file in another directory:
    // content written there is what SIGHUP must pick up.
    let dir = tempfile::tempdir().expect("tempdir");
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let target = elsewhere.path().join("real.yaml");
    let config_path = dir.path().join("config.yaml");
    let mut router = Router::start_managed(&config_path, StartOpts::default(), |ports| {
        std::fs::write(&target, ports.fill(&v1)).expect("write config");
        let _ = std::fs::remove_file(&config_path);
        std::os::unix::fs::symlink(&target, &config_path).expect("symlink");
    })
    .await;
    let h1 = router.config_hash().await;

    // SIGHUP with nothing changed: the router keeps running, same config.
    router.signal("HUP");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(router.is_running(), "SIGHUP killed the router");
    assert_eq!(router.config_hash().await, h1);
    assert_eq!(router.chat_status("gpt-4o").await, 200);
    assert_eq!(x.count(), 1);

    // New content + SIGHUP → applied.
    replace_file(&target, &router.fill(&v2));
    router.signal("HUP");
    let h2 = router
        .wait_hash(RELOAD_DEADLINE, |h| h != h1)
        .await
        .unwrap_or_else(|| panic!("SIGHUP did not apply the file; logs:\n{}", router.logs()));
    let metrics = router.admin_metrics().await;
    assert!(
        reloads(&metrics, "sighup", "success") + reloads(&metrics, "file", "success") >= 1.0,
        "{metrics}"
    );
    assert_eq!(router.chat_status("gpt-4o").await, 200);
    assert_eq!(y.bearers(), vec!["sk-c2"]);
    assert_eq!(x.count(), 1);

    // Invalid content + SIGHUP → rejected, still serving v2.
    replace_file(&target, &router.fill(&invalid));
    router.signal("HUP");
    let metrics = router
        .wait_metrics(RELOAD_DEADLINE, |m| {
            reloads(m, "sighup", "failure") + reloads(m, "file", "failure") >= 1.0
        })
        .await
        .unwrap_or_else(|| panic!("invalid file not reported; logs:\n{}", router.logs()));
    assert_eq!(
        metric_sum(&metrics, "airouter_config_info", &[("hash", &h2)]),
        1.0,
        "{metrics}"
    );
    assert!(router.is_running());
    assert_eq!(router.config_hash().await, h2);
    assert_eq!(router.chat_status("gpt-4o").await, 200);
    assert_eq!(y.count(), 2);

    // Valid again + SIGHUP → applied (back to v1's hash).
    replace_file(&target, &router.fill(&v1));
    router.signal("HUP");
    let h3 = router
        .wait_hash(RELOAD_DEADLINE, |h| h != h2)
        .await
        .expect("SIGHUP after an invalid file did not apply the valid one");
    assert_eq!(h3, h1);
    assert_eq!(router.chat_status("gpt-4o").await, 200);
    assert_eq!(x.count(), 2);
    assert_eq!(y.count(), 2);
}

// ---------------------------------------------------------------------------
// (6) An idle router leaves its config file alone
// ---------------------------------------------------------------------------

/// Opening a file is an inotify event of its directory; a watcher that reacted to it
/// re-read the config every debounce period (150 ms) forever, waking an idle router.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_router_does_not_keep_reading_its_config_file() {
    use notify::{
        event::{AccessKind, AccessMode},
        EventKind, RecursiveMode, Watcher,
    };
    let x = MockUpstream::start().await;
    let yaml = admin_server_yaml(0, &[])
        + &creds_yaml(&[cred("c1", "openai", "sk-c1", &x.url(), &[])])
        + "models:\n  - {name: gpt-4o}\n";
    let router = Router::start(&yaml).await;
    let (tx, rx) = std::sync::mpsc::channel();
    let mut watcher = notify::recommended_watcher(move |e: notify::Result<notify::Event>| {
        if let Ok(e) = e {
            if e.kind == EventKind::Access(AccessKind::Open(AccessMode::Any)) {
                let _ = tx.send(());
            }
        }
    })
    .expect("inotify watcher");
    watcher
        .watch(&router.config_path, RecursiveMode::NonRecursive)
        .expect("watch the config file");
    // Six debounce periods: a watcher feeding on its own reads opens the file ~6 times.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(router.chat_status("gpt-4o").await, 200);
    assert_eq!(
        rx.try_iter().count(),
        0,
        "the router re-opened its config file while nothing changed"
    );

    // It still follows a real change of the file.
    let h1 = router.config_hash().await;
    let v2 = admin_server_yaml(0, &[])
        + &creds_yaml(&[cred("c2", "openai", "sk-c2", &x.url(), &[])])
        + "models:\n  - {name: gpt-4o}\n";
    replace_file(&router.config_path, &router.fill(&v2));
    router
        .wait_hash(RELOAD_DEADLINE, |h| h != h1)
        .await
        .unwrap_or_else(|| panic!("file change not applied; logs:\n{}", router.logs()));
}
