//! `/health`, `/health/readiness` and `/v1/models`: read-only views of the running config and
//! its live state. Nothing here ever includes a key.

use std::{
    collections::BTreeMap,
    sync::atomic::Ordering,
    time::{Instant, SystemTime},
};

use bytes::Bytes;
use http::{Response, StatusCode};
use serde::Serialize;

use crate::{
    app::App,
    body::RespBody,
    config::CredentialType,
    config::Limit,
    error::json_response,
    limit::{CredUsage, PairUsage},
    remote::{RemoteHealth, RemoteStatus},
    runtime::Runtime,
};

#[derive(Serialize)]
struct Health<'a> {
    status: &'static str,
    credentials_available: usize,
    credentials_banned: usize,
    total_credentials: usize,
    credentials: BTreeMap<&'a str, CredentialHealth<'a>>,
    models: BTreeMap<String, PairHealth<'a>>,
}

#[derive(Serialize)]
struct CredentialHealth<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    is_fallback: bool,
    is_banned: bool,
    current_rpm: u64,
    current_tpm: u64,
    limit_rpm: i64,
    limit_tpm: i64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    banned_error_counts: BTreeMap<String, u32>,
    /// Proxy credentials: what the remote router reported at the last sync.
    #[serde(skip_serializing_if = "Option::is_none")]
    remote: Option<RemoteHealthDoc>,
}

#[derive(Serialize)]
struct RemoteHealthDoc {
    reachable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    synced_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    credentials_available: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    total_credentials: Option<u64>,
    models: Vec<String>,
    unavailable_models: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl RemoteHealthDoc {
    fn new(s: &RemoteStatus) -> Self {
        let mut unavailable: Vec<String> = s.unavailable_models.iter().cloned().collect();
        unavailable.sort();
        RemoteHealthDoc {
            reachable: s.reachable,
            synced_at: s
                .synced_at
                .map(|t| humantime::format_rfc3339_seconds(t).to_string()),
            status: s.status.clone(),
            credentials_available: s.credentials_available,
            total_credentials: s.total_credentials,
            models: s.models.iter().map(|m| m.id.clone()).collect(),
            unavailable_models: unavailable,
            error: s.error.clone(),
        }
    }
}

#[derive(Serialize)]
struct PairHealth<'a> {
    credential: &'a str,
    model: String,
    is_banned: bool,
    current_rpm: u64,
    current_tpm: u64,
    limit_rpm: i64,
    limit_tpm: i64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    error_code_counts: BTreeMap<String, u32>,
}

/// The upstream `/health` document (spec §9.1) with our fixes (§12.12): a credential counts as
/// banned when any of its pairs is, and as available when it can still serve some model
/// ([`Runtime::is_available`]); the status is 503 only when none is available.
pub fn health(rt: &Runtime, remote: &RemoteHealth) -> Response<RespBody> {
    let now = Instant::now();
    let usages: Vec<CredUsage> = rt.credentials.iter().map(|c| c.state.usage(now)).collect();
    let mut credentials = BTreeMap::new();
    let mut models = BTreeMap::new();
    let (mut available, mut banned) = (0, 0);
    for (i, (cred, usage)) in rt.credentials.iter().zip(&usages).enumerate() {
        let mut banned_counts = BTreeMap::new();
        for pair in usage.pairs.iter().filter(|p| p.ban.is_some()) {
            for (code, n) in &pair.strikes {
                *banned_counts.entry(code.to_string()).or_insert(0) += n;
            }
        }
        let is_banned = usage.any_ban();
        banned += usize::from(is_banned);
        available += usize::from(rt.is_available(i, usage));
        credentials.insert(
            &*cred.name,
            CredentialHealth {
                kind: cred.kind.as_str(),
                is_fallback: cred.is_fallback,
                is_banned,
                current_rpm: usage.rpm,
                current_tpm: usage.tpm,
                limit_rpm: cred.rpm.as_i64(),
                limit_tpm: cred.tpm.as_i64(),
                banned_error_counts: banned_counts,
                remote: (cred.kind == CredentialType::Proxy).then(|| {
                    remote
                        .get(&cred.name)
                        .map(|s| RemoteHealthDoc::new(&s))
                        .unwrap_or_else(|| RemoteHealthDoc::new(&RemoteStatus::default()))
                }),
            },
        );
    }
    for (model, slot) in rt.pairs() {
        let cred = &rt.credentials[slot.cred];
        let pair = usages[slot.cred].pairs.iter().find(|p| p.model == model);
        models.insert(
            format!("{}:{}", cred.name, model),
            pair_health(&cred.name, model, pair, slot.model_rpm, slot.model_tpm),
        );
    }
    // Pairs that only exist in the state (models no `models[]` entry names).
    for (cred, usage) in rt.credentials.iter().zip(&usages) {
        for pair in &usage.pairs {
            models
                .entry(format!("{}:{}", cred.name, pair.model))
                .or_insert_with(|| {
                    pair_health(
                        &cred.name,
                        &pair.model,
                        Some(pair),
                        Limit::Unlimited,
                        Limit::Unlimited,
                    )
                });
        }
    }
    let doc = Health {
        status: if available > 0 {
            "healthy"
        } else {
            "unhealthy"
        },
        credentials_available: available,
        credentials_banned: banned,
        total_credentials: rt.credentials.len(),
        credentials,
        models,
    };
    let status = if available > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(status, to_json(&doc))
}

