//! `RouterConfig`: the config document. Its format is the Auto AI Router `config.yaml`, so an
//! existing file runs unchanged; our additions use the same snake_case keys in the natural
//! section. The operator renders this same type (with `Serialize`) and the data plane reads it
//! with [`RouterConfig::from_yaml`], which resolves `os.environ/NAME`, applies the upstream
//! defaults and collects *every* problem with its field path instead of stopping at the first.
//!
//! Pure: no I/O except reading a Vertex `credentials_file`'s existence, as upstream does.

pub mod duration;
mod parse;

pub use parse::base_url;

use std::{collections::BTreeMap, fmt, time::Duration};

use serde::{Serialize, Serializer};

use crate::secret::Secret;

/// A requests- or tokens-per-minute limit. The file spells unlimited as `-1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Limit {
    #[default]
    Unlimited,
    PerMinute(u64),
}

impl Limit {
    /// One of `parts` equal shares of the limit, at least 1: what each of `parts` replicas
    /// enforces when they do not share their windows.
    pub fn share(self, parts: u32) -> Limit {
        match self {
            Limit::Unlimited => Limit::Unlimited,
            Limit::PerMinute(n) => Limit::PerMinute((n / u64::from(parts.max(1))).max(1)),
        }
    }

    /// The upstream number: `-1` for unlimited.
    pub fn as_i64(self) -> i64 {
        match self {
            Limit::Unlimited => -1,
            Limit::PerMinute(n) => n as i64,
        }
    }

    pub fn get(self) -> Option<u64> {
        match self {
            Limit::Unlimited => None,
            Limit::PerMinute(n) => Some(n),
        }
    }
}

impl Serialize for Limit {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(self.as_i64())
    }
}

/// The whole document.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RouterConfig {
    pub server: ServerConfig,
    /// `None`: the section is absent and airouter's safe defaults apply (§12.6).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fail2ban: Option<Fail2BanConfig>,
    pub monitoring: MonitoringConfig,
    pub credentials: Vec<CredentialConfig>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<ModelConfig>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub model_alias: BTreeMap<String, String>,
    /// Ours: where RPM/TPM windows and bans live. Omitted when it is the default (local), so
    /// configs without it keep their hash.
    #[serde(skip_serializing_if = "RateLimitConfig::is_default")]
    pub rate_limit: RateLimitConfig,
}

/// Ours: the `rate_limit` section.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RateLimitConfig {
    pub backend: RateLimitBackend,
    /// `redis://[user:password@]host[:port][/db]`, `rediss://…` (TLS) or `unix:///path`;
    /// required with the redis backend. It may carry a password: a [`Secret`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<Secret>,
    /// `redis_url` is one node of a Redis Cluster: the client learns the others from it and
    /// follows the cluster's redirections (every key of one request is in one slot).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub cluster: bool,
    /// Namespaces the keys, so routers of different pools can share one Redis.
    pub key_prefix: String,
    /// How many replicas share the limits. With the redis backend, while Redis cannot be
    /// reached each replica enforces `limit / replicas` locally (never the whole limit).
    pub replicas: u32,
    /// How long one Redis call may take before the request goes on without it.
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
}

