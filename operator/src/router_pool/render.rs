//! Pure: a RouterPool plus what resolve found → the data plane's `RouterConfig`, the exact
//! document pods load from the `<pool>-config` Secret and receive on `PUT /admin/config`.
//! Deterministic (credentials sorted by name), so equal inputs give an equal config hash.

use std::time::Duration;

use airouter::{
    config::{
        duration, BanDuration, CredentialConfig, CredentialType as DpType, ErrorCodeRule,
        Fail2BanConfig, HttpVersion as DpHttpVersion, Limit, LogLevel, ModelConfig,
        MonitoringConfig, RateLimitBackend, RateLimitConfig, RouterConfig, ServerConfig,
        DEFAULT_BAN,
    },
    secret::Secret,
};
use airouter_crds::{
    credential::{CredentialType, HttpVersion},
    router_pool::{Fail2BanSpec, LogLevel as CrdLogLevel},
    RouterPoolSpec,
};

use super::{Resolved, ResolvedCredential};

/// The port pods serve clients on.
pub const PUBLIC_PORT: u16 = 8080;
/// The port pods take config pushes on.
pub const ADMIN_PORT: u16 = 9090;

/// A spec the data plane could not run; the pool gets `Ready=False` with [`RenderError::reason`].
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("Credential {credential}: {message}")]
    Credential { credential: String, message: String },
    #[error("RouterPool {field}: {message}")]
    Pool {
        field: &'static str,
        message: String,
    },
    /// The rendered document, as a pod would read it, is refused or read differently.
    #[error("the rendered config is not applied: {0}")]
    Document(String),
}

impl RenderError {
    pub fn reason(&self) -> &'static str {
        match self {
            RenderError::Credential { .. } => "InvalidCredential",
            RenderError::Pool { .. } => "InvalidSpec",
            RenderError::Document(_) => "InvalidConfig",
        }
    }
}

/// Reads `document` the way a pod will (the data plane's parser): a document it would refuse
/// is not applied — running pods would refuse the push, and a pod that restarts would refuse
/// to start — and one it would read as another config than `hash` would never report synced.
/// The last applied config keeps serving. Each problem names the field and the object it
/// was rendered from (`config`: the rendered config, to name Credentials by their index);
/// the parser's messages never show a secret.
pub fn check_document(
    document: &str,
    hash: &str,
    config: &RouterConfig,
) -> Result<(), RenderError> {
    let loaded = RouterConfig::from_yaml(document, &|_| None).map_err(|e| {
        let problems: Vec<String> = (e.problems.iter())
            .map(|p| {
                format!(
                    "{} ({}): {}",
                    p.field,
                    source_of(&p.field, config),
                    p.message
                )
            })
            .collect();
        RenderError::Document(problems.join("; "))
    })?;
    let read = loaded.config.hash();
    if read != hash {
        return Err(RenderError::Document(format!(
            "the data plane reads it as config {read}, not {hash}"
        )));
    }
    Ok(())
}

