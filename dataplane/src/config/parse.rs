//! Reads a YAML document into [`RouterConfig`] the way upstream does (scalars read as strings,
//! `os.environ/NAME` resolved, then parsed; upstream defaults), but collects every problem with
//! its field path, and applies the airouter fixes of spec §12 (unique names, `models[]` without
//! `rpm` unlimited, no silent fallbacks for bad values).

use std::{collections::BTreeMap, collections::HashMap, path::Path, time::Duration};

use serde_yaml::{Mapping, Value};

use super::{
    duration, BanDuration, ConfigError, CredentialConfig, CredentialType, ErrorCodeRule,
    Fail2BanConfig, HttpVersion, Limit, Loaded, LogLevel, MockConfig, ModelConfig,
    MonitoringConfig, Problem, RateLimitBackend, RateLimitConfig, RouterConfig, ServerConfig,
    DEFAULT_BAN,
};
use crate::secret::Secret;

const ENV_PREFIX: &str = "os.environ/";

const TOP_KEYS: &[&str] = &[
    "server",
    "fail2ban",
    "monitoring",
    "credentials",
    "models",
    "model_alias",
    "rate_limit",
    "litellm_db",
];
const SERVER_KEYS: &[&str] = &[
    "host",
    "port",
    "max_body_size_mb",
    "response_body_multiplier",
    "request_timeout",
    "write_timeout",
    "idle_timeout",
    "idle_conn_timeout",
    "max_idle_conns",
    "max_idle_conns_per_host",
    "logging_level",
    "master_key",
    "default_models_rpm",
    "max_provider_retries",
    "model_prices_link",
    "max_hops",
    "admin_port",
    "admin_token",
    "health_sync_interval",
    "shutdown_grace",
    "shutdown_timeout",
];
const CREDENTIAL_KEYS: &[&str] = &[
    "name",
    "type",
    "api_key",
    "base_url",
    "rpm",
    "tpm",
    "is_fallback",
    "project_id",
    "location",
    "credentials_file",
    "credentials_json",
    "mock",
    "http_version",
];
const MOCK_KEYS: &[&str] = &[
    "latency",
    "chunk_interval",
    "chunks",
    "prompt_tokens",
    "completion_tokens",
];
const MODEL_KEYS: &[&str] = &["name", "model", "credential", "rpm", "tpm"];
const FAIL2BAN_KEYS: &[&str] = &[
    "max_attempts",
    "ban_duration",
    "error_codes",
    "error_code_rules",
];
const RULE_KEYS: &[&str] = &["code", "max_attempts", "ban_duration"];
const MONITORING_KEYS: &[&str] = &["prometheus_enabled", "log_errors", "errors_log_path"];
const RATE_LIMIT_KEYS: &[&str] = &[
    "backend",
    "redis_url",
    "cluster",
    "key_prefix",
    "replicas",
    "timeout",
];

pub(super) fn parse(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Loaded, ConfigError> {
    let mut p = Parser {
        env,
        problems: Vec::new(),
        warnings: Vec::new(),
    };
    let root: Value = match serde_yaml::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            let field = e
                .location()
                .map(|l| format!("line {} column {}", l.line(), l.column()))
                .unwrap_or_else(|| "document".into());
            return Err(ConfigError {
                problems: vec![Problem {
                    field,
                    message: format!("not valid YAML: {e}"),
                }],
            });
        }
    };
    let config = p.document(&root);
    if p.problems.is_empty() {
        Ok(Loaded {
            config: config.expect("a document without problems is complete"),
            warnings: p.warnings,
        })
    } else {
        Err(ConfigError {
            problems: p.problems,
        })
    }
}

struct Parser<'e> {
    env: &'e dyn Fn(&str) -> Option<String>,
    problems: Vec<Problem>,
    warnings: Vec<Problem>,
}

/// A scalar as written, after env resolution. `from_env` remembers that the YAML held
/// `os.environ/X`, so an empty result is an error rather than "use the default".
struct Scalar {
    text: String,
    from_env: bool,
}

