//! Shared harness for the airouter integration tests.
//!
//! * [`Router`] spawns the real `airouter` binary on a free 127.0.0.1 port with a
//!   YAML config written to a temp dir, and waits (bounded) for readiness.
//! * [`MockUpstream`] is an in-process, scriptable OpenAI-compatible provider
//!   (hyper 1) that records every request it receives.
//! * [`dead_url`] gives a base URL where nothing listens (connection refused).
//! * Live-config helpers: an `{admin_port}` placeholder (a second free port,
//!   [`Router::admin_port`]), the admin API ([`Router::push_config`],
//!   [`Router::config_hash`], [`Router::admin_state`], [`Router::admin_metrics`]),
//!   signals ([`Router::signal`]), [`Router::wait_exit`], routers started from a
//!   config file the test manages ([`Router::start_managed`]) and [`metric_sum`].
//!
//! Every wait in here is bounded in time and in iterations.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::HeaderMap;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, Notify};

/// Master key used by the tests (distinctive so that log scans are meaningful).
pub const MASTER_KEY: &str = "sk-test-master-7f3a9c41";

/// Admin API token used by [`admin_server_yaml`].
pub const ADMIN_TOKEN: &str = "adm-secret-3b8e5d20";

/// How long `Router::start` waits for `/health/readiness`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll period of the readiness loop.
const READY_POLL: Duration = Duration::from_millis(20);

/// Proxy variables removed from the child's environment (only 127.0.0.1 is used).
const PROXY_VARS: &[&str] = &[
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
];

// ---------------------------------------------------------------------------
// Ports / addresses
// ---------------------------------------------------------------------------

/// A currently free TCP port on 127.0.0.1 (bound to port 0, then released).
pub fn free_port() -> u16 {
    let [port] = free_ports();
    port
}

/// `N` distinct currently free TCP ports on 127.0.0.1: all `N` listeners are held at once,
/// so no two are the same (ports picked one at a time can repeat once released).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: [StdTcpListener; N] =
        std::array::from_fn(|_| StdTcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"));
    listeners.map(|l| l.local_addr().expect("local_addr").port())
}

/// The two ports of a router: the public one (`{port}`) and the admin one
/// (`{admin_port}`; only used when the config mentions it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ports {
    pub port: u16,
    pub admin_port: u16,
}

impl Ports {
    /// Two distinct currently free ports on 127.0.0.1.
    pub fn pick() -> Ports {
        let [port, admin_port] = free_ports();
        Ports { port, admin_port }
    }

    /// `template` with `{port}` and `{admin_port}` replaced.
    pub fn fill(&self, template: &str) -> String {
        template
            .replace("{admin_port}", &self.admin_port.to_string())
            .replace("{port}", &self.port.to_string())
    }

    /// `http://127.0.0.1:<port>` (the public listener).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// Base URL of a "dead" upstream: a port on 127.0.0.1 with nothing listening.
pub fn dead_url() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

// ---------------------------------------------------------------------------
// YAML helpers
// ---------------------------------------------------------------------------

/// `server:` section with host, the `{port}` placeholder, the test master key
/// and `max_provider_retries: <retries>`; `extra` lines (e.g.
/// `"request_timeout: 1s"`) are appended inside the section.
pub fn server_yaml(retries: u32, extra: &[&str]) -> String {
    let mut s = format!(
        "server:\n  host: 127.0.0.1\n  port: {{port}}\n  master_key: {MASTER_KEY}\n  \
         max_provider_retries: {retries}\n"
    );
    for line in extra {
        s.push_str("  ");
        s.push_str(line);
        s.push('\n');
    }
    s
}

/// [`server_yaml`] plus `admin_port: {admin_port}` and `admin_token: <ADMIN_TOKEN>`.
pub fn admin_server_yaml(retries: u32, extra: &[&str]) -> String {
    let token = format!("admin_token: {ADMIN_TOKEN}");
    let mut lines: Vec<&str> = vec!["admin_port: {admin_port}", &token];
    lines.extend_from_slice(extra);
    server_yaml(retries, &lines)
}

/// One credential list item in block style (to be placed under `credentials:`).
pub fn cred(name: &str, kind: &str, api_key: &str, base_url: &str, extra: &[&str]) -> String {
    let mut s = format!("  - name: {name}\n    type: {kind}\n");
    if !api_key.is_empty() {
        s.push_str(&format!("    api_key: {api_key}\n"));
    }
    if !base_url.is_empty() {
        s.push_str(&format!("    base_url: \"{base_url}\"\n"));
    }
    for line in extra {
        s.push_str("    ");
        s.push_str(line);
        s.push('\n');
    }
    s
}

/// `credentials:` section made of the given items.
pub fn creds_yaml(items: &[String]) -> String {
    let mut s = String::from("credentials:\n");
    for item in items {
        s.push_str(item);
    }
    s
}

// ---------------------------------------------------------------------------
// Router process
// ---------------------------------------------------------------------------

/// Options for [`Router::start_with`].
#[derive(Clone, Debug, Default)]
pub struct StartOpts {
    /// Extra environment for the child only (`{port}` in values is replaced).
    pub env: Vec<(String, String)>,
    /// Use the upstream spelling `airouter -config FILE` instead of `run --config FILE`.
    pub upstream_flag_spelling: bool,
    /// The key [`Router::post`] & co. send (default [`MASTER_KEY`]); set it when
    /// the config uses another `master_key`.
    pub master_key: Option<String>,
    /// Use these ports instead of picking free ones (e.g. when another router's
    /// config must name this one before it starts). No retry on a port race.
    pub ports: Option<Ports>,
    /// Return once readiness answers at all (`503 starting` too), not only once it is 200.
    pub answering: bool,
}

impl StartOpts {
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    pub fn master_key(mut self, key: &str) -> Self {
        self.master_key = Some(key.to_string());
        self
    }

    pub fn ports(mut self, ports: Ports) -> Self {
        self.ports = Some(ports);
        self
    }

    pub fn answering(mut self) -> Self {
        self.answering = true;
        self
    }
}

/// A running `airouter` child process (killed on drop).
pub struct Router {
    child: Option<Child>,
    pub port: u16,
    /// The port substituted for `{admin_port}` (listening only if the config uses it).
    pub admin_port: u16,
    pub config_path: PathBuf,
    master_key: String,
    log_path: PathBuf,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

/// A reqwest client that never uses a proxy and has a generous overall timeout.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("reqwest client")
}

enum StartError {
    /// The port was taken between `free_port` and the child's bind: retry.
    PortRace(String),
    Fatal(String),
}

impl Router {
    /// Start the router with `yaml` (`{port}` and `{admin_port}` are replaced by
    /// free ports).
    pub async fn start(yaml: &str) -> Router {
        Self::start_with(yaml, StartOpts::default()).await
    }