/// Renders the router config for a pool of `spec.replicas` pods.
///
/// With the local rate-limit backend each replica enforces its share of every limit
/// (`limit / replicas`, at least 1), so the pool as a whole never admits more than the
/// configured quota (§12.14). With Redis the replicas share whole limits, and fall back on
/// the same share (the data plane divides by `rate_limit.replicas`) while Redis is down.
pub fn render_config(
    spec: &RouterPoolSpec,
    resolved: &Resolved,
) -> Result<RouterConfig, RenderError> {
    if resolved.credentials.is_empty() {
        // The data plane refuses a config without credentials; say so on the pool instead.
        return Err(RenderError::Pool {
            field: "spec.credentialSelector",
            message: "selects no Credential whose Secrets resolved; label a Credential to match it"
                .into(),
        });
    }
    let replicas = spec.replicas.max(1) as u32;
    let (share, rate_limit) = match &resolved.shared_limits {
        None => (Share(replicas), RateLimitConfig::default()),
        Some(shared) => (
            Share(1),
            RateLimitConfig {
                backend: RateLimitBackend::Redis,
                redis_url: Some(Secret::new(shared.redis_url.as_str())),
                key_prefix: shared.key_prefix.clone(),
                cluster: shared.cluster,
                replicas,
                ..RateLimitConfig::default()
            },
        ),
    };
    let mut credentials: Vec<&ResolvedCredential> = resolved.credentials.iter().collect();
    credentials.sort_by(|a, b| a.name.cmp(&b.name));
    let server = server(spec, resolved, share)?;
    let mut models = Vec::new();
    let mut rendered = Vec::with_capacity(credentials.len());
    for cred in credentials {
        rendered.push(credential(cred, share)?);
        for m in cred.spec.models.iter().flatten() {
            models.push(ModelConfig {
                name: m.name.clone(),
                // Empty: none (the data plane reads `model: ''` as no real name).
                model: m
                    .model
                    .clone()
                    .filter(|real| real != &m.name && !real.is_empty()),
                credential: Some(cred.name.clone()),
                rpm: m.rpm.map(|n| share.of(limit(n))),
                tpm: m.tpm.map(|n| share.of(limit(n))),
            });
        }
    }
    Ok(RouterConfig {
        server,
        fail2ban: spec.fail2ban.as_ref().map(fail2ban).transpose()?,
        monitoring: MonitoringConfig {
            prometheus_enabled: true,
            ..Default::default()
        },
        credentials: rendered,
        models,
        model_alias: spec.model_aliases.clone(),
        rate_limit,
    })
}

/// How many replicas split each limit (1: they share whole limits in Redis).
#[derive(Clone, Copy)]
struct Share(u32);

impl Share {
    /// A replica's share of `limit`: the data plane's own rule ([`Limit::share`]), which its
    /// Redis backend also falls back on.
    fn of(self, limit: Limit) -> Limit {
        limit.share(self.0)
    }
}

/// `-1`/`0` → unlimited (the CRD refuses `rpm: 0`; `tpm: 0` means unlimited, as upstream).
fn limit(n: i64) -> Limit {
    if n > 0 {
        Limit::PerMinute(n as u64)
    } else {
        Limit::Unlimited
    }
}

fn server(
    spec: &RouterPoolSpec,
    resolved: &Resolved,
    share: Share,
) -> Result<ServerConfig, RenderError> {
    let s = spec.server.clone().unwrap_or_default();
    let request_timeout = match s.request_timeout.as_deref() {
        None => Some(Duration::from_secs(60)),
        Some(text) => {
            Some(parse_duration("spec.server.requestTimeout", text)?).filter(|d| !d.is_zero())
        }
    };
    let write_timeout = match s.write_timeout.as_deref() {
        None => Duration::from_secs(60),
        Some(text) => parse_duration("spec.server.writeTimeout", text)?,
    };
    Ok(ServerConfig {
        host: "0.0.0.0".into(),
        port: PUBLIC_PORT,
        max_body_size_mb: s.max_body_size_mb.map_or(100, |n| n.max(1) as u64),
        response_body_multiplier: 10,
        request_timeout,
        write_timeout,
        idle_timeout: Duration::from_secs(120),
        idle_conn_timeout: Duration::from_secs(120),
        max_idle_conns: 200,
        max_idle_conns_per_host: 256,
        logging_level: match s.logging_level {
            Some(CrdLogLevel::Debug) => LogLevel::Debug,
            Some(CrdLogLevel::Error) => LogLevel::Error,
            Some(CrdLogLevel::Info) | None => LogLevel::Info,
        },
        master_key: Secret::new(resolved.master_key.as_str()),
        default_models_rpm: share.of(spec.default_models_rpm.map_or(Limit::Unlimited, limit)),
        max_provider_retries: s.max_provider_retries.map_or(2, |n| n.max(0) as u32),
        model_prices_link: String::new(),
        max_hops: s.max_hops.map_or(5, |n| n.max(1) as u32),
        admin_port: Some(ADMIN_PORT),
        admin_token: Some(Secret::new(resolved.admin_token.as_str())),
        health_sync_interval: Duration::from_secs(30),
        shutdown_grace: Duration::from_secs(5),
        shutdown_timeout: Duration::from_secs(30),
    })
}

