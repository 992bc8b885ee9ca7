//! Upstream requests: how a request for one credential is built ([`build`], [`url`]) and
//! the client that sends it ([`Client`]: HTTP/1.1 and HTTP/2 connection pools).

mod client;
mod h1;
mod h2;
mod origin;

use bytes::Bytes;
use http::{
    header,
    uri::{Authority, PathAndQuery, Scheme},
    HeaderMap, HeaderName, HeaderValue, Method, Request, Uri,
};
use http_body_util::Full;

pub use client::{Client, Error, ResponseBody};
pub use h2::Http2Origin;

use crate::{config::CredentialType, runtime::Credential};

/// The header that counts how many routers a request has passed.
pub const HOPS_HEADER: HeaderName = HeaderName::from_static("x-airouter-hops");
/// Returned to the client and forwarded upstream; taken from the client when it sent one.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

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

/// The headers a `Connection` header names (RFC 9110 §7.6.1): they belong to that one
/// connection, so they are never passed on. Those dropped anyway (and `close`) are left out,
/// so the usual `Connection: keep-alive` allocates nothing.
fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .filter(|name| !is_dropped(name) && name != "close")
        .collect()
}

/// A credential's `base_url` split once at compile time, so a request's URI is assembled
/// from parts instead of formatting and re-parsing a string.
#[derive(Clone, Debug)]
pub struct BaseUrl {
    scheme: Scheme,
    authority: Authority,
    /// The path part of `base_url` (`""` or `/…`), without query or fragment.
    prefix: Box<str>,
    /// `openai` with a trailing `/vN`: the request path's own version is removed.
    dedup_version: bool,
}

impl BaseUrl {
    /// `None` when `base` is not a plain `scheme://authority[/path]` (the request path then
    /// goes through the general string route, which gives the same URI for every base).
    pub fn parse(kind: CredentialType, base: &str) -> Option<BaseUrl> {
        let uri = Uri::try_from(base).ok()?;
        let scheme = uri.scheme()?.clone();
        let authority = uri.authority()?.clone();
        let prefix = base.strip_prefix(scheme.as_str())?.strip_prefix("://")?;
        let prefix = prefix.strip_prefix(authority.as_str())?;
        if !(prefix.is_empty() || prefix.starts_with('/')) || prefix.contains(['?', '#']) {
            return None;
        }
        Some(BaseUrl {
            scheme,
            authority,
            prefix: prefix.into(),
            dedup_version: kind == CredentialType::Openai && ends_with_version(base),
        })
    }
}

/// The request path after the `/vN` dedup of [`url`].
fn effective_path<'p>(cred: &Credential, path_and_query: &'p str) -> &'p str {
    let dedup = match &cred.base {
        Some(base) => base.dedup_version,
        None => cred.kind == CredentialType::Openai && ends_with_version(&cred.base_url),
    };
    if dedup {
        if let Some(rest) = path_and_query.strip_prefix('/') {
            let (first, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            if is_version(first) {
                return tail;
            }
        }
    }
    path_and_query
}

