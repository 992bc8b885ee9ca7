//! `check-config`, `run` with bad configs, CLI spellings, `os.environ/`
//! references and secret hygiene of the logs.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const CLI_TIMEOUT: Duration = Duration::from_secs(10);

/// A valid config with two credentials; `server_extra` lines go at the end of
/// `server:`, `cred_extra` lines at the end of credential c1 (index 0) and
/// `tail` right after credential c2 (index 1: its own fields or new sections).
fn config(server_extra: &str, cred_extra: &str, tail: &str) -> String {
    let mut s = String::new();
    s.push_str("server:\n");
    s.push_str("  host: 127.0.0.1\n");
    s.push_str("  port: 18080\n");
    s.push_str(&format!("  master_key: {MASTER_KEY}\n"));
    s.push_str(server_extra);
    s.push_str("credentials:\n");
    s.push_str("  - name: c1\n");
    s.push_str("    type: openai\n");
    s.push_str("    api_key: sk-cli-secret-c1\n");
    s.push_str("    base_url: \"http://127.0.0.1:9/v1\"\n");
    s.push_str(cred_extra);
    s.push_str("  - name: c2\n");
    s.push_str("    type: openai\n");
    s.push_str("    api_key: sk-cli-secret-c2\n");
    s.push_str("    base_url: \"http://127.0.0.1:9\"\n");
    s.push_str(tail);
    s
}

fn write_config(dir: &tempfile::TempDir, name: &str, yaml: &str) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, yaml).unwrap();
    p
}

