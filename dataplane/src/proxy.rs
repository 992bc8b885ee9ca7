//! The request pipeline: auth → body → model → route → select (reserves RPM) → forward →
//! retry or answer → charge tokens and feed fail2ban.
//!
//! A retry moves to the next credential only while nothing has been sent to the client: the
//! decision is made on the upstream's status line and (for non-streaming answers) its
//! buffered body. Once a streaming response starts, it is the answer.

use std::{
    sync::{atomic::AtomicBool, Arc},
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use http::{header, request::Parts, HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tracing::{debug, info, warn};

use crate::{
    body::{full, BoxError, RespBody},
    config::CredentialType,
    error::{ExhaustedReason, ProxyError, TransportError},
    health,
    limit::{fail2ban::Outcome, parse_retry_after, retry_after_secs, Limits, SlotRef},
    mock,
    request::{self, Probe, Rewritten},
    runtime::{Credential, Lookup, Runtime, Slot},
    select::{select, Exhausted},
    store::ConfigStore,
    stream::{total_tokens, UsageTap},
    upstream::{self, HttpClient, HOPS_HEADER},
};

/// Everything a request handler shares.
pub struct App {
    pub store: ConfigStore,
    pub client: HttpClient,
    pub limits: Arc<dyn Limits>,
    /// False once shutdown has begun: readiness probes fail so traffic drains away.
    pub ready: AtomicBool,
}

const PROXIED_PATHS: &[&str] = &[
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/images/generations",
    "/v1/responses",
];

/// Answers one request. Never fails: every error becomes a response.
pub async fn handle(app: Arc<App>, req: Request<Incoming>) -> Response<RespBody> {
    let rt = app.store.current();
    let path = req.uri().path();
    match path {
        "/health" => health::health(&rt),
        "/health/readiness" => health::readiness(&app),
        "/v1/models" if req.method() == Method::GET => health::models(&rt),
        p if PROXIED_PATHS.contains(&p) => {
            let started = Instant::now();
            match proxy(&app, &rt, req).await {
                Ok(resp) => resp,
                Err(e) => {
                    debug!(
                        reason = e.reason(),
                        status = e.status().as_u16(),
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "refused"
                    );
                    e.into_response()
                }
            }
        }
        _ => ProxyError::NotFound.into_response(),
    }
}

/// How an attempt ended when it did not produce the answer.
enum Failure {
    /// A retryable upstream response (kept: it is the answer if no retry succeeds).
    Response(Response<RespBody>),
    Transport(TransportError),
}

enum Attempt {
    Answer(Response<RespBody>),
    Retry(Failure),
}

/// What every attempt of one request shares.
struct Forward<'a> {
    app: &'a App,
    rt: &'a Runtime,
    parts: &'a Parts,
    path_and_query: &'a str,
    body: &'a Rewritten,
    model_id: &'a str,
    upstream_model: &'a str,
    stream: bool,
    /// The forwarded body asks for the final usage chunk (the client did, or the router did).
    usage_requested: bool,
    hops: u32,
}

async fn proxy(
    app: &App,
    rt: &Arc<Runtime>,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, ProxyError> {
    let started = Instant::now();
    authorize(rt, req.headers())?;
    let hops = incoming_hops(req.headers());
    let max_hops = rt.config.server.max_hops;
    if hops >= max_hops {
        return Err(ProxyError::LoopDetected {
            hops,
            max: max_hops,
        });
    }
    let (parts, body) = req.into_parts();
    let body = read_body(&parts.headers, body, rt.config.server.max_body_size_mb).await?;
    let probe = Probe::read(&body).ok_or(ProxyError::ModelRequired)?;
    let model_id = rt.resolve_alias(&probe.model).to_owned();
    let route = match rt.lookup(&model_id) {
        Lookup::Route(route) => route,
        Lookup::NotServed { unsupported } => {
            return Err(ProxyError::ModelNotFound {
                model: model_id,
                unsupported: unsupported.into_iter().map(str::to_owned).collect(),
            })
        }
    };
    let upstream_model = rt.real_name(&model_id).unwrap_or(&model_id).to_owned();
    let stream = probe.stream;
    let rewritten = request::rewrite(body.clone(), &probe, &upstream_model, &model_id);
    let usage_requested = probe.include_usage || rewritten.injected_usage;
    drop(probe);
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or_else(|| parts.uri.path());
    let fwd = Forward {
        app,
        rt,
        parts: &parts,
        path_and_query,
        body: &rewritten,
        model_id: &model_id,
        upstream_model: &upstream_model,
        stream,
        usage_requested,
        hops,
    };

    let cursor = rt.cursor(&model_id);
    let attempts = rt.config.server.max_provider_retries + 1;
    let mut tried: Vec<usize> = Vec::with_capacity(attempts as usize);
    let mut last: Option<Failure> = None;
    for attempt in 0..attempts {
        let now = Instant::now();
        let pick = match select(rt, route, &model_id, &cursor, &tried, &*app.limits, now) {
            Ok(pick) => pick,
            Err(exhausted) if attempt == 0 => return Err(exhaustion(&model_id, exhausted, now)),
            Err(_) => break,
        };
        tried.push(pick.slot.cred);
        let cred = &rt.credentials[pick.slot.cred];
        match fwd.attempt(cred, pick.slot).await {
            Attempt::Answer(resp) => {
                info!(
                    target: "airouter::access",
                    model = %model_id,
                    credential = %cred.name,
                    status = resp.status().as_u16(),
                    attempts = attempt + 1,
                    stream,
                    duration_ms = started.elapsed().as_millis() as u64,
                    "request"
                );
                return Ok(resp);
            }
            Attempt::Retry(failure) => last = Some(failure),
        }
    }
    let answer = match last {
        Some(Failure::Response(resp)) => Ok(resp),
        Some(Failure::Transport(t)) => Err(ProxyError::Upstream(t)),
        None => Err(ProxyError::Exhausted {
            model: model_id.clone(),
            reason: ExhaustedReason::Unavailable,
            retry_after: None,
        }),
    };
    info!(
        target: "airouter::access",
        model = %model_id,
        status = answer.as_ref().map(|r| r.status().as_u16()).unwrap_or_else(|e| e.status().as_u16()),
        attempts = tried.len(),
        stream,
        duration_ms = started.elapsed().as_millis() as u64,
        "request failed on every attempt"
    );
    answer
}

impl Forward<'_> {
    fn slot_ref<'s>(&'s self, cred: &'s Credential, slot: &Slot) -> SlotRef<'s> {
        SlotRef {
            credential: &cred.name,
            state: &cred.state,
            model: self.model_id,
            limits: self.rt.slot_limits(slot),
        }
    }

    fn record(&self, cred: &Credential, slot: &Slot, outcome: Outcome) {
        let ban = self.app.limits.record_outcome(
            self.slot_ref(cred, slot),
            outcome,
            &self.rt.policy,
            Instant::now(),
        );
        if let Some(ban) = ban {
            warn!(
                credential = %cred.name,
                model = %self.model_id,
                code = ban.code,
                ban_seconds = ban.until.map(|u| u.saturating_duration_since(Instant::now()).as_secs()),
                permanent = ban.until.is_none(),
                "credential banned for model"
            );
        }
    }

    fn transport_failure(&self, cred: &Credential, slot: &Slot, error: TransportError) -> Attempt {
        let status = match error {
            TransportError::Timeout => 408,
            TransportError::Connect | TransportError::Body => 502,
        };
        self.record(
            cred,
            slot,
            Outcome {
                status,
                retry_after: None,
                counts: true,
            },
        );
        Attempt::Retry(Failure::Transport(error))
    }

    async fn attempt(&self, cred: &Credential, slot: &Slot) -> Attempt {
        let timeout = self.rt.config.server.request_timeout;
        let resp = match (&cred.kind, &cred.mock) {
            (CredentialType::Mock, Some(cfg)) => {
                let req = mock::MockRequest {
                    path: self.parts.uri.path(),
                    model: self.upstream_model,
                    stream: self.stream,
                    include_usage: self.stream && self.usage_requested,
                };
                mock::respond(cfg, req).await
            }
            _ => {
                let req = match upstream::build(
                    cred,
                    &self.parts.method,
                    self.path_and_query,
                    &self.parts.headers,
                    self.body.body.clone(),
                    self.hops,
                ) {
                    Ok(req) => req,
                    Err(e) => {
                        warn!(credential = %cred.name, error = %e, "cannot build the upstream request");
                        return self.transport_failure(cred, slot, TransportError::Connect);
                    }
                };
                let sent = self.app.client.request(req);
                let result = match timeout {
                    Some(t) => tokio::time::timeout(t, sent).await,
                    None => Ok(sent.await),
                };
                match result {
                    Err(_) => {
                        warn!(credential = %cred.name, "upstream did not answer within request_timeout");
                        return self.transport_failure(cred, slot, TransportError::Timeout);
                    }
                    Ok(Err(e)) => {
                        warn!(credential = %cred.name, error = %e, "upstream request failed");
                        return self.transport_failure(cred, slot, TransportError::Connect);
                    }
                    Ok(Ok(resp)) => upstream::into_client_response(resp),
                }
            }
        };

        let status = resp.status();
        if is_streaming(resp.headers()) {
            // The answer, whatever its status: bytes are about to reach the client.
            self.record(
                cred,
                slot,
                Outcome {
                    status: status.as_u16(),
                    retry_after: None,
                    counts: !status.is_success(),
                },
            );
            return Attempt::Answer(self.tap_stream(cred, slot, resp));
        }

        let (parts, body) = resp.into_parts();
        let limit = self.rt.config.server.max_body_size_mb
            * self.rt.config.server.response_body_multiplier
            * MIB;
        let collect = collect_limited(body, limit as usize);
        let collected = match timeout {
            Some(t) => tokio::time::timeout(t, collect)
                .await
                .map_err(|_| TransportError::Timeout),
            None => Ok(collect.await),
        };
        let bytes = match collected {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(e)) => {
                warn!(credential = %cred.name, error = %e, "upstream response body failed");
                return self.transport_failure(cred, slot, TransportError::Body);
            }
            Err(t) => return self.transport_failure(cred, slot, t),
        };
        let benign = is_request_specific_error(&bytes);
        let retry_after = parts
            .headers
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        self.record(
            cred,
            slot,
            Outcome {
                status: status.as_u16(),
                retry_after,
                counts: !benign,
            },
        );
        if status.is_success() {
            if let Some(tokens) = total_tokens(&bytes) {
                self.app
                    .limits
                    .charge_tokens(self.slot_ref(cred, slot), tokens, Instant::now());
            }
        }
        let resp = Response::from_parts(parts, full(bytes));
        if is_retryable(status) && !benign {
            debug!(credential = %cred.name, status = status.as_u16(), "retryable upstream answer");
            Attempt::Retry(Failure::Response(resp))
        } else {
            Attempt::Answer(resp)
        }
    }

    /// Wraps a streaming body so its usage is charged when it ends, and the usage chunk the
    /// router asked for is removed unless the client asked too.
    fn tap_stream(
        &self,
        cred: &Credential,
        slot: &Slot,
        resp: Response<RespBody>,
    ) -> Response<RespBody> {
        let sse = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.contains("text/event-stream"));
        if !sse {
            return resp;
        }
        let (mut parts, body) = resp.into_parts();
        parts.headers.remove(header::CONTENT_LENGTH);
        let limits = self.app.limits.clone();
        let state = cred.state.clone();
        let name = cred.name.clone();
        let model: Arc<str> = Arc::from(self.model_id);
        let slot_limits = self.rt.slot_limits(slot);
        let on_done = Box::new(move |tokens: u64| {
            debug!(credential = %name, model = %model, tokens, "stream finished");
            if tokens > 0 {
                let slot = SlotRef {
                    credential: &name,
                    state: &state,
                    model: &model,
                    limits: slot_limits,
                };
                limits.charge_tokens(slot, tokens, Instant::now());
            }
        });
        let tap = UsageTap::new(body, self.body.injected_usage, on_done);
        Response::from_parts(parts, tap.boxed_unsync())
    }
}