/// Where a field of the rendered config comes from, for a user who has to fix it there.
fn source_of(field: &str, config: &RouterConfig) -> String {
    let credential = (field.strip_prefix("credentials["))
        .and_then(|rest| rest.split(']').next()?.parse::<usize>().ok())
        .and_then(|i| config.credentials.get(i));
    if let Some(cred) = credential {
        return format!("from Credential {}", cred.name);
    }
    match field.split('.').next().unwrap_or(field) {
        "rate_limit" => "from spec.rateLimit and the Secret its redis.urlSecretRef names".into(),
        "server" if field.ends_with("master_key") => {
            "from the Secret spec.masterKeySecretRef names".into()
        }
        "models" => "from the Credentials' spec.models".into(),
        _ => "from the RouterPool's spec".into(),
    }
}

fn parse_duration(field: &'static str, text: &str) -> Result<Duration, RenderError> {
    duration::parse(text).map_err(|message| RenderError::Pool { field, message })
}

fn ban_duration(field: &'static str, text: &str) -> Result<BanDuration, RenderError> {
    if text == "permanent" {
        return Ok(BanDuration::Permanent);
    }
    let d = parse_duration(field, text)?;
    Ok(if d.is_zero() {
        BanDuration::Permanent
    } else {
        BanDuration::For(d)
    })
}

fn fail2ban(spec: &Fail2BanSpec) -> Result<Fail2BanConfig, RenderError> {
    let code = |n: i32, field| {
        u16::try_from(n).map_err(|_| RenderError::Pool {
            field,
            message: format!("{n} is not an HTTP status code"),
        })
    };
    let mut error_codes = spec
        .error_codes
        .iter()
        .map(|c| code(c.0, "spec.fail2ban.errorCodes"))
        .collect::<Result<Vec<_>, _>>()?;
    if error_codes.is_empty() {
        error_codes.push(429);
    }
    Ok(Fail2BanConfig {
        max_attempts: spec.max_attempts.map_or(3, |n| n.max(1) as u32),
        ban_duration: match &spec.ban_duration {
            None => BanDuration::For(DEFAULT_BAN),
            Some(text) => ban_duration("spec.fail2ban.banDuration", text)?,
        },
        error_codes,
        error_code_rules: spec
            .error_code_rules
            .iter()
            .map(|r| {
                Ok(ErrorCodeRule {
                    code: code(r.code, "spec.fail2ban.errorCodeRules[].code")?,
                    max_attempts: r.max_attempts.map(|n| n.max(1) as u32),
                    ban_duration: r
                        .ban_duration
                        .as_deref()
                        .map(|t| ban_duration("spec.fail2ban.errorCodeRules[].banDuration", t))
                        .transpose()?,
                })
            })
            .collect::<Result<_, RenderError>>()?,
    })
}

