//! The request pipeline: auth → body → model → route → select (reserves RPM) → forward →
//! retry or answer → charge tokens, feed fail2ban, record metrics, write the access log.
//!
//! A retry moves to the next credential only while nothing has been sent to the client: the
//! decision is made on the upstream's status line and (for non-streaming answers) its
//! buffered body. Once a streaming response starts, it is the answer.

use std::{
    borrow::Cow,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use http::{
    header, request::Parts, uri::PathAndQuery, HeaderMap, HeaderValue, Method, Request, Response,
    StatusCode,
};
use http_body_util::{BodyExt, Either};
use hyper::body::Incoming;
use tracing::{debug, info, warn};

use crate::{
    app::App,
    body::{full, BoxError, RespBody},
    config::CredentialType,
    error::{ExhaustedReason, ProxyError, TransportError},
    health,
    limit::{
        fail2ban::Outcome, parse_retry_after, retry_after_secs, shared::SharedLimits, LocalLimits,
        SlotRef,
    },
    metrics, mock,
    request::{self, Probe, Rewritten},
    runtime::{Credential, Lookup, Route, Runtime, Slot, Tier},
    select::{select, select_shared, Exhausted, Pick, Query},
    stall::StreamStallGuard,
    stream::{usage, StreamEnd, TokenUsage, UsageTap, Watchdog},
    upstream::{self, ResponseBody, HOPS_HEADER},
};

pub use crate::upstream::REQUEST_ID;

const PROXIED_PATHS: &[&str] = &[
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/images/generations",
    "/v1/responses",
];

/// Answers one request on the public port. Never fails: every error becomes a response.
pub async fn handle(app: Arc<App>, req: Request<Incoming>) -> Response<RespBody> {
    let rt = app.current();
    let path = req.uri().path();
    match path {
        "/health" => health::health(&rt, &app.remote),
        "/vhealth" => health::vhealth(),
        "/health/readiness" => health::readiness(&app),
        "/metrics" if rt.config.monitoring.prometheus_enabled => metrics_response(&app, &rt),
        "/v1/models" if req.method() == Method::GET => {
            if !app.remote.covers(&rt) {
                Box::pin(app.remote.synced(&rt)).await;
            }
            health::models(&rt, &app.remote)
        }
        p if PROXIED_PATHS.contains(&p) => {
            let ctx = RequestCtx {
                request_id: request_id(req.headers()),
                started: Instant::now(),
            };
            let mut resp = match proxy(&app, &rt, req, &ctx).await {
                Ok(resp) => resp,
                Err(e) => {
                    let status = e.status().as_u16();
                    if let ProxyError::Exhausted { model, reason, .. } = &e {
                        app.metrics.exhausted(model, reason.as_str());
                    }
                    info!(
                        target: "airouter::access",
                        request_id = ctx.id(),
                        status,
                        reason = e.reason(),
                        duration_ms = ctx.started.elapsed().as_millis() as u64,
                        "request refused"
                    );
                    e.into_response()
                }
            };
            resp.headers_mut().insert(REQUEST_ID, ctx.request_id);
            resp
        }
        _ => ProxyError::NotFound.into_response(),
    }
}

pub fn metrics_response(app: &App, rt: &Runtime) -> Response<RespBody> {
    let mut resp = Response::new(full(
        app.metrics.render(rt, &app.client.http2_connections()),
    ));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(metrics::CONTENT_TYPE),
    );
    resp
}

/// Per-request facts every step needs.
struct RequestCtx {
    request_id: HeaderValue,
    started: Instant,
}

impl RequestCtx {
    fn id(&self) -> &str {
        self.request_id.to_str().unwrap_or("-")
    }
}

/// The client's `x-request-id` when it is a sane token, else a new UUID.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    headers
        .get(&REQUEST_ID)
        .filter(|v| {
            (1..=128).contains(&v.len()) && v.as_bytes().iter().all(|b| b.is_ascii_graphic())
        })
        .cloned()
        .unwrap_or_else(|| {
            let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
            let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
            HeaderValue::from_str(id).expect("a UUID is a valid header value")
        })
}

/// Why a request did not reach the upstream, or got no answer from it.
enum Unsent {
    Build(http::Error),
    Failed(upstream::Error),
}