    pub async fn start_with(yaml: &str, opts: StartOpts) -> Router {
        let write = |ports: &Ports, dir: &Path| -> PathBuf {
            let path = dir.join("config.yaml");
            std::fs::write(&path, ports.fill(yaml)).expect("write config");
            path
        };
        Self::launch(&opts, &write).await
    }

    /// Start the router on `config_path`, a file (or symlink) the test manages.
    /// `prepare` is called with the chosen ports (again after a port race) and
    /// must leave the config readable at `config_path`.
    pub async fn start_managed(
        config_path: &Path,
        opts: StartOpts,
        prepare: impl Fn(&Ports),
    ) -> Router {
        let write = |ports: &Ports, _dir: &Path| -> PathBuf {
            prepare(ports);
            config_path.to_path_buf()
        };
        Self::launch(&opts, &write).await
    }

    async fn launch(opts: &StartOpts, write: &dyn Fn(&Ports, &Path) -> PathBuf) -> Router {
        let mut last = String::new();
        let tries = if opts.ports.is_some() { 1 } else { 3 };
        for _ in 0..tries {
            match Self::try_start(opts, write).await {
                Ok(router) => return router,
                Err(StartError::PortRace(msg)) => last = msg,
                Err(StartError::Fatal(msg)) => panic!("{msg}"),
            }
        }
        panic!("router failed to start (port races):\n{last}");
    }

    async fn try_start(
        opts: &StartOpts,
        write: &dyn Fn(&Ports, &Path) -> PathBuf,
    ) -> Result<Router, StartError> {
        let ports = opts.ports.unwrap_or_else(Ports::pick);
        let port = ports.port;
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = write(&ports, dir.path());
        let log_path = dir.path().join("router.log");
        let log = File::create(&log_path).expect("create log");
        let log_err = log.try_clone().expect("clone log");

        let mut cmd = Command::new(env!("CARGO_BIN_EXE_airouter"));
        if opts.upstream_flag_spelling {
            cmd.arg("-config").arg(&config_path);
        } else {
            cmd.arg("run").arg("--config").arg(&config_path);
        }
        for var in PROXY_VARS {
            cmd.env_remove(var);
        }
        for (k, v) in &opts.env {
            cmd.env(k, ports.fill(v));
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        let child = cmd.spawn().expect("spawn airouter binary");

        let mut router = Router {
            child: Some(child),
            port,
            admin_port: ports.admin_port,
            config_path,
            master_key: opts
                .master_key
                .clone()
                .unwrap_or_else(|| MASTER_KEY.to_string()),
            log_path,
            client: http_client(),
            _dir: dir,
        };

        let ready_url = router.url("/health/readiness");
        let deadline = Instant::now() + READY_TIMEOUT;
        let max_polls = (READY_TIMEOUT.as_millis() / READY_POLL.as_millis()) as usize + 1;
        for _ in 0..max_polls {
            if let Some(child) = router.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    let logs = router.logs();
                    let msg =
                        format!("airouter exited early ({status}) on port {port}; logs:\n{logs}");
                    let lower = logs.to_lowercase();
                    if lower.contains("address already in use") || lower.contains("addrinuse") {
                        return Err(StartError::PortRace(msg));
                    }
                    return Err(StartError::Fatal(msg));
                }
            }
            let probe = router
                .client
                .get(&ready_url)
                .timeout(Duration::from_millis(500))
                .send()
                .await;
            if let Ok(resp) = probe {
                if resp.status().as_u16() == 200 || opts.answering {
                    return Ok(router);
                }
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(READY_POLL).await;
        }
        let logs = router.logs();
        Err(StartError::Fatal(format!(
            "airouter not ready on port {port} within {READY_TIMEOUT:?}; logs:\n{logs}"
        )))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// The key the request helpers send as `Authorization: Bearer`.
    pub fn master_key(&self) -> &str {
        &self.master_key
    }

    /// This router's ports.
    pub fn ports(&self) -> Ports {
        Ports {
            port: self.port,
            admin_port: self.admin_port,
        }
    }

    /// `template` with this router's `{port}` and `{admin_port}` (for pushes and
    /// file rewrites that keep the listeners).
    pub fn fill(&self, template: &str) -> String {
        self.ports().fill(template)
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("router process").id()
    }

    /// Everything the child wrote to stdout and stderr so far.
    pub fn logs(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// POST JSON with `Authorization: Bearer <MASTER_KEY>`.
    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .bearer_auth(&self.master_key)
            .json(body)
            .send()
            .await
            .expect("request to router")
    }

    /// POST a raw body with `Authorization: Bearer <MASTER_KEY>`.
    pub async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .bearer_auth(&self.master_key)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request to router")
    }

    /// Non-streaming chat completion for `model`.
    pub async fn chat(&self, model: &str) -> reqwest::Response {
        self.post("/v1/chat/completions", &chat_body(model)).await
    }

    /// Chat completion for `model` returning only the status code (body drained).
    pub async fn chat_status(&self, model: &str) -> u16 {
        let resp = self.chat(model).await;
        let status = resp.status().as_u16();
        let _ = resp.bytes().await;
        status
    }

    /// [`Self::chat_status`] on a task of its own, for requests that must be in flight
    /// together.
    pub fn spawn_chat_status(&self, model: &str) -> tokio::task::JoinHandle<u16> {
        let req = self
            .client
            .post(self.url("/v1/chat/completions"))
            .bearer_auth(&self.master_key)
            .json(&chat_body(model));
        tokio::spawn(async move {
            let resp = req.send().await.expect("request to router");
            let status = resp.status().as_u16();
            let _ = resp.bytes().await;
            status
        })
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("GET to router")
    }

    /// GET /health → (status, JSON).
    pub async fn health(&self) -> (u16, Value) {
        let resp = self.get("/health").await;
        let status = resp.status().as_u16();
        let body = resp.json::<Value>().await.expect("/health JSON");
        (status, body)
    }