const MIB: u64 = 1024 * 1024;

/// Buffers a response body up to `limit` bytes. (Not `http_body_util::Limited`: its boxed
/// error type trips a compiler limitation when proving this future `Send`.)
async fn collect_limited(mut body: RespBody, limit: usize) -> Result<Bytes, BoxError> {
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if buf.len() + data.len() > limit {
                return Err(format!("upstream response larger than {limit} bytes").into());
            }
            if buf.is_empty() && body.is_end_stream() {
                return Ok(data);
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

fn authorize(rt: &Runtime, headers: &HeaderMap) -> Result<(), ProxyError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or(ProxyError::MissingAuth)?;
    let token = value
        .as_bytes()
        .strip_prefix(b"Bearer ")
        .ok_or(ProxyError::BadAuthFormat)?;
    if rt.master_key.matches(token) {
        Ok(())
    } else {
        Err(ProxyError::InvalidKey)
    }
}

fn incoming_hops(headers: &HeaderMap) -> u32 {
    headers
        .get(HOPS_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

async fn read_body(
    headers: &HeaderMap,
    body: Incoming,
    limit_mb: u64,
) -> Result<Bytes, ProxyError> {
    let limit = limit_mb * MIB;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ProxyError::BodyTooLarge { limit_mb });
    }
    match Limited::new(body, limit as usize).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(ProxyError::BodyTooLarge { limit_mb })
        }
        Err(_) => Err(ProxyError::BodyRead),
    }
}