/// How many times one attempt sends a request the upstream refused unprocessed, after the
/// first: a second refusal in a row is rare (a new connection is chosen after a `GOAWAY`), a
/// third means the upstream refuses everything, which then counts as its failure.
const MAX_RESENDS: u32 = 2;

/// How an attempt ended when it did not produce the answer.
enum Failure {
    /// A retryable upstream response (kept: it is the answer if no retry succeeds).
    Response(Response<RespBody>),
    Transport(TransportError),
}

enum Attempt {
    Answer(Response<RespBody>, Option<TokenUsage>),
    Retry(Failure),
}

/// What every attempt of one request shares.
struct Forward<'a> {
    app: &'a Arc<App>,
    rt: &'a Runtime,
    ctx: &'a RequestCtx,
    parts: &'a Parts,
    /// The request path, as one of [`PROXIED_PATHS`] (a metric label).
    endpoint: &'static str,
    path_and_query: &'a PathAndQuery,
    body: &'a Rewritten,
    model_id: &'a str,
    upstream_model: &'a str,
    stream: bool,
    /// The forwarded body asks for the final usage chunk (the client did, or the router did).
    usage_requested: bool,
    hops: u32,
}

async fn proxy(
    app: &Arc<App>,
    rt: &Arc<Runtime>,
    req: Request<Incoming>,
    ctx: &RequestCtx,
) -> Result<Response<RespBody>, ProxyError> {
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
    let server = &rt.config.server;
    let body = read_body(
        &parts.headers,
        body,
        server.max_body_size_mb,
        server.idle_timeout,
    )
    .await?;
    let probe = Probe::read(&body).ok_or(ProxyError::ModelRequired)?;
    let model_id = rt.resolve_alias(&probe.model);
    let route = resolve_route(app, rt, model_id).await?;
    let upstream_model = rt.real_name(model_id).unwrap_or(model_id);
    let stream = probe.stream;
    let rewritten = request::rewrite(body.clone(), &probe, upstream_model, model_id)
        .map_err(ProxyError::Unreadable)?;
    let usage_requested = probe.include_usage || rewritten.injected_usage;
    let root = PathAndQuery::from_static("/");
    let path_and_query = parts.uri.path_and_query().unwrap_or(&root);
    let fwd = Forward {
        app,
        rt,
        ctx,
        parts: &parts,
        endpoint: PROXIED_PATHS
            .iter()
            .find(|p| **p == parts.uri.path())
            .copied()
            .unwrap_or("other"),
        path_and_query,
        body: &rewritten,
        model_id,
        upstream_model,
        stream,
        usage_requested,
        hops,
    };

    let cursor = rt.cursor(model_id);
    let attempts = rt.config.server.max_provider_retries + 1;
    let mut tried = Tried::default();
    // The failure to answer with when attempts run out, and whose it was.
    let mut last: Option<(Failure, usize)> = None;
    for attempt in 0..attempts {
        let now = Instant::now();
        let query = Query {
            rt,
            route: &route,
            model_id,
            cursor: &cursor,
            tried: tried.as_slice(),
            remote: &app.remote,
        };
        let picked = match &rt.shared {
            None => select(query, &LocalLimits::WHOLE, now),
            // Boxed: the Redis call's state stays out of every request's future.
            Some(shared) => Box::pin(select_shared(query, shared)).await,
        };
        let pick = match picked {
            Ok(pick) => pick,
            Err(exhausted) => {
                fwd.count_skipped(&exhausted);
                if attempt == 0 {
                    return Err(exhaustion(
                        model_id,
                        exhausted,
                        now,
                        rt.config.server.health_sync_interval,
                    ));
                }
                break;
            }
        };
        fwd.count_skipped(&pick.skipped);
        if attempt > 0 {
            app.metrics.retry(model_id);
        }
        tried.push(pick.slot.cred);
        let cred = &rt.credentials[pick.slot.cred];
        match fwd.attempt(cred, &pick, attempt + 1).await {
            Attempt::Answer(resp, tokens) => {
                if pick.tier == Tier::Fallback {
                    app.metrics.fallback(model_id);
                }
                let status = resp.status().as_u16();
                let elapsed = ctx.started.elapsed();
                app.metrics
                    .request_done(model_id, &cred.name, status, elapsed);
                // A stream logs its line when it ends, with its tokens.
                if tokens.is_some() || !is_streaming(resp.headers()) {
                    access_log(
                        ctx,
                        model_id,
                        &cred.name,
                        status,
                        attempt + 1,
                        stream,
                        tokens.unwrap_or_default(),
                        elapsed,
                        StreamEnd::Complete.as_str(),
                    );
                }
                return Ok(resp);
            }
            // An upstream's own answer (its status, body, Retry-After) is what the client
            // gets when attempts run out, even if a later attempt could not connect at all.
            Attempt::Retry(Failure::Transport(_))
                if matches!(last, Some((Failure::Response(_), _))) => {}
            Attempt::Retry(failure) => last = Some((failure, pick.slot.cred)),
        }
    }
    let last_cred: Arc<str> = last
        .as_ref()
        .map(|&(_, i)| rt.credentials[i].name.clone())
        .unwrap_or_else(|| Arc::from("-"));
    match last.map(|(failure, _)| failure) {
        Some(Failure::Response(resp)) => {
            let status = resp.status().as_u16();
            let elapsed = ctx.started.elapsed();
            app.metrics
                .request_done(model_id, &last_cred, status, elapsed);
            access_log(
                ctx,
                model_id,
                &last_cred,
                status,
                tried.len() as u32,
                stream,
                TokenUsage::default(),
                elapsed,
                StreamEnd::Complete.as_str(),
            );
            Ok(resp)
        }
        Some(Failure::Transport(t)) => Err(ProxyError::Upstream(t)),
        None => Err(ProxyError::Exhausted {
            model: model_id.to_owned(),
            reason: ExhaustedReason::Unavailable,
            retry_after: None,
        }),
    }
}