    /// Poll `/health` every 50 ms until `pred` holds or `timeout` elapses.
    pub async fn wait_health(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let max = (timeout.as_millis() / 50) as usize + 2;
        for _ in 0..max {
            let (_, body) = self.health().await;
            if pred(&body) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    // --- admin API -------------------------------------------------------

    /// `http://127.0.0.1:<admin_port><path>`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.admin_port, path)
    }

    /// An admin request with `Authorization: Bearer <token>` (none if `None`).
    pub async fn admin_request(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<String>,
    ) -> reqwest::Response {
        let mut req = self.client.request(method, self.admin_url(path));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.body(body);
        }
        req.send().await.expect("request to the admin API")
    }

    /// GET on the admin port with [`ADMIN_TOKEN`].
    pub async fn admin_get(&self, path: &str) -> reqwest::Response {
        self.admin_request(reqwest::Method::GET, path, Some(ADMIN_TOKEN), None)
            .await
    }

    /// `PUT /admin/config` with [`ADMIN_TOKEN`] → (status, JSON body).
    pub async fn push_config(&self, document: &str) -> (u16, Value) {
        let resp = self
            .admin_request(
                reqwest::Method::PUT,
                "/admin/config",
                Some(ADMIN_TOKEN),
                Some(document.to_string()),
            )
            .await;
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("admin body");
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("PUT /admin/config body is not JSON ({e}): {text}"));
        (status, body)
    }

    /// `GET /admin/config/hash` → the running config's hash.
    pub async fn config_hash(&self) -> String {
        let resp = self.admin_get("/admin/config/hash").await;
        assert_eq!(resp.status().as_u16(), 200, "GET /admin/config/hash");
        let v: Value = resp.json().await.expect("hash JSON");
        v["hash"]
            .as_str()
            .unwrap_or_else(|| panic!("no hash in {v}"))
            .to_string()
    }

    /// `GET /admin/state` as JSON.
    pub async fn admin_state(&self) -> Value {
        let resp = self.admin_get("/admin/state").await;
        assert_eq!(resp.status().as_u16(), 200, "GET /admin/state");
        resp.json().await.expect("state JSON")
    }

    /// `GET /metrics` on the admin port (text).
    pub async fn admin_metrics(&self) -> String {
        let resp = self.admin_get("/metrics").await;
        assert_eq!(resp.status().as_u16(), 200, "GET /metrics (admin)");
        resp.text().await.expect("metrics text")
    }

