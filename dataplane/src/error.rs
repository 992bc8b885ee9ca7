//! Errors the router answers itself, and their one mapping to HTTP responses.
//!
//! Bodies use the OpenAI error shape (`{"error":{"message","type","param","code"}}`), so SDKs
//! surface them as they would the provider's own errors. Messages never contain a key.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use serde_json::json;

use crate::body::{full, RespBody};

/// Why every candidate credential was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExhaustedReason {
    RateLimited,
    Banned,
    /// Every candidate is a proxy whose remote reported the model unavailable at its last
    /// health sync (§12.9): no round trip to a router that would refuse.
    RemoteUnavailable,
    /// Some rate-limited, some banned, or none left untried.
    Unavailable,
}

impl ExhaustedReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ExhaustedReason::RateLimited => "rate_limited",
            ExhaustedReason::Banned => "banned",
            ExhaustedReason::RemoteUnavailable => "remote_unavailable",
            ExhaustedReason::Unavailable => "unavailable",
        }
    }
}

/// How an upstream attempt failed without an HTTP response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportError {
    Timeout,
    Connect,
    /// The response body could not be read (or exceeded the size limit).
    Body,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("Missing Authorization header")]
    MissingAuth,
    #[error("Invalid Authorization header format")]
    BadAuthFormat,
    #[error("Invalid master key")]
    InvalidKey,
    #[error("Failed to read request body")]
    BodyRead,
    #[error("Request Timeout: the request body stalled for {secs} s (server.idle_timeout)")]
    BodyStalled { secs: u64 },
    #[error("Request Entity Too Large")]
    BodyTooLarge { limit_mb: u64 },
    #[error("model field is required")]
    ModelRequired,
    /// The body must be rewritten before it is forwarded and cannot be read for that.
    #[error("{0}")]
    Unreadable(String),
    #[error("model {model:?} is not served by any credential{}", unsupported_note(.unsupported))]
    ModelNotFound {
        model: String,
        unsupported: Vec<String>,
    },
    #[error("{}", exhausted_message(*.reason, .model))]
    Exhausted {
        model: String,
        reason: ExhaustedReason,
        retry_after: Option<u64>,
    },
    #[error("request has already passed {hops} routers (header x-airouter-hops); refusing to forward it again to break a routing loop (raise server.max_hops if the chain is meant to be longer than {max})")]
    LoopDetected { hops: u32, max: u32 },
    #[error("{}", transport_message(*.0))]
    Upstream(TransportError),
    #[error("Not Found")]
    NotFound,
    #[error("Method Not Allowed")]
    MethodNotAllowed,
}

fn unsupported_note(unsupported: &[String]) -> String {
    if unsupported.is_empty() {
        String::new()
    } else {
        format!(
            " of a supported type ({} has a type whose adapter airouter does not have yet)",
            unsupported.join(", ")
        )
    }
}

fn exhausted_message(reason: ExhaustedReason, model: &str) -> String {
    let why = match reason {
        ExhaustedReason::RateLimited => "every credential is at its rate limit",
        ExhaustedReason::Banned => "every credential is temporarily banned after upstream errors",
        ExhaustedReason::RemoteUnavailable => {
            "every proxy credential's remote router reported the model unavailable at its last health sync; retry after Retry-After or check the remote routers' /health"
        }
        ExhaustedReason::Unavailable => {
            "every credential is rate-limited, banned, reported unavailable by its remote router, or failed for this request"
        }
    };
    format!("No credentials available for model {model:?}: {why}")
}

