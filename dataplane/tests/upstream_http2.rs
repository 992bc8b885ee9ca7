//! Which HTTP version airouter speaks to an upstream (`http_version`), and HTTP/2 connection
//! pooling: streams past the peer's `SETTINGS_MAX_CONCURRENT_STREAMS` go on new
//! connections instead of waiting for a stream to end; a stream the upstream refused
//! unprocessed (`REFUSED_STREAM`, `GOAWAY`) is sent again and not counted against the
//! credential.
//!
//! The upstream here is a real TLS server (rustls, a throwaway CA trusted through
//! `SSL_CERT_FILE`) or plain TCP, serving HTTP/1.1 and HTTP/2 with hyper; it records every
//! connection and the version of every request, and holds streams open until released.

mod common;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::*;
use futures::StreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::{body::Frame, Request, Response, Version};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use parking_lot::Mutex;
use rustls::pki_types::PrivateKeyDer;
use tokio::{net::TcpListener, sync::watch};

const KEY: &str = "sk-upstream-3c9e1f07";

#[derive(Default)]
struct Seen {
    connections: usize,
    closed: usize,
    versions: Vec<Version>,
    open_streams: usize,
    most_open_streams: usize,
}

/// The test's upstream provider.
struct Upstream {
    addr: SocketAddr,
    tls: bool,
    seen: Arc<Mutex<Seen>>,
    release: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    /// `alpn`: `None` for plain TCP, else TLS offering these protocols.
    async fn start(pki: Option<&Pki>, alpn: &[&[u8]], h2_max_streams: u32) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = pki.map(|pki| {
            let mut config = rustls::ServerConfig::builder()
                .with_no_client_auth()
                .with_single_cert(
                    vec![pki.cert.clone()],
                    PrivateKeyDer::Pkcs8(pki.key.clone().into()),
                )
                .unwrap();
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            tokio_rustls::TlsAcceptor::from(Arc::new(config))
        });
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (release, released) = watch::channel(false);
        let (tls, seen2) = (acceptor.is_some(), seen.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                seen2.lock().connections += 1;
                let (acceptor, seen, released) =
                    (acceptor.clone(), seen2.clone(), released.clone());
                let closed = seen.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        handle(req, seen.clone(), released.clone())
                    });
                    let mut builder = auto::Builder::new(TokioExecutor::new());
                    builder.http2().max_concurrent_streams(h2_max_streams);
                    match acceptor {
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(tcp).await {
                                let _ = builder.serve_connection(TokioIo::new(tls), service).await;
                            }
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
                        }
                    }
                    closed.lock().closed += 1;
                });
            }
        });
        Upstream {
            addr,
            tls,
            seen,
            release,
            task,
        }
    }

    fn base_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    fn versions(&self) -> Vec<Version> {
        self.seen.lock().versions.clone()
    }
}

type Body = BoxBody<Bytes, Infallible>;

const CHUNK: &str = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n";
const USAGE: &str = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4,\"total_tokens\":7}}\n\n";

/// A completion, or a stream that sends one chunk at once and the rest once released.
async fn handle(
    req: Request<hyper::body::Incoming>,
    seen: Arc<Mutex<Seen>>,
    mut released: watch::Receiver<bool>,
) -> Result<Response<Body>, Infallible> {
    seen.lock().versions.push(req.version());
    let authorized = req
        .headers()
        .get("authorization")
        .is_some_and(|v| v == format!("Bearer {KEY}").as_str());
    let body = req.into_body().collect().await.unwrap().to_bytes();
    if !authorized {
        return Ok(Response::builder()
            .status(401)
            .body(Full::new(Bytes::from_static(b"{}")).boxed())
            .unwrap());
    }
    if !String::from_utf8_lossy(&body).contains("\"stream\":true") {
        let completion = r#"{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
        return Ok(Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(completion.as_bytes())).boxed())
            .unwrap());
    }
    {
        let mut s = seen.lock();
        s.open_streams += 1;
        s.most_open_streams = s.most_open_streams.max(s.open_streams);
    }
    let stream =
        futures::stream::once(async { Ok(Frame::data(Bytes::from_static(CHUNK.as_bytes()))) })
            .chain(futures::stream::once(async move {
                let _ = released.wait_for(|r| *r).await;
                seen.lock().open_streams -= 1;
                Ok(Frame::data(Bytes::from(format!("{USAGE}data: [DONE]\n\n"))))
            }));
    Ok(Response::builder()
        .header("content-type", "text/event-stream")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap())
}

