//! README promises about what the balancer shows and how it stops: the
//! `/backends` fields, a request counted in flight until its body has been
//! sent, and shutdown by `SIGINT` or `SIGTERM` through the real binary
//! (idle connections closed at once, requests in flight cut at
//! `shutdown_timeout`).

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use support::{config_for, start_proxy, wait_until, Binary, Http, TestBackend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// A raw backend that reads each request head, then holds its answer
/// (`200`, body `held`) until the test releases it.
struct HeldBackend {
    address: String,
    /// Requests whose head has arrived.
    arrived: Arc<AtomicUsize>,
    release: Arc<Semaphore>,
}

impl HeldBackend {
    async fn start() -> HeldBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let arrived = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(Semaphore::new(0));
        let (a, r) = (Arc::clone(&arrived), Arc::clone(&release));
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (arrived, release) = (Arc::clone(&a), Arc::clone(&r));
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            arrived.fetch_add(1, Ordering::SeqCst);
                            release.acquire().await.unwrap().forget();
                            if stream
                                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nheld")
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        HeldBackend {
            address,
            arrived,
            release,
        }
    }

    fn arrived(&self) -> usize {
        self.arrived.load(Ordering::SeqCst)
    }

    /// Lets one held answer go.
    fn release_one(&self) {
        self.release.add_permits(1);
    }
}

/// `GET /backends` from the admin API, parsed.
async fn backends(admin: &Http) -> serde_json::Value {
    let answer = admin.get("/backends").await;
    assert_eq!(answer.status, StatusCode::OK);
    serde_json::from_slice(&answer.body).unwrap()
}

#[tokio::test]
async fn backends_show_a_request_in_flight_and_the_latency_of_the_answer() {
    let backend = HeldBackend::start().await;
    let mut config =
        rust_load_balancer::Config::new("127.0.0.1:0".parse().unwrap(), &[&backend.address]);
    config.admin_address = Some("127.0.0.1:0".parse().unwrap());
    let proxy = start_proxy(config).await;
    let http = Http::new(proxy.local_addr());
    let admin = Http::new(proxy.admin_addr().unwrap());

    let listed = backends(&admin).await;
    assert_eq!(listed[0]["active_connections"], 0, "{listed}");
    assert_eq!(listed[0]["latency_micros"], 0, "no answer yet: {listed}");

    let request = tokio::spawn({
        let http = http.clone();
        async move { http.get("/").await }
    });
    wait_until(
        "the request reached the backend",
        Duration::from_secs(10),
        || backend.arrived() == 1,
    )
    .await;
    let held_from = Instant::now();
    // Held at the backend: in flight, and still without a latency.
    for _ in 0..3 {
        let listed = backends(&admin).await;
        assert_eq!(listed[0]["active_connections"], 1, "{listed}");
        assert_eq!(listed[0]["latency_micros"], 0, "{listed}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let held = held_from.elapsed();
    backend.release_one();
    let answer = request.await.unwrap();
    assert_eq!(answer.text(), "held");

    // The request is counted until its last byte is written, which the
    // client may see first: wait for the count to drop.
    let state = proxy.state();
    wait_until("the request finished", Duration::from_secs(5), || {
        state.pool().backends()[0].in_flight() == 0
    })
    .await;
    let listed = backends(&admin).await;
    assert_eq!(listed[0]["active_connections"], 0, "{listed}");
    assert_eq!(listed[0]["requests_total"], 1, "{listed}");
    // The answer took at least as long as the backend held it (the
    // balancer's clock started before the request arrived and stopped
    // after its release).
    let latency = listed[0]["latency_micros"].as_u64().unwrap();
    assert!(
        latency >= held.as_micros() as u64,
        "latency_micros {latency}, held {held:?}"
    );
}

#[tokio::test]
async fn a_request_is_in_flight_until_its_response_body_has_been_sent() {
    let backend = TestBackend::start("s").await;
    let mut config = config_for(&[&backend]);
    config.admin_address = Some("127.0.0.1:0".parse().unwrap());
    let proxy = start_proxy(config).await;
    let http = Http::new(proxy.local_addr());
    let admin = Http::new(proxy.admin_addr().unwrap());
    let gauge = format!(
        "lb_backend_active_connections{{backend=\"{}\"}} ",
        backend.address()
    );
    let in_flight = |metrics: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&gauge))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or_else(|| panic!("no {gauge}in {metrics}"))
    };

    let request = Request::get(format!("{}/stream", http.base()))
        .body(Full::<Bytes>::default())
        .unwrap();
    let response = http.raw().request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    for i in 1..=3 {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("the next chunk")
            .expect("a frame")
            .expect("no error");
        assert_eq!(frame.into_data().unwrap(), format!("part{i} "));
        if i < 3 {
            // Head and part of the body delivered, the rest held by the
            // gate: still in flight, in /backends and in the gauge.
            let listed = backends(&admin).await;
            assert_eq!(
                listed[0]["active_connections"], 1,
                "after part{i}: {listed}"
            );
            assert_eq!(in_flight(&admin.get("/metrics").await.text()), 1);
            backend.state.gate.notify_one();
        }
    }
    let end = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .unwrap();
    assert!(end.is_none(), "the body ends after three chunks");
    let state = proxy.state();
    wait_until("the request finished", Duration::from_secs(5), || {
        state.pool().backends()[0].in_flight() == 0
    })
    .await;
    assert_eq!(backends(&admin).await[0]["active_connections"], 0);
    assert_eq!(in_flight(&admin.get("/metrics").await.text()), 0);
}

