//! The pooled upstream HTTP client and how a request for one credential is built.
//!
//! One hyper client (HTTP/1.1 and HTTP/2 by ALPN, rustls with the webpki roots for `https`,
//! `TCP_NODELAY` on every socket) is shared by all credentials; connections are pooled per
//! host.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioTimer},
};

use crate::{
    body::RespBody,
    config::{CredentialType, ServerConfig},
    runtime::Credential,
};

/// The header that counts how many routers a request has passed.
pub const HOPS_HEADER: HeaderName = HeaderName::from_static("x-airouter-hops");

pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Builds the shared client from the `server` section's pool settings.
pub fn client(server: &ServerConfig) -> HttpClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    http.set_keepalive(Some(Duration::from_secs(60)));
    if let Some(t) = server.request_timeout {
        http.set_connect_timeout(Some(t));
    }
    // The ring provider is compiled in; installing it is idempotent across tests.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(server.idle_conn_timeout)
        .pool_max_idle_per_host(server.max_idle_conns_per_host as usize)
        .build(https)
}

/// Headers never copied from the client: hop-by-hop ones (RFC 9110 §7.6.1), the client's own
/// credentials, and those the client library sets itself.
fn is_dropped(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "accept-encoding"
            | "authorization"
            | "host"
            | "content-length"
            | "x-airouter-hops"
    )
}

/// The upstream URL for a request path: `base_url` + path + query. For `openai`, a `/vN`
/// version at the end of `base_url` replaces the path's own (`…/api/paas/v4` +
/// `/v1/chat/completions` → `…/v4/chat/completions`).
pub fn url(cred: &Credential, path_and_query: &str) -> Result<Uri, http::Error> {
    let base = &cred.base_url;
    let mut path = path_and_query;
    if cred.kind == CredentialType::Openai && ends_with_version(base) {
        if let Some(rest) = path.strip_prefix('/') {
            let (first, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            if is_version(first) {
                path = tail;
            }
        }
    }
    let mut s = String::with_capacity(base.len() + path.len());
    s.push_str(base);
    s.push_str(path);
    Ok(Uri::try_from(s)?)
}

fn is_version(segment: &str) -> bool {
    segment
        .strip_prefix('v')
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

fn ends_with_version(base: &str) -> bool {
    base.rsplit('/').next().is_some_and(is_version)
}

/// Builds the upstream request for `cred`.
pub fn build(
    cred: &Credential,
    method: &Method,
    path_and_query: &str,
    client_headers: &HeaderMap,
    body: Bytes,
    hops: u32,
    request_id: &HeaderValue,
) -> Result<Request<Full<Bytes>>, http::Error> {
    let mut req = Request::builder()
        .method(method.clone())
        .uri(url(cred, path_and_query)?)
        .body(Full::new(body))?;
    let headers = req.headers_mut();
    headers.reserve(client_headers.len() + 2);
    for (name, value) in client_headers {
        if !is_dropped(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    if let Some(auth) = &cred.authorization {
        headers.insert(header::AUTHORIZATION, auth.clone());
    }
    if cred.kind == CredentialType::Proxy {
        headers.insert(HOPS_HEADER, HeaderValue::from(hops + 1));
    }
    headers.insert(HeaderName::from_static("x-request-id"), request_id.clone());
    Ok(req)
}

/// Copies an upstream response's headers for the client, without hop-by-hop ones.
pub fn into_client_response(resp: Response<hyper::body::Incoming>) -> Response<RespBody> {
    let (mut parts, body) = resp.into_parts();
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        parts.headers.remove(name);
    }
    Response::from_parts(parts, body.map_err(Into::into).boxed_unsync())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::Limit;

    fn cred(kind: CredentialType, base: &str) -> Credential {
        Credential {
            name: Arc::from("c"),
            kind,
            is_fallback: false,
            rpm: Limit::Unlimited,
            tpm: Limit::Unlimited,
            base_url: base.into(),
            authorization: None,
            mock: None,
            state: Arc::default(),
        }
    }

    #[test]
    fn version_dedup_only_for_openai() {
        let c = cred(CredentialType::Openai, "https://h/api/paas/v4");
        assert_eq!(
            url(&c, "/v1/chat/completions?x=1").unwrap(),
            "https://h/api/paas/v4/chat/completions?x=1"
        );
        let c = cred(CredentialType::Openai, "https://h");
        assert_eq!(
            url(&c, "/v1/chat/completions").unwrap(),
            "https://h/v1/chat/completions"
        );
        let c = cred(CredentialType::Proxy, "http://r/v4");
        assert_eq!(url(&c, "/v1/models").unwrap(), "http://r/v4/v1/models");
    }

    #[test]
    fn client_credentials_never_forwarded() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer master"),
        );
        h.insert("x-custom", HeaderValue::from_static("1"));
        h.insert(HOPS_HEADER, HeaderValue::from_static("2"));
        let c = cred(CredentialType::Proxy, "http://r");
        let req = build(
            &c,
            &Method::POST,
            "/v1/chat/completions",
            &h,
            Bytes::new(),
            2,
            &HeaderValue::from_static("rid"),
        )
        .unwrap();
        assert_eq!(req.headers()["x-request-id"], "rid");
        assert!(req.headers().get(header::AUTHORIZATION).is_none());
        assert_eq!(req.headers()["x-custom"], "1");
        assert_eq!(req.headers()[HOPS_HEADER], "3");
    }
}