fn config(items: &[String]) -> String {
    server_yaml(1, &["request_timeout: 20s", "idle_conn_timeout: 1s"])
        + "monitoring:\n  prometheus_enabled: true\n"
        + &creds_yaml(items)
}

/// The value of the sample `name{origin="<origin>"}` in `/metrics`.
async fn origin_gauge(router: &Router, name: &str, origin: &str) -> Option<f64> {
    let text = router.get("/metrics").await.text().await.unwrap();
    let prefix = format!("{name}{{origin=\"{origin}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().parse().unwrap())
}

fn upstream_cred(name: &str, up: &Upstream, http_version: Option<&str>) -> String {
    let extra: Vec<String> = http_version
        .map(|v| vec![format!("http_version: {v}")])
        .unwrap_or_default();
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    cred(name, "openai", KEY, &up.base_url(), &extra)
}

async fn start_router(yaml: &str, pki: &Pki) -> Router {
    Router::start_with(
        yaml,
        StartOpts::default().env("SSL_CERT_FILE", &pki.ca_file),
    )
    .await
}

/// Starts a stream (asking for usage) and reads it to its first content chunk; the response
/// is kept to finish later.
async fn first_chunk(router: &Router) -> reqwest::Response {
    first_chunk_with(router, &http_client()).await
}

/// [`first_chunk`] sent by `client`.
async fn first_chunk_with(router: &Router, client: &reqwest::Client) -> reqwest::Response {
    let body = serde_json::json!({
        "model": "m", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "hello"}],
    });
    let mut resp = client
        .post(router.url("/v1/chat/completions"))
        .bearer_auth(MASTER_KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("\"content\":\"hi\"") {
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(left, resp.chunk())
            .await
            .expect("no first chunk within 10 s: the stream is queued behind others")
            .unwrap()
            .expect("stream ended before its first chunk");
        got.extend_from_slice(&chunk);
    }
    resp
}