fn check_config(path: &std::path::Path) -> CliOutput {
    let out = run_cli(&["check-config", path.to_str().unwrap()], &[], CLI_TIMEOUT);
    assert!(!out.timed_out, "check-config hung: {out:?}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_accepts_valid_config() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_config(&dir, "ok.yaml", &config("", "", ""));
    let out = check_config(&p);
    assert_eq!(out.code, Some(0), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_warns_about_unknown_keys_and_litellm_db() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = config(
        "  frobnicate_level: 3\n",
        "",
        "litellm_db:\n  enabled: true\n  database_url: postgresql://u:p@127.0.0.1/db\n",
    );
    let p = write_config(&dir, "warn.yaml", &yaml);
    let out = check_config(&p);
    assert_eq!(out.code, Some(0), "warnings are not errors: {out:?}");
    let text = out.combined();
    assert!(
        text.contains("frobnicate_level"),
        "unknown key not reported: {text}"
    );
    assert!(
        text.contains("litellm_db"),
        "litellm_db not reported: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_rejects_invalid_fields() {
    let dir = tempfile::tempdir().unwrap();
    let base = config("", "", "");
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "port0",
            base.replace("port: 18080", "port: 0"),
            "server.port",
        ),
        (
            "type",
            base.replacen("type: openai", "type: foo", 1),
            "credentials[0].type",
        ),
        ("rpm0", config("", "", "    rpm: 0\n"), "credentials[1].rpm"),
        (
            "dup",
            base.replace("name: c2", "name: c1"),
            "credentials[1]",
        ),
        (
            "nomaster",
            base.replace(&format!("  master_key: {MASTER_KEY}\n"), ""),
            "server.master_key",
        ),
        (
            "ftp",
            base.replace("http://127.0.0.1:9/v1", "ftp://x"),
            "credentials[0].base_url",
        ),
    ];
    for (name, yaml, field) in cases {
        assert_ne!(yaml, base, "case {name} did not change the config");
        let p = write_config(&dir, &format!("{name}.yaml"), &yaml);
        let out = check_config(&p);
        assert_eq!(out.code, Some(64), "case {name}: {out:?}");
        let text = out.combined();
        assert!(
            text.contains(field),
            "case {name}: output does not name {field}: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_reports_each_problem_on_its_own_line() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = config("", "", "    rpm: 0\n").replace("port: 18080", "port: 0");
    let p = write_config(&dir, "multi.yaml", &yaml);
    let out = check_config(&p);
    assert_eq!(out.code, Some(64), "{out:?}");
    let text = out.combined();
    let port_line = text.lines().find(|l| l.contains("server.port"));
    let rpm_line = text.lines().find(|l| l.contains("credentials[1].rpm"));
    assert!(port_line.is_some() && rpm_line.is_some(), "{text}");
    assert_ne!(
        port_line, rpm_line,
        "problems should be on separate lines: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_rejects_unparsable_and_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_config(&dir, "broken.yaml", "server: [\n  - : :\n");
    let out = check_config(&p);
    assert_eq!(out.code, Some(64), "{out:?}");

    let missing = dir.path().join("missing.yaml");
    let out = check_config(&missing);
    assert!(out.code.is_some_and(|c| c != 0), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_rejects_invalid_config_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    for (yaml, field) in [
        (
            config("", "", "").replace("port: 18080", "port: 0"),
            "server.port",
        ),
        (config("", "", "    rpm: 0\n"), "credentials[1].rpm"),
    ] {
        let p = write_config(&dir, "bad.yaml", &yaml);
        let out = run_cli(
            &["run", "--config", p.to_str().unwrap()],
            &[],
            Duration::from_secs(5),
        );
        assert!(
            !out.timed_out,
            "router kept running with an invalid config: {out:?}"
        );
        assert!(out.code.is_some_and(|c| c != 0), "{out:?}");
        assert!(
            out.combined().contains(field),
            "output does not name {field}: {out:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_single_dash_config_flag_runs() {
    let mock = MockUpstream::start().await;
    let yaml =
        server_yaml(0, &[]) + &creds_yaml(&[cred("c1", "openai", "sk-c1", &mock.url(), &[])]);
    let router = Router::start_with(
        &yaml,
        StartOpts {
            upstream_flag_spelling: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(router.chat_status("gpt-4o").await, 200);
    assert_eq!(mock.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_references_are_resolved() {
    let mock = MockUpstream::start().await;
    let env_master = "sk-master-from-env-5e1d";
    let yaml = "server:\n  host: 127.0.0.1\n  port: os.environ/AIROUTER_IT_PORT\n  \
                master_key: os.environ/AIROUTER_IT_MASTER\n  max_provider_retries: 0\n\
                credentials:\n  - name: c1\n    type: openai\n    api_key: os.environ/AIROUTER_IT_C1_KEY\n    \
                base_url: os.environ/AIROUTER_IT_C1_URL\n    rpm: os.environ/AIROUTER_IT_C1_RPM\n";
    let opts = StartOpts::default()
        .env("AIROUTER_IT_PORT", "{port}")
        .env("AIROUTER_IT_MASTER", env_master)
        .env("AIROUTER_IT_C1_KEY", "sk-key-from-env-77aa")
        .env("AIROUTER_IT_C1_URL", &mock.url())
        .env("AIROUTER_IT_C1_RPM", "1");
    let router = Router::start_with(yaml, opts).await;

    let send = |key: &'static str| {
        router
            .client()
            .post(router.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&chat_body("gpt-4o"))
            .send()
    };
    assert_eq!(
        send("os.environ/AIROUTER_IT_MASTER")
            .await
            .unwrap()
            .status()
            .as_u16(),
        401
    );
    assert_eq!(send(env_master).await.unwrap().status().as_u16(), 200);
    assert_eq!(mock.bearers(), vec!["sk-key-from-env-77aa"]);
    // rpm resolved from the environment as a number.
    assert_eq!(send(env_master).await.unwrap().status().as_u16(), 503);
    let (_, h) = router.health().await;
    assert_eq!(h["credentials"]["c1"]["limit_rpm"], json!(1), "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_appear_in_logs() {
    let mock = MockUpstream::start().await;
    let secrets = [
        MASTER_KEY,
        "sk-upstream-secret-c1-d41d8c",
        "sk-upstream-secret-c2-8f00b2",
        "sk-upstream-secret-c3-3c9a11",
        "sk-upstream-secret-fb-6b1e4f",
    ];
    let yaml = server_yaml(2, &[])
        + &creds_yaml(&[
            cred("c1", "openai", secrets[1], &mock.url(), &[]),
            cred("c2", "openai", secrets[2], &mock.url(), &[]),
            cred("c3", "openai", secrets[3], &dead_url(), &[]),
            cred(
                "fb",
                "proxy",
                secrets[4],
                &mock.url(),
                &["is_fallback: true"],
            ),
        ]);
    let mut router = Router::start_with(&yaml, StartOpts::default().env("RUST_LOG", "debug")).await;
    let url = router.url("/v1/chat/completions");

    // Authentication failures.
    for auth in [None, Some("Token abc"), Some("Bearer sk-wrong-0000")] {
        let mut req = router.client().post(&url).json(&chat_body("gpt-4o"));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        assert_eq!(req.send().await.unwrap().status().as_u16(), 401);
    }
    // Upstream errors, retries, a dead upstream, a stream.
    mock.push(Reply::error(
        401,
        "Incorrect API key provided: sk-upstr****",
    ));
    mock.push(Reply::error(500, "internal"));
    mock.push(Reply::error(429, "rate limited"));
    for _ in 0..4 {
        let status = router.chat_status("gpt-4o").await;
        assert!(status == 200 || status >= 400, "{status}");
    }
    let start = Instant::now();
    let resp = router
        .post("/v1/chat/completions", &chat_stream_body("gpt-4o"))
        .await;
    let _ = read_sse(resp, start, None, Duration::from_secs(5)).await;
    let health = router.get("/health").await.text().await.unwrap();
    assert!(mock.count() >= 3);

    router.shutdown();
    let logs = router.logs();
    if std::env::var_os("AIROUTER_IT_DUMP_LOGS").is_some() {
        eprintln!("{logs}");
    }
    assert!(
        logs.lines().count() >= 5,
        "expected logs at RUST_LOG=debug for the scan to mean something:\n{logs}"
    );
    for secret in secrets {
        assert!(
            !logs.contains(secret),
            "secret {secret} found in logs:\n{logs}"
        );
        assert!(
            !health.contains(secret),
            "secret {secret} found in /health: {health}"
        );
    }

    // check-config output does not echo secrets either (valid and invalid configs).
    let dir = tempfile::tempdir().unwrap();
    for (name, yaml) in [
        ("ok.yaml", config("", "", "")),
        (
            "bad.yaml",
            config("", "", "    rpm: 0\n").replace("port: 18080", "port: 0"),
        ),
    ] {
        let p = write_config(&dir, name, &yaml);
        let out = check_config(&p);
        let text = out.combined();
        for secret in [MASTER_KEY, "sk-cli-secret-c1", "sk-cli-secret-c2"] {
            assert!(
                !text.contains(secret),
                "check-config {name} prints {secret}: {text}"
            );
        }
    }
}
