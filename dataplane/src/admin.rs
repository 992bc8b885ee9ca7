//! The admin API, on its own port (`server.admin_port`) behind a bearer token
//! (`server.admin_token`): how the operator pushes configs and reads live state.
//!
//! - `PUT /admin/config` — a whole config document (YAML or JSON). 200 with the new hash, or
//!   422 listing every invalid field; the running config is untouched on error.
//! - `GET /admin/config/hash` — the running config's hash.
//! - `GET /admin/state` — per credential and pair: RPM/TPM in the window, bans, availability,
//!   last error class. Never a key.
//! - `GET /metrics` — the Prometheus metrics (always, whatever `monitoring` says).

use std::{
    sync::{atomic::Ordering, Arc},
    time::{Instant, SystemTime},
};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Serialize;
use serde_json::json;

use crate::{
    app::App,
    body::RespBody,
    config::{CredentialType, Limit},
    error::{error_response, json_response},
    limit::PairUsage,
    proxy::metrics_response,
    runtime::Runtime,
};

/// Config documents larger than this are refused.
const MAX_DOCUMENT: usize = 16 * 1024 * 1024;

pub async fn handle(app: Arc<App>, req: Request<Incoming>) -> Response<RespBody> {
    let rt = app.current();
    if let Err(resp) = authorize(&rt, &req) {
        return *resp;
    }
    match (req.method(), req.uri().path()) {
        (&Method::PUT | &Method::POST, "/admin/config") => put_config(&app, req).await,
        (&Method::GET, "/admin/config/hash") => json(StatusCode::OK, &json!({"hash": rt.hash})),
        (&Method::GET, "/admin/state") => json(StatusCode::OK, &state(&app, &rt)),
        (&Method::GET, "/metrics") => metrics_response(&app, &rt),
        (_, "/admin/config" | "/admin/config/hash" | "/admin/state" | "/metrics") => {
            error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "Method Not Allowed",
                "invalid_request_error",
                None,
                None,
            )
        }
        _ => error_response(
            StatusCode::NOT_FOUND,
            "Not Found",
            "not_found_error",
            None,
            None,
        ),
    }
}

fn authorize(rt: &Runtime, req: &Request<Incoming>) -> Result<(), Box<Response<RespBody>>> {
    let Some(token) = &rt.config.server.admin_token else {
        return Err(Box::new(error_response(
            StatusCode::FORBIDDEN,
            "the admin API is disabled: the running config sets no server.admin_token",
            "permission_denied",
            None,
            None,
        )));
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    match given {
        Some(given) if token.matches(given) => Ok(()),
        _ => Err(Box::new(error_response(
            StatusCode::UNAUTHORIZED,
            "admin API: send Authorization: Bearer <server.admin_token>",
            "authentication_error",
            None,
            None,
        ))),
    }
}

async fn put_config(app: &App, req: Request<Incoming>) -> Response<RespBody> {
    let body = match Limited::new(req.into_body(), MAX_DOCUMENT).collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => {
            return error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "config document unreadable or larger than 16 MiB",
                "invalid_request_error",
                None,
                None,
            )
        }
    };
    let Ok(text) = std::str::from_utf8(&body) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "config document is not UTF-8",
            "invalid_request_error",
            None,
            None,
        );
    };
    match app.apply_text(text, "admin") {
        Ok(applied) => json(StatusCode::OK, &applied),
        Err(e) => json(
            StatusCode::UNPROCESSABLE_ENTITY,
            &json!({
                "error": {
                    "message": format!("config rejected ({} problem(s)); the running config is unchanged", e.problems.len()),
                    "type": "invalid_request_error",
                    "param": null,
                    "code": "invalid_config",
                },
                "problems": e.problems,
            }),
        ),
    }
}

#[derive(Serialize)]
struct State {
    config_hash: String,
    ready: bool,
    rate_limit: RateLimitState,
    credentials: Vec<CredentialState>,
}

/// Where limits are enforced. With Redis, the windows and bans below are this replica's own
/// view (what it admitted and saw); Redis holds the shared totals.
#[derive(Serialize)]
struct RateLimitState {
    backend: &'static str,
    /// Redis answered the last call (`false`: this replica enforces its local share).
    #[serde(skip_serializing_if = "Option::is_none")]
    shared: Option<bool>,
    /// Redis calls that failed or timed out since the backend was configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    errors: Option<u64>,
}

#[derive(Serialize)]
struct CredentialState {
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    is_fallback: bool,
    /// False for types without an adapter: never selected.
    supported: bool,
    /// Not banned for any model and under its credential limits.
    available: bool,
    rpm: Window,
    tpm: Window,
    last_error: Option<&'static str>,
    pairs: Vec<PairState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remote: Option<serde_json::Value>,
}

