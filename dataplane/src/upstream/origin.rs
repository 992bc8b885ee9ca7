//! Where upstream requests go: the key of both connection pools.

use std::{
    fmt,
    sync::Weak,
    time::{Duration, Instant},
};

use parking_lot::Mutex;

use http::{
    uri::{Authority, PathAndQuery, Scheme},
    HeaderValue, Uri,
};

use crate::FastMap;

/// A pool's connections, by origin.
pub type ByOrigin<T> = Mutex<FastMap<Origin, T>>;

/// Every half idle timeout (at least every second), keeps the origins for which `keep(conns,
/// ms since epoch)` is true — it closes what has been idle too long and says whether anything
/// is left (a config change may have removed an origin's credentials). Ends with the pool.
pub async fn sweep<T>(
    origins: Weak<ByOrigin<T>>,
    epoch: Instant,
    idle_timeout: Duration,
    keep: impl Fn(&T, u64) -> bool,
) {
    let mut tick = tokio::time::interval((idle_timeout / 2).max(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(origins) = origins.upgrade() else {
            return;
        };
        let now_ms = epoch.elapsed().as_millis() as u64;
        origins.lock().retain(|_, conns| keep(conns, now_ms));
    }
}

/// Scheme and authority of a request URI.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Origin {
    scheme: Scheme,
    authority: Authority,
}

impl Origin {
    pub fn of(uri: &Uri) -> Option<Origin> {
        Some(Origin {
            scheme: uri.scheme()?.clone(),
            authority: uri.authority()?.clone(),
        })
    }

    pub fn is_https(&self) -> bool {
        self.scheme == Scheme::HTTPS
    }

    /// `scheme://authority/`, what a connector is called with.
    pub fn uri(&self) -> Uri {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
        Uri::from_parts(parts).expect("scheme and authority make a URI")
    }

    /// The HTTP/1.1 `Host` header: the host, and the port unless it is the scheme's default
    /// (RFC 9110 §7.2); never the user-info.
    pub fn host_header(&self) -> HeaderValue {
        let host = self.authority.host();
        let value = match self.authority.port_u16() {
            Some(443) if self.is_https() => HeaderValue::from_str(host),
            Some(80) if self.scheme == Scheme::HTTP => HeaderValue::from_str(host),
            Some(port) => HeaderValue::from_str(&format!("{host}:{port}")),
            None => HeaderValue::from_str(host),
        };
        value.expect("a URI's host and port make a header value")
    }
}

/// `scheme://host[:port]`, never the user-info part of the authority (it may hold a key).
impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority.host())?;
        match self.authority.port_u16() {
            Some(port) => write!(f, ":{port}"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(uri: &str) -> Origin {
        Origin::of(&uri.parse().unwrap()).unwrap()
    }

    #[test]
    fn an_origin_is_shown_without_its_user_info() {
        assert_eq!(
            origin("https://user:sk-secret@api.example.com:8443/v1/chat").to_string(),
            "https://api.example.com:8443"
        );
        assert_eq!(origin("http://127.0.0.1/x").to_string(), "http://127.0.0.1");
        assert!(Origin::of(&"/relative".parse().unwrap()).is_none());
    }

    #[test]
    fn the_host_header_has_the_port_only_when_it_is_not_the_default() {
        let host = |uri| origin(uri).host_header();
        assert_eq!(
            host("https://user:sk-secret@api.example.com/v1"),
            "api.example.com"
        );
        assert_eq!(host("https://api.example.com:443/v1"), "api.example.com");
        assert_eq!(host("http://api.example.com:80"), "api.example.com");
        assert_eq!(host("https://api.example.com:80"), "api.example.com:80");
        assert_eq!(host("http://127.0.0.1:8080/v1"), "127.0.0.1:8080");
        assert_eq!(host("http://[::1]:9000"), "[::1]:9000");
    }
}
