//! SSE pass-through: incremental delivery, usage-chunk handling, disconnects,
//! and no retry once a stream started.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

fn one_cred(url: &str) -> String {
    server_yaml(0, &[]) + &creds_yaml(&[cred("c1", "openai", "sk-c1", url, &[])])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_arrive_incrementally() {
    let mock = MockUpstream::start().await;
    let router = Router::start(&one_cred(&mock.url())).await;

    let interval = Duration::from_millis(100);
    mock.push(Reply::stream(openai_stream(5, false, 0), interval));
    let start = Instant::now();
    let resp = router
        .post("/v1/chat/completions", &chat_stream_body("gpt-4o"))
        .await;
    assert_eq!(resp.status().as_u16(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/event-stream"), "content-type {ct}");
    let sse = read_sse(resp, start, None, Duration::from_secs(5)).await;

    let chunks = sse.choice_chunks();
    assert_eq!(chunks.len(), 5, "raw: {}", sse.raw);
    assert!(sse.has_done());
    assert_eq!(sse.content(), "c0 c1 c2 c3 c4 ");
    let times: Vec<Duration> = chunks.iter().map(|(t, _)| *t).collect();
    let spread = times[4] - times[0];
    assert!(
        spread >= Duration::from_millis(300),
        "chunks were not delivered incrementally: arrival times {times:?}"
    );
    let spaced = times
        .windows(2)
        .filter(|w| w[1] - w[0] >= Duration::from_millis(50))
        .count();
    assert!(spaced >= 3, "inter-arrival gaps too small: {times:?}");
    assert!(
        times[0] < Duration::from_millis(400),
        "first chunk late: {times:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_usage_chunk_is_stripped() {
    let mock = MockUpstream::start().await;
    let router = Router::start(&one_cred(&mock.url())).await;

    let bodies = [
        chat_stream_body("gpt-4o"),
        json!({"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": false},
               "messages": [{"role": "user", "content": "hello"}]}),
    ];
    for body in bodies {
        let start = Instant::now();
        let resp = router.post("/v1/chat/completions", &body).await;
        assert_eq!(resp.status().as_u16(), 200);
        let sse = read_sse(resp, start, None, Duration::from_secs(5)).await;
        assert_eq!(sse.choice_chunks().len(), 3, "raw: {}", sse.raw);
        assert!(sse.has_done(), "raw: {}", sse.raw);
        assert!(
            sse.usage_chunks().is_empty(),
            "usage chunk not stripped: {}",
            sse.raw
        );
        assert!(
            sse.events_with_usage().is_empty(),
            "usage leaked: {}",
            sse.raw
        );
    }
    // The router asked the upstream for usage both times.
    let reqs = mock.requests();
    assert_eq!(reqs.len(), 2);
    for r in &reqs {
        let up = r.json();
        assert_eq!(up["stream"], json!(true));
        assert_eq!(
            up["stream_options"]["include_usage"],
            json!(true),
            "forwarded body {up}"
        );
        assert_eq!(
            up["messages"],
            json!([{"role": "user", "content": "hello"}])
        );
    }
    // …and charged it.
    let charged = router
        .wait_health(Duration::from_secs(2), |h| {
            h["credentials"]["c1"]["current_tpm"] == json!(24)
        })
        .await;
    assert!(
        charged,
        "streamed usage not charged: {}",
        router.health().await.1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_chunk_kept_when_client_asked() {
    let mock = MockUpstream::start().await;
    let router = Router::start(&one_cred(&mock.url())).await;

    let body = json!({"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true},
                      "messages": [{"role": "user", "content": "hello"}]});
    let start = Instant::now();
    let resp = router.post("/v1/chat/completions", &body).await;
    assert_eq!(resp.status().as_u16(), 200);
    let sse = read_sse(resp, start, None, Duration::from_secs(5)).await;
    assert_eq!(sse.choice_chunks().len(), 3, "raw: {}", sse.raw);
    let usage = sse.usage_chunks();
    assert_eq!(usage.len(), 1, "raw: {}", sse.raw);
    assert_eq!(usage[0]["usage"]["total_tokens"], json!(12));
    assert!(sse.has_done());
    // The usage chunk comes after the content and before [DONE].
    let datas: Vec<&str> = sse.events.iter().map(|e| e.data.as_str()).collect();
    assert_eq!(datas.last().copied(), Some("[DONE]"));
    assert!(datas[datas.len() - 2].contains("\"usage\""), "{datas:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_closes_upstream() {
    let mock = MockUpstream::start().await;
    let router = Router::start(&one_cred(&mock.url())).await;

    let total_events = 61; // 60 chunks + [DONE], 50 ms apart: ~3 s if never cut
    mock.push(Reply::stream(
        openai_stream(60, false, 0),
        Duration::from_millis(50),
    ));
    let start = Instant::now();
    let resp = router
        .post("/v1/chat/completions", &chat_stream_body("gpt-4o"))
        .await;
    assert_eq!(resp.status().as_u16(), 200);
    let sse = read_sse(resp, start, Some(2), Duration::from_secs(5)).await;
    assert!(sse.events.len() >= 2, "raw: {}", sse.raw);
    // `read_sse` dropped the response: the client connection is gone.
    let closed = mock.wait_stream_aborted(Duration::from_millis(2500)).await;
    assert!(
        closed,
        "upstream stream still running after the client left (events sent: {})",
        mock.events_sent()
    );
    assert!(mock.events_sent() < total_events, "all events were sent");
    assert_eq!(mock.streams_completed(), 0);
}

/// The same for an answer the router buffers (not streaming): the client leaving while the
/// upstream is still writing it cancels the upstream request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_cancels_a_buffered_upstream_answer() {
    let mock = MockUpstream::start().await;
    let router = Router::start(&one_cred(&mock.url())).await;
    mock.push(Reply::SlowJson {
        body: default_completion().to_string(),
        interval: Duration::from_secs(3),
    });
    let impatient = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let sent = impatient
        .post(router.url("/v1/chat/completions"))
        .bearer_auth(MASTER_KEY)
        .json(&chat_body("gpt-4o"))
        .send()
        .await;
    assert!(sent.is_err_and(|e| e.is_timeout()), "the client gave up");
    let cancelled = mock.wait_stream_aborted(Duration::from_millis(2000)).await;
    assert!(
        cancelled,
        "the upstream answer was still being read after the client left"
    );
    assert_eq!(mock.streams_completed(), 0);
    assert_eq!(mock.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_retry_after_stream_started() {
    let mock = MockUpstream::start().await;
    let yaml = server_yaml(2, &[])
        + &creds_yaml(&[
            cred("c1", "openai", "sk-c1", &mock.url(), &[]),
            cred("c2", "openai", "sk-c2", &mock.url(), &[]),
        ]);
    let router = Router::start(&yaml).await;

    let events: Vec<String> = openai_stream(5, false, 0).into_iter().take(2).collect();
    mock.push(Reply::StreamCut {
        events,
        interval: Duration::from_millis(50),
    });
    let start = Instant::now();
    let resp = router
        .post("/v1/chat/completions", &chat_stream_body("gpt-4o"))
        .await;
    assert_eq!(resp.status().as_u16(), 200);
    let sse = read_sse(resp, start, None, Duration::from_secs(5)).await;
    assert!(!sse.timed_out, "truncated stream must end: {}", sse.raw);
    assert_eq!(sse.content(), "c0 c1 ", "raw: {}", sse.raw);
    assert!(!sse.has_done());
    // Give a (wrong) late retry a chance to show up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        mock.bearers(),
        vec!["sk-c1"],
        "no second attempt once streaming started"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_stream_error_status_is_retried_before_streaming() {
    // A 500 before any byte reached the client is retried even for stream requests.
    let mock = MockUpstream::start().await;
    let yaml = server_yaml(1, &[])
        + &creds_yaml(&[
            cred("c1", "openai", "sk-c1", &mock.url(), &[]),
            cred("c2", "openai", "sk-c2", &mock.url(), &[]),
        ]);
    let router = Router::start(&yaml).await;

    mock.push(Reply::error(500, "boom"));
    let start = Instant::now();
    let resp = router
        .post("/v1/chat/completions", &chat_stream_body("gpt-4o"))
        .await;
    assert_eq!(resp.status().as_u16(), 200);
    let sse = read_sse(resp, start, None, Duration::from_secs(5)).await;
    assert_eq!(sse.choice_chunks().len(), 3, "raw: {}", sse.raw);
    assert!(sse.has_done());
    assert_eq!(mock.bearers(), vec!["sk-c1", "sk-c2"]);
}

/// A stream whose upstream stops sending without closing is ended after `request_timeout`
/// of silence (at most twice that), the upstream request cancelled and the end logged; one
/// whose chunks come closer together than that runs to its end however long it lasts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_stream_is_ended_after_request_timeout() {
    let mock = MockUpstream::start().await;
    let yaml = server_yaml(0, &["request_timeout: 1s"])
        + &creds_yaml(&[cred("c1", "openai", "sk-c1", &mock.url(), &[])]);
    let router = Router::start(&yaml).await;

    // 5 chunks 600 ms apart: 2.4 s in all, no gap of 1 s.
    mock.push(Reply::stream(
        openai_stream(5, true, 9),
        Duration::from_millis(600),
    ));
    let start = Instant::now();
    let resp = router
        .post("/v1/chat/completions", &chat_stream_body("gpt-4o"))
        .await;
    let sse = read_sse(resp, start, None, Duration::from_secs(10)).await;
    assert!(sse.has_done(), "{sse:?}");
    assert!(start.elapsed() > Duration::from_secs(2));

    // The first chunk, then 6 s of nothing.
    mock.push(Reply::stream(
        openai_stream(2, true, 9),
        Duration::from_secs(6),
    ));
    let start = Instant::now();
    let resp = router
        .post("/v1/chat/completions", &chat_stream_body("gpt-4o"))
        .await;
    assert_eq!(resp.status().as_u16(), 200);
    let sse = read_sse(resp, start, None, Duration::from_secs(10)).await;
    let ended = start.elapsed();
    assert!(!sse.timed_out && !sse.has_done(), "{sse:?}");
    assert!(sse.error.is_some(), "cut short, not ended cleanly: {sse:?}");
    assert_eq!(sse.choice_chunks().len(), 1, "{sse:?}");
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(4)).contains(&ended),
        "ended after {ended:?}; request_timeout is 1 s"
    );
    assert!(
        mock.wait_stream_aborted(Duration::from_secs(5)).await,
        "upstream cancelled"
    );
    let logs = router.logs();
    assert!(logs.contains("end=\"upstream_error\""), "{logs}");
    assert!(logs.contains("sent nothing for 1s"), "{logs}");
}

/// A router with `write_timeout: 1s` in front of a mock whose next answer streams `events`
/// events of `kib` KiB, `interval` apart.
async fn a_stream_behind_a_router(
    events: usize,
    kib: usize,
    interval: Duration,
) -> (MockUpstream, Router) {
    let mock = MockUpstream::start().await;
    let yaml = server_yaml(0, &["write_timeout: 1s"])
        + &creds_yaml(&[cred("c1", "openai", "sk-c1", &mock.url(), &[])]);
    let router = Router::start(&yaml).await;
    let big = json!({"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o",
        "choices": [{"index": 0, "delta": {"content": "x".repeat(kib * 1024)}}]});
    mock.push(Reply::stream(vec![big.to_string(); events], interval));
    (mock, router)
}

/// A client that stops reading while its stream goes on (its socket full, its kernel still
/// answering) is disconnected after `write_timeout`, and its upstream request ends with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_disconnected_after_write_timeout() {
    use tokio::io::AsyncWriteExt;
    // 64 KiB events every 30 ms for 9 s, 19 MB: more than the socket buffers on the way (the
    // router's toward the client grow to 4 MB here, its upstream one and the mock's take
    // more), so the stream is still going when the router gives up on the client.
    let (mock, router) = a_stream_behind_a_router(300, 64, Duration::from_millis(30)).await;

    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let addr = router
        .url("/")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let mut client = socket.connect(addr).await.unwrap();
    let body = chat_stream_body("gpt-4o").to_string();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: router\r\nAuthorization: Bearer {MASTER_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    client.write_all(head.as_bytes()).await.unwrap();
    client.write_all(body.as_bytes()).await.unwrap();
    // …and never read.
    assert!(
        mock.wait_stream_aborted(Duration::from_secs(8)).await,
        "the upstream stream still runs (events sent: {})",
        mock.events_sent()
    );
    assert!(mock.events_sent() < 300, "all events were sent");
    assert_eq!(mock.streams_completed(), 0);
    let logs = router.logs();
    assert!(
        logs.contains("client took no bytes for server.write_timeout"),
        "{logs}"
    );
    assert!(logs.contains("end=\"client_gone\""), "{logs}");
    drop(client);
}

/// HTTP/2 flow control stalls one stream without the socket filling: a client that stops
/// reading one stream (it grants no more window) while its connection lives on. The stream is
/// ended after `write_timeout` without bytes taken, its upstream request with it, and the
/// connection goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_its_client_stops_reading_ends_after_write_timeout() {
    use http_body_util::BodyExt;
    // 4 KiB events every 30 ms for 9 s: the 64 KiB stream window is full after 16.
    let (mock, router) = a_stream_behind_a_router(300, 4, Duration::from_millis(30)).await;

    let mut send = h2c_client(&router).await;
    let stalled = send
        .send_request(h2c_chat(&router, &chat_stream_body("gpt-4o")))
        .await
        .unwrap();
    assert_eq!(stalled.status().as_u16(), 200);
    // …and its body is never read: hyper grants window only as it is.
    assert!(
        mock.wait_stream_aborted(Duration::from_secs(8)).await,
        "the upstream stream still runs (events sent: {})",
        mock.events_sent()
    );
    assert!(mock.events_sent() < 300, "all events were sent");
    let logs = router.logs();
    assert!(
        logs.contains("client took no bytes of an HTTP/2 stream for server.write_timeout"),
        "{logs}"
    );
    assert!(logs.contains("end=\"client_gone\""), "{logs}");

    // The connection itself is fine: another request on it is answered.
    mock.push(Reply::ok());
    let resp = send
        .send_request(h2c_chat(&router, &chat_body("gpt-4o")))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("chat.completion"));

    // Read at last, the stalled stream gives what the router held, then an error (a reset):
    // never a clean end that would pass for the whole answer.
    let read = tokio::time::timeout(Duration::from_secs(5), stalled.into_body().collect()).await;
    let end = read.expect("the stalled stream ends within 5 s once read");
    let err = end.expect_err("the cut stream ended cleanly");
    assert!(format!("{err:?}").contains("Reset"), "{err:?}");
}

/// An h2c (prior knowledge) connection to `router` whose streams get 64 KiB of window, granted
/// again only as their bodies are read.
async fn h2c_client(
    router: &Router,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", router.port))
        .await
        .unwrap();
    let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(65_535)
        .handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// A chat completions request with `body`, for [`h2c_client`].
fn h2c_chat(
    router: &Router,
    body: &serde_json::Value,
) -> hyper::Request<http_body_util::Full<bytes::Bytes>> {
    hyper::Request::post(router.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {MASTER_KEY}"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(body.to_string().into()))
        .unwrap()
}

/// The HTTP/2 limit is on progress too: a client that reads its stream slowly but steadily,
/// for several times `write_timeout` in all, gets all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_http2_reader_that_keeps_reading_is_never_cut_off() {
    use http_body_util::BodyExt;
    // 40 events of 8 KiB at once: 320 KiB, five windows' worth, read over about 4 s.
    let (mock, router) = a_stream_behind_a_router(40, 8, Duration::ZERO).await;

    let mut send = h2c_client(&router).await;
    let resp = send
        .send_request(h2c_chat(&router, &chat_stream_body("gpt-4o")))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let started = Instant::now();
    let mut body = resp.into_body();
    let mut text = Vec::new();
    for _ in 0..10_000 {
        let Some(frame) = body.frame().await else {
            break;
        };
        let frame = frame.unwrap_or_else(|e| panic!("cut off: {e}; {}", router.logs()));
        if let Ok(data) = frame.into_data() {
            text.extend_from_slice(&data);
            // 8 KiB per 100 ms: each chunk is taken well within the limit.
            let pause = Duration::from_micros(100_000 * data.len() as u64 / 8192);
            tokio::time::sleep(pause).await;
        }
    }
    assert!(
        started.elapsed() > Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let text = String::from_utf8_lossy(&text);
    assert_eq!(text.matches("chat.completion.chunk").count(), 40);
    assert_eq!(mock.streams_completed(), 1);
    let logs = router.logs();
    assert!(
        !logs.contains("HTTP/2 stream for server.write_timeout"),
        "{logs}"
    );
    assert!(logs.contains("end=\"complete\""), "{logs}");
}
