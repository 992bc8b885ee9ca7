//! Streaming probe. `latency`: N streamed chat completions (C at a time), reporting time to
//! the first SSE event and the gaps between events (µs percentiles, JSON). `hold`: open N
//! concurrent streams and keep them open; prints `open N` once all have started, then waits
//! for them to finish and prints how many completed.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use airouter_bench::percentile;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http::{header, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};

#[derive(Parser)]
struct Args {
    /// Chat completions URL.
    #[arg(long)]
    url: String,
    #[arg(long, default_value = "bench")]
    key: String,
    #[arg(long, default_value = "gpt-4o-mini")]
    model: String,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    Latency {
        #[arg(long, default_value_t = 500)]
        streams: usize,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
    },
    Hold {
        #[arg(long, default_value_t = 5000)]
        open: usize,
    },
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// One stream: (time to first event, gaps between events, events seen).
async fn one(
    client: &HttpClient,
    url: &str,
    key: &str,
    body: &Bytes,
    on_first: impl FnOnce(),
) -> anyhow::Result<(Duration, Vec<Duration>, usize)> {
    let req = Request::post(url)
        .header(header::AUTHORIZATION, format!("Bearer {key}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(body.clone()))?;
    let start = Instant::now();
    let resp = client.request(req).await?;
    anyhow::ensure!(resp.status().is_success(), "status {}", resp.status());
    let mut body = resp.into_body();
    let mut first = None;
    let mut last = start;
    let mut gaps = Vec::new();
    let mut events = 0;
    let mut on_first = Some(on_first);
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        let n = data.windows(2).filter(|w| w == b"\n\n").count();
        if n == 0 {
            continue;
        }
        let now = Instant::now();
        match first {
            None => {
                first = Some(now - start);
                if let Some(f) = on_first.take() {
                    f();
                }
            }
            Some(_) => gaps.push(now - last),
        }
        last = now;
        events += n;
    }
    Ok((first.unwrap_or_default(), gaps, events))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(10_000)
        .build(http);
    let body = Bytes::from(serde_json::to_vec(&serde_json::json!({
        "model": args.model, "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "hi"}]
    }))?);
    match args.mode {
        Mode::Latency {
            streams,
            concurrency,
        } => {
            let next = Arc::new(AtomicUsize::new(0));
            let mut tasks = Vec::new();
            for _ in 0..concurrency {
                let (client, url, key, body, next) = (
                    client.clone(),
                    args.url.clone(),
                    args.key.clone(),
                    body.clone(),
                    next.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    let mut out = Vec::new();
                    while next.fetch_add(1, Ordering::Relaxed) < streams {
                        out.push(one(&client, &url, &key, &body, || {}).await);
                    }
                    out
                }));
            }
            let (mut ttfc, mut gaps, mut errors, mut events) = (Vec::new(), Vec::new(), 0, 0);
            for t in tasks {
                for r in t.await? {
                    match r {
                        Ok((first, g, n)) => {
                            ttfc.push(first.as_secs_f64() * 1e6);
                            gaps.extend(g.iter().map(|d| d.as_secs_f64() * 1e6));
                            events += n;
                        }
                        Err(_) => errors += 1,
                    }
                }
            }
            ttfc.sort_by(f64::total_cmp);
            gaps.sort_by(f64::total_cmp);
            println!(
                "{}",
                serde_json::json!({
                    "streams": ttfc.len(), "errors": errors, "events": events,
                    "ttfc_us": {"p50": percentile(&ttfc, 50.0), "p99": percentile(&ttfc, 99.0)},
                    "gap_us": {"p50": percentile(&gaps, 50.0), "p99": percentile(&gaps, 99.0)},
                })
            );
        }
        Mode::Hold { open } => {
            let started = Arc::new(AtomicUsize::new(0));
            let mut tasks = Vec::with_capacity(open);
            for _ in 0..open {
                let (client, url, key, body, started) = (
                    client.clone(),
                    args.url.clone(),
                    args.key.clone(),
                    body.clone(),
                    started.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    one(&client, &url, &key, &body, || {
                        started.fetch_add(1, Ordering::Relaxed);
                    })
                    .await
                }));
            }
            let deadline = Instant::now() + Duration::from_secs(60);
            while started.load(Ordering::Relaxed) < open && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            println!("open {}", started.load(Ordering::Relaxed));
            let mut ok = 0;
            for t in tasks {
                if matches!(t.await, Ok(Ok(_))) {
                    ok += 1;
                }
            }
            println!("completed {ok}");
        }
    }
    Ok(())
}