/// The upstream URL for a request path: `base_url` + path + query. For `openai`, a `/vN`
/// version at the end of `base_url` replaces the path's own (`…/api/paas/v4` +
/// `/v1/chat/completions` → `…/v4/chat/completions`).
pub fn url(cred: &Credential, path_and_query: &PathAndQuery) -> Result<Uri, http::Error> {
    let pq = path_and_query.as_str();
    let path = effective_path(cred, pq);
    let Some(base) = &cred.base else {
        let mut s = String::with_capacity(cred.base_url.len() + path.len());
        s.push_str(&cred.base_url);
        s.push_str(path);
        return Ok(Uri::try_from(s)?);
    };
    let path_and_query = if base.prefix.is_empty() && path.len() == pq.len() {
        path_and_query.clone()
    } else {
        let mut s = String::with_capacity(base.prefix.len() + path.len());
        s.push_str(&base.prefix);
        s.push_str(path);
        PathAndQuery::try_from(s)?
    };
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(base.scheme.clone());
    parts.authority = Some(base.authority.clone());
    parts.path_and_query = Some(path_and_query);
    Ok(Uri::from_parts(parts)?)
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
    path_and_query: &PathAndQuery,
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
    let listed = connection_listed(client_headers);
    for (name, value) in client_headers {
        if !is_dropped(name) && !listed.contains(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    if let Some(auth) = &cred.authorization {
        headers.insert(header::AUTHORIZATION, auth.clone());
    }
    if cred.kind == CredentialType::Proxy {
        headers.insert(HOPS_HEADER, HeaderValue::from(hops + 1));
    }
    headers.insert(REQUEST_ID, request_id.clone());
    Ok(req)
}

/// Removes an upstream response's hop-by-hop headers before it is passed to the client.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    const HOP_BY_HOP: [HeaderName; 7] = [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
        KEEP_ALIVE,
        PROXY_CONNECTION,
    ];
    // Usually there are none: look once instead of removing each by hash.
    if headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        for name in connection_listed(headers) {
            headers.remove(name);
        }
        for name in HOP_BY_HOP {
            headers.remove(name);
        }
    }
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
            ban_scope: Arc::from("c#0"),
            base: BaseUrl::parse(kind, base),
            http_version: crate::config::HttpVersion::Auto,
        }
    }

    fn pq(s: &'static str) -> PathAndQuery {
        PathAndQuery::from_static(s)
    }

    #[test]
    fn version_dedup_only_for_openai() {
        let c = cred(CredentialType::Openai, "https://h/api/paas/v4");
        assert_eq!(
            url(&c, &pq("/v1/chat/completions?x=1")).unwrap(),
            "https://h/api/paas/v4/chat/completions?x=1"
        );
        let c = cred(CredentialType::Openai, "https://h");
        assert_eq!(
            url(&c, &pq("/v1/chat/completions")).unwrap(),
            "https://h/v1/chat/completions"
        );
        let c = cred(CredentialType::Proxy, "http://r/v4");
        assert_eq!(url(&c, &pq("/v1/models")).unwrap(), "http://r/v4/v1/models");
    }

    #[test]
    fn assembled_uris_equal_the_formatted_ones() {
        for base in [
            "http://127.0.0.1:9000",
            "https://api.openai.com",
            "https://h/api/paas/v4",
            "http://user:pw@h:81/openai",
            "http://h/x?api-version=1",
            "http://[::1]:8080/a/v2",
            "https://H.example",
        ] {
            for kind in [CredentialType::Openai, CredentialType::Proxy] {
                for path in [
                    "/v1/chat/completions",
                    "/v1/embeddings?x=1&y=%20",
                    "/v3/responses",
                ] {
                    let split = cred(kind, base);
                    let unsplit = Credential {
                        base: None,
                        ..cred(kind, base)
                    };
                    assert_eq!(
                        url(&split, &pq(path)).unwrap().to_string(),
                        url(&unsplit, &pq(path)).unwrap().to_string(),
                        "{base} {path}"
                    );
                }
            }
        }
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
            &pq("/v1/chat/completions"),
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

    #[test]
    fn headers_a_connection_header_names_stay_on_that_connection() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, X-Internal-Auth"),
        );
        h.append(header::CONNECTION, HeaderValue::from_static("x-trace"));
        h.insert("x-internal-auth", HeaderValue::from_static("t"));
        h.insert("x-trace", HeaderValue::from_static("1"));
        h.insert("x-custom", HeaderValue::from_static("1"));
        let c = cred(CredentialType::Openai, "http://r");
        let rid = HeaderValue::from_static("rid");
        let req = build(&c, &Method::POST, &pq("/v1/x"), &h, Bytes::new(), 0, &rid).unwrap();
        let names: Vec<&str> = req.headers().keys().map(|n| n.as_str()).collect();
        assert!(names.contains(&"x-custom"), "{names:?}");
        for gone in ["connection", "x-internal-auth", "x-trace"] {
            assert!(!names.contains(&gone), "{gone} forwarded: {names:?}");
        }
        // The same on the way back.
        h.remove("x-custom");
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty(), "{h:?}");
        assert!(connection_listed(&HeaderMap::from_iter([(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive")
        )]))
        .is_empty());
    }
}