#[derive(Serialize)]
struct Window {
    used: u64,
    limit: i64,
}

#[derive(Serialize)]
struct PairState {
    model: String,
    rpm: Window,
    tpm: Window,
    banned: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    ban: Option<BanState>,
    strikes: std::collections::BTreeMap<String, u32>,
    last_error: Option<&'static str>,
}

#[derive(Serialize)]
struct BanState {
    code: u16,
    permanent: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    until: Option<String>,
}

/// The class of an error status, as the retry logic names it.
fn error_class(status: u16) -> &'static str {
    match status {
        401 | 403 => "auth_error",
        429 => "rate_limit",
        408 => "timeout",
        s if s >= 500 => "server_error",
        _ => "client_error",
    }
}

fn state(app: &App, rt: &Runtime) -> State {
    let now = Instant::now();
    let wall = SystemTime::now();
    let credentials = rt
        .credentials
        .iter()
        .enumerate()
        .map(|(i, cred)| {
            let usage = cred.state.usage(now);
            let mut pairs: Vec<PairState> = Vec::new();
            let configured = rt.pairs().filter(|(_, s)| s.cred == i);
            for (model, slot) in configured {
                let p = usage.pairs.iter().find(|p| p.model == model);
                pairs.push(pair_state(
                    model,
                    p,
                    slot.model_rpm,
                    slot.model_tpm,
                    now,
                    wall,
                ));
            }
            for p in &usage.pairs {
                if !pairs.iter().any(|x| x.model == p.model) {
                    pairs.push(pair_state(
                        &p.model,
                        Some(p),
                        Limit::Unlimited,
                        Limit::Unlimited,
                        now,
                        wall,
                    ));
                }
            }
            pairs.sort_by(|a, b| a.model.cmp(&b.model));
            let last_error = usage
                .pairs
                .iter()
                .rev()
                .find_map(|p| p.last_error)
                .map(error_class);
            CredentialState {
                name: cred.name.to_string(),
                kind: cred.kind.as_str(),
                is_fallback: cred.is_fallback,
                supported: cred.kind.is_supported(),
                available: rt.is_available(i, &usage),
                rpm: Window {
                    used: usage.rpm,
                    limit: cred.rpm.as_i64(),
                },
                tpm: Window {
                    used: usage.tpm,
                    limit: cred.tpm.as_i64(),
                },
                last_error,
                pairs,
                remote: (cred.kind == CredentialType::Proxy).then(|| {
                    let s = app.remote.get(&cred.name).unwrap_or_default();
                    json!({
                        "reachable": s.reachable,
                        "credentials_available": s.credentials_available,
                        "models": s.models.iter().map(|m| &m.id).collect::<Vec<_>>(),
                        "error": s.error,
                    })
                }),
            }
        })
        .collect();
    State {
        config_hash: rt.hash.clone(),
        ready: app.ready.load(Ordering::Relaxed),
        rate_limit: RateLimitState {
            backend: if rt.shared.is_some() {
                "redis"
            } else {
                "local"
            },
            shared: rt.shared.as_ref().map(|s| s.is_up()),
            errors: rt.shared.as_ref().map(|s| s.errors()),
        },
        credentials,
    }
}

fn pair_state(
    model: &str,
    p: Option<&PairUsage>,
    rpm: Limit,
    tpm: Limit,
    now: Instant,
    wall: SystemTime,
) -> PairState {
    let ban = p.and_then(|p| p.ban.as_ref()).map(|b| BanState {
        code: b.code,
        permanent: b.until.is_none(),
        until: b.until.map(|u| {
            humantime::format_rfc3339_seconds(wall + u.saturating_duration_since(now)).to_string()
        }),
    });
    PairState {
        model: model.to_owned(),
        rpm: Window {
            used: p.map_or(0, |p| p.rpm),
            limit: rpm.as_i64(),
        },
        tpm: Window {
            used: p.map_or(0, |p| p.tpm),
            limit: tpm.as_i64(),
        },
        banned: ban.is_some(),
        ban,
        strikes: p
            .map(|p| p.strikes.iter().map(|(c, n)| (c.to_string(), *n)).collect())
            .unwrap_or_default(),
        last_error: p.and_then(|p| p.last_error).map(error_class),
    }
}

fn json<T: Serialize>(status: StatusCode, v: &T) -> Response<RespBody> {
    let mut body = serde_json::to_vec(v).expect("admin JSON serialises");
    body.push(b'\n');
    let mut resp = json_response(status, Bytes::from(body));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}