/// Writes `json` as `lb.json` in `dir`; returns its path.
fn config_file(dir: &tempfile::TempDir, json: &str) -> std::path::PathBuf {
    let path = dir.path().join("lb.json");
    std::fs::write(&path, json).unwrap();
    path
}

/// Whether `addr` still accepts connections.
fn accepts(addr: SocketAddr) -> bool {
    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

#[tokio::test]
async fn sigint_shuts_down_gracefully_like_sigterm() {
    let backend = HeldBackend::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = config_file(
        &dir,
        &format!(
            r#"{{ "listen_address": "127.0.0.1:0", "backend_servers": ["{}"], "shutdown_timeout": 30 }}"#,
            backend.address
        ),
    );
    let mut binary = Binary::spawn(&path, &[]).await;
    let addr = binary.addr().unwrap();
    let http = Http::new(addr);

    let in_flight = tokio::spawn({
        let http = http.clone();
        async move { http.get("/").await }
    });
    wait_until(
        "the request reached the backend",
        Duration::from_secs(10),
        || backend.arrived() == 1,
    )
    .await;
    binary.signal("INT");
    // SIGINT's default action would kill the process at once; handled, it
    // closes the listener and waits for the request in flight.
    wait_until("the listener closed", Duration::from_secs(10), || {
        !accepts(addr)
    })
    .await;
    assert!(
        binary.child.try_wait().unwrap().is_none(),
        "exited with a request in flight: {}",
        binary.log()
    );
    backend.release_one();
    let answer = in_flight.await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.text(), "held");
    assert_eq!(
        answer
            .headers
            .get("connection")
            .map(|v| v.to_str().unwrap()),
        Some("close")
    );
    let status = binary.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{status:?}: {}", binary.log());
    assert!(binary.log().contains("stopped"), "{}", binary.log());
}

/// Reads one whole `Content-Length` response from `stream`.
async fn read_one(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .expect("a Content-Length");
            if buf.len() >= end + 4 + length {
                return String::from_utf8_lossy(&buf).into_owned();
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .expect("an answer")
            .unwrap();
        assert!(n > 0, "closed before a whole answer");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads from `stream` until it closes (end or reset) or `limit` passes;
/// returns what came, or `None` if it stayed open.
async fn until_closed(stream: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
            Err(_) => return None,
        }
    }
}