impl Parser<'_> {
    fn error(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            field: field.into(),
            message: message.into(),
        });
    }

    fn warn(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(Problem {
            field: field.into(),
            message: message.into(),
        });
    }

    fn document(&mut self, root: &Value) -> Option<RouterConfig> {
        let empty = Mapping::new();
        let top = match root {
            Value::Mapping(m) => m,
            Value::Null => &empty,
            _ => {
                self.error(
                    "document",
                    "must be a mapping with a `server` and `credentials` section",
                );
                return None;
            }
        };
        self.unknown_keys(top, "", TOP_KEYS);
        if top.get("litellm_db").is_some_and(|v| !v.is_null()) {
            self.warn(
                "litellm_db",
                "the LiteLLM database integration is not supported by airouter; the section is ignored",
            );
        }
        let server = self.server(top.get("server"));
        let fail2ban = match top.get("fail2ban") {
            None => None,
            Some(v) => self.fail2ban(v),
        };
        let monitoring = self.monitoring(top.get("monitoring"));
        let credentials = self.credentials(top.get("credentials"));
        let models = self.models(top.get("models"), &credentials);
        let model_alias = self.aliases(top.get("model_alias"));
        let rate_limit = self.rate_limit(top.get("rate_limit"));
        Some(RouterConfig {
            server: server?,
            fail2ban,
            monitoring,
            credentials,
            models,
            model_alias,
            rate_limit,
        })
    }

    fn mapping<'v>(
        &mut self,
        v: Option<&'v Value>,
        field: &str,
        known: &[&str],
    ) -> Option<&'v Mapping> {
        match v {
            None | Some(Value::Null) => None,
            Some(Value::Mapping(m)) => {
                self.unknown_keys(m, field, known);
                Some(m)
            }
            Some(_) => {
                self.error(field, "must be a mapping of keys to values");
                None
            }
        }
    }

    fn unknown_keys(&mut self, m: &Mapping, field: &str, known: &[&str]) {
        for key in m.keys() {
            let name = key
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| format!("{key:?}"));
            if !known.contains(&name.as_str()) {
                let path = join(field, &name);
                self.warn(path, "unknown key, ignored");
            }
        }
    }

    /// Reads a scalar, resolving `os.environ/NAME` when `env` is set.
    fn scalar(&mut self, m: Option<&Mapping>, key: &str, field: &str, env: bool) -> Option<Scalar> {
        let v = m?.get(key)?;
        let text = match v {
            Value::Null => return None,
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            _ => {
                self.error(field, "must be a single value, not a list or mapping");
                return None;
            }
        };
        if env {
            if let Some(var) = text.strip_prefix(ENV_PREFIX) {
                let value = (self.env)(var).unwrap_or_default();
                if value.is_empty() {
                    self.warn(
                        field,
                        format!("environment variable {var} is unset or empty"),
                    );
                }
                return Some(Scalar {
                    text: value,
                    from_env: true,
                });
            }
        }
        Some(Scalar {
            text,
            from_env: false,
        })
    }

    /// A string field; `None` when absent or empty.
    fn string(
        &mut self,
        m: Option<&Mapping>,
        key: &str,
        parent: &str,
        env: bool,
    ) -> Option<String> {
        let field = join(parent, key);
        self.scalar(m, key, &field, env)
            .map(|s| s.text)
            .filter(|s| !s.is_empty())
    }

    /// Reads a scalar and parses it; `None` when absent (the caller applies the default) or
    /// invalid (a problem has been recorded).
    fn parsed<T>(
        &mut self,
        m: Option<&Mapping>,
        key: &str,
        parent: &str,
        env: bool,
        what: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Option<T> {
        let field = join(parent, key);
        let s = self.scalar(m, key, &field, env)?;
        if s.text.is_empty() && !s.from_env {
            return None;
        }
        match parse(s.text.trim()) {
            Ok(v) => Some(v),
            Err(why) => {
                self.error(
                    field,
                    format!("invalid {key}: {:?} is not {what}{}", s.text, suffix(&why)),
                );
                None
            }
        }
    }

    fn int(&mut self, m: Option<&Mapping>, key: &str, parent: &str, env: bool) -> Option<i64> {
        self.parsed(m, key, parent, env, "a whole number", |s| {
            s.parse::<i64>().map_err(|_| String::new())
        })
    }

    fn boolean(&mut self, m: Option<&Mapping>, key: &str, parent: &str, env: bool) -> Option<bool> {
        self.parsed(m, key, parent, env, "true or false", |s| match s {
            "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
            "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
            _ => Err(String::new()),
        })
    }

    fn duration(
        &mut self,
        m: Option<&Mapping>,
        key: &str,
        parent: &str,
        env: bool,
    ) -> Option<Duration> {
        self.parsed(
            m,
            key,
            parent,
            env,
            "a duration such as 30s, 1m or 1h30m",
            duration::parse,
        )
    }

    /// An RPM/TPM limit: `-1` unlimited, a positive number, and `0` per `zero`.
    fn limit(
        &mut self,
        m: Option<&Mapping>,
        key: &str,
        parent: &str,
        env: bool,
        zero: Zero,
    ) -> Limit {
        let Some(n) = self.int(m, key, parent, env) else {
            return Limit::Unlimited;
        };
        match (n, zero) {
            (-1, _) => Limit::Unlimited,
            (0, Zero::Unlimited) => Limit::Unlimited,
            (n, _) if n > 0 => Limit::PerMinute(n as u64),
            (n, _) => {
                self.error(
                    join(parent, key),
                    format!("invalid {key}: {n} (must be -1 for unlimited or a positive number)"),
                );
                Limit::Unlimited
            }
        }
    }

    fn server(&mut self, v: Option<&Value>) -> Option<ServerConfig> {
        if v.is_none_or(Value::is_null) {
            self.error(
                "server",
                "section is required (it holds at least `master_key`)",
            );
        }
        let m = self.mapping(v, "server", SERVER_KEYS);
        let f = "server";
        let host = self
            .string(m, "host", f, true)
            .unwrap_or_else(|| "0.0.0.0".into());
        if host.parse::<std::net::IpAddr>().is_err() {
            self.error(
                "server.host",
                format!(
                    "invalid host: {host:?} (must be an IP address such as 0.0.0.0 or 127.0.0.1)"
                ),
            );
        }
        let port = match self.int(m, "port", f, true).unwrap_or(8080) {
            p @ 1..=65535 => p as u16,
            p => {
                self.error(
                    "server.port",
                    format!("invalid port: {p} (must be 1..65535)"),
                );
                0
            }
        };
        let max_body_size_mb = match self.int(m, "max_body_size_mb", f, true).unwrap_or(100) {
            n if n > 0 => n as u64,
            n => {
                self.error(
                    "server.max_body_size_mb",
                    format!("invalid max_body_size_mb: {n} (must be > 0)"),
                );
                1
            }
        };
        let response_body_multiplier = match self.int(m, "response_body_multiplier", f, true) {
            None => 10,
            Some(n) if n > 0 => n as u64,
            // Upstream silently takes 10 here (spec §1.2); every invalid value is refused.
            Some(n) => {
                self.error(
                    "server.response_body_multiplier",
                    format!("invalid response_body_multiplier: {n} (must be > 0)"),
                );
                10
            }
        };
        let request_timeout = self.request_timeout(m);
        let write_timeout = self
            .duration(m, "write_timeout", f, true)
            .unwrap_or(Duration::from_secs(60));
        let idle_timeout = match self.duration(m, "idle_timeout", f, true) {
            Some(Duration::ZERO) => write_timeout * 2,
            Some(d) => d,
            None => Duration::from_secs(120),
        };
        if idle_timeout.is_zero() {
            self.error(
                "server.idle_timeout",
                "must be > 0 (0 means 2 × write_timeout, and write_timeout is 0 too)",
            );
        }
        let idle_conn_timeout = self
            .duration(m, "idle_conn_timeout", f, true)
            .unwrap_or(Duration::from_secs(120));
        let max_idle_conns = self.non_negative(m, "max_idle_conns", f, 200);
        let max_idle_conns_per_host = self.non_negative(m, "max_idle_conns_per_host", f, 256);
        // Accepted so an upstream config loads unchanged, but said out loud when set to
        // something else than the default, since nothing here reads them.
        if max_idle_conns != 200 {
            self.warn(
                "server.max_idle_conns",
                "has no effect in airouter: idle upstream connections are bounded per host, by \
                 max_idle_conns_per_host",
            );
        }
        let logging_level = match self.string(m, "logging_level", f, true).as_deref() {
            None | Some("info") => LogLevel::Info,
            Some("debug") => LogLevel::Debug,
            Some("error") => LogLevel::Error,
            Some(other) => {
                self.error(
                    "server.logging_level",
                    format!("invalid logging_level: {other} (must be info, debug, or error)"),
                );
                LogLevel::Info
            }
        };
        let master_key = self.string(m, "master_key", f, true);
        if master_key.is_none() {
            self.error(
                "server.master_key",
                "master_key is required (clients send it as `Authorization: Bearer <master_key>`)",
            );
        }
        let default_models_rpm = match self.int(m, "default_models_rpm", f, true) {
            None | Some(0) | Some(-1) => Limit::Unlimited,
            Some(n) if n > 0 => Limit::PerMinute(n as u64),
            Some(n) => {
                self.error("server.default_models_rpm", format!("invalid default_models_rpm: {n} (must be -1 for unlimited or positive number)"));
                Limit::Unlimited
            }
        };
        let max_provider_retries = match self.int(m, "max_provider_retries", f, true).unwrap_or(2) {
            n if (0..=100).contains(&n) => n as u32,
            n => {
                self.error(
                    "server.max_provider_retries",
                    format!("invalid max_provider_retries: {n} (must be between 0 and 100)"),
                );
                0
            }
        };
        let model_prices_link = self
            .string(m, "model_prices_link", f, true)
            .unwrap_or_default();
        let max_hops = match self.int(m, "max_hops", f, true).unwrap_or(5) {
            n if (1..=100).contains(&n) => n as u32,
            n => {
                self.error(
                    "server.max_hops",
                    format!("invalid max_hops: {n} (must be between 1 and 100)"),
                );
                5
            }
        };
        let admin_port = match self.int(m, "admin_port", f, true) {
            None => None,
            Some(p @ 1..=65535) if p as u16 == port => {
                self.error("server.admin_port", format!("admin_port {p} must differ from port (the admin API never shares the public listener)"));
                None
            }
            Some(p @ 1..=65535) => Some(p as u16),
            Some(p) => {
                self.error(
                    "server.admin_port",
                    format!("invalid admin_port: {p} (must be 1..65535)"),
                );
                None
            }
        };
        let admin_token = self.string(m, "admin_token", f, true).map(Secret::new);
        if admin_port.is_some() && admin_token.is_none() {
            self.error("server.admin_token", "admin_token is required when admin_port is set (the admin API accepts config pushes)");
        }
        let health_sync_interval = match self.duration(m, "health_sync_interval", f, true) {
            None => Duration::from_secs(30),
            Some(d) if d >= Duration::from_millis(100) => d,
            Some(_) => {
                self.error(
                    "server.health_sync_interval",
                    "health_sync_interval must be at least 100ms",
                );
                Duration::from_secs(30)
            }
        };
        let shutdown_grace = self
            .duration(m, "shutdown_grace", f, true)
            .unwrap_or(Duration::from_secs(5));
        let shutdown_timeout = self
            .duration(m, "shutdown_timeout", f, true)
            .unwrap_or(Duration::from_secs(30));
        Some(ServerConfig {
            host,
            port,
            max_body_size_mb,
            response_body_multiplier,
            request_timeout,
            write_timeout,
            idle_timeout,
            idle_conn_timeout,
            max_idle_conns,
            max_idle_conns_per_host,
            logging_level,
            master_key: Secret::new(master_key?),
            default_models_rpm,
            max_provider_retries,
            model_prices_link,
            max_hops,
            admin_port,
            admin_token,
            health_sync_interval,
            shutdown_grace,
            shutdown_timeout,
        })
    }

    /// `request_timeout`: a duration; zero or negative (upstream's `-1ns`) means no timeout.
    fn request_timeout(&mut self, m: Option<&Mapping>) -> Option<Duration> {
        let parsed = self.parsed(
            m,
            "request_timeout",
            "server",
            true,
            "a duration such as 60s (0 or -1ns: no timeout)",
            |s| match s.strip_prefix('-') {
                Some(rest) => duration::parse(rest).map(|_| None),
                None => duration::parse(s).map(|d| Some(d).filter(|d| !d.is_zero())),
            },
        );
        match parsed {
            None => Some(Duration::from_secs(60)),
            Some(d) => d,
        }
    }

    fn non_negative(&mut self, m: Option<&Mapping>, key: &str, parent: &str, default: u64) -> u64 {
        match self.int(m, key, parent, true) {
            None => default,
            Some(n) if n >= 0 => n as u64,
            Some(n) => {
                self.error(
                    join(parent, key),
                    format!("invalid {key}: {n} (must be >= 0)"),
                );
                default
            }
        }
    }

    fn fail2ban(&mut self, v: &Value) -> Option<Fail2BanConfig> {
        let m = self.mapping(Some(v), "fail2ban", FAIL2BAN_KEYS);
        let f = "fail2ban";
        let max_attempts = match self.int(m, "max_attempts", f, true).unwrap_or(3) {
            n if n > 0 && n <= u32::MAX as i64 => n as u32,
            n => {
                self.error(
                    "fail2ban.max_attempts",
                    format!("invalid max_attempts: {n} (must be > 0)"),
                );
                3
            }
        };
        let ban_duration = self.ban_duration(m, "ban_duration", f).unwrap_or_else(|| {
            if m.and_then(|m| m.get("ban_duration")).is_none_or(Value::is_null) {
                self.warn(
                    "fail2ban.ban_duration",
                    "not set: bans last 5m (Auto AI Router bans permanently; write `permanent` for that)",
                );
            }
            BanDuration::For(DEFAULT_BAN)
        });
        let mut error_codes =
            self.codes(m.and_then(|m| m.get("error_codes")), "fail2ban.error_codes");
        if error_codes.is_empty() {
            error_codes.push(429);
        }
        let mut error_code_rules = Vec::new();
        match m.and_then(|m| m.get("error_code_rules")) {
            None | Some(Value::Null) => {}
            Some(Value::Sequence(rules)) => {
                let mut seen: HashMap<u16, usize> = HashMap::new();
                for (i, rule) in rules.iter().enumerate() {
                    let rf = format!("fail2ban.error_code_rules[{i}]");
                    let rm = self.mapping(Some(rule), &rf, RULE_KEYS);
                    let code = self.int(rm, "code", &rf, false);
                    let Some(code) = self.status_code(code, &join(&rf, "code")) else {
                        if rm.is_some_and(|m| m.get("code").is_none()) {
                            self.error(join(&rf, "code"), "code is required");
                        }
                        continue;
                    };
                    if let Some(prev) = seen.insert(code, i) {
                        self.error(join(&rf, "code"), format!("duplicate error_code_rules for code {code} (also error_code_rules[{prev}])"));
                    }
                    let max_attempts = match self.int(rm, "max_attempts", &rf, false) {
                        None => None,
                        Some(n) if n > 0 && n <= u32::MAX as i64 => Some(n as u32),
                        Some(n) => {
                            self.error(join(&rf, "max_attempts"), format!("invalid max_attempts: {n} (must be > 0; omit it to use fail2ban.max_attempts)"));
                            None
                        }
                    };
                    let ban_duration = self.ban_duration(rm, "ban_duration", &rf);
                    error_code_rules.push(ErrorCodeRule {
                        code,
                        max_attempts,
                        ban_duration,
                    });
                }
            }
            Some(_) => self.error(
                "fail2ban.error_code_rules",
                "must be a list of {code, max_attempts, ban_duration}",
            ),
        }
        Some(Fail2BanConfig {
            max_attempts,
            ban_duration,
            error_codes,
            error_code_rules,
        })
    }

    fn ban_duration(
        &mut self,
        m: Option<&Mapping>,
        key: &str,
        parent: &str,
    ) -> Option<BanDuration> {
        self.parsed(
            m,
            key,
            parent,
            true,
            "`permanent` or a duration such as 30m",
            |s| {
                if s == "permanent" {
                    return Ok(BanDuration::Permanent);
                }
                duration::parse(s).map(|d| {
                    if d.is_zero() {
                        BanDuration::Permanent
                    } else {
                        BanDuration::For(d)
                    }
                })
            },
        )
    }

    fn codes(&mut self, v: Option<&Value>, field: &str) -> Vec<u16> {
        match v {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Sequence(items)) => items
                .iter()
                .enumerate()
                .filter_map(|(i, item)| {
                    let f = format!("{field}[{i}]");
                    let n = match item {
                        Value::Number(n) => n.as_i64(),
                        Value::String(s) => s.trim().parse().ok(),
                        _ => None,
                    };
                    if n.is_none() {
                        self.error(&f, format!("{item:?} is not an HTTP status code"));
                    }
                    self.status_code(n, &f)
                })
                .collect(),
            Some(_) => {
                self.error(
                    field,
                    "must be a list of HTTP status codes, e.g. [429, 500]",
                );
                Vec::new()
            }
        }
    }

    fn status_code(&mut self, n: Option<i64>, field: &str) -> Option<u16> {
        match n? {
            n @ 100..=599 => Some(n as u16),
            n => {
                self.error(field, format!("{n} is not an HTTP status code (100..599)"));
                None
            }
        }
    }

    fn monitoring(&mut self, v: Option<&Value>) -> MonitoringConfig {
        let m = self.mapping(v, "monitoring", MONITORING_KEYS);
        let f = "monitoring";
        let log_errors = self.boolean(m, "log_errors", f, true).unwrap_or(false);
        if log_errors {
            self.warn(
                "monitoring.log_errors",
                "airouter writes no error file (errors_log_path is not used): a failed request \
                 is logged with its request id and status, without bodies, and counted in the metrics",
            );
        }
        MonitoringConfig {
            prometheus_enabled: self
                .boolean(m, "prometheus_enabled", f, true)
                .unwrap_or(false),
            log_errors,
            errors_log_path: self
                .string(m, "errors_log_path", f, true)
                .unwrap_or_default(),
        }
    }

    fn rate_limit(&mut self, v: Option<&Value>) -> RateLimitConfig {
        let m = self.mapping(v, "rate_limit", RATE_LIMIT_KEYS);
        let f = "rate_limit";
        let defaults = RateLimitConfig::default();
        let backend = self
            .parsed(m, "backend", f, true, "local or redis", |s| match s {
                "local" => Ok(RateLimitBackend::Local),
                "redis" => Ok(RateLimitBackend::Redis),
                _ => Err(String::new()),
            })
            .unwrap_or(defaults.backend);
        // Never echo the URL in a problem: it may hold a password.
        let redis_url = self.string(m, "redis_url", f, true);
        let cluster = self
            .boolean(m, "cluster", f, true)
            .unwrap_or(defaults.cluster);
        if redis_url
            .as_deref()
            .is_some_and(|url| !crate::limit::shared::is_redis_url(url, cluster))
        {
            let expected = if cluster {
                "not a Redis Cluster node's URL: expected redis://[user:password@]host[:port] or rediss://…"
            } else {
                "not a Redis URL: expected redis://[user:password@]host[:port][/db], rediss://… or unix:///path"
            };
            self.error("rate_limit.redis_url", expected);
        }
        if backend == RateLimitBackend::Redis && redis_url.is_none() {
            self.error(
                "rate_limit.redis_url",
                "required when rate_limit.backend is redis: set it to the server's URL (redis://host:6379) or os.environ/NAME of a variable holding it",
            );
        }
        let key_prefix = self
            .string(m, "key_prefix", f, true)
            .unwrap_or(defaults.key_prefix);
        if key_prefix.contains(['{', '}']) {
            self.error(
                "rate_limit.key_prefix",
                format!("invalid key_prefix: {key_prefix:?} (braces are reserved: the prefix becomes a Redis Cluster hash tag)"),
            );
        }
        let replicas = match self.int(m, "replicas", f, true) {
            None => defaults.replicas,
            Some(n) if (1..=i64::from(u32::MAX)).contains(&n) => n as u32,
            Some(n) => {
                self.error(
                    "rate_limit.replicas",
                    format!("invalid replicas: {n} (must be at least 1)"),
                );
                defaults.replicas
            }
        };
        let timeout = match self.duration(m, "timeout", f, true) {
            None => defaults.timeout,
            Some(d) if d > Duration::ZERO => d,
            Some(_) => {
                self.error(
                    "rate_limit.timeout",
                    "invalid timeout: must be longer than 0",
                );
                defaults.timeout
            }
        };
        RateLimitConfig {
            backend,
            redis_url: redis_url.map(Secret::new),
            cluster,
            key_prefix,
            replicas,
            timeout,
        }
    }

    fn credentials(&mut self, v: Option<&Value>) -> Vec<CredentialConfig> {
        let items = match v {
            Some(Value::Sequence(items)) if !items.is_empty() => items,
            None | Some(Value::Null) | Some(Value::Sequence(_)) => {
                self.error(
                    "credentials",
                    "no credentials configured (add at least one entry)",
                );
                return Vec::new();
            }
            Some(_) => {
                self.error("credentials", "must be a list of credentials");
                return Vec::new();
            }
        };
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let f = format!("credentials[{i}]");
            if !item.is_mapping() {
                self.error(&f, "must be a mapping with at least `name` and `type`");
                continue;
            }
            if let Some(c) = self.credential(item, &f) {
                if let Some(prev) = names.insert(c.name.clone(), i) {
                    self.error(join(&f, "name"), format!("duplicate credential name {:?} (also credentials[{prev}]); names must be unique", c.name));
                }
                out.push(c);
            }
        }
        out
    }

    fn credential(&mut self, v: &Value, f: &str) -> Option<CredentialConfig> {
        let m = self.mapping(Some(v), f, CREDENTIAL_KEYS);
        let name = self.string(m, "name", f, true);
        if name.is_none() {
            self.error(join(f, "name"), "name is required");
        }
        let kind = match self.string(m, "type", f, true) {
            None => {
                self.error(join(f, "type"), "type is required (one of openai, anthropic, gemini, vertex-ai, bedrock, proxy, mock)");
                None
            }
            Some(t) => match CredentialType::ALL.into_iter().find(|k| k.as_str() == t) {
                Some(k) => Some(k),
                None => {
                    self.error(join(f, "type"), format!("invalid type: {t} (must be one of openai, anthropic, gemini, vertex-ai, bedrock, proxy, mock)"));
                    None
                }
            },
        };
        let api_key = self.string(m, "api_key", f, true).map(Secret::new);
        // Sent as `Authorization: Bearer <key>`: a key a header cannot carry would go out with
        // no Authorization at all. Named by its flaw, never shown.
        if let Some(key) = &api_key {
            if let Some(flaw) = header_flaw(key.expose()) {
                self.error(
                    join(f, "api_key"),
                    format!("{flaw}; a header cannot carry it"),
                );
            }
        }
        let base_url = self.base_url(m, f, kind);
        let rpm = self.limit(m, "rpm", f, true, Zero::Invalid);
        let tpm = self.limit(m, "tpm", f, true, Zero::Unlimited);
        let is_fallback = self.boolean(m, "is_fallback", f, true).unwrap_or(false);
        let project_id = self.string(m, "project_id", f, true);
        let location = self.string(m, "location", f, true);
        let credentials_file = self.string(m, "credentials_file", f, true);
        let credentials_json = self.string(m, "credentials_json", f, true).map(Secret::new);
        let kind = kind?;
        let needs_key = matches!(
            kind,
            CredentialType::Openai
                | CredentialType::Anthropic
                | CredentialType::Bedrock
                | CredentialType::Gemini
        );
        if needs_key && api_key.is_none() {
            self.error(
                join(f, "api_key"),
                format!("api_key is required for type {kind}"),
            );
        }
        if kind == CredentialType::VertexAi {
            if project_id.is_none() {
                self.error(
                    join(f, "project_id"),
                    "project_id is required for type vertex-ai",
                );
            }
            if location.is_none() {
                self.error(
                    join(f, "location"),
                    "location is required for type vertex-ai",
                );
            }
            if api_key.is_none() && credentials_file.is_none() && credentials_json.is_none() {
                self.error(
                    f,
                    "vertex-ai needs one of api_key, credentials_file or credentials_json",
                );
            }
            if let Some(file) = &credentials_file {
                if !Path::new(file).is_file() {
                    self.error(
                        join(f, "credentials_file"),
                        format!("file {file:?} does not exist"),
                    );
                }
            }
        }
        let mock = match m.and_then(|m| m.get("mock")) {
            Some(v) if !v.is_null() && kind != CredentialType::Mock => {
                let _ = v;
                self.error(
                    join(f, "mock"),
                    "only a credential of type mock takes a `mock` section",
                );
                None
            }
            v if kind == CredentialType::Mock => Some(self.mock(v, &join(f, "mock"))),
            _ => None,
        };
        let http_version = self.http_version(m, f, kind);
        Some(CredentialConfig {
            name: name?,
            kind,
            api_key,
            base_url: base_url.unwrap_or_default(),
            rpm,
            tpm,
            is_fallback,
            project_id,
            location,
            credentials_file,
            credentials_json,
            mock,
            http_version,
        })
    }

    fn http_version(&mut self, m: Option<&Mapping>, f: &str, kind: CredentialType) -> HttpVersion {
        let field = join(f, "http_version");
        let Some(raw) = self.string(m, "http_version", f, true) else {
            return HttpVersion::Auto;
        };
        match HttpVersion::ALL.into_iter().find(|v| v.as_str() == raw) {
            Some(v) if kind == CredentialType::Mock && !v.is_auto() => {
                self.warn(
                    field,
                    "a mock credential has no upstream; http_version is ignored",
                );
                HttpVersion::Auto
            }
            Some(v) => v,
            None => {
                self.error(
                    field,
                    format!("invalid http_version: {raw} (must be one of auto, http1, http2)"),
                );
                HttpVersion::Auto
            }
        }
    }

    fn base_url(
        &mut self,
        m: Option<&Mapping>,
        f: &str,
        kind: Option<CredentialType>,
    ) -> Option<String> {
        let field = join(f, "base_url");
        let Some(raw) = self.string(m, "base_url", f, true) else {
            if kind.is_some_and(|k| !matches!(k, CredentialType::VertexAi | CredentialType::Mock)) {
                self.error(field, "base_url is required");
            }
            return None;
        };
        match base_url(&raw) {
            Ok(url) => Some(url),
            Err(message) => {
                self.error(field, message);
                None
            }
        }
    }

    fn mock(&mut self, v: Option<&Value>, f: &str) -> MockConfig {
        let m = self.mapping(v, f, MOCK_KEYS);
        let d = MockConfig::default();
        MockConfig {
            latency: self.duration(m, "latency", f, true).unwrap_or(d.latency),
            chunk_interval: self
                .duration(m, "chunk_interval", f, true)
                .unwrap_or(d.chunk_interval),
            chunks: match self.int(m, "chunks", f, true) {
                None => d.chunks,
                Some(n @ 1..=10_000) => n as u32,
                Some(n) => {
                    self.error(
                        join(f, "chunks"),
                        format!("invalid chunks: {n} (must be 1..10000)"),
                    );
                    d.chunks
                }
            },
            prompt_tokens: self.non_negative(m, "prompt_tokens", f, d.prompt_tokens),
            completion_tokens: self.non_negative(m, "completion_tokens", f, d.completion_tokens),
        }
    }

    fn models(&mut self, v: Option<&Value>, credentials: &[CredentialConfig]) -> Vec<ModelConfig> {
        let items = match v {
            None | Some(Value::Null) => return Vec::new(),
            Some(Value::Sequence(items)) => items,
            Some(_) => {
                self.error(
                    "models",
                    "must be a list of {name, model, credential, rpm, tpm}",
                );
                return Vec::new();
            }
        };
        let mut seen: HashMap<(String, Option<String>), usize> = HashMap::new();
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let f = format!("models[{i}]");
            let m = self.mapping(Some(item), &f, MODEL_KEYS);
            if m.is_none() {
                self.error(&f, "must be a mapping with at least `name`");
                continue;
            }
            // Upstream resolves no environment variables in models[]; neither do we.
            let name = self.string(m, "name", &f, false);
            let model = self.string(m, "model", &f, false);
            let credential = self.string(m, "credential", &f, false);
            let rpm = has(m, "rpm").then(|| self.limit(m, "rpm", &f, false, Zero::Invalid));
            let tpm = has(m, "tpm").then(|| self.limit(m, "tpm", &f, false, Zero::Unlimited));
            let Some(name) = name else {
                self.error(join(&f, "name"), "name is required");
                continue;
            };
            if let Some(c) = &credential {
                if !credentials.iter().any(|cred| &cred.name == c) {
                    self.warn(
                        join(&f, "credential"),
                        format!("no credential is named {c:?}; the entry binds nothing"),
                    );
                }
            }
            if let Some(prev) = seen.insert((name.clone(), credential.clone()), i) {
                self.error(
                    &f,
                    format!(
                        "duplicate entry for model {name:?}{} (also models[{prev}])",
                        credential
                            .as_ref()
                            .map(|c| format!(" and credential {c:?}"))
                            .unwrap_or_default()
                    ),
                );
            }
            out.push(ModelConfig {
                name,
                model,
                credential,
                rpm,
                tpm,
            });
        }
        out
    }

    fn aliases(&mut self, v: Option<&Value>) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let m = match v {
            None | Some(Value::Null) => return out,
            Some(Value::Mapping(m)) => m,
            Some(_) => {
                self.error("model_alias", "must be a mapping of alias: target");
                return out;
            }
        };
        for (k, v) in m {
            let (Some(k), Some(v)) = (scalar_text(k), scalar_text(v)) else {
                self.error("model_alias", "aliases and targets must be strings");
                continue;
            };
            let field = format!("model_alias.{k}");
            let alias = self.resolve(&k, &field);
            let target = self.resolve(&v, &field);
            if alias.is_empty() || target.is_empty() {
                self.error(field, "alias and target must not be empty");
            } else if alias == target {
                self.warn(field, "alias equals its target; skipped");
            } else {
                out.insert(alias, target);
            }
        }
        out
    }

    fn resolve(&mut self, s: &str, field: &str) -> String {
        match s.strip_prefix(ENV_PREFIX) {
            Some(var) => {
                let value = (self.env)(var).unwrap_or_default();
                if value.is_empty() {
                    self.warn(
                        field,
                        format!("environment variable {var} is unset or empty"),
                    );
                }
                value
            }
            None => s.to_owned(),
        }
    }
}