fn transport_message(e: TransportError) -> &'static str {
    match e {
        TransportError::Timeout => "Request Timeout",
        TransportError::Connect | TransportError::Body => "Bad Gateway",
    }
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::MissingAuth | ProxyError::BadAuthFormat | ProxyError::InvalidKey => {
                StatusCode::UNAUTHORIZED
            }
            ProxyError::BodyRead | ProxyError::ModelRequired | ProxyError::Unreadable(_) => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::ModelNotFound { .. } | ProxyError::NotFound => StatusCode::NOT_FOUND,
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::Exhausted { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::LoopDetected { .. } => StatusCode::LOOP_DETECTED,
            ProxyError::Upstream(TransportError::Timeout) | ProxyError::BodyStalled { .. } => {
                StatusCode::REQUEST_TIMEOUT
            }
            ProxyError::Upstream(TransportError::Connect | TransportError::Body) => {
                StatusCode::BAD_GATEWAY
            }
        }
    }

    /// The machine-readable `code` of the error body.
    fn code(&self) -> Option<&'static str> {
        match self {
            ProxyError::InvalidKey => Some("invalid_api_key"),
            ProxyError::ModelNotFound { .. } => Some("model_not_found"),
            ProxyError::Exhausted { reason, .. } => Some(match reason {
                ExhaustedReason::RateLimited => "all_credentials_rate_limited",
                ExhaustedReason::Banned => "all_credentials_banned",
                ExhaustedReason::RemoteUnavailable => "remote_unavailable",
                ExhaustedReason::Unavailable => "no_credentials_available",
            }),
            ProxyError::LoopDetected { .. } => Some("loop_detected"),
            ProxyError::BodyTooLarge { .. } => Some("request_too_large"),
            ProxyError::MissingAuth
            | ProxyError::BadAuthFormat
            | ProxyError::BodyRead
            | ProxyError::BodyStalled { .. }
            | ProxyError::ModelRequired
            | ProxyError::Unreadable(_)
            | ProxyError::Upstream(_)
            | ProxyError::NotFound
            | ProxyError::MethodNotAllowed => None,
        }
    }

    fn param(&self) -> Option<&'static str> {
        match self {
            ProxyError::ModelRequired | ProxyError::ModelNotFound { .. } => Some("model"),
            _ => None,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ProxyError::Exhausted { .. } => "service_unavailable",
            ProxyError::LoopDetected { .. } => "loop_detected",
            _ => error_type(self.status()),
        }
    }

    /// A short PascalCase reason for logs and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::MissingAuth => "MissingAuth",
            ProxyError::BadAuthFormat => "BadAuthFormat",
            ProxyError::InvalidKey => "InvalidKey",
            ProxyError::BodyRead => "BodyRead",
            ProxyError::BodyStalled { .. } => "BodyStalled",
            ProxyError::BodyTooLarge { .. } => "BodyTooLarge",
            ProxyError::ModelRequired => "ModelRequired",
            ProxyError::Unreadable(_) => "Unreadable",
            ProxyError::ModelNotFound { .. } => "ModelNotFound",
            ProxyError::Exhausted { .. } => "Exhausted",
            ProxyError::LoopDetected { .. } => "LoopDetected",
            ProxyError::Upstream(TransportError::Timeout) => "UpstreamTimeout",
            ProxyError::Upstream(TransportError::Connect) => "UpstreamConnect",
            ProxyError::Upstream(TransportError::Body) => "UpstreamBody",
            ProxyError::NotFound => "NotFound",
            ProxyError::MethodNotAllowed => "MethodNotAllowed",
        }
    }

    pub fn into_response(self) -> Response<RespBody> {
        let mut resp = error_response(
            self.status(),
            &self.to_string(),
            self.kind(),
            self.param(),
            self.code(),
        );
        if let ProxyError::Exhausted {
            retry_after: Some(secs),
            ..
        } = self
        {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// The upstream error `type` for a status (spec §2.2).
pub fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 405 | 413 => "invalid_request_error",
        401 => "authentication_error",
        402 => "insufficient_quota",
        403 => "permission_denied",
        404 => "not_found_error",
        408 => "timeout_error",
        429 => "rate_limit_error",
        502 => "api_error",
        s if s >= 500 => "server_error",
        _ => "invalid_request_error",
    }
}

pub fn error_response(
    status: StatusCode,
    message: &str,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Response<RespBody> {
    let mut body = serde_json::to_vec(&json!({
        "error": {"message": message, "type": kind, "param": param, "code": code}
    }))
    .expect("error JSON serialises");
    body.push(b'\n');
    json_response(status, Bytes::from(body))
}

pub fn json_response(status: StatusCode, body: Bytes) -> Response<RespBody> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