    /// Poll `/admin/config/hash` every 25 ms until `pred` holds (→ that hash) or
    /// `timeout` elapses (→ `None`).
    pub async fn wait_hash(
        &self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let max = (timeout.as_millis() / 25) as usize + 2;
        for _ in 0..max {
            let hash = self.config_hash().await;
            if pred(&hash) {
                return Some(hash);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        None
    }

    /// Poll the admin `/metrics` every 25 ms until `pred` holds (→ that text) or
    /// `timeout` elapses (→ `None`).
    pub async fn wait_metrics(
        &self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let max = (timeout.as_millis() / 25) as usize + 2;
        for _ in 0..max {
            let text = self.admin_metrics().await;
            if pred(&text) {
                return Some(text);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        None
    }

    // --- process control -----------------------------------------------------

    /// Send a signal (`"HUP"`, `"TERM"`, …) with `kill -s SIG <pid>`. Panics if the
    /// child has already exited (its pid may not be ours any more).
    pub fn signal(&mut self, sig: &str) {
        let child = self.child.as_mut().expect("router process");
        if let Ok(Some(status)) = child.try_wait() {
            panic!("cannot send SIG{sig}: airouter already exited ({status})");
        }
        let status = Command::new("kill")
            .arg("-s")
            .arg(sig)
            .arg(child.id().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -s {sig} failed: {status}");
    }

    /// Whether the child is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Wait (polling every 20 ms) until the child exits → its status, or `None`
    /// if it is still running after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let max = (timeout.as_millis() / 20) as usize + 2;
        let child = self.child.as_mut()?;
        for _ in 0..max {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        child.try_wait().ok().flatten()
    }

    /// Ask the child to stop (SIGTERM, at most 1 s), then SIGKILL.
    pub fn shutdown(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(1);
            for _ in 0..50 {
                if matches!(child.try_wait(), Ok(Some(_))) || Instant::now() >= deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A minimal chat completion request body.
pub fn chat_body(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hello"}]})
}

/// A streaming chat completion request body.
pub fn chat_stream_body(model: &str) -> Value {
    json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "hello"}]})
}

/// Parse the router's local error body `{"error":{...}}`.
pub fn error_of(body: &Value) -> (&str, &str, Option<&str>) {
    let err = &body["error"];
    (
        err["message"].as_str().unwrap_or(""),
        err["type"].as_str().unwrap_or(""),
        err["code"].as_str(),
    )
}

/// Integer `Retry-After` header value, if present.
pub fn retry_after(resp: &reqwest::Response) -> Option<u64> {
    resp.headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// Sum of the samples of metric `name` (exact series name, e.g.
/// `airouter_config_reloads_total`) whose labels include every `(key, value)`
/// of `labels`, in a Prometheus/OpenMetrics text exposition.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.trim().rsplit_once(' ')?;
            let (metric, label_text) = match series.find('{') {
                Some(i) => (&series[..i], series[i + 1..].trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let have = parse_labels(label_text);
            labels
                .iter()
                .all(|(k, v)| have.iter().any(|(hk, hv)| hk == k && hv == v))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// `a="x",b="y"` → pairs (values unescaped for `\"` and `\\`).
fn parse_labels(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() || chars.next() != Some('"') {
            return out;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => value.extend(chars.next()),
                '"' => break,
                c => value.push(c),
            }
        }
        out.push((key.trim().to_string(), value));
    }
}

// ---------------------------------------------------------------------------
// CLI helper
// ---------------------------------------------------------------------------

/// Output of a bounded CLI run.
#[derive(Debug)]
pub struct CliOutput {
    /// Exit code; `None` if killed by a signal or by the timeout.
    pub code: Option<i32>,
    pub timed_out: bool,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    pub fn combined(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// Run the binary with `args` (and extra env), bounded by `timeout` (killed after).
pub fn run_cli(args: &[&str], env: &[(&str, &str)], timeout: Duration) -> CliOutput {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_airouter"));
    cmd.args(args);
    for var in PROXY_VARS {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(File::create(&out_path).expect("stdout file")))
        .stderr(Stdio::from(File::create(&err_path).expect("stderr file")));
    let mut child = cmd.spawn().expect("spawn airouter");
    let deadline = Instant::now() + timeout;
    let max = (timeout.as_millis() / 20) as usize + 2;
    let mut status = None;
    for _ in 0..max {
        if let Ok(Some(s)) = child.try_wait() {
            status = Some(s);
            break;
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let timed_out = status.is_none();
    if timed_out {
        let _ = child.kill();
        let _ = child.wait();
    }
    let read = |p: &PathBuf| {
        std::fs::read(p)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    CliOutput {
        code: status.and_then(|s| s.code()),
        timed_out,
        stdout: read(&out_path),
        stderr: read(&err_path),
    }
}

// ---------------------------------------------------------------------------
// SSE client side
// ---------------------------------------------------------------------------

/// One SSE event as received by the test client.
#[derive(Clone, Debug)]
pub struct SseEvent {
    /// Arrival time relative to the `start` instant given to [`read_sse`].
    pub at: Duration,
    /// Concatenated `data:` lines.
    pub data: String,
}

#[derive(Debug, Default)]
pub struct SseRead {
    pub events: Vec<SseEvent>,
    /// Transport error that ended the stream, if any.
    pub error: Option<String>,
    /// Whether the read stopped because of the `timeout`.
    pub timed_out: bool,
    pub raw: String,
}

impl SseRead {
    pub fn has_done(&self) -> bool {
        self.events.iter().any(|e| e.data.trim() == "[DONE]")
    }

    /// All JSON events (everything but `[DONE]`), with arrival times.
    pub fn json_events(&self) -> Vec<(Duration, Value)> {
        self.events
            .iter()
            .filter(|e| e.data.trim() != "[DONE]")
            .filter_map(|e| {
                serde_json::from_str::<Value>(&e.data)
                    .ok()
                    .map(|v| (e.at, v))
            })
            .collect()
    }

    /// JSON events whose `choices` array is non-empty.
    pub fn choice_chunks(&self) -> Vec<(Duration, Value)> {
        self.json_events()
            .into_iter()
            .filter(|(_, v)| v["choices"].as_array().is_some_and(|c| !c.is_empty()))
            .collect()
    }

    /// Usage chunks: `"choices": []` and a `usage` object.
    pub fn usage_chunks(&self) -> Vec<Value> {
        self.json_events()
            .into_iter()
            .map(|(_, v)| v)
            .filter(|v| {
                v["choices"].as_array().is_some_and(|c| c.is_empty()) && v["usage"].is_object()
            })
            .collect()
    }

    /// Any event carrying a non-null `usage` object.
    pub fn events_with_usage(&self) -> Vec<Value> {
        self.json_events()
            .into_iter()
            .map(|(_, v)| v)
            .filter(|v| v["usage"].is_object())
            .collect()
    }

    /// Concatenated `delta.content` of all chunks.
    pub fn content(&self) -> String {
        self.choice_chunks()
            .iter()
            .filter_map(|(_, v)| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect()
    }
}

/// Read an SSE response until it ends, errors, `limit` events arrived, or
/// `timeout` elapses. The response (and its connection) is dropped on return.
pub async fn read_sse(
    resp: reqwest::Response,
    start: Instant,
    limit: Option<usize>,
    timeout: Duration,
) -> SseRead {
    let mut out = SseRead::default();
    let mut buf = String::new();
    let mut stream = resp.bytes_stream();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let next = match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(n) => n,
            Err(_) => {
                out.timed_out = true;
                break;
            }
        };
        match next {
            None => break,
            Some(Err(e)) => {
                out.error = Some(e.to_string());
                break;
            }
            Some(Ok(bytes)) => {
                let at = start.elapsed();
                let text = String::from_utf8_lossy(&bytes).replace("\r\n", "\n");
                out.raw.push_str(&text);
                buf.push_str(&text);
                while let Some(pos) = buf.find("\n\n") {
                    let block: String = buf[..pos].to_string();
                    buf.drain(..pos + 2);
                    let data: Vec<&str> = block
                        .lines()
                        .filter_map(|l| l.strip_prefix("data:"))
                        .map(|d| d.strip_prefix(' ').unwrap_or(d))
                        .collect();
                    if !data.is_empty() {
                        out.events.push(SseEvent {
                            at,
                            data: data.join("\n"),
                        });
                    }
                }
                if limit.is_some_and(|l| out.events.len() >= l) {
                    break;
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Mock OpenAI upstream
// ---------------------------------------------------------------------------

/// A scripted reply of the mock upstream.
#[derive(Clone, Debug)]
pub enum Reply {
    /// A complete response (the body is sent as is; JSON by default).
    Json {
        status: u16,
        body: String,
        headers: Vec<(String, String)>,
    },
    /// `text/event-stream`, each event written as `data: <event>\n\n`, with
    /// `interval` between events (the first is written at once).
    Stream {
        status: u16,
        events: Vec<String>,
        interval: Duration,
    },
    /// Like `Stream` with status 200, but after the events the connection is
    /// cut (body error: no terminating chunk, no `[DONE]` unless in `events`).
    StreamCut {
        events: Vec<String>,
        interval: Duration,
    },
    /// 200 `application/json` whose body comes in two halves `interval` apart (an answer
    /// still being written when the reader goes away; counted like a stream).
    SlowJson { body: String, interval: Duration },
    /// Wait, then send the inner reply.
    Delay(Duration, Box<Reply>),
    /// Close the connection without answering.
    Hangup,
}

impl Reply {
    /// 200 with the default chat.completion body (usage 5 + 7 = 12).
    pub fn ok() -> Reply {
        Reply::json(200, default_completion())
    }

    pub fn json(status: u16, body: Value) -> Reply {
        Reply::Json {
            status,
            body: body.to_string(),
            headers: Vec::new(),
        }
    }

    /// An OpenAI-style error body with `message`.
    pub fn error(status: u16, message: &str) -> Reply {
        Reply::json(
            status,
            json!({"error": {"message": message, "type": "upstream_error", "param": null, "code": null}}),
        )
    }

    /// 200 chat.completion whose usage.total_tokens is `total`.
    pub fn ok_with_usage(total: u64) -> Reply {
        let mut body = default_completion();
        let prompt = total.min(5);
        body["usage"] = json!({"prompt_tokens": prompt, "completion_tokens": total - prompt, "total_tokens": total});
        Reply::json(200, body)
    }

    /// Add a response header (only meaningful for `Json`).
    pub fn with_header(mut self, name: &str, value: &str) -> Reply {
        if let Reply::Json { headers, .. } = &mut self {
            headers.push((name.to_string(), value.to_string()));
        }
        self
    }

    pub fn stream(events: Vec<String>, interval: Duration) -> Reply {
        Reply::Stream {
            status: 200,
            events,
            interval,
        }
    }

    pub fn delay(d: Duration, inner: Reply) -> Reply {
        Reply::Delay(d, Box::new(inner))
    }
}

/// The default non-streaming chat.completion body.
pub fn default_completion() -> Value {
    json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": 1_700_000_000u64,
        "model": "gpt-4o",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": "Hello from the mock upstream"},
            "finish_reason": "stop"
        }],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    })
}

/// Standard chat.completion.chunk events: `n_chunks` content chunks (content
/// `"c0 "`, `"c1 "`, …), then a usage chunk (`"choices": []`) when
/// `include_usage`, then `[DONE]`.
pub fn openai_stream(n_chunks: usize, include_usage: bool, total_tokens: u64) -> Vec<String> {
    let mut events = Vec::new();
    for i in 0..n_chunks {
        let mut delta = json!({"content": format!("c{i} ")});
        if i == 0 {
            delta["role"] = json!("assistant");
        }
        let finish = if i + 1 == n_chunks {
            json!("stop")
        } else {
            Value::Null
        };
        events.push(
            json!({
                "id": "chatcmpl-mock",
                "object": "chat.completion.chunk",
                "created": 1_700_000_000u64,
                "model": "gpt-4o",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]
            })
            .to_string(),
        );
    }
    if include_usage {
        let prompt = total_tokens.min(5);
        events.push(
            json!({
                "id": "chatcmpl-mock",
                "object": "chat.completion.chunk",
                "created": 1_700_000_000u64,
                "model": "gpt-4o",
                "choices": [],
                "usage": {"prompt_tokens": prompt, "completion_tokens": total_tokens - prompt, "total_tokens": total_tokens}
            })
            .to_string(),
        );
    }
    events.push("[DONE]".to_string());
    events
}

/// A request as seen by the mock upstream.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Path and query.
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    /// The token of `Authorization: Bearer <token>` (or the raw header).
    pub fn bearer(&self) -> Option<String> {
        self.header("authorization")
            .map(|v| v.strip_prefix("Bearer ").map(str::to_string).unwrap_or(v))
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn model(&self) -> String {
        self.json()["model"].as_str().unwrap_or("").to_string()
    }
}

#[derive(Default)]
struct Inner {
    queue: VecDeque<Reply>,
    default: Option<Reply>,
    /// Replies to GETs by path (every other GET gets a 404).
    documents: Vec<(String, Reply)>,
    requests: Vec<Recorded>,
    streams_started: usize,
    streams_completed: usize,
    /// Streams whose reader went away before all events were written.
    streams_aborted: usize,
    events_sent: usize,
}

struct MockState {
    inner: Mutex<Inner>,
    notify: Notify,
}

/// Scriptable OpenAI-compatible upstream on 127.0.0.1:<ephemeral>.
///
/// Scripted replies (`push`, then `set_default`, else `honour`) answer the
/// API calls (any method but GET); GET requests get what [`Self::serve_get`]
/// set for their path, else a 404, and are left out of [`Self::requests`] /
/// [`Self::count`] / [`Self::bearers`].
pub struct MockUpstream {
    addr: SocketAddr,
    state: Arc<MockState>,
    accept_task: tokio::task::JoinHandle<()>,
}

impl MockUpstream {
    pub async fn start() -> MockUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("mock bind");
        let addr = listener.local_addr().expect("mock addr");
        let state = Arc::new(MockState {
            inner: Mutex::new(Inner::default()),
            notify: Notify::new(),
        });
        let st = state.clone();
        let accept_task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    // Out of descriptors, say: back off rather than spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| handle(st.clone(), req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        MockUpstream {
            addr,
            state,
            accept_task,
        }
    }

    /// `http://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queue a scripted reply (FIFO, one per request).
    pub fn push(&self, reply: Reply) {
        self.state.inner.lock().queue.push_back(reply);
    }

    /// Answer every GET of `path` with `reply` (e.g. a remote router's
    /// `/v1/models`, to play one).
    pub fn serve_get(&self, path: &str, reply: Reply) {
        self.state
            .inner
            .lock()
            .documents
            .push((path.to_string(), reply));
    }

    /// Reply used when the queue is empty (instead of honouring the request).
    pub fn set_default(&self, reply: Reply) {
        self.state.inner.lock().default = Some(reply);
    }

    /// The API calls received (every method but GET), in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state
            .inner
            .lock()
            .requests
            .iter()
            .filter(|r| r.method != "GET")
            .cloned()
            .collect()
    }

    /// Everything received, GETs included (e.g. a router's sync of a proxy's
    /// `/health` and `/v1/models`).
    pub fn all_requests(&self) -> Vec<Recorded> {
        self.state.inner.lock().requests.clone()
    }

    /// Number of API calls received (GETs excluded, see [`Self::requests`]).
    pub fn count(&self) -> usize {
        self.requests().len()
    }

    /// Bearer tokens of the requests received so far, in arrival order.
    pub fn bearers(&self) -> Vec<String> {
        self.requests()
            .iter()
            .map(|r| r.bearer().unwrap_or_else(|| "<none>".into()))
            .collect()
    }

    /// Number of requests that carried `Authorization: Bearer <token>`.
    pub fn count_bearer(&self, token: &str) -> usize {
        self.bearers().iter().filter(|b| *b == token).count()
    }

    pub fn streams_started(&self) -> usize {
        self.state.inner.lock().streams_started
    }

    pub fn streams_completed(&self) -> usize {
        self.state.inner.lock().streams_completed
    }

    pub fn streams_aborted(&self) -> usize {
        self.state.inner.lock().streams_aborted
    }

    pub fn events_sent(&self) -> usize {
        self.state.inner.lock().events_sent
    }

    /// Wait (bounded) until at least `n` requests were received.
    pub async fn wait_requests(&self, n: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, |i| {
            i.requests.iter().filter(|r| r.method != "GET").count() >= n
        })
        .await
    }

    /// Wait (bounded) until at least `n` stream events were written (all streams).
    pub async fn wait_events(&self, n: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, |i| i.events_sent >= n).await
    }

    /// Wait (bounded) until a stream's reader went away.
    pub async fn wait_stream_aborted(&self, timeout: Duration) -> bool {
        self.wait_until(timeout, |i| i.streams_aborted >= 1).await
    }

    async fn wait_until(&self, timeout: Duration, pred: impl Fn(&Inner) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        let max = (timeout.as_millis() / 10) as usize + 2;
        for _ in 0..max {
            let notified = self.state.notify.notified();
            if pred(&self.state.inner.lock()) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            // Wake on change, or re-check every 10 ms at most.
            let _ = tokio::time::timeout(Duration::from_millis(10), notified).await;
        }
        pred(&self.state.inner.lock())
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

type MockBody = BoxBody<Bytes, io::Error>;

fn full(status: u16, content_type: &str, body: impl Into<Bytes>) -> Response<MockBody> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(
            Full::new(body.into())
                .map_err(|never| match never {})
                .boxed(),
        )
        .expect("response")
}

/// Response body fed by a channel (so that events are written as they are produced).
struct ChannelBody(mpsc::Receiver<Result<Frame<Bytes>, io::Error>>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.0.poll_recv(cx)
    }
}

/// What the mock does without a scripted reply: stream 3 chunks when the
/// request asks for `stream: true` (with a usage chunk only when
/// `stream_options.include_usage` is true), otherwise the default JSON.
fn honour(rec: &Recorded) -> Reply {
    let req = rec.json();
    if req["stream"].as_bool() == Some(true) {
        let include_usage = req["stream_options"]["include_usage"].as_bool() == Some(true);
        Reply::stream(
            openai_stream(3, include_usage, 12),
            Duration::from_millis(10),
        )
    } else {
        Reply::ok()
    }
}

async fn handle(
    state: Arc<MockState>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, io::Error> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let rec = Recorded {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_else(|| parts.uri.path().to_string()),
        headers: parts.headers,
        body,
    };
    let is_get = rec.method == "GET";
    let scripted = {
        let mut inner = state.inner.lock();
        inner.requests.push(rec.clone());
        if is_get {
            // Not an API call (e.g. a router syncing a proxy's /health or
            // /v1/models): a plain provider has no such documents.
            let document = inner.documents.iter().find(|(p, _)| *p == rec.path);
            Some(document.map_or_else(|| Reply::error(404, "not found"), |(_, r)| r.clone()))
        } else {
            inner.queue.pop_front().or_else(|| inner.default.clone())
        }
    };
    state.notify.notify_waiters();
    let mut reply = scripted.unwrap_or_else(|| honour(&rec));
    for _ in 0..16 {
        match reply {
            Reply::Delay(d, inner) => {
                tokio::time::sleep(d).await;
                reply = *inner;
            }
            _ => break,
        }
    }
    match reply {
        Reply::Json {
            status,
            body,
            headers,
        } => {
            let mut resp = full(status, "application/json", body);
            for (k, v) in headers {
                resp.headers_mut().insert(
                    hyper::header::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                    hyper::header::HeaderValue::from_str(&v).expect("header value"),
                );
            }
            Ok(resp)
        }
        Reply::Stream {
            status,
            events,
            interval,
        } => Ok(stream_response(state, status, events, interval, false)),
        Reply::StreamCut { events, interval } => {
            Ok(stream_response(state, 200, events, interval, true))
        }
        Reply::SlowJson { body, interval } => {
            let half = body.len() / 2;
            let pieces = vec![
                Bytes::copy_from_slice(&body.as_bytes()[..half]),
                Bytes::copy_from_slice(&body.as_bytes()[half..]),
            ];
            let content_type = "application/json";
            Ok(trickle(state, 200, content_type, pieces, interval, false))
        }
        Reply::Hangup => Err(io::Error::other("mock: hang up")),
        Reply::Delay(..) => Err(io::Error::other("mock: too many nested delays")),
    }
}

fn stream_response(
    state: Arc<MockState>,
    status: u16,
    events: Vec<String>,
    interval: Duration,
    cut: bool,
) -> Response<MockBody> {
    let pieces = events
        .into_iter()
        .map(|ev| Bytes::from(format!("data: {ev}\n\n")))
        .collect();
    trickle(state, status, "text/event-stream", pieces, interval, cut)
}

/// A body written piece by piece, `interval` apart, counted in the mock's stream counters.
fn trickle(
    state: Arc<MockState>,
    status: u16,
    content_type: &str,
    pieces: Vec<Bytes>,
    interval: Duration,
    cut: bool,
) -> Response<MockBody> {
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, io::Error>>(1);
    state.inner.lock().streams_started += 1;
    tokio::spawn(async move {
        let aborted = |state: &MockState| {
            state.inner.lock().streams_aborted += 1;
            state.notify.notify_waiters();
        };
        for (i, piece) in pieces.into_iter().enumerate() {
            if i > 0 {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = tx.closed() => { aborted(&state); return; }
                }
            }
            let frame = Frame::data(piece);
            if tx.send(Ok(frame)).await.is_err() {
                aborted(&state);
                return;
            }
            state.inner.lock().events_sent += 1;
            state.notify.notify_waiters();
        }
        if cut {
            // Give hyper a moment to flush the last event, then fail the body:
            // hyper closes the connection without the terminating chunk.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = tx.send(Err(io::Error::other("mock: stream cut"))).await;
        }
        state.inner.lock().streams_completed += 1;
        state.notify.notify_waiters();
    });
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("cache-control", "no-cache")
        .body(ChannelBody(rx).boxed())
        .expect("stream response")
}

// ---------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------

/// A throwaway CA and a certificate for 127.0.0.1 signed by it, with PEM files of the CA
/// (for `SSL_CERT_FILE`), the certificate and its key.
pub struct Pki {
    _dir: tempfile::TempDir,
    pub ca_file: String,
    pub cert: rustls::pki_types::CertificateDer<'static>,
    pub key: Vec<u8>,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

pub fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "airouter test CA");
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    // A subject of its own: OpenSSL (redis-cli, redis-server's cluster bus) takes a leaf
    // whose subject equals its issuer's for self-signed and refuses it.
    leaf.distinguished_name
        .push(DnType::CommonName, "127.0.0.1");
    let cert = leaf.signed_by(&key, &ca, &ca_key).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, pem: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let ca_file = file("ca.pem", ca.pem());
    let cert_file = file("cert.pem", cert.pem());
    let key_file = file("key.pem", key.serialize_pem());
    Pki {
        ca_file: ca_file.to_string_lossy().into_owned(),
        cert: cert.der().clone(),
        key: key.serialize_der(),
        cert_file,
        key_file,
        _dir: dir,
    }
}

// ---------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------

/// A real `redis-server` on 127.0.0.1 (no persistence), killed on drop. Debian's
/// `redis-server` package provides it; `tests/run.sh` installs it.
pub struct RedisServer {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

/// How many times a server (or cluster) on free ports is started before the test fails: a
/// port picked free can be taken by another process before the server binds it, and then
/// the server exits (its log says "Address already in use").
const REDIS_TRIES: usize = 3;

impl RedisServer {
    /// Starts on a free port.
    pub async fn start() -> RedisServer {
        retry_on_free_ports(async || Self::try_start_on(free_port()).await).await
    }

    /// Starts on `port` and waits (bounded) until it answers `PING`.
    pub async fn start_on(port: u16) -> RedisServer {
        Self::try_start_on(port)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    async fn try_start_on(port: u16) -> Result<RedisServer, String> {
        let mut server = Self::spawn(&["--port", &port.to_string()], port);
        let ping = async || Self::command_on(port, &["PING"]).await.as_deref() == Some("+PONG");
        server.wait_for("answer PING", ping).await?;
        Ok(server)
    }

    /// Starts with TLS only on a free port (`cert`/`key`: PEM files), waiting (bounded) until
    /// it accepts connections. [`RedisServer::command`] does not speak TLS.
    pub async fn start_tls(cert: &Path, key: &Path) -> RedisServer {
        let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
        retry_on_free_ports(async || {
            let port = free_port();
            let args = ["--port", "0", "--tls-port", &port.to_string()];
            let tls = [
                "--tls-cert-file",
                cert,
                "--tls-key-file",
                key,
                "--tls-auth-clients",
                "no",
            ];
            let mut server = Self::spawn(&[&args[..], &tls[..]].concat(), port);
            // Its own log, not a connect: another process may hold the port.
            let log = server.log_path();
            let ready = async || {
                std::fs::read_to_string(&log)
                    .is_ok_and(|log| log.contains("Ready to accept connections"))
            };
            server.wait_for("accept connections", ready).await?;
            Ok(server)
        })
        .await
    }

    /// Waits until `ready` holds: at most 10 s and 500 tries. `Err` names what did not
    /// happen and carries the server's log when it exits first or time runs out.
    async fn wait_for(&mut self, what: &str, ready: impl AsyncFn() -> bool) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        for _ in 0..500 {
            if ready().await {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "redis-server on port {} exited ({status}) before it would {what}; its log:\n{}",
                    self.port,
                    self.log()
                ));
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(format!(
            "redis-server on port {} did not {what} within 10 s; its log:\n{}",
            self.port,
            self.log()
        ))
    }

    fn spawn(args: &[&str], port: u16) -> RedisServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--logfile",
                "redis.log",
                "--dir",
            ])
            .arg(dir.path())
            .args(args)
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is missing: install Debian's redis-server (tests/run.sh does)");
        RedisServer { child, port, dir }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// The server's log (its last 40 lines), for failure messages.
    fn log(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Sends one command (a RESP array of bulk strings); `None` when the server cannot be
    /// reached.
    async fn send(port: u16, args: &[&str]) -> Option<BufReader<tokio::net::TcpStream>> {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        stream.write_all(req.as_bytes()).await.ok()?;
        Some(BufReader::new(stream))
    }

    async fn line(reader: &mut BufReader<tokio::net::TcpStream>) -> Option<String> {
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(2), reader.read_line(&mut line))
            .await
            .ok()?
            .ok()?;
        Some(line.trim_end().to_string())
    }

    /// Sends one command and returns the first line of the reply (`+PONG`, `:1`, `$2`…).
    pub async fn command(&self, args: &[&str]) -> Option<String> {
        Self::command_on(self.port, args).await
    }

    /// [`RedisServer::command`] to the server on `port`.
    async fn command_on(port: u16, args: &[&str]) -> Option<String> {
        Self::line(&mut Self::send(port, args).await?).await
    }

    /// Sends one command and returns a bulk-string reply's value (`None` for a nil reply or
    /// when the server cannot be reached).
    pub async fn command_value(&self, args: &[&str]) -> Option<String> {
        let mut reader = Self::send(self.port, args).await?;
        let head = Self::line(&mut reader).await?;
        let len: usize = head.strip_prefix('$')?.parse().ok()?;
        let mut value = vec![0; len + 2]; // and its CRLF
        tokio::time::timeout(Duration::from_secs(2), reader.read_exact(&mut value))
            .await
            .ok()?
            .ok()?;
        value.truncate(len);
        String::from_utf8(value).ok()
    }

    /// Stops the server (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of three primaries (`redis-server --cluster-enabled yes`), its slots
/// assigned by `redis-cli --cluster create`; every node is killed on drop. Driven through
/// `redis-cli`, which reads every reply type and speaks TLS.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    /// `--tls --cacert <file>` for `redis-cli` when the nodes speak only TLS.
    tls: Vec<String>,
}

impl RedisCluster {
    pub async fn start() -> RedisCluster {
        retry_on_free_ports(async || Self::create(free_ports(), None).await).await
    }