#[tokio::test]
async fn on_sigterm_idle_keep_alive_connections_close_at_once_while_a_request_in_flight_finishes() {
    let backend = TestBackend::start("b").await;
    let dir = tempfile::tempdir().unwrap();
    let path = config_file(
        &dir,
        &format!(
            r#"{{ "listen_address": "127.0.0.1:0", "backend_servers": ["{}"], "shutdown_timeout": 30 }}"#,
            backend.address()
        ),
    );
    let mut binary = Binary::spawn(&path, &[]).await;
    let addr = binary.addr().unwrap();

    // Two kept-alive connections, served once each, now idle.
    let mut idle = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let answer = read_one(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer:?}");
        assert!(!answer.to_ascii_lowercase().contains("connection: close"));
        idle.push(stream);
    }
    // A request in flight: its head and first chunk are out, the rest
    // waits for the gate.
    let http = Http::new(addr);
    let request = Request::get(format!("{}/stream", http.base()))
        .body(Full::<Bytes>::default())
        .unwrap();
    let response = http.raw().request(request).await.unwrap();
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "part1 ");

    binary.signal("TERM");
    // The idle connections are closed without a word, long before the
    // 30 s shutdown timeout, while the request in flight is still open and
    // the process still running.
    for stream in &mut idle {
        let got = until_closed(stream, Duration::from_secs(10))
            .await
            .expect("an idle connection stayed open after SIGTERM");
        assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    }
    assert!(
        binary.child.try_wait().unwrap().is_none(),
        "exited with a request in flight: {}",
        binary.log()
    );
    // The request in flight finishes whole.
    for i in 2..=3 {
        backend.state.gate.notify_one();
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("the next chunk")
            .expect("a frame")
            .expect("no error");
        assert_eq!(frame.into_data().unwrap(), format!("part{i} "));
    }
    let end = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("the body ends");
    assert!(end.is_none());
    let status = binary.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{status:?}: {}", binary.log());
}

#[tokio::test]
async fn a_request_still_in_flight_at_shutdown_timeout_is_cut_and_the_process_exits_zero() {
    let backend = TestBackend::start("b").await;
    let dir = tempfile::tempdir().unwrap();
    let shutdown_timeout = Duration::from_secs(1);
    let path = config_file(
        &dir,
        &format!(
            r#"{{ "listen_address": "127.0.0.1:0", "backend_servers": ["{}"], "shutdown_timeout": 1 }}"#,
            backend.address()
        ),
    );
    let mut binary = Binary::spawn(&path, &[]).await;
    let addr = binary.addr().unwrap();
    // A response whose body never ends: the gate is never opened.
    let http = Http::new(addr);
    let request = Request::get(format!("{}/stream", http.base()))
        .body(Full::<Bytes>::default())
        .unwrap();
    let response = http.raw().request(request).await.unwrap();
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "part1 ");

    // Read the rest as it comes, noting when it ends.
    let reader = tokio::spawn(async move {
        let rest = body.collect().await;
        (rest.map(|c| c.to_bytes()), Instant::now())
    });

    let signalled = Instant::now();
    binary.signal("TERM");
    wait_until("the listener closed", Duration::from_secs(10), || {
        !accepts(addr)
    })
    .await;
    let status = binary.wait_exit(Duration::from_secs(20)).await;
    let exited = Instant::now();
    assert_eq!(status.code(), Some(0), "{status:?}: {}", binary.log());
    assert!(
        exited - signalled >= shutdown_timeout,
        "exited {:?} after SIGTERM, before shutdown_timeout",
        exited - signalled
    );
    assert!(
        binary.log().contains("shutdown timeout"),
        "{}",
        binary.log()
    );
    // The body was cut, with an error, never the rest of it; and not
    // before shutdown_timeout had passed.
    let (rest, ended) = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("the body ends once the process is gone")
        .unwrap();
    assert!(rest.is_err(), "the cut body ended cleanly: {rest:?}");
    assert!(
        ended - signalled >= shutdown_timeout,
        "cut {:?} after SIGTERM, before shutdown_timeout",
        ended - signalled
    );
}
