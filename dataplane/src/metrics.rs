//! Prometheus metrics: the upstream `auto_ai_router_*` names (spec §9.4), each really updated,
//! plus our `airouter_*` ones. Built on `prometheus-client` (the Prometheus project's Rust
//! client); exposed in the OpenMetrics text format, which Prometheus scrapes natively.
//!
//! Gauges of live state (RPM/TPM in use, bans) are computed from the limiter state at scrape
//! time rather than on a timer, so a scrape never shows stale numbers.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::{Mutex, RwLock};
use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::{runtime::Runtime, upstream::Http2Origin, FastMap};

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CredEndpointStatus {
    pub credential: String,
    pub endpoint: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CredEndpoint {
    pub credential: String,
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CredLabel {
    pub credential: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CredModel {
    pub credential: String,
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CredModelCode {
    pub credential: String,
    pub model: String,
    pub error_code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelCredStatus {
    pub model: String,
    pub credential: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub credential: String,
    pub model: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabel {
    pub backend: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OriginLabel {
    pub origin: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelReason {
    pub model: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub source: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HashLabel {
    pub hash: String,
}

fn upstream_buckets() -> Histogram {
    Histogram::new([1.0, 10.0, 30.0, 60.0, 120.0, 240.0, 600.0])
}

fn latency_buckets() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0, 120.0, 300.0,
    ])
}

/// Handles of one (credential, endpoint, status) attempt series, so the hot path neither
/// allocates label strings nor hashes them with the family's lock held.
#[derive(Clone)]
struct AttemptHandles {
    requests: Counter,
    duration: Histogram,
    ttfb: Histogram,
    errors: Option<Counter>,
}

/// (credential, endpoint, status).
type AttemptKey = (Arc<str>, &'static str, u16);
type ModelSeries = FastMap<Box<str>, Histogram>;

/// The token counters of one (credential, model), by kind; a kind's series is created the
/// first time it has tokens to count.
#[derive(Clone, Default)]
struct TokenHandles([Option<Counter>; 3]);

const TOKEN_KINDS: [&str; 3] = ["prompt", "completion", "total"];

/// credential → model id → token counters.
type TokenCache = FastMap<Arc<str>, FastMap<Box<str>, TokenHandles>>;

/// Distinct model ids that get their own `model` label value; later ones are `other`.
const MAX_MODEL_LABELS: usize = 1024;

/// Every metric the data plane exports.
pub struct Metrics {
    registry: Registry,
    attempts: RwLock<FastMap<AttemptKey, AttemptHandles>>,
    /// (credential, status) → model id → series.
    done: RwLock<FastMap<(Arc<str>, u16), ModelSeries>>,
    token_handles: RwLock<TokenCache>,
    /// Model ids that have their own label value.
    models: RwLock<std::collections::HashSet<Box<str>, ahash::RandomState>>,
    /// Serialises scrapes: gauges are refilled from state, then encoded.
    scrape: Mutex<()>,
    requests: Family<CredEndpointStatus, Counter>,
    requests_duration: HistogramFamily<CredEndpoint>,
    credential_errors: Family<CredLabel, Counter>,
    credential_rpm: Family<CredLabel, Gauge>,
    credential_tpm: Family<CredLabel, Gauge>,
    model_rpm: Family<CredModel, Gauge>,
    model_tpm: Family<CredModel, Gauge>,
    selection_rejected: Family<ReasonLabel, Counter>,
    ban_events: Family<CredModelCode, Counter>,
    unban_events: Family<CredModel, Counter>,
    credential_banned: Family<CredLabel, Gauge>,
    request_duration: HistogramFamily<ModelCredStatus>,
    upstream_ttfb: HistogramFamily<CredLabel>,
    tokens: Family<TokenLabels, Counter>,
    retries: Family<ModelLabel, Counter>,
    fallbacks: Family<ModelLabel, Counter>,
    exhausted: Family<ModelReason, Counter>,
    bans: Family<CredModelCode, Counter>,
    config_reloads: Family<ReloadLabels, Counter>,
    config_info: Family<HashLabel, Gauge>,
    http2_connections: Family<OriginLabel, Gauge>,
    http2_streams: Family<OriginLabel, Gauge>,
    rate_limit_backend_up: Family<BackendLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            attempts: RwLock::default(),
            done: RwLock::default(),
            token_handles: RwLock::default(),
            models: RwLock::default(),
            scrape: Mutex::new(()),
            requests: Family::default(),
            requests_duration: Family::new_with_constructor(upstream_buckets),
            credential_errors: Family::default(),
            credential_rpm: Family::default(),
            credential_tpm: Family::default(),
            model_rpm: Family::default(),
            model_tpm: Family::default(),
            selection_rejected: Family::default(),
            ban_events: Family::default(),
            unban_events: Family::default(),
            credential_banned: Family::default(),
            request_duration: Family::new_with_constructor(latency_buckets),
            upstream_ttfb: Family::new_with_constructor(latency_buckets),
            tokens: Family::default(),
            retries: Family::default(),
            fallbacks: Family::default(),
            exhausted: Family::default(),
            bans: Family::default(),
            config_reloads: Family::default(),
            config_info: Family::default(),
            http2_connections: Family::default(),
            http2_streams: Family::default(),
            rate_limit_backend_up: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "auto_ai_router_requests",
            "Upstream attempts by credential, endpoint and status",
            m.requests.clone(),
        );
        r.register(
            "auto_ai_router_requests_duration_seconds",
            "Time from client request start to upstream response headers",
            m.requests_duration.clone(),
        );
        r.register(
            "auto_ai_router_credential_errors",
            "Upstream attempts that did not answer 200",
            m.credential_errors.clone(),
        );
        r.register(
            "auto_ai_router_credential_rpm_current",
            "Requests in the credential's 60 s window",
            m.credential_rpm.clone(),
        );
        r.register(
            "auto_ai_router_credential_tpm_current",
            "Tokens in the credential's 60 s window",
            m.credential_tpm.clone(),
        );
        r.register(
            "auto_ai_router_model_rpm_current",
            "Requests in the (credential, model) 60 s window",
            m.model_rpm.clone(),
        );
        r.register(
            "auto_ai_router_model_tpm_current",
            "Tokens in the (credential, model) 60 s window",
            m.model_tpm.clone(),
        );
        r.register(
            "auto_ai_router_credential_selection_rejected",
            "Candidates skipped during selection, by reason",
            m.selection_rejected.clone(),
        );
        r.register(
            "auto_ai_router_credential_ban_events",
            "Pairs banned by fail2ban",
            m.ban_events.clone(),
        );
        r.register(
            "auto_ai_router_credential_unban_events",
            "Pair bans that expired",
            m.unban_events.clone(),
        );
        r.register(
            "auto_ai_router_credential_banned",
            "1 when any model of the credential is banned",
            m.credential_banned.clone(),
        );
        r.register(
            "airouter_request_duration_seconds",
            "Client request duration until the response head, by model, credential and status",
            m.request_duration.clone(),
        );
        r.register(
            "airouter_upstream_ttfb_seconds",
            "Upstream time to first byte (response headers)",
            m.upstream_ttfb.clone(),
        );
        r.register(
            "airouter_tokens",
            "Tokens reported by providers' usage, by kind",
            m.tokens.clone(),
        );
        r.register(
            "airouter_retries",
            "Attempts after the first within one request",
            m.retries.clone(),
        );
        r.register(
            "airouter_fallbacks",
            "Requests served by a fallback credential",
            m.fallbacks.clone(),
        );
        r.register(
            "airouter_exhausted",
            "Requests answered 503 because every credential was exhausted",
            m.exhausted.clone(),
        );
        r.register("airouter_bans", "Pairs banned by fail2ban", m.bans.clone());
        r.register(
            "airouter_config_reloads",
            "Config applications by source and result",
            m.config_reloads.clone(),
        );
        r.register(
            "airouter_config_info",
            "The running config's content hash (value 1)",
            m.config_info.clone(),
        );
        r.register(
            "airouter_upstream_http2_connections",
            "Open HTTP/2 connections to each upstream origin",
            m.http2_connections.clone(),
        );
        r.register(
            "airouter_upstream_http2_streams",
            "Streams in flight on the HTTP/2 connections to each upstream origin",
            m.http2_streams.clone(),
        );
        r.register(
            "airouter_rate_limit_backend_up",
            "1 while the shared rate-limit backend answers; 0 while each replica enforces its local share",
            m.rate_limit_backend_up.clone(),
        );
        Metrics { registry, ..m }
    }

    /// One upstream attempt (spec §9.4 semantics: every attempt, including retries).
    pub fn upstream_attempt(
        &self,
        credential: &Arc<str>,
        endpoint: &'static str,
        status: u16,
        since_request_start: Duration,
        ttfb: Duration,
    ) {
        let key = (credential.clone(), endpoint, status);
        let cached = self.attempts.read().get(&key).cloned();
        let handles = cached.unwrap_or_else(|| {
            let (credential, endpoint) = (credential.to_string(), endpoint.to_owned());
            let h = AttemptHandles {
                requests: self.requests.get_or_create_owned(&CredEndpointStatus {
                    credential: credential.clone(),
                    endpoint: endpoint.clone(),
                    status: status.to_string(),
                }),
                duration: self.requests_duration.get_or_create_owned(&CredEndpoint {
                    credential: credential.clone(),
                    endpoint,
                }),
                ttfb: self.upstream_ttfb.get_or_create_owned(&CredLabel {
                    credential: credential.clone(),
                }),
                errors: (status != 200).then(|| {
                    self.credential_errors
                        .get_or_create_owned(&CredLabel { credential })
                }),
            };
            self.attempts.write().insert(key, h.clone());
            h
        });
        handles.requests.inc();
        handles.duration.observe(since_request_start.as_secs_f64());
        handles.ttfb.observe(ttfb.as_secs_f64());
        if let Some(errors) = &handles.errors {
            errors.inc();
        }
    }

    /// A request answered (the response head), by model id, credential and status.
    pub fn request_done(
        &self,
        model: &str,
        credential: &Arc<str>,
        status: u16,
        duration: Duration,
    ) {
        let key = (credential.clone(), status);
        let cached = self
            .done
            .read()
            .get(&key)
            .and_then(|by_model| by_model.get(model).cloned());
        let histogram = cached.unwrap_or_else(|| {
            let label = self.model_label(model);
            let capped = label == "other";
            let h = self.request_duration.get_or_create_owned(&ModelCredStatus {
                model: label,
                credential: credential.to_string(),
                status: status.to_string(),
            });
            // Past the cap the handle is not cached either: the cache stays bounded too.
            if !capped {
                self.done
                    .write()
                    .entry(key)
                    .or_default()
                    .insert(Box::from(model), h.clone());
            }
            h
        });
        histogram.observe(duration.as_secs_f64());
    }

    /// The `model` label for a model id: the id itself for the first [`MAX_MODEL_LABELS`]
    /// distinct ids, `other` after that, so clients sending made-up names (possible when no
    /// `models[]` filter is configured) cannot grow the metric set without bound.
    fn model_label(&self, model: &str) -> String {
        if self.models.read().contains(model) {
            return model.to_owned();
        }
        let mut models = self.models.write();
        if models.len() < MAX_MODEL_LABELS {
            models.insert(Box::from(model));
            model.to_owned()
        } else {
            "other".to_owned()
        }
    }

    pub fn tokens(&self, credential: &Arc<str>, model: &str, usage: &crate::stream::TokenUsage) {
        let counts = [usage.prompt, usage.completion, usage.total];
        let cached = self
            .token_handles
            .read()
            .get(&**credential)
            .and_then(|by_model| by_model.get(model).cloned());
        let mut handles = cached.unwrap_or_default();
        let mut created = false;
        let mut capped = false;
        for ((handle, kind), n) in handles.0.iter_mut().zip(TOKEN_KINDS).zip(counts) {
            if n == 0 {
                continue;
            }
            let counter = handle.get_or_insert_with(|| {
                let label = self.model_label(model);
                capped |= label == "other";
                created = true;
                self.tokens.get_or_create_owned(&TokenLabels {
                    credential: credential.to_string(),
                    model: label,
                    kind: kind.to_owned(),
                })
            });
            counter.inc_by(n);
        }
        // Past the model-label cap the handles are not cached: the cache stays bounded.
        if created && !capped {
            self.token_handles
                .write()
                .entry(credential.clone())
                .or_default()
                .insert(Box::from(model), handles);
        }
    }

    pub fn rejected(&self, reason: &str, n: usize) {
        if n > 0 {
            self.selection_rejected
                .get_or_create(&ReasonLabel {
                    reason: reason.to_owned(),
                })
                .inc_by(n as u64);
        }
    }

    pub fn retry(&self, model: &str) {
        self.retries
            .get_or_create(&ModelLabel {
                model: self.model_label(model),
            })
            .inc();
    }

    pub fn fallback(&self, model: &str) {
        self.fallbacks
            .get_or_create(&ModelLabel {
                model: self.model_label(model),
            })
            .inc();
    }

    pub fn exhausted(&self, model: &str, reason: &str) {
        self.exhausted
            .get_or_create(&ModelReason {
                model: self.model_label(model),
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn ban(&self, credential: &str, model: &str, code: u16) {
        let labels = CredModelCode {
            credential: credential.to_owned(),
            model: self.model_label(model),
            error_code: code.to_string(),
        };
        self.ban_events.get_or_create(&labels).inc();
        self.bans.get_or_create(&labels).inc();
    }

    pub fn unban(&self, credential: &str, model: &str) {
        self.unban_events
            .get_or_create(&CredModel {
                credential: credential.to_owned(),
                model: self.model_label(model),
            })
            .inc();
    }

    pub fn config_applied(&self, source: &str, ok: bool, hash: Option<&str>) {
        self.config_reloads
            .get_or_create(&ReloadLabels {
                source: source.to_owned(),
                result: if ok { "success" } else { "failure" }.to_owned(),
            })
            .inc();
        if let Some(hash) = hash {
            self.config_info.clear();
            self.config_info
                .get_or_create(&HashLabel {
                    hash: hash.to_owned(),
                })
                .set(1);
        }
    }

    /// Refreshes state gauges from `rt` and encodes everything.
    pub fn render(&self, rt: &Runtime, http2: &[Http2Origin]) -> String {
        let _guard = self.scrape.lock();
        let now = Instant::now();
        self.http2_connections.clear();
        self.http2_streams.clear();
        for o in http2 {
            let label = OriginLabel {
                origin: o.origin.clone(),
            };
            self.http2_connections
                .get_or_create(&label)
                .set(o.connections as i64);
            self.http2_streams
                .get_or_create(&label)
                .set(o.streams as i64);
        }
        for family in [
            &self.credential_rpm,
            &self.credential_tpm,
            &self.credential_banned,
        ] {
            family.clear();
        }
        self.model_rpm.clear();
        self.model_tpm.clear();
        self.rate_limit_backend_up.clear();
        if let Some(shared) = &rt.shared {
            self.rate_limit_backend_up
                .get_or_create(&BackendLabel { backend: "redis" })
                .set(i64::from(shared.is_up()));
        }
        for cred in &rt.credentials {
            let usage = cred.state.usage(now);
            for model in cred.state.take_unbans() {
                self.unban(&cred.name, &model);
            }
            let label = CredLabel {
                credential: cred.name.to_string(),
            };
            self.credential_rpm
                .get_or_create(&label)
                .set(usage.rpm as i64);
            self.credential_tpm
                .get_or_create(&label)
                .set(usage.tpm as i64);
            let banned = usage.pairs.iter().any(|p| p.ban.is_some());
            self.credential_banned
                .get_or_create(&label)
                .set(i64::from(banned));
            for pair in &usage.pairs {
                let label = CredModel {
                    credential: cred.name.to_string(),
                    model: pair.model.clone(),
                };
                self.model_rpm.get_or_create(&label).set(pair.rpm as i64);
                self.model_tpm.get_or_create(&label).set(pair.tpm as i64);
            }
        }
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::RouterConfig, runtime::Registry};

    #[test]
    fn made_up_model_names_cannot_grow_the_label_set() {
        let m = Metrics::new();
        let cred: Arc<str> = Arc::from("c");
        for i in 0..(MAX_MODEL_LABELS + 50) {
            let model = format!("made-up-{i}");
            m.request_done(&model, &cred, 200, Duration::from_millis(1));
            m.exhausted(&model, "rate_limited");
        }
        let config = RouterConfig::from_yaml(
            "server: {master_key: k}\ncredentials: [{name: c, type: mock}]\n",
            &|_| None,
        )
        .unwrap()
        .config;
        let text = m.render(
            &Runtime::compile(config, Arc::new(Registry::default())),
            &[],
        );
        let exhausted: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("airouter_exhausted_total{"))
            .collect();
        assert_eq!(exhausted.len(), MAX_MODEL_LABELS + 1);
        assert!(exhausted
            .iter()
            .any(|l| l.contains("model=\"other\"") && l.ends_with(" 50")));
        let durations = text
            .lines()
            .filter(|l| l.starts_with("airouter_request_duration_seconds_count{"))
            .count();
        assert_eq!(durations, MAX_MODEL_LABELS + 1);
        let cached: usize = m.done.read().values().map(FastMap::len).sum();
        assert_eq!(
            cached, MAX_MODEL_LABELS,
            "the handle cache is bounded as well"
        );
    }
}