/// The credentials one request has tried, in order (no allocation for the first few).
#[derive(Default)]
struct Tried {
    inline: [usize; 4],
    len: usize,
    /// Every entry, once there are more than fit inline.
    spill: Vec<usize>,
}

impl Tried {
    fn push(&mut self, cred: usize) {
        if self.len < self.inline.len() {
            self.inline[self.len] = cred;
        } else {
            if self.spill.is_empty() {
                self.spill.extend_from_slice(&self.inline);
            }
            self.spill.push(cred);
        }
        self.len += 1;
    }

    fn as_slice(&self) -> &[usize] {
        if self.len <= self.inline.len() {
            &self.inline[..self.len]
        } else {
            &self.spill
        }
    }

    fn len(&self) -> usize {
        self.len
    }
}

/// The credentials that serve `model_id`: its `models[]` route, or — for a model no entry
/// names — the open route plus proxies whose remote lists the model. A model nothing serves
/// yet waits for the first sync of the config's proxies (their remotes may list it).
async fn resolve_route<'r>(
    app: &App,
    rt: &'r Runtime,
    model_id: &str,
) -> Result<Cow<'r, Route>, ProxyError> {
    if let Some(route) = rt.static_route(model_id) {
        return Ok(Cow::Borrowed(route));
    }
    if let Some(route) = remote_route(app, rt, model_id) {
        return Ok(Cow::Owned(route));
    }
    let unsupported = match rt.lookup(model_id) {
        Lookup::Route(route) => return Ok(Cow::Borrowed(route)),
        Lookup::NotServed { unsupported } => unsupported,
    };
    if !app.remote.covers(rt) {
        // Boxed, like the shared limiter's calls: a rare wait keeps its timer out of every
        // request's future.
        Box::pin(app.remote.synced(rt)).await;
        if let Some(route) = remote_route(app, rt, model_id) {
            return Ok(Cow::Owned(route));
        }
    }
    Err(ProxyError::ModelNotFound {
        model: model_id.to_owned(),
        unsupported: unsupported.into_iter().map(str::to_owned).collect(),
    })
}

/// The open route plus the proxies whose remote lists `model_id`, if any does.
fn remote_route(app: &App, rt: &Runtime, model_id: &str) -> Option<Route> {
    let serving = app.remote.credentials_serving(model_id);
    if serving.is_empty() {
        return None;
    }
    rt.route_with_remotes(&serving)
}

#[allow(clippy::too_many_arguments)]
fn access_log(
    ctx: &RequestCtx,
    model: &str,
    credential: &str,
    status: u16,
    attempts: u32,
    stream: bool,
    tokens: TokenUsage,
    duration: Duration,
    end: &str,
) {
    info!(
        target: "airouter::access",
        request_id = ctx.id(),
        model,
        credential,
        status,
        attempts,
        stream,
        end,
        prompt_tokens = tokens.prompt,
        completion_tokens = tokens.completion,
        total_tokens = tokens.total,
        duration_ms = duration.as_millis() as u64,
        "request"
    );
}