async fn rest(resp: reqwest::Response) -> String {
    let body = tokio::time::timeout(Duration::from_secs(10), resp.text())
        .await
        .expect("stream did not finish within 10 s")
        .unwrap();
    assert!(body.contains("[DONE]"), "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_streams_past_the_peers_stream_limit_go_on_new_connections() {
    let pki = pki();
    // The provider allows 4 streams per connection; 10 streams are held open at once.
    let up = Upstream::start(Some(&pki), &[b"h2", b"http/1.1"], 4).await;
    let router = start_router(&config(&[upstream_cred("a", &up, None)]), &pki).await;
    let mut open = Vec::new();
    for _ in 0..10 {
        open.push(first_chunk(&router).await);
    }
    {
        let seen = up.seen.lock();
        assert_eq!(seen.most_open_streams, 10, "every stream is open at once");
        assert!(
            (3..=4).contains(&seen.connections),
            "10 streams at 4 per connection take 3 connections (one more if a probe raced), got {}",
            seen.connections
        );
        assert!(
            seen.versions.iter().all(|v| *v == Version::HTTP_2),
            "{:?}",
            seen.versions
        );
    }
    let origin = up.base_url();
    let connections = up.seen.lock().connections as f64;
    assert_eq!(
        origin_gauge(&router, "airouter_upstream_http2_connections", &origin).await,
        Some(connections)
    );
    assert_eq!(
        origin_gauge(&router, "airouter_upstream_http2_streams", &origin).await,
        Some(10.0)
    );
    up.release.send(true).unwrap();
    for resp in open {
        rest(resp).await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut streams = None;
    while Instant::now() < deadline {
        streams = origin_gauge(&router, "airouter_upstream_http2_streams", &origin).await;
        if streams == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(streams, Some(0.0), "finished streams are counted out");
    // Finished streams free their slots: the next requests reuse the open connections.
    let connections = up.seen.lock().connections;
    for _ in 0..6 {
        assert_eq!(router.chat_status("m").await, 200);
    }
    assert_eq!(up.seen.lock().connections, connections);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_speaks_http1_to_an_https_upstream_without_h2_in_alpn() {
    let pki = pki();
    let up = Upstream::start(Some(&pki), &[b"http/1.1"], 100).await;
    let router = start_router(&config(&[upstream_cred("a", &up, None)]), &pki).await;
    let mut connections = Vec::new();
    for _ in 0..3 {
        let resp = router.chat("m").await;
        assert_eq!(resp.status().as_u16(), 200);
        let v: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(v["usage"]["total_tokens"], 7);
        connections.push(up.seen.lock().connections);
    }
    // The first request's ALPN probe is one connection, its HTTP/1.1 one another; that one
    // is reused: TLS 1.3 session tickets arriving on it while idle do not make it look closed.
    assert_eq!(connections, [2, 2, 2]);
    let resp = first_chunk(&router).await;
    up.release.send(true).unwrap();
    assert!(rest(resp).await.contains("\"total_tokens\":7"));
    assert!(
        up.versions().iter().all(|v| *v == Version::HTTP_11),
        "{:?}",
        up.versions()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_is_spoken_when_asked_even_if_h2_is_offered() {
    let pki = pki();
    let up = Upstream::start(Some(&pki), &[b"h2", b"http/1.1"], 100).await;
    let router = start_router(&config(&[upstream_cred("a", &up, Some("http1"))]), &pki).await;
    assert_eq!(router.chat_status("m").await, 200);
    assert_eq!(up.versions(), [Version::HTTP_11]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_over_plain_http_is_h2c_with_prior_knowledge() {
    let pki = pki();
    let up = Upstream::start(None, &[], 2).await;
    let router = start_router(&config(&[upstream_cred("a", &up, Some("http2"))]), &pki).await;
    let mut open = Vec::new();
    for _ in 0..5 {
        open.push(first_chunk(&router).await);
    }
    up.release.send(true).unwrap();
    for resp in open {
        assert!(rest(resp).await.contains("\"total_tokens\":7"));
    }
    {
        let seen = up.seen.lock();
        assert!(seen.versions.iter().all(|v| *v == Version::HTTP_2));
        assert_eq!(seen.connections, 3, "5 held streams at 2 per connection");
    }
    // idle_conn_timeout is 1 s: the idle connections are closed (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(10);
    while up.seen.lock().closed < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        up.seen.lock().closed,
        3,
        "idle HTTP/2 connections are closed"
    );
    assert_eq!(
        router.chat_status("m").await,
        200,
        "and a new one opens on demand"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_required_but_refused_fails_over_to_the_next_credential() {
    let pki = pki();
    let h1_only = Upstream::start(Some(&pki), &[b"http/1.1"], 100).await;
    let good = Upstream::start(None, &[], 100).await;
    let yaml = config(&[
        upstream_cred("needs-h2", &h1_only, Some("http2")),
        upstream_cred("plain", &good, None),
    ]);
    let router = start_router(&yaml, &pki).await;
    for _ in 0..2 {
        assert_eq!(router.chat_status("m").await, 200);
    }
    assert!(h1_only.versions().is_empty(), "no request reached it");
    assert!(!good.versions().is_empty());
    let logs = router.logs();
    assert!(
        logs.contains("did not agree to HTTP/2"),
        "the log says why: {logs}"
    );
    assert!(!logs.contains(KEY), "no key in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_ssl_cert_file_is_reported_and_the_router_still_serves() {
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("not-a-ca.pem");
    std::fs::write(&bogus, "not a certificate\n").unwrap();
    let yaml = server_yaml(0, &[]) + "credentials:\n  - name: m\n    type: mock\n";
    let router = Router::start_with(
        &yaml,
        StartOpts::default().env("SSL_CERT_FILE", &bogus.to_string_lossy()),
    )
    .await;
    assert_eq!(router.chat_status("gpt-4o-mini").await, 200);
    let logs = router.logs();
    assert!(
        logs.contains("SSL_CERT_FILE not used") && logs.contains("not-a-ca.pem"),
        "{logs}"
    );
}

/// What the frame-level peer below does with a stream: the connection's `n`th (from 0) of
/// the `c`th connection (from 0).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Verdict {
    Answer,
    /// `RST_STREAM` with `REFUSED_STREAM`; the connection stays.
    Refuse,
    /// `GOAWAY` naming the stream before it as the last processed, then the connection closes.
    GoAway,
}

/// An h2c peer written at the frame level, so that it can refuse streams and send `GOAWAY`
/// exactly as a provider's edge does when it sheds or rotates connections (hyper's server
/// does neither on demand). It answers a stream with `:status 200` and a completion.
struct FramePeer {
    addr: SocketAddr,
    /// The verdicts given, by connection.
    seen: Arc<Mutex<Vec<Vec<Verdict>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FramePeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const FRAME_DATA: u8 = 0;
const FRAME_HEADERS: u8 = 1;
const FRAME_RST_STREAM: u8 = 3;
const FRAME_SETTINGS: u8 = 4;
const FRAME_GOAWAY: u8 = 7;
const FLAG_END_STREAM: u8 = 1;
const FLAG_ACK: u8 = 1;
const FLAG_END_HEADERS: u8 = 4;
const REFUSED_STREAM: u32 = 7;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream.to_be_bytes());
    f.extend(payload);
    f
}

impl FramePeer {
    async fn start(verdict: fn(usize, usize) -> Verdict) -> FramePeer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Vec<Verdict>>>> = Arc::default();
        let seen2 = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let conn = {
                    let mut seen = seen2.lock();
                    seen.push(Vec::new());
                    seen.len() - 1
                };
                let seen = seen2.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(20),
                        Self::serve(tcp, conn, verdict, seen),
                    )
                    .await;
                });
            }
        });
        FramePeer { addr, seen, task }
    }

    async fn serve(
        mut tcp: tokio::net::TcpStream,
        conn: usize,
        verdict: fn(usize, usize) -> Verdict,
        seen: Arc<Mutex<Vec<Vec<Verdict>>>>,
    ) -> std::io::Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut preface = [0u8; 24];
        tcp.read_exact(&mut preface).await?;
        assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        tcp.write_all(&frame(FRAME_SETTINGS, 0, 0, &[])).await?;
        // Streams answered once their request has ended.
        let mut answering = Vec::new();
        loop {
            let mut head = [0u8; 9];
            tcp.read_exact(&mut head).await?;
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let (kind, flags) = (head[3], head[4]);
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; len];
            tcp.read_exact(&mut payload).await?;
            match kind {
                FRAME_SETTINGS if flags & FLAG_ACK == 0 => {
                    tcp.write_all(&frame(FRAME_SETTINGS, FLAG_ACK, 0, &[]))
                        .await?;
                }
                FRAME_HEADERS => {
                    let v = {
                        let mut seen = seen.lock();
                        let v = verdict(conn, seen[conn].len());
                        seen[conn].push(v);
                        v
                    };
                    match v {
                        Verdict::Answer => answering.push(stream),
                        Verdict::Refuse => {
                            let code = REFUSED_STREAM.to_be_bytes();
                            tcp.write_all(&frame(FRAME_RST_STREAM, 0, stream, &code))
                                .await?;
                        }
                        Verdict::GoAway => {
                            let mut goaway = stream.saturating_sub(2).to_be_bytes().to_vec();
                            goaway.extend(0u32.to_be_bytes()); // NO_ERROR
                            tcp.write_all(&frame(FRAME_GOAWAY, 0, 0, &goaway)).await?;
                            // Read until the client closes (closing first, with its frames
                            // unread, would reset the connection under the GOAWAY).
                            let mut rest = Vec::new();
                            let _ = tcp.read_to_end(&mut rest).await;
                            return Ok(());
                        }
                    }
                    if flags & FLAG_END_STREAM == 0 {
                        continue;
                    }
                }
                FRAME_DATA if flags & FLAG_END_STREAM != 0 => {}
                _ => continue,
            }
            if let Some(i) = answering.iter().position(|s| *s == stream) {
                answering.remove(i);
                // 0x88: `:status: 200` from HPACK's static table.
                tcp.write_all(&frame(FRAME_HEADERS, FLAG_END_HEADERS, stream, &[0x88]))
                    .await?;
                let completion = br#"{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
                tcp.write_all(&frame(FRAME_DATA, FLAG_END_STREAM, stream, completion))
                    .await?;
            }
        }
    }

    fn verdicts(&self) -> Vec<Vec<Verdict>> {
        self.seen.lock().clone()
    }
}