    /// [`RedisCluster::start`] on these ports.
    pub async fn start_on(ports: [u16; 3]) -> RedisCluster {
        Self::create(ports, None)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Nodes that speak only TLS, to clients and to each other (`tls-cluster`), with the
    /// certificate of `pki` (127.0.0.1); their client URLs are `rediss://`.
    pub async fn start_tls(pki: &Pki) -> RedisCluster {
        retry_on_free_ports(async || Self::create(free_ports(), Some(pki)).await).await
    }

    async fn create(ports: [u16; 3], pki: Option<&Pki>) -> Result<RedisCluster, String> {
        let mut cluster = RedisCluster {
            nodes: Vec::new(),
            tls: pki.map_or_else(Vec::new, |pki| {
                vec!["--tls".into(), "--cacert".into(), pki.ca_file.clone()]
            }),
        };
        // The bus port is port + 10000 unless given: past 65535 for a high free port. Six
        // distinct free ports leave at least three that are not a node's.
        let buses: Vec<String> = free_ports::<6>()
            .into_iter()
            .filter(|p| !ports.contains(p))
            .map(|p| p.to_string())
            .collect();
        for (port, bus) in ports.into_iter().zip(&buses) {
            let port_s = port.to_string();
            let mut args = vec![
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                bus,
                "--cluster-config-file",
                "nodes.conf",
            ];
            let (cert, key);
            match pki {
                None => args.extend(["--port", &port_s]),
                Some(pki) => {
                    (cert, key) = (
                        pki.cert_file.to_str().unwrap(),
                        pki.key_file.to_str().unwrap(),
                    );
                    args.extend(["--port", "0", "--tls-port", &port_s, "--tls-cluster", "yes"]);
                    args.extend(["--tls-cert-file", cert, "--tls-key-file", key]);
                    args.extend([
                        "--tls-ca-cert-file",
                        &pki.ca_file,
                        "--tls-auth-clients",
                        "no",
                    ]);
                }
            }
            let mut node = RedisServer::spawn(&args, port);
            let tls = &cluster.tls;
            let ping = async || redis_cli(tls, port, &["PING"]).as_deref() == Some("PONG");
            let up = node.wait_for("answer PING", ping).await;
            cluster.nodes.push(node);
            up?;
        }
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        // Bounded like every redis-cli call: it waits for the nodes to agree without limit.
        let created = Command::new("timeout")
            .args(["-k", "5", "60", "redis-cli"])
            .args(&cluster.tls)
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli is missing: Debian's redis-tools provides it (redis-server depends on it)");
        if !created.status.success() {
            return Err(format!(
                "redis-cli --cluster create failed ({}): {}",
                created.status,
                String::from_utf8_lossy(&created.stdout)
            ));
        }
        let tls = &cluster.tls;
        for node in &mut cluster.nodes {
            let port = node.port;
            let ok = async || {
                redis_cli(tls, port, &["CLUSTER", "INFO"])
                    .is_some_and(|info| info.contains("cluster_state:ok"))
            };
            node.wait_for("join the cluster", ok).await?;
        }
        Ok(cluster)
    }

    /// The `redis://` (or `rediss://`) URL of node `n`.
    pub fn url(&self, n: usize) -> String {
        let scheme = if self.tls.is_empty() {
            "redis"
        } else {
            "rediss"
        };
        format!("{scheme}://127.0.0.1:{}", self.nodes[n].port)
    }

    /// `redis-cli` on node `node`: see [`redis_cli`].
    fn try_cli(&self, node: usize, args: &[&str]) -> Option<String> {
        redis_cli(&self.tls, self.nodes[node].port, args)
    }

    /// [`RedisCluster::try_cli`] that must succeed.
    fn cli(&self, node: usize, args: &[&str]) -> String {
        self.try_cli(node, args)
            .unwrap_or_else(|| panic!("redis-cli {args:?} on node {node} failed"))
    }

    /// The index of the node that serves `slot`.
    pub fn owner_of(&self, slot: u16) -> usize {
        // `CLUSTER SHARDS` needs Redis 7; `CLUSTER NODES` lines end with the slot ranges.
        let nodes = self.cli(0, &["CLUSTER", "NODES"]);
        let owner_id = nodes
            .lines()
            .find(|line| {
                line.split(' ').skip(8).any(|range| {
                    let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                    matches!((lo.parse::<u16>(), hi.parse::<u16>()), (Ok(lo), Ok(hi)) if (lo..=hi).contains(&slot))
                })
            })
            .and_then(|line| line.split(' ').next())
            .expect("a node serves every slot")
            .to_string();
        (0..self.nodes.len())
            .find(|&i| self.cli(i, &["CLUSTER", "MYID"]) == owner_id)
            .expect("the owner is one of the nodes")
    }

    /// Moves `slot` and its keys from node `from` to node `to` the way `redis-cli --cluster
    /// reshard` does: mark it importing and migrating, `MIGRATE` the keys, then tell every
    /// node its new owner. Clients that cached the old owner get `MOVED` from it afterwards.
    pub fn move_slot(&self, slot: u16, from: usize, to: usize) {
        let slot = slot.to_string();
        let from_id = self.cli(from, &["CLUSTER", "MYID"]);
        let to_id = self.cli(to, &["CLUSTER", "MYID"]);
        assert_eq!(
            self.cli(to, &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id]),
            "OK"
        );
        assert_eq!(
            self.cli(from, &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id]),
            "OK"
        );
        let keys = self.cli(from, &["CLUSTER", "GETKEYSINSLOT", &slot, "1000"]);
        let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
        if !keys.is_empty() {
            let port = self.nodes[to].port.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            args.extend(&keys);
            assert_eq!(self.cli(from, &args), "OK");
        }
        for node in std::iter::once(to)
            .chain(std::iter::once(from))
            .chain((0..self.nodes.len()).filter(|&n| n != to && n != from))
        {
            assert_eq!(
                self.cli(node, &["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]),
                "OK"
            );
        }
    }

    /// How many keys each node holds, in node order.
    pub fn key_counts(&self) -> Vec<u64> {
        (0..self.nodes.len())
            .map(|n| self.cli(n, &["DBSIZE"]).parse().unwrap_or(0))
            .collect()
    }

    /// The slot every key with the hash tag `{tag}` lands in.
    pub fn slot_of(&self, tag: &str) -> u16 {
        self.cli(0, &["CLUSTER", "KEYSLOT", tag])
            .parse()
            .expect("CLUSTER KEYSLOT answers a number")
    }
}

/// `redis-cli [tls…] -p <port> <args…>`: its output, one reply element a line; `None` when it
/// fails (the node is not up yet, or answered an error).
fn redis_cli(tls: &[String], port: u16, args: &[&str]) -> Option<String> {
    // redis-cli waits for a reply without limit, and a port taken by another process may
    // accept and never answer: coreutils' `timeout` bounds it.
    let out = Command::new("timeout")
        .args(["-k", "1", "10", "redis-cli"])
        .args(tls)
        .args(["-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("redis-cli is missing: Debian's redis-tools provides it");
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // redis-cli exits 0 on an error reply, and 1 when it cannot connect.
    (out.status.success() && !text.starts_with("ERR") && !text.starts_with("Could not"))
        .then_some(text)
}

/// Runs `start` (which picks its own free ports) up to [`REDIS_TRIES`] times, and fails the
/// test with every attempt's error when none starts.
async fn retry_on_free_ports<T>(start: impl AsyncFn() -> Result<T, String>) -> T {
    let mut errors = Vec::new();
    for _ in 0..REDIS_TRIES {
        match start().await {
            Ok(started) => return started,
            Err(e) => errors.push(e),
        }
    }
    panic!(
        "redis did not start in {REDIS_TRIES} tries:\n{}",
        errors.join("\n---\n")
    );
}