/// Charges the tokens a provider reported to `slot`: in process (the local backend's
/// windows, or the Redis backend's mirror of them) and, with Redis, in Redis off the request
/// path.
fn charge(
    shared: Option<&Arc<SharedLimits>>,
    slot: SlotRef<'_>,
    credential: &Arc<str>,
    tokens: u64,
    now: Instant,
) {
    slot.state.charge_tokens(slot.model, tokens, now);
    if let Some(shared) = shared {
        shared.charge_in_background(
            credential.clone(),
            Arc::from(slot.model),
            slot.limits,
            tokens,
        );
    }
}

impl Forward<'_> {
    fn slot_ref<'s>(&'s self, cred: &'s Credential, slot: &Slot) -> SlotRef<'s> {
        SlotRef {
            state: &cred.state,
            model: self.model_id,
            limits: self.rt.slot_limits(slot),
        }
    }

    /// Whether a config applied while this request ran replaced `cred`'s key or endpoint
    /// (the rotation cleared its bans): the old key's failures in flight must not ban the new
    /// one.
    fn key_replaced(&self, cred: &Credential) -> bool {
        !self.app.store.is_current(self.rt)
            && self
                .app
                .current()
                .credential(&cred.name)
                .is_some_and(|now| now.ban_scope != cred.ban_scope)
    }

    fn count_skipped(&self, e: &Exhausted) {
        let m = &self.app.metrics;
        m.rejected("banned", e.banned);
        m.rejected("rate_limit", e.rate_limited);
        m.rejected("remote_unavailable", e.remote_refused);
    }

    /// Feeds one attempt's outcome to metrics and fail2ban; `now` is when it was decided.
    async fn record(
        &self,
        cred: &Credential,
        pick: &Pick<'_>,
        outcome: Outcome,
        ttfb: Duration,
        now: Instant,
    ) {
        self.app.metrics.upstream_attempt(
            &cred.name,
            self.endpoint,
            outcome.status,
            now.saturating_duration_since(self.ctx.started),
            ttfb,
        );
        // With the Redis backend its answer decides (and is mirrored here for `/health`);
        // without it, or when it does not answer, the local state does.
        let shared = self.rt.shared.as_ref().filter(|s| s.available());
        let from_redis = match shared {
            Some(shared) if (200..300).contains(&outcome.status) => {
                shared.record_success_in_background(
                    cred.ban_scope.clone(),
                    Arc::from(self.model_id),
                    pick.strikes,
                );
                Some(None)
            }
            // Boxed: the Redis call's state stays out of every request's future.
            Some(shared) => Box::pin(shared.record_outcome(
                &cred.ban_scope,
                self.model_id,
                outcome,
                &self.rt.policy,
            ))
            .await
            .ok(),
            None => None,
        };
        if self.key_replaced(cred) {
            // Its state now belongs to the new key (Redis keeps outcomes under the old key's
            // ban scope, so that call above was harmless).
            debug!(request_id = self.ctx.id(), credential = %cred.name, status = outcome.status, "outcome of a replaced key not recorded");
            return;
        }
        let ban = match from_redis {
            Some(ban) => {
                cred.state
                    .mirror_ban(self.model_id, Some(outcome.status), ban.clone());
                ban
            }
            None => cred
                .state
                .record_outcome(self.model_id, outcome, &self.rt.policy, now),
        };
        if let Some(ban) = ban {
            self.app.metrics.ban(&cred.name, self.model_id, ban.code);
            warn!(
                request_id = self.ctx.id(),
                credential = %cred.name,
                model = %self.model_id,
                code = ban.code,
                ban_seconds = ban.until.map(|u| u.saturating_duration_since(Instant::now()).as_secs()),
                permanent = ban.until.is_none(),
                "credential banned for model"
            );
        }
    }

    async fn transport_failure(
        &self,
        cred: &Credential,
        pick: &Pick<'_>,
        error: TransportError,
        sent: Instant,
    ) -> Attempt {
        let status = match error {
            TransportError::Timeout => 408,
            TransportError::Connect | TransportError::Body => 502,
        };
        let now = Instant::now();
        self.record(
            cred,
            pick,
            Outcome {
                status,
                retry_after: None,
                counts: true,
            },
            now.saturating_duration_since(sent),
            now,
        )
        .await;
        Attempt::Retry(Failure::Transport(error))
    }

    /// Sends the request to `cred`'s upstream; one the upstream refused unprocessed (an HTTP/2
    /// stream refused, or left out by a `GOAWAY`) goes again, on another connection when the
    /// refusing one is going away. A provider's edge does this routinely when it rotates
    /// connections, and it is not the credential's failure.
    async fn send(&self, cred: &Credential) -> Result<Response<ResponseBody>, Unsent> {
        let mut resends = 0;
        loop {
            let req = upstream::build(
                cred,
                &self.parts.method,
                self.path_and_query,
                &self.parts.headers,
                self.body.body.clone(),
                self.hops,
                &self.ctx.request_id,
            )
            .map_err(Unsent::Build)?;
            match self.app.client.request(cred.http_version, req).await {
                Err(e) if e.is_refused() && resends < MAX_RESENDS => {
                    resends += 1;
                    debug!(request_id = self.ctx.id(), credential = %cred.name, error = %e, "upstream refused the request unprocessed; sending it again");
                }
                sent => return sent.map_err(Unsent::Failed),
            }
        }
    }

    async fn attempt(&self, cred: &Credential, pick: &Pick<'_>, attempt_no: u32) -> Attempt {
        let slot = pick.slot;
        let timeout = self.rt.config.server.request_timeout;
        let sent = Instant::now();
        let (parts, body) = match (&cred.kind, &cred.mock) {
            (CredentialType::Mock, Some(cfg)) => {
                let req = mock::MockRequest {
                    path: self.parts.uri.path(),
                    model: self.upstream_model,
                    stream: self.stream,
                    include_usage: self.stream && self.usage_requested,
                };
                let (parts, body) = mock::respond(cfg, req).await.into_parts();
                (parts, Either::Right(body))
            }
            _ => {
                let call = self.send(cred);
                let result = match timeout {
                    Some(t) => tokio::time::timeout(t, call).await,
                    None => Ok(call.await),
                };
                match result {
                    Ok(Err(Unsent::Build(e))) => {
                        warn!(request_id = self.ctx.id(), credential = %cred.name, error = %e, "cannot build the upstream request");
                        return self
                            .transport_failure(cred, pick, TransportError::Connect, sent)
                            .await;
                    }
                    Err(_) => {
                        warn!(request_id = self.ctx.id(), credential = %cred.name, "upstream did not answer within request_timeout");
                        return self
                            .transport_failure(cred, pick, TransportError::Timeout, sent)
                            .await;
                    }
                    Ok(Err(Unsent::Failed(e))) => {
                        warn!(request_id = self.ctx.id(), credential = %cred.name, error = %e, "upstream request failed");
                        return self
                            .transport_failure(cred, pick, TransportError::Connect, sent)
                            .await;
                    }
                    Ok(Ok(resp)) => {
                        let (mut parts, body) = resp.into_parts();
                        upstream::strip_hop_by_hop(&mut parts.headers);
                        (parts, Either::Left(body))
                    }
                }
            }
        };
        let head_at = Instant::now();
        let ttfb = head_at.saturating_duration_since(sent);
        let status = parts.status;
        if is_streaming(&parts.headers) {
            // The answer, whatever its status: bytes are about to reach the client.
            self.record(
                cred,
                pick,
                Outcome {
                    status: status.as_u16(),
                    retry_after: None,
                    counts: !status.is_success(),
                },
                ttfb,
                head_at,
            )
            .await;
            return Attempt::Answer(self.tap_stream(cred, slot, parts, body, attempt_no), None);
        }

        let limit = (self.rt.config.server.max_body_size_mb
            * self.rt.config.server.response_body_multiplier
            * MIB) as usize;
        // A body already read with the head is taken on the first poll, before the timer is
        // ever registered.
        let collect = collect_limited(body, limit, None);
        let collected = match timeout {
            Some(t) => tokio::time::timeout(t, collect)
                .await
                .map_err(|_| TransportError::Timeout),
            None => Ok(collect.await),
        };
        let bytes = match collected {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(CollectError::TooLarge { limit })) => {
                warn!(request_id = self.ctx.id(), credential = %cred.name, limit_bytes = limit,
                    "upstream response larger than server.max_body_size_mb × server.response_body_multiplier allows");
                return self
                    .transport_failure(cred, pick, TransportError::Body, sent)
                    .await;
            }
            Ok(Err(CollectError::Body(e))) => {
                warn!(request_id = self.ctx.id(), credential = %cred.name, error = %e, "upstream response body failed");
                return self
                    .transport_failure(cred, pick, TransportError::Body, sent)
                    .await;
            }
            // (`Stalled` needs a stall allowance, which this call does not give.)
            Ok(Err(CollectError::Stalled)) => {
                return self
                    .transport_failure(cred, pick, TransportError::Timeout, sent)
                    .await
            }
            Err(t) => return self.transport_failure(cred, pick, t, sent).await,
        };
        let now = Instant::now();
        let benign = !status.is_success() && is_request_specific_error(&bytes);
        let retry_after = parts
            .headers
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        self.record(
            cred,
            pick,
            Outcome {
                status: status.as_u16(),
                retry_after,
                counts: !benign,
            },
            ttfb,
            now,
        )
        .await;
        let mut tokens = TokenUsage::default();
        if status.is_success() {
            if let Some(u) = usage(&bytes) {
                let shared = self.rt.shared.as_ref();
                charge(shared, self.slot_ref(cred, slot), &cred.name, u.total, now);
                self.app.metrics.tokens(&cred.name, self.model_id, &u);
                tokens = u;
            }
        }
        let resp = Response::from_parts(parts, full(bytes));
        if is_retryable(status) && !benign {
            debug!(request_id = self.ctx.id(), credential = %cred.name, status = status.as_u16(), "retryable upstream answer");
            Attempt::Retry(Failure::Response(resp))
        } else {
            Attempt::Answer(resp, Some(tokens))
        }
    }

    /// Wraps a streaming body so its usage is charged (and the access line written) when it
    /// ends, and the usage chunk the router asked for is removed unless the client asked too.
    fn tap_stream(
        &self,
        cred: &Credential,
        slot: &Slot,
        mut parts: http::response::Parts,
        body: UpstreamBody,
        attempt_no: u32,
    ) -> Response<RespBody> {
        let sse = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.contains("text/event-stream"));
        parts.headers.remove(header::CONTENT_LENGTH);
        let app = self.app.clone();
        let state = cred.state.clone();
        let name = cred.name.clone();
        let model: Arc<str> = Arc::from(self.model_id);
        let slot_limits = self.rt.slot_limits(slot);
        let shared = self.rt.shared.clone();
        let status = parts.status.as_u16();
        let ctx = RequestCtx {
            request_id: self.ctx.request_id.clone(),
            started: self.ctx.started,
        };
        let on_done = Box::new(move |tokens: TokenUsage, end: StreamEnd| {
            if let StreamEnd::Failed(error) = &end {
                warn!(request_id = ctx.id(), credential = %name, error = %error, "upstream stream failed; the client's stream is cut short");
            }
            if tokens.total > 0 {
                let slot = SlotRef {
                    state: &state,
                    model: &model,
                    limits: slot_limits,
                };
                charge(shared.as_ref(), slot, &name, tokens.total, Instant::now());
                app.metrics.tokens(&name, &model, &tokens);
            }
            access_log(
                &ctx,
                &model,
                &name,
                status,
                attempt_no,
                true,
                tokens,
                ctx.started.elapsed(),
                end.as_str(),
            );
        });
        let strip = sse && self.body.injected_usage;
        let watchdog = self.rt.config.server.request_timeout.map(Watchdog::new);
        let tap = UsageTap::new(body, strip, sse, on_done).watched(watchdog);
        let write_timeout = self.rt.config.server.write_timeout;
        if self.parts.version == http::Version::HTTP_2 && !write_timeout.is_zero() {
            let request_id = self.ctx.request_id.clone();
            let guarded = StreamStallGuard::new(tap, write_timeout, request_id);
            return Response::from_parts(parts, guarded.boxed_unsync());
        }
        Response::from_parts(parts, tap.boxed_unsync())
    }
}