impl RateLimitConfig {
    pub const DEFAULT_PREFIX: &'static str = "airouter";
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(250);

    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            backend: RateLimitBackend::Local,
            redis_url: None,
            cluster: false,
            key_prefix: Self::DEFAULT_PREFIX.into(),
            replicas: 1,
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitBackend {
    /// Windows and bans in process: each replica enforces its own.
    Local,
    /// Windows and bans in Redis, shared by every replica (atomic Lua scripts).
    Redis,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ServerConfig {
    /// Ours: the address to listen on (upstream always listens on every interface).
    pub host: String,
    pub port: u16,
    pub max_body_size_mb: u64,
    pub response_body_multiplier: u64,
    /// `None`: no timeout (written `-1ns`, which Go reads the same way).
    #[serde(serialize_with = "ser_opt_duration")]
    pub request_timeout: Option<Duration>,
    /// A client connection that takes no bytes of its answer for this long is closed (a
    /// limit on progress, not on the whole answer); zero: never.
    #[serde(serialize_with = "ser_duration")]
    pub write_timeout: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub idle_timeout: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub idle_conn_timeout: Duration,
    pub max_idle_conns: u64,
    pub max_idle_conns_per_host: u64,
    pub logging_level: LogLevel,
    pub master_key: Secret,
    pub default_models_rpm: Limit,
    pub max_provider_retries: u32,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub model_prices_link: String,
    /// Ours: how many routers a request may already have passed before this one refuses it.
    pub max_hops: u32,
    /// Ours: the admin API port (`PUT /admin/config`, `/admin/state`); `None`: no admin API.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_port: Option<u16>,
    /// Ours: the bearer token the admin API requires (required with `admin_port`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<Secret>,
    /// Ours: how often proxy credentials' remote `/health` and `/v1/models` are read.
    #[serde(serialize_with = "ser_duration")]
    pub health_sync_interval: Duration,
    /// Ours: after SIGTERM, how long readiness is false while new connections are still
    /// served (so load balancers stop sending before the listener closes).
    #[serde(serialize_with = "ser_duration")]
    pub shutdown_grace: Duration,
    /// Ours: after the grace, how long in-flight requests and streams may take to finish.
    #[serde(serialize_with = "ser_duration")]
    pub shutdown_timeout: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Debug,
    Info,
    Error,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Error => "error",
        }
    }
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Fail2BanConfig {
    pub max_attempts: u32,
    pub ban_duration: BanDuration,
    pub error_codes: Vec<u16>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub error_code_rules: Vec<ErrorCodeRule>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ErrorCodeRule {
    pub code: u16,
    /// `None`: the section's `max_attempts` (upstream banned at once; see README).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// `None`: the section's `ban_duration`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ban_duration: Option<BanDuration>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BanDuration {
    Permanent,
    For(Duration),
}

/// A ban's length when nothing says otherwise: the safe defaults' auth ban, and a `fail2ban`
/// section without `ban_duration` (upstream's permanent ban is only ever written out, §12.6).
pub const DEFAULT_BAN: Duration = Duration::from_secs(300);

impl Serialize for BanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            BanDuration::Permanent => s.serialize_str("permanent"),
            BanDuration::For(d) => s.serialize_str(&duration::format(*d)),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct MonitoringConfig {
    pub prometheus_enabled: bool,
    pub log_errors: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub errors_log_path: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CredentialType {
    Openai,
    Anthropic,
    Gemini,
    VertexAi,
    Bedrock,
    Proxy,
    /// Ours: answers locally with OpenAI-shaped responses (quickstart, demos, benchmarks).
    Mock,
}

impl CredentialType {
    pub const ALL: [CredentialType; 7] = [
        CredentialType::Openai,
        CredentialType::VertexAi,
        CredentialType::Gemini,
        CredentialType::Anthropic,
        CredentialType::Bedrock,
        CredentialType::Proxy,
        CredentialType::Mock,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CredentialType::Openai => "openai",
            CredentialType::Anthropic => "anthropic",
            CredentialType::Gemini => "gemini",
            CredentialType::VertexAi => "vertex-ai",
            CredentialType::Bedrock => "bedrock",
            CredentialType::Proxy => "proxy",
            CredentialType::Mock => "mock",
        }
    }

    /// Types whose request adapter exists; the others are accepted in the file but never
    /// selected.
    pub fn is_supported(self) -> bool {
        matches!(
            self,
            CredentialType::Openai | CredentialType::Proxy | CredentialType::Mock
        )
    }
}

impl fmt::Display for CredentialType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CredentialConfig {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: CredentialType,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key: Option<Secret>,
    /// Trailing `/` and one trailing `/v1` already removed.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub base_url: String,
    pub rpm: Limit,
    pub tpm: Limit,
    pub is_fallback: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials_json: Option<Secret>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mock: Option<MockConfig>,
    /// Ours: the HTTP version spoken to `base_url`.
    #[serde(skip_serializing_if = "HttpVersion::is_auto")]
    pub http_version: HttpVersion,
}

/// Ours: which HTTP version a credential's upstream is spoken to with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpVersion {
    /// HTTP/2 to `https` origins that offer it in TLS ALPN, HTTP/1.1 otherwise.
    #[default]
    Auto,
    Http1,
    /// HTTP/2 only: required in ALPN for `https`, prior knowledge (h2c) for `http`.
    Http2,
}

impl HttpVersion {
    pub const ALL: [HttpVersion; 3] = [HttpVersion::Auto, HttpVersion::Http1, HttpVersion::Http2];

    pub fn as_str(self) -> &'static str {
        match self {
            HttpVersion::Auto => "auto",
            HttpVersion::Http1 => "http1",
            HttpVersion::Http2 => "http2",
        }
    }

    pub fn is_auto(&self) -> bool {
        *self == HttpVersion::Auto
    }
}

/// How a `mock` credential answers.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct MockConfig {
    /// Delay before the response headers.
    #[serde(serialize_with = "ser_duration")]
    pub latency: Duration,
    /// Delay between streamed chunks.
    #[serde(serialize_with = "ser_duration")]
    pub chunk_interval: Duration,
    /// Content chunks in a streamed reply.
    pub chunks: u32,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            latency: Duration::ZERO,
            chunk_interval: Duration::ZERO,
            chunks: 5,
            prompt_tokens: 10,
            completion_tokens: 20,
        }
    }
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ModelConfig {
    pub name: String,
    /// The real name sent upstream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// `None`: a global entry, bound to every credential.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    /// `None`: `server.default_models_rpm` (which defaults to unlimited; upstream blocked the
    /// pair instead).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpm: Option<Limit>,
    /// `None`: unlimited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tpm: Option<Limit>,
}

/// One thing wrong (or worth a warning) in a config document, with the field it is about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// A rejected document: every problem found, each naming its field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid config: {}", .problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

/// A document that parsed and validated, with the warnings `check-config` prints.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub config: RouterConfig,
    pub warnings: Vec<Problem>,
}

impl RouterConfig {
    /// Parses and validates a YAML (or JSON) document, resolving `os.environ/NAME` through
    /// `env` (pass `|k| std::env::var(k).ok()` in production; tests pass a map).
    pub fn from_yaml(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Loaded, ConfigError> {
        parse::parse(text, env)
    }

    /// A stable content hash of the document (16 hex digits of SHA-256 over the canonical
    /// rendering): equal configs hash equal whatever their key order, comments or env
    /// indirection. The operator reports the same value in `RouterPool.status.configHash`.
    pub fn hash(&self) -> String {
        document_hash(&self.to_yaml())
    }

    /// Renders the document in the file format; [`RouterConfig::from_yaml`] reads it back to
    /// an equal value.
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("RouterConfig serialises to YAML")
    }
}

/// [`RouterConfig::hash`] of the config whose [`RouterConfig::to_yaml`] is `document`, for a
/// caller that already rendered it.
pub fn document_hash(document: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(document.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&duration::format(*d))
}

fn ser_opt_duration<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => ser_duration(d, s),
        None => s.serialize_str("-1ns"),
    }
}