#[derive(Clone, Copy)]
enum Zero {
    /// `0` is rejected (RPM: upstream's 0 silently blocks every request).
    Invalid,
    /// `0` means unlimited (TPM, as upstream).
    Unlimited,
}

fn has(m: Option<&Mapping>, key: &str) -> bool {
    m.and_then(|m| m.get(key)).is_some_and(|v| !v.is_null())
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

/// What keeps `value` out of an HTTP header, if anything (said without showing the value).
fn header_flaw(value: &str) -> Option<&'static str> {
    if value.starts_with([' ', '\t']) || value.ends_with([' ', '\t']) {
        Some("it starts or ends with a space or a tab")
    } else if value.bytes().any(|b| b == b'\n' || b == b'\r') {
        Some("it holds a line break (a trailing newline from a file or a secret?)")
    } else if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        Some("it holds a control character")
    } else if !value.is_ascii() {
        Some("it holds a non-ASCII character")
    } else {
        None
    }
}

/// A credential's `base_url` as the router uses it (without a trailing `/` and `/v1`), or why
/// it cannot be one; the message never shows the URL's user-info.
pub fn base_url(raw: &str) -> Result<String, String> {
    let uri: http::Uri = raw.parse().map_err(|e| {
        let shown = without_userinfo(raw);
        format!("invalid base_url {shown:?}: {e}")
    })?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        other => {
            return Err(format!(
                "base_url must use http or https scheme, got: {}",
                other.unwrap_or("none")
            ))
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("base_url must have a host".into());
    }
    // Over HTTP/2 it would travel in `:authority`, which must not carry it; the key belongs
    // in `api_key`.
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(format!(
            "base_url must not carry user-info ({:?}); put the key in api_key",
            without_userinfo(raw)
        ));
    }
    if uri.query().is_some() {
        return Err("base_url must not have a query string".into());
    }
    let trimmed = raw.trim_end_matches('/');
    Ok(trimmed.strip_suffix("/v1").unwrap_or(trimmed).to_owned())
}