const MIB: u64 = 1024 * 1024;

/// An upstream answer's body: from the network (`Left`), or the mock provider's (`Right`).
/// `Either` polls the one it holds with a `match` per frame, so a stream is not wrapped in
/// another boxed, error-mapping layer.
type UpstreamBody = Either<upstream::ResponseBody, RespBody>;

/// Why [`collect_limited`] gave up.
#[derive(Debug)]
enum CollectError {
    TooLarge {
        limit: usize,
    },
    Body(BoxError),
    /// No frame came for the whole `stall` allowance.
    Stalled,
}

/// Buffers a body up to `limit` bytes. A body that arrives in one frame (the usual case) is
/// returned as that frame, without copying. (Not `http_body_util::Limited` + `collect`: that
/// buffers every frame in a list and then copies them, and its boxed error type trips a
/// compiler limitation when proving this future `Send`.)
///
/// `stall`: how long the body may go without a frame (`None`: no limit). A frame that is
/// already there is taken without a timer (the usual body arrives with its head).
async fn collect_limited<B>(
    mut body: B,
    limit: usize,
    stall: Option<Duration>,
) -> Result<Bytes, CollectError>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let mut buf = BytesMut::new();
    loop {
        let frame = match stall {
            Some(stall) => Stall::new(body.frame(), stall)
                .await
                .map_err(|_| CollectError::Stalled)?,
            None => body.frame().await,
        };
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|e| CollectError::Body(e.into()))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(CollectError::TooLarge { limit });
            }
            if buf.is_empty() && body.is_end_stream() {
                return Ok(data);
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

pin_project_lite::pin_project! {
    /// `inner`, or `Err(())` once it has stayed pending for `stall`. The timer is made only
    /// when `inner` is first pending: a frame that is already there costs no timer.
    struct Stall<F> {
        #[pin]
        inner: F,
        #[pin]
        timer: Option<tokio::time::Sleep>,
        stall: Duration,
    }
}

impl<F> Stall<F> {
    fn new(inner: F, stall: Duration) -> Self {
        Stall {
            inner,
            timer: None,
            stall,
        }
    }
}

impl<F: Future> Future for Stall<F> {
    type Output = Result<F::Output, ()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(out) = this.inner.poll(cx) {
            return Poll::Ready(Ok(out));
        }
        if this.timer.is_none() {
            this.timer.set(Some(tokio::time::sleep(*this.stall)));
        }
        match this.timer.as_pin_mut().map(|timer| timer.poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Err(())),
            _ => Poll::Pending,
        }
    }
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

