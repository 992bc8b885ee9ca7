//! The listener: accepts connections (HTTP/1.1 with keep-alive, or HTTP/2 without TLS),
//! serves them with [`proxy::handle`], and shuts down gracefully: stop accepting, let
//! in-flight requests and streams finish (bounded by a grace period), then return.

use std::{
    convert::Infallible, future::Future, net::SocketAddr, pin::Pin, sync::Arc, time::Duration,
};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::{admin, app::App, body::RespBody, proxy};

/// Serves until `shutdown` resolves, then drains connections for at most `grace`: idle
/// keep-alive connections are closed, in-flight requests and streams run to their end.
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    role: Role,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(Duration::from_secs(30));
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Usually EMFILE: back off briefly instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let service = Service { app: app.clone(), role };
                let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        debug!(peer = %peer, error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    info!(listener = ?role, "listener closed: draining in-flight requests");
    tokio::select! {
        () = graceful.shutdown() => info!("all connections closed"),
        () = tokio::time::sleep(grace) => warn!(grace_seconds = grace.as_secs(), "grace period over; closing remaining connections"),
    }
}

/// Binds the public listener.
pub async fn bind(host: &str, port: u16) -> std::io::Result<TcpListener> {
    let addr: SocketAddr = format!("{host}:{port}")
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    TcpListener::bind(addr).await
}

/// The per-connection service. A named type with a boxed future (rather than `service_fn`)
/// so the future's `Send` bound is checked once, here.
/// Which API a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Public,
    Admin,
}

#[derive(Clone)]
struct Service {
    app: Arc<App>,
    role: Role,
}

impl hyper::service::Service<Request<Incoming>> for Service {
    type Response = Response<RespBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let app = self.app.clone();
        match self.role {
            Role::Public => Box::pin(async move { Ok(proxy::handle(app, req).await) }),
            Role::Admin => Box::pin(async move { Ok(admin::handle(app, req).await) }),
        }
    }
}