/// One credential whose failures would ban it at the first: a refusal must not count.
async fn router_before(peer: &FramePeer) -> Router {
    let yaml = server_yaml(0, &["request_timeout: 10s"])
        + "fail2ban:\n  max_attempts: 1\n  ban_duration: 1m\n  error_codes: [502]\n"
        + &creds_yaml(&[cred(
            "edge",
            "openai",
            KEY,
            &format!("http://{}", peer.addr),
            &["http_version: http2"],
        )]);
    Router::start(&yaml).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_left_out_by_goaway_is_sent_again_on_a_new_connection() {
    use Verdict::*;
    let peer = FramePeer::start(|conn, _| if conn == 0 { GoAway } else { Answer }).await;
    let router = router_before(&peer).await;
    assert_eq!(router.chat_status("m").await, 200);
    assert_eq!(peer.verdicts(), vec![vec![GoAway], vec![Answer]]);
    // Not the credential's failure: it is not banned, and the new connection serves on.
    assert_eq!(router.chat_status("m").await, 200);
    assert_eq!(peer.verdicts(), vec![vec![GoAway], vec![Answer, Answer]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stream_is_sent_again_and_its_connection_kept() {
    use Verdict::*;
    let peer = FramePeer::start(|_, n| if n == 0 { Refuse } else { Answer }).await;
    let router = router_before(&peer).await;
    assert_eq!(router.chat_status("m").await, 200);
    assert_eq!(router.chat_status("m").await, 200);
    assert_eq!(peer.verdicts(), vec![vec![Refuse, Answer, Answer]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_refusing_every_stream_fails_after_two_resends() {
    let peer = FramePeer::start(|_, _| Verdict::Refuse).await;
    let router = router_before(&peer).await;
    assert_eq!(router.chat_status("m").await, 502);
    assert_eq!(peer.verdicts(), vec![vec![Verdict::Refuse; 3]]);
    // That is the credential's failure: it counts (and bans at the first, as configured).
    assert_eq!(router.chat_status("m").await, 503);
    assert_eq!(peer.verdicts().concat().len(), 3, "nothing more was sent");
    let logs = router.logs();
    assert!(logs.contains("refused the HTTP/2 stream"), "{logs}");
    assert!(!logs.contains(KEY), "no key in the log");
}

/// A TCP relay to `target` that can be frozen: it then stops copying either way but keeps
/// both sockets open, as a dropped NAT entry or a powered-off peer behind a live link does
/// (no FIN, no RST: the kernel on this side still accepts bytes).
struct Relay {
    addr: SocketAddr,
    frozen: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Relay {
    async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (frozen, is_frozen) = watch::channel(false);
        let task = tokio::spawn(async move {
            // Dropped with this task when the relay is: every connection ends with it.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                let mut is_frozen = is_frozen.clone();
                connections.spawn(async move {
                    let (mut a, mut b) = (inbound, outbound);
                    let freeze = async move {
                        let _ = is_frozen.wait_for(|f| *f).await;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                        _ = freeze => {
                            // Both sockets stay open, and nothing is copied.
                            std::future::pending::<()>().await
                        }
                    }
                });
            }
        });
        Relay { addr, frozen, task }
    }

    fn freeze(&self) {
        self.frozen.send_replace(true);
    }
}

/// An HTTP/2 upstream connection that goes silent without closing (its peer gone behind a
/// live link) is found by pings — 30 s without a frame, then 20 s for the answer — and the
/// stream waiting on it ends then, not at `request_timeout` (10 minutes here) or never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_http2_upstream_is_found_by_pings_and_its_stream_ended() {
    let up = Upstream::start(None, &[], 100).await;
    let relay = Relay::start(up.addr).await;
    let base_url = format!("http://{}", relay.addr);
    let yaml = server_yaml(0, &["request_timeout: 10m"])
        + &creds_yaml(&[cred(
            "c1",
            "openai",
            KEY,
            &base_url,
            &["http_version: http2"],
        )]);
    let router = Router::start(&yaml).await;
    // A client of its own: the harness's gives up after 20 s.
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut resp = first_chunk_with(&router, &client).await;

    relay.freeze();
    let frozen_at = Instant::now();
    // Bounded: 90 s is past the 50 s the pings take, well short of request_timeout.
    let ended = tokio::time::timeout(Duration::from_secs(90), async {
        while let Ok(Some(_)) = resp.chunk().await {}
    })
    .await;
    let waited = frozen_at.elapsed();
    assert!(ended.is_ok(), "the stream still waits after 90 s");
    assert!(
        (Duration::from_secs(40)..Duration::from_secs(80)).contains(&waited),
        "ended {waited:?} after the upstream went silent; pings take 30 s + 20 s"
    );
    let logs = router.logs();
    assert!(logs.contains("end=\"upstream_error\""), "{logs}");
}