/// The client's body, at most `limit_mb`; a body that stalls for `server.idle_timeout` is a
/// 408 (a client that stopped sending, or vanished, must not hold its buffer for ever).
async fn read_body(
    headers: &HeaderMap,
    body: Incoming,
    limit_mb: u64,
    stall: Duration,
) -> Result<Bytes, ProxyError> {
    let limit = limit_mb * MIB;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ProxyError::BodyTooLarge { limit_mb });
    }
    match collect_limited(body, limit as usize, Some(stall)).await {
        Ok(bytes) => Ok(bytes),
        Err(CollectError::TooLarge { .. }) => Err(ProxyError::BodyTooLarge { limit_mb }),
        Err(CollectError::Body(_)) => Err(ProxyError::BodyRead),
        Err(CollectError::Stalled) => Err(ProxyError::BodyStalled {
            secs: stall.as_secs(),
        }),
    }
}

/// The 503 for `model`. `Retry-After` is when the first skipped credential frees up; a remote
/// that refused is read again at the next health sync, at most `sync_interval` away.
fn exhaustion(model: &str, e: Exhausted, now: Instant, sync_interval: Duration) -> ProxyError {
    let reason = match (e.rate_limited, e.banned, e.remote_refused) {
        (r, 0, 0) if r > 0 => ExhaustedReason::RateLimited,
        (0, b, 0) if b > 0 => ExhaustedReason::Banned,
        (0, 0, n) if n > 0 => ExhaustedReason::RemoteUnavailable,
        _ => ExhaustedReason::Unavailable,
    };
    let resync = (e.remote_refused > 0).then(|| sync_interval.as_secs().max(1));
    let frees = e.frees_at.map(|at| retry_after_secs(at, now));
    ProxyError::Exhausted {
        model: model.to_owned(),
        reason,
        retry_after: match (frees, resync) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        },
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

    #[test]
    fn request_ids_are_kept_or_made() {
        let mut h = HeaderMap::new();
        assert_eq!(request_id(&h).len(), 36);
        h.insert(REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h), "abc-123");
        h.insert(REQUEST_ID, HeaderValue::from_static("has space"));
        assert_ne!(request_id(&h), "has space");
    }
}