fn exhaustion(model: &str, e: Exhausted, now: Instant) -> ProxyError {
    let reason = match (e.rate_limited, e.banned) {
        (r, 0) if r > 0 => ExhaustedReason::RateLimited,
        (0, b) if b > 0 => ExhaustedReason::Banned,
        _ => ExhaustedReason::Unavailable,
    };
    ProxyError::Exhausted {
        model: model.to_owned(),
        reason,
        retry_after: e.frees_at.map(|at| retry_after_secs(at, now)),
    }
}

/// A response is streaming by its content type (spec §8.1).
fn is_streaming(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.contains("text/event-stream")
                || ct.contains("application/stream+json")
                || ct.contains("application/vnd.amazon.eventstream")
        })
}

fn is_retryable(status: StatusCode) -> bool {
    matches!(status.as_u16(), 401 | 403 | 429) || status.is_server_error()
}

/// Errors about this request rather than the credential: never retried, never counted by
/// fail2ban (spec §6.1 markers, plus context-length errors per §12.6).
fn is_request_specific_error(body: &[u8]) -> bool {
    const MARKERS: &[&str] = &[
        "content policy",
        "content management policy",
        "policy violation",
        "model not found",
        "model does not exist",
        "unsupported model",
        "context_length_exceeded",
        "maximum context length",
        "context length",
    ];
    let head = &body[..body.len().min(8192)];
    let lower = head.to_ascii_lowercase();
    MARKERS
        .iter()
        .any(|m| lower.windows(m.len()).any(|w| w == m.as_bytes()))
}

/// How long a graceful shutdown waits for in-flight requests.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_specific_errors_are_recognised() {
        assert!(is_request_specific_error(
            br#"{"error":{"message":"This model's Maximum Context Length is 8192"}}"#
        ));
        assert!(is_request_specific_error(b"blocked by Content Policy"));
        assert!(!is_request_specific_error(b"rate limit exceeded"));
    }
}
