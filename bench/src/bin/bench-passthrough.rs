//! The physical limit of a hyper proxy: forward every request to one upstream over a pooled
//! client and stream the answer back. No auth, no parsing, no routing.

use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use clap::Parser;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Upstream base URL, e.g. http://127.0.0.1:9000
    #[arg(long)]
    upstream: String,
}

type Body = UnsyncBoxBody<Bytes, hyper::Error>;

async fn forward(
    client: Arc<Client<HttpConnector, Full<Bytes>>>,
    base: Arc<str>,
    req: Request<Incoming>,
) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let Ok(body) = body.collect().await.map(|c| c.to_bytes()) else {
        return error(StatusCode::BAD_REQUEST);
    };
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let Ok(uri) = format!("{base}{pq}").parse::<Uri>() else {
        return error(StatusCode::BAD_GATEWAY);
    };
    let mut up = Request::new(Full::new(body));
    *up.method_mut() = parts.method;
    *up.uri_mut() = uri;
    for (k, v) in &parts.headers {
        if k != http::header::HOST && k != http::header::CONNECTION {
            up.headers_mut().append(k.clone(), v.clone());
        }
    }
    match client.request(up).await {
        Ok(resp) => resp.map(|b| b.boxed_unsync()),
        Err(_) => error(StatusCode::BAD_GATEWAY),
    }
}

fn error(status: StatusCode) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    resp
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client = Arc::new(
        Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1024)
            .build(http),
    );
    let base: Arc<str> = Arc::from(args.upstream.trim_end_matches('/'));
    airouter_bench::serve(args.listen, move |req| {
        forward(client.clone(), base.clone(), req)
    })
    .await
}