fn credential(cred: &ResolvedCredential, share: Share) -> Result<CredentialConfig, RenderError> {
    let fail = |message: &str| RenderError::Credential {
        credential: cred.name.clone(),
        message: message.into(),
    };
    let spec = &cred.spec;
    let kind = match spec.type_ {
        CredentialType::Openai => DpType::Openai,
        CredentialType::Anthropic => DpType::Anthropic,
        CredentialType::Gemini => DpType::Gemini,
        CredentialType::VertexAi => DpType::VertexAi,
        CredentialType::Bedrock => DpType::Bedrock,
        CredentialType::Proxy => DpType::Proxy,
    };
    let (base_url, api_key) = match (&spec.base_url, &cred.proxy_target) {
        (Some(url), _) => (
            airouter::config::base_url(url).map_err(|m| fail(&m))?,
            cred.api_key.clone(),
        ),
        (None, Some(target)) => (
            target.url.clone(),
            Some(
                cred.api_key
                    .clone()
                    .unwrap_or_else(|| target.master_key.clone()),
            ),
        ),
        (None, None) if kind == DpType::VertexAi => (String::new(), cred.api_key.clone()),
        (None, None) => {
            return Err(fail(
                "has neither spec.baseUrl nor a resolved spec.proxy.routerPoolRef",
            ))
        }
    };
    Ok(CredentialConfig {
        name: cred.name.clone(),
        kind,
        api_key: api_key.map(Secret::new),
        base_url,
        rpm: share.of(spec.rpm.map_or(Limit::Unlimited, limit)),
        tpm: share.of(spec.tpm.map_or(Limit::Unlimited, limit)),
        is_fallback: spec.is_fallback,
        project_id: spec.vertex.as_ref().map(|v| v.project_id.clone()),
        location: spec.vertex.as_ref().map(|v| v.location.clone()),
        credentials_file: None,
        credentials_json: cred.vertex_credentials_json.clone().map(Secret::new),
        mock: None,
        http_version: match spec.http_version {
            None | Some(HttpVersion::Auto) => DpHttpVersion::Auto,
            Some(HttpVersion::Http1) => DpHttpVersion::Http1,
            Some(HttpVersion::Http2) => DpHttpVersion::Http2,
        },
    })
}

#[cfg(test)]
mod tests {
    use airouter_crds::router_pool::ServerSpec;

    use super::*;

    fn pool() -> RouterPoolSpec {
        serde_json::from_value(serde_json::json!({
            "credentialSelector": {}, "masterKeySecretRef": {"name": "m", "key": "k"}
        }))
        .unwrap()
    }

    fn resolved(spec: serde_json::Value, target: bool) -> Resolved {
        Resolved {
            master_key: "m".into(),
            admin_token: "a".into(),
            shared_limits: None,
            trusted_ca_hash: None,
            credentials: vec![ResolvedCredential {
                name: "c".into(),
                spec: serde_json::from_value(spec).unwrap(),
                api_key: None,
                proxy_target: target.then(|| super::super::ProxyTarget {
                    url: "http://t:8080".into(),
                    master_key: "tk".into(),
                }),
                vertex_credentials_json: None,
            }],
        }
    }

    #[test]
    fn an_unresolved_proxy_names_the_credential() {
        let err = render_config(
            &pool(),
            &resolved(
                serde_json::json!({"type": "proxy", "proxy": {"routerPoolRef": {"name": "b"}}}),
                false,
            ),
        )
        .unwrap_err();
        assert_eq!(err.reason(), "InvalidCredential");
        assert!(err.to_string().starts_with("Credential c:"), "{err}");
        let ok = render_config(
            &pool(),
            &resolved(
                serde_json::json!({"type": "proxy", "proxy": {"routerPoolRef": {"name": "b"}}}),
                true,
            ),
        )
        .unwrap();
        assert_eq!(
            ok.credentials[0].api_key.as_ref().unwrap().expose(),
            "tk",
            "a pool target is called with its master key"
        );
    }