fn pair_health<'a>(
    credential: &'a str,
    model: &str,
    pair: Option<&PairUsage>,
    rpm: Limit,
    tpm: Limit,
) -> PairHealth<'a> {
    let banned = pair.filter(|p| p.ban.is_some());
    PairHealth {
        credential,
        model: model.to_owned(),
        is_banned: banned.is_some(),
        current_rpm: pair.map_or(0, |p| p.rpm),
        current_tpm: pair.map_or(0, |p| p.tpm),
        limit_rpm: rpm.as_i64(),
        limit_tpm: tpm.as_i64(),
        // Upstream lists the failure counts of banned pairs only.
        error_code_counts: banned
            .map(|p| p.strikes.iter().map(|(c, n)| (c.to_string(), *n)).collect())
            .unwrap_or_default(),
    }
}

/// LiteLLM-style readiness (spec §9.3); 503 until the first sync of the proxies' remotes has
/// ended (so their models are known before traffic comes) and while shutting down.
pub fn readiness(app: &App) -> Response<RespBody> {
    let status = if !app.ready.load(Ordering::Relaxed) {
        "shutting_down"
    } else if !app.remote.started(&app.current()) {
        "starting"
    } else {
        "healthy"
    };
    let doc = serde_json::json!({
        "status": status,
        "db": "Not connected",
        "cache": "",
        "litellm_version": env!("CARGO_PKG_VERSION"),
        "success_callbacks": null,
        "use_aiohttp_transport": false,
        "last_updated": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
    });
    let code = if status == "healthy" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(code, to_json(&doc))
}

/// `GET /v1/models`: every distinct `models[].name` in config order, then the models proxy
/// remotes reported at the last sync (their `created`/`owned_by` kept), deduplicated by id.
pub fn models(rt: &Runtime, remote: &RemoteHealth) -> Response<RespBody> {
    let mut data: Vec<_> = rt
        .model_ids
        .iter()
        .map(|id| serde_json::json!({"id": id, "object": "model", "created": rt.loaded_at_unix, "owned_by": "system"}))
        .collect();
    for m in remote.models() {
        if rt.model_ids.contains(&m.id) {
            continue;
        }
        let mut item = serde_json::json!({"id": m.id, "object": "model"});
        if let Some(created) = m.created {
            item["created"] = created.into();
        }
        if let Some(owner) = m.owned_by {
            item["owned_by"] = owner.into();
        }
        data.push(item);
    }
    json_response(
        StatusCode::OK,
        to_json(&serde_json::json!({"object": "list", "data": data})),
    )
}

/// `/vhealth`: a self-contained HTML dashboard of `/health` that refreshes itself.
pub fn vhealth() -> Response<RespBody> {
    let mut resp = Response::new(crate::body::full(Bytes::from_static(include_bytes!(
        "vhealth.html"
    ))));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    resp
}

fn to_json<T: Serialize>(v: &T) -> Bytes {
    let mut out = serde_json::to_vec(v).expect("health JSON serialises");
    out.push(b'\n');
    Bytes::from(out)
}
