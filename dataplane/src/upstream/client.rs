//! The upstream client every credential's requests go through: HTTP/1.1 over [`h1::Pool`],
//! HTTP/2 over [`h2::Pool`]. Which one is the credential's `http_version`:
//! `http1` and `http2` say it outright (`http2` on an `http` URL is h2c with prior
//! knowledge); `auto` speaks HTTP/2 to `https` origins that offer it in TLS ALPN and
//! HTTP/1.1 to the rest, remembering the origins that do not.

use std::{
    path::Path,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use parking_lot::RwLock;
use rustls::{
    pki_types::{pem::PemObject, CertificateDer},
    RootCertStore,
};
use tracing::{info, warn};

use super::{
    h1,
    h2::{self, Http2Origin, SendError, StreamSlot},
    origin::Origin,
};
use crate::{
    config::{HttpVersion, ServerConfig},
    FastSet,
};

/// Connecting gives up after this when `server.request_timeout` is unlimited.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Cheap to clone: every clone shares the connections.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    /// TLS offers only `http/1.1` here: HTTP/2 goes through `h2`.
    http1: h1::Pool,
    h2: h2::Pool,
    /// `https` origins of `auto` credentials whose TLS handshake did not choose `h2`.
    http1_only: RwLock<FastSet<Origin>>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Http1(#[from] h1::Error),
    #[error(transparent)]
    Http2(#[from] h2::Error),
    #[error("upstream URI has no scheme or host")]
    NoOrigin,
}

impl Error {
    /// The upstream said it did not process the request (HTTP/2 `REFUSED_STREAM`, or a
    /// `GOAWAY` that left it out): sending it again is safe and says nothing about the
    /// credential.
    pub fn is_refused(&self) -> bool {
        matches!(self, Error::Http2(h2::Error::Refused { .. }))
    }
}

/// `e` and every error under it, `: `-separated (refused, DNS, certificate…). Upstream
/// errors name hosts, never keys.
pub(super) fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

impl Client {
    /// The client for the `server` section's pool settings.
    pub fn new(server: &ServerConfig) -> Client {
        // The ring provider is compiled in; installing it is idempotent across tests.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let roots = roots(std::env::var_os(CA_FILE_VAR).as_deref().map(Path::new));
        let connect_timeout = server.request_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let http1 = h1::Pool::new(
            connector(&roots, connect_timeout, false),
            h1::Settings {
                idle_timeout: server.idle_conn_timeout,
                max_idle_per_origin: server.max_idle_conns_per_host as usize,
                connect_timeout,
            },
        );
        let h2 = h2::Pool::new(
            connector(&roots, connect_timeout, true),
            h2::Settings {
                idle_timeout: server.idle_conn_timeout,
                connect_timeout,
            },
        );
        Client {
            inner: Arc::new(Inner {
                http1,
                h2,
                http1_only: RwLock::default(),
            }),
        }
    }

    /// Sends `req` (absolute URI) with the HTTP version `version` asks for.
    pub async fn request(
        &self,
        version: HttpVersion,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<ResponseBody>, Error> {
        // A URI without an origin cannot come from a validated config.
        let origin = Origin::of(req.uri()).ok_or(Error::NoOrigin)?;
        let http2 = match version {
            HttpVersion::Http1 => false,
            HttpVersion::Http2 => true,
            HttpVersion::Auto => {
                origin.is_https() && !self.inner.http1_only.read().contains(&origin)
            }
        };
        if !http2 {
            return self.http1(origin, req).await;
        }
        match self.inner.h2.send(origin.clone(), req).await {
            Ok(resp) => Ok(resp.map(|(body, slot)| ResponseBody::Http2(body, slot))),
            Err(SendError::NotHttp2(req)) if version == HttpVersion::Auto => {
                info!(origin = %origin, "upstream does not offer HTTP/2; using HTTP/1.1 for it");
                self.inner.http1_only.write().insert(origin.clone());
                self.http1(origin, *req).await
            }
            Err(SendError::NotHttp2(_)) => Err(h2::Error::NotHttp2 {
                origin: origin.to_string(),
            }
            .into()),
            Err(SendError::Failed(e)) => Err(e.into()),
        }
    }

    /// The HTTP/2 connections by origin.
    pub fn http2_connections(&self) -> Vec<Http2Origin> {
        self.inner.h2.snapshot()
    }

    async fn http1(
        &self,
        origin: Origin,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<ResponseBody>, Error> {
        let resp = self.inner.http1.send(origin, req).await?;
        Ok(resp.map(ResponseBody::Http1))
    }
}

/// `https` (rustls) or plain `http`, `TCP_NODELAY` and keep-alive on every socket; ALPN
/// offers `h2` only to the HTTP/2 pool.
fn connector(
    roots: &RootCertStore,
    connect_timeout: Duration,
    offer_h2: bool,
) -> HttpsConnector<HttpConnector> {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    http.set_keepalive(Some(Duration::from_secs(60)));
    http.set_connect_timeout(Some(connect_timeout));
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    if offer_h2 {
        builder.enable_all_versions().wrap_connector(http)
    } else {
        builder.enable_http1().wrap_connector(http)
    }
}

/// The variable naming a PEM file of extra CA certificates for `https` upstreams (an
/// internal CA). Go's TLS stack reads the same variable, so an Auto AI Router deployment that
/// sets it keeps working.
const CA_FILE_VAR: &str = "SSL_CERT_FILE";

/// Mozilla's roots (webpki-roots), plus every certificate in `ca_file`. A file that cannot
/// be used adds nothing and is reported, naming the file and the reason.
fn roots(ca_file: Option<&Path>) -> RootCertStore {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let Some(path) = ca_file else {
        return roots;
    };
    let read = CertificateDer::pem_file_iter(path)
        .map_err(|e| e.to_string())
        .and_then(|certs| {
            certs
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())
        });
    let certs = match read {
        Ok(certs) if certs.is_empty() => Err("no PEM certificate in it".to_owned()),
        other => other,
    };
    match certs {
        Ok(certs) => {
            let (added, ignored) = roots.add_parsable_certificates(certs);
            info!(file = %path.display(), added, ignored, "{CA_FILE_VAR}: trusting its CA certificates for https upstreams");
        }
        Err(e) => {
            warn!(file = %path.display(), error = %e, "{CA_FILE_VAR} not used: https upstreams are checked against the built-in roots only");
        }
    }
    roots
}

/// An upstream response body: an HTTP/1.1 one (which gives its connection back to the pool
/// at its end, and closes it if dropped before), or an HTTP/2 stream's, held with its slot.
pub enum ResponseBody {
    Http1(h1::Body),
    /// The slot is held, never read: dropping it frees the stream.
    Http2(Incoming, #[allow(dead_code)] StreamSlot),
}

/// A response body that could not be read to its end.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Http1(#[from] h1::BodyError),
    #[error(transparent)]
    Http2(#[from] hyper::Error),
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ResponseBody::Http1(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(BodyError::from))),
            ResponseBody::Http2(body, _) => Pin::new(body)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(BodyError::from))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Http1(body) => body.is_end_stream(),
            ResponseBody::Http2(body, _) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Http1(body) => body.size_hint(),
            ResponseBody::Http2(body, _) => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn builtin() -> usize {
        roots(None).len()
    }

    #[test]
    fn ssl_cert_file_adds_its_certificates_to_the_builtin_roots() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).unwrap();
        let file = dir.path().join("ca.pem");
        std::fs::write(&file, ca.pem()).unwrap();
        assert!(builtin() > 100, "Mozilla's roots are built in");
        assert_eq!(roots(Some(&file)).len(), builtin() + 1);
    }

    #[test]
    fn an_unusable_ssl_cert_file_adds_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").unwrap();
        assert_eq!(roots(Some(&empty)).len(), builtin());
        assert_eq!(
            roots(Some(&dir.path().join("missing.pem"))).len(),
            builtin()
        );
    }
}