/// `url` with its user-info (`user:password@`) shown as `***@`: a URL that does not parse
/// may still carry a key, and the message goes to logs and API answers.
fn without_userinfo(url: &str) -> std::borrow::Cow<'_, str> {
    let start = url.find("://").map_or(0, |i| i + 3);
    let authority = &url[start..];
    let end = authority.find(['/', '?', '#']).unwrap_or(authority.len());
    match authority[..end].rfind('@') {
        Some(at) => format!("{}***{}", &url[..start], &authority[at..]).into(),
        None => url.into(),
    }
}

fn suffix(why: &str) -> String {
    if why.is_empty() {
        String::new()
    } else {
        format!(" ({why})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn fields(text: &str) -> Vec<String> {
        parse(text, &no_env)
            .unwrap_err()
            .problems
            .into_iter()
            .map(|p| p.field)
            .collect()
    }

    const MINIMAL: &str = "server: {master_key: k}\ncredentials: [{name: a, type: openai, api_key: x, base_url: 'http://h/v1/'}]\n";

    #[test]
    fn an_invalid_base_url_is_named_without_its_userinfo() {
        let text = "server: {master_key: k}\ncredentials: [{name: a, type: openai, api_key: x, \
                    base_url: 'https://user:s3cret pw@llm.example/v1'}]\n";
        let err = parse(text, &no_env).unwrap_err();
        let message = err.problems[0].to_string();
        assert!(message.contains("credentials[0].base_url"), "{message}");
        assert!(message.contains("https://***@llm.example/v1"), "{message}");
        assert!(!message.contains("s3cret"), "{message}");
        let valid_but_keyed = text.replace("user:s3cret pw@", "user:s3cret@");
        let err = parse(&valid_but_keyed, &no_env).unwrap_err();
        let message = err.problems[0].to_string();
        assert!(message.contains("must not carry user-info"), "{message}");
        assert!(!message.contains("s3cret"), "{message}");
        assert_eq!(without_userinfo("http://h:8080/v1"), "http://h:8080/v1");
        assert_eq!(without_userinfo("h/a@b"), "h/a@b");
        assert_eq!(without_userinfo("u:p@h"), "***@h");
    }

    #[test]
    fn an_api_key_a_header_cannot_carry_is_refused_without_showing_it() {
        for (key, says) in [
            ("sk-xyzzy\\n", "line break"),
            ("sk-xyzzy\\r\\n", "line break"),
            (" sk-xyzzy", "space"),
            ("sk-xyzzé", "non-ASCII"),
            ("sk-\\u0007xyzzy", "control character"),
        ] {
            let text = format!("server: {{master_key: k}}\ncredentials: [{{name: a, type: openai, api_key: \"{key}\", base_url: 'http://h'}}]\n");
            let err = parse(&text, &no_env).unwrap_err();
            let message = err.problems[0].to_string();
            assert!(message.starts_with("credentials[0].api_key: "), "{message}");
            assert!(message.contains(says), "{key:?}: {message}");
            assert!(!message.contains("xyzz"), "{message}");
        }
        let ok = "server: {master_key: k}\ncredentials: [{name: a, type: openai, api_key: 'sk-a/b+c=', base_url: 'http://h'}]\n";
        assert!(parse(ok, &no_env).is_ok());
    }

    #[test]
    fn upstream_defaults() {
        let c = parse(MINIMAL, &no_env).unwrap().config;
        assert_eq!(c.server.port, 8080);
        assert_eq!(c.server.max_body_size_mb, 100);
        assert_eq!(c.server.request_timeout, Some(Duration::from_secs(60)));
        assert_eq!(c.server.idle_timeout, Duration::from_secs(120));
        assert_eq!(c.server.max_provider_retries, 2);
        assert_eq!(c.server.default_models_rpm, Limit::Unlimited);
        assert_eq!(c.credentials[0].base_url, "http://h");
        assert_eq!(c.credentials[0].rpm, Limit::Unlimited);
        assert!(c.fail2ban.is_none());
    }

    #[test]
    fn collects_every_problem_with_its_field() {
        let text = "server: {port: 0, master_key: k, logging_level: INFO, request_timeout: 5, response_body_multiplier: 0}\n\
                    credentials:\n\
                    - {name: a, type: foo}\n\
                    - {name: b, type: openai, api_key: x, base_url: 'ftp://h', rpm: 0, tpm: -2}\n\
                    - {name: b, type: proxy, base_url: 'http://h'}\n\
                    models: [{name: m, rpm: 0}, {rpm: 3}]\n";
        let got = fields(text);
        for want in [
            "server.port",
            "server.logging_level",
            "server.request_timeout",
            "server.response_body_multiplier",
            "credentials[0].type",
            "credentials[1].base_url",
            "credentials[1].rpm",
            "credentials[1].tpm",
            "credentials[2].name",
            "models[0].rpm",
            "models[1].name",
        ] {
            assert!(got.iter().any(|f| f == want), "missing {want} in {got:?}");
        }
    }

    #[test]
    fn settings_that_do_nothing_here_are_named_when_set() {
        let warned = |server: &str, monitoring: &str| {
            let text = format!("server: {{master_key: k{server}}}\nmonitoring: {{{monitoring}}}\ncredentials: [{{name: a, type: mock}}]\n");
            let loaded = parse(&text, &no_env).unwrap();
            loaded
                .warnings
                .into_iter()
                .map(|w| w.field)
                .collect::<Vec<_>>()
        };
        assert!(warned("", "").is_empty());
        let defaults = ", max_idle_conns: 200";
        assert!(
            warned(defaults, "log_errors: false").is_empty(),
            "a rendered config"
        );
        assert_eq!(
            warned(
                ", write_timeout: 5m, max_idle_conns: 10",
                "log_errors: true, errors_log_path: /tmp/e"
            ),
            ["server.max_idle_conns", "monitoring.log_errors"]
        );
    }

    #[test]
    fn master_key_and_credentials_are_required() {
        let got = fields("server: {port: 1}\n");
        assert_eq!(got, vec!["server.master_key", "credentials"]);
    }

    #[test]
    fn env_resolution() {
        let env = |k: &str| match k {
            "KEY" => Some("sk-env".to_string()),
            "PORT" => Some("9000".to_string()),
            _ => None,
        };
        let text = "server: {master_key: os.environ/KEY, port: os.environ/PORT}\n\
                    credentials: [{name: a, type: openai, api_key: os.environ/KEY, base_url: 'http://h'}]\n";
        let c = parse(text, &env).unwrap().config;
        assert_eq!(c.server.port, 9000);
        assert_eq!(c.server.master_key.expose(), "sk-env");
        let err = parse("server: {master_key: k, port: os.environ/NOPE}\ncredentials: [{name: a, type: proxy, base_url: 'http://h'}]", &env).unwrap_err();
        assert_eq!(err.problems[0].field, "server.port");
    }

    #[test]
    fn warnings_for_unknown_keys_and_litellm() {
        let text = format!("{MINIMAL}litellm_db: {{enabled: true}}\nsurprise: 1\n");
        let w: Vec<_> = parse(&text, &no_env)
            .unwrap()
            .warnings
            .into_iter()
            .map(|p| p.field)
            .collect();
        assert!(w.contains(&"litellm_db".to_string()));
        assert!(w.contains(&"surprise".to_string()));
    }

    #[test]
    fn http_version_per_credential() {
        let doc = |v: &str| {
            format!("server: {{master_key: k}}\ncredentials: [{{name: a, type: openai, api_key: x, base_url: 'https://h', http_version: {v}}}]\n")
        };
        let version = |v: &str| parse(&doc(v), &no_env).unwrap().config.credentials[0].http_version;
        assert_eq!(
            parse(MINIMAL, &no_env).unwrap().config.credentials[0].http_version,
            HttpVersion::Auto
        );
        assert_eq!(version("http1"), HttpVersion::Http1);
        assert_eq!(version("http2"), HttpVersion::Http2);
        assert_eq!(version("auto"), HttpVersion::Auto);
        let err = parse(&doc("h2"), &no_env).unwrap_err();
        assert_eq!(err.problems[0].field, "credentials[0].http_version");
        assert!(
            err.problems[0].message.contains("auto, http1, http2"),
            "{}",
            err.problems[0].message
        );
        let mock =
            "server: {master_key: k}\ncredentials: [{name: m, type: mock, http_version: http2}]\n";
        let loaded = parse(mock, &no_env).unwrap();
        assert_eq!(loaded.warnings[0].field, "credentials[0].http_version");
        assert_eq!(loaded.config.credentials[0].http_version, HttpVersion::Auto);
    }

    #[test]
    fn models_without_limits_are_unlimited() {
        let text = format!("{MINIMAL}models: [{{name: m}}, {{name: m, credential: a, rpm: 5}}]\n");
        let c = parse(&text, &no_env).unwrap().config;
        assert_eq!(c.models[0].rpm, None);
        assert_eq!(c.models[1].rpm, Some(Limit::PerMinute(5)));
    }

    #[test]
    fn fail2ban_section() {
        let text = format!("{MINIMAL}fail2ban: {{max_attempts: 2, ban_duration: 1m, error_codes: [500], error_code_rules: [{{code: 401, max_attempts: 1, ban_duration: permanent}}]}}\n");
        let f = parse(&text, &no_env).unwrap().config.fail2ban.unwrap();
        assert_eq!(f.ban_duration, BanDuration::For(Duration::from_secs(60)));
        assert_eq!(f.error_codes, vec![500]);
        assert_eq!(
            f.error_code_rules[0].ban_duration,
            Some(BanDuration::Permanent)
        );
        assert!(parse(&text, &no_env).unwrap().warnings.is_empty());

        // Without `ban_duration` a ban lasts 5 minutes, not for ever as upstream's did, and
        // the load says so.
        let unset = parse(
            &format!("{MINIMAL}fail2ban: {{max_attempts: 5}}\n"),
            &no_env,
        )
        .unwrap();
        let f = unset.config.fail2ban.unwrap();
        assert_eq!(f.ban_duration, BanDuration::For(DEFAULT_BAN));
        let warned: Vec<_> = unset.warnings.iter().map(|w| w.field.as_str()).collect();
        assert_eq!(warned, ["fail2ban.ban_duration"]);
        let dup =
            format!("{MINIMAL}fail2ban: {{error_code_rules: [{{code: 401}}, {{code: 401}}]}}\n");
        assert_eq!(fields(&dup), vec!["fail2ban.error_code_rules[1].code"]);
    }

    #[test]
    fn rate_limit_section() {
        let local = parse(MINIMAL, &no_env).unwrap().config;
        assert_eq!(local.rate_limit, RateLimitConfig::default());
        assert!(
            !local.to_yaml().contains("rate_limit"),
            "the default is not rendered, so existing configs keep their hash"
        );
        let text = format!(
            "{MINIMAL}rate_limit: {{backend: redis, redis_url: os.environ/REDIS_URL, key_prefix: ns/pool, replicas: 3, timeout: 100ms}}\n"
        );
        let env = |k: &str| (k == "REDIS_URL").then(|| "redis://:pw@cache:6379/2".to_string());
        let shared = parse(&text, &env).unwrap().config;
        let r = &shared.rate_limit;
        assert_eq!(r.backend, RateLimitBackend::Redis);
        assert_eq!(
            r.redis_url.as_ref().map(Secret::expose),
            Some("redis://:pw@cache:6379/2")
        );
        assert_eq!((r.key_prefix.as_str(), r.replicas), ("ns/pool", 3));
        assert_eq!(r.timeout, Duration::from_millis(100));
        assert!(!format!("{r:?}").contains(":pw@"), "Debug redacts the URL");
        let again = parse(&shared.to_yaml(), &no_env).unwrap().config;
        assert_eq!(again, shared, "the rendered section reads back equal");

        let bad = format!(
            "{MINIMAL}rate_limit: {{backend: memcached, key_prefix: '{{x}}', replicas: -1, timeout: 0s}}\n"
        );
        assert_eq!(
            fields(&bad),
            vec![
                "rate_limit.backend",
                "rate_limit.key_prefix",
                "rate_limit.replicas",
                "rate_limit.timeout"
            ]
        );

        assert!(!r.cluster);
        assert!(
            !shared.to_yaml().contains("cluster"),
            "false is not rendered"
        );

        let cluster = format!(
            "{MINIMAL}rate_limit: {{backend: redis, redis_url: 'redis://10.0.0.7:7000', cluster: true}}\n"
        );
        let c = parse(&cluster, &no_env).unwrap().config;
        assert!(c.rate_limit.cluster);
        assert_eq!(parse(&c.to_yaml(), &no_env).unwrap().config, c);
        let not_tcp = format!(
            "{MINIMAL}rate_limit: {{backend: redis, redis_url: 'unix:///run/redis.sock', cluster: true}}\n"
        );
        assert_eq!(fields(&not_tcp), vec!["rate_limit.redis_url"]);
        let not_bool = format!("{MINIMAL}rate_limit: {{cluster: maybe}}\n");
        assert_eq!(fields(&not_bool), vec!["rate_limit.cluster"]);
    }

    #[test]
    fn admin_port_needs_a_token_and_its_own_port() {
        let got = fields("server: {master_key: k, port: 9000, admin_port: 9000}\ncredentials: [{name: a, type: mock}]\n");
        assert_eq!(got, vec!["server.admin_port"]);
        let got = fields(
            "server: {master_key: k, admin_port: 9001}\ncredentials: [{name: a, type: mock}]\n",
        );
        assert_eq!(got, vec!["server.admin_token"]);
    }

    #[test]
    fn hash_ignores_spelling() {
        let a = parse(MINIMAL, &no_env).unwrap().config;
        let b = parse("credentials: [{base_url: 'http://h', api_key: x, type: openai, name: a}]\nserver: {master_key: k, port: 8080}\n", &no_env).unwrap().config;
        assert_eq!(a.hash(), b.hash());
        assert_eq!(a.hash().len(), 16);
        let c = parse(&MINIMAL.replace("api_key: x", "api_key: y"), &no_env)
            .unwrap()
            .config;
        assert_ne!(a.hash(), c.hash(), "a rotated key is a new config");
    }

    #[test]
    fn rendered_document_reads_back_equal() {
        let text = format!(
            "{MINIMAL}fail2ban: {{max_attempts: 2, ban_duration: 90s, error_codes: [500, 429]}}\n\
             models: [{{name: m, model: real-m, rpm: 5, tpm: 100}}]\nmodel_alias: {{fast: m}}\n"
        );
        let c = parse(&text, &no_env).unwrap().config;
        let again = parse(&c.to_yaml(), &no_env).unwrap().config;
        assert_eq!(c, again);
    }
}