    #[test]
    fn a_document_the_data_plane_would_refuse_or_misread_is_not_applied() {
        let check = |resolved: &Resolved| {
            let mut resolved = resolved.clone();
            resolved.credentials[0].api_key = Some("sk-test".into());
            let config = render_config(&pool(), &resolved).unwrap();
            let doc = config.to_yaml();
            check_document(&doc, &airouter::config::document_hash(&doc), &config)
        };
        let openai = serde_json::json!({"type": "openai", "baseUrl": "https://api.openai.com/v1"});
        assert_eq!(check(&resolved(openai.clone(), false)), Ok(()));

        // A Redis URL Secret the data plane refuses: named by its field, never echoed.
        let mut redis = resolved(openai.clone(), false);
        redis.shared_limits = Some(super::super::SharedLimits {
            redis_url: "cache:hunter2@6379".into(),
            key_prefix: "ns/pool".into(),
            cluster: false,
        });
        let err = check(&redis).unwrap_err();
        assert_eq!(err.reason(), "InvalidConfig");
        assert!(err.to_string().contains("rate_limit.redis_url"), "{err}");
        assert!(err.to_string().contains("spec.rateLimit"), "{err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");

        // An empty real model name is rendered as none, as the data plane reads it: the hash
        // a pod reports then equals the operator's.
        let mut empty_model = openai;
        empty_model["models"] = serde_json::json!([{"name": "gpt", "model": ""}]);
        assert_eq!(check(&resolved(empty_model, false)), Ok(()));

        let config = render_config(
            &pool(),
            &resolved(
                serde_json::json!({"type": "proxy", "baseUrl": "http://x"}),
                false,
            ),
        )
        .unwrap();
        let err = check_document(&config.to_yaml(), "0000000000000000", &config).unwrap_err();
        assert!(err.to_string().contains("reads it as config"), "{err}");
    }

    #[test]
    fn http_version_reaches_the_config() {
        let render = |spec: serde_json::Value| {
            render_config(&pool(), &resolved(spec, false))
                .unwrap()
                .credentials[0]
                .http_version
        };
        let base = serde_json::json!({"type": "openai", "baseUrl": "https://api.openai.com"});
        assert_eq!(render(base.clone()), DpHttpVersion::Auto);
        let mut h2c = base;
        h2c["httpVersion"] = "http2".into();
        assert_eq!(render(h2c), DpHttpVersion::Http2);
    }

    #[test]
    fn a_pool_without_credentials_is_refused() {
        let empty = Resolved {
            master_key: "m".into(),
            admin_token: "a".into(),
            credentials: vec![],
            shared_limits: None,
            trusted_ca_hash: None,
        };
        let err = render_config(&pool(), &empty).unwrap_err();
        assert!(err.to_string().contains("spec.credentialSelector"), "{err}");
    }

    #[test]
    fn write_timeout_is_rendered_and_a_bad_one_names_its_field() {
        let proxy = resolved(
            serde_json::json!({"type": "proxy", "baseUrl": "http://x"}),
            false,
        );
        let mut p = pool();
        let rendered =
            |p: &RouterPoolSpec| render_config(p, &proxy).map(|c| c.server.write_timeout);
        assert_eq!(
            rendered(&p).unwrap(),
            Duration::from_secs(60),
            "the default"
        );
        p.server = Some(ServerSpec {
            write_timeout: Some("5m".into()),
            ..Default::default()
        });
        assert_eq!(rendered(&p).unwrap(), Duration::from_secs(300));
        p.server = Some(ServerSpec {
            write_timeout: Some("0".into()),
            ..Default::default()
        });
        assert_eq!(rendered(&p).unwrap(), Duration::ZERO, "0: never");
        p.server = Some(ServerSpec {
            write_timeout: Some("later".into()),
            ..Default::default()
        });
        let err = rendered(&p).unwrap_err();
        assert_eq!(err.reason(), "InvalidSpec");
        assert!(
            err.to_string().contains("spec.server.writeTimeout"),
            "{err}"
        );
    }

    #[test]
    fn a_bad_duration_names_the_field() {
        let mut p = pool();
        p.server = Some(ServerSpec {
            request_timeout: Some("soon".into()),
            ..Default::default()
        });
        let err = render_config(
            &p,
            &resolved(
                serde_json::json!({"type": "proxy", "baseUrl": "http://x"}),
                false,
            ),
        )
        .unwrap_err();
        assert_eq!(err.reason(), "InvalidSpec");
        assert!(
            err.to_string().contains("spec.server.requestTimeout"),
            "{err}"
        );
    }
}
