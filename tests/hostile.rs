//! Hostile clients over raw TCP: malformed requests, oversized heads, slow
//! senders, too many connections, slow backends. Each gets the right status
//! (or is cut off), never reaches a backend it should not, and the balancer
//! keeps serving everyone else.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::StatusCode;
use support::{config_for, start_proxy, Http, TestBackend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the peer closes (or `limit` passes); returns what came.
async fn read_to_close(stream: &mut TcpStream, limit: Duration) -> (String, bool) {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return (String::from_utf8_lossy(&received).into_owned(), true)
            }
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&received).into_owned(), false),
        }
    }
}

/// Sends `raw` on a fresh connection and returns the answer and whether the
/// balancer closed the connection.
async fn exchange(addr: SocketAddr, raw: &[u8]) -> (String, bool) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(raw).await.unwrap();
    read_to_close(&mut stream, Duration::from_secs(5)).await
}

#[tokio::test]
async fn malformed_requests_get_400_and_a_closed_connection() {
    let backend = TestBackend::start("b").await;
    let proxy = start_proxy(config_for(&[&backend])).await;
    let addr = proxy.local_addr();
    let cases: [(&str, &[u8]); 4] = [
        (
            "conflicting Content-Length",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde",
        ),
        (
            "invalid header bytes",
            b"GET / HTTP/1.1\r\nHost: x\r\nBad\x01Name: v\r\n\r\n",
        ),
        (
            "malformed request line",
            b"GET/HTTP/1.1 nonsense\r\nHost: x\r\n\r\n",
        ),
        ("header without colon", b"GET / HTTP/1.1\r\nHost x\r\n\r\n"),
    ];
    for (what, raw) in cases {
        let (answer, closed) = exchange(addr, raw).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{what}: {answer:?}");
        assert!(closed, "{what}: connection left open");
    }
    assert_eq!(backend.hits(), 0, "nothing malformed reached the backend");
    assert_eq!(Http::new(addr).get("/").await.status, StatusCode::OK);
}

#[tokio::test]
async fn an_oversized_head_gets_431() {
    let backend = TestBackend::start("b").await;
    let mut config = config_for(&[&backend]);
    config.clients.max_header_bytes = 16 << 10;
    let proxy = start_proxy(config).await;
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(40 << 10)
    );
    let (answer, closed) = exchange(proxy.local_addr(), big.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    assert!(closed);
    assert_eq!(backend.hits(), 0);
    // A head under the limit is fine.
    let ok = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(8 << 10)
    );
    let (answer, _) = exchange(proxy.local_addr(), ok.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
}

#[tokio::test]
async fn expect_100_continue_works() {
    let backend = TestBackend::start("b").await;
    let proxy = start_proxy(config_for(&[&backend])).await;
    let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
    stream
        .write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("an interim answer before the body is sent")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 100 Continue"));
    stream.write_all(b"hello").await.unwrap();
    let (answer, _) = read_to_close(&mut stream, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(answer.ends_with("hello"), "{answer:?}");
}

#[tokio::test]
async fn idle_keep_alive_connections_close_after_the_keepalive_timeout_not_the_header_timeout() {
    let backend = TestBackend::start("b").await;
    let mut config = config_for(&[&backend]);
    config.clients.header_timeout = Duration::from_millis(300);
    config.clients.keepalive_timeout = Duration::from_millis(1500);
    let proxy = start_proxy(config).await;
    let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
    let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut buf = [0u8; 4096];
    stream.write_all(request).await.unwrap();
    let n = stream.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // Idle longer than the head timeout, well within the keep-alive one:
    // the connection still serves.
    tokio::time::sleep(Duration::from_millis(800)).await;
    stream.write_all(request).await.unwrap();
    let n = stream.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "kept alive");
    // Idle past the keep-alive timeout: closed by the balancer.
    let started = Instant::now();
    let (rest, closed) = read_to_close(&mut stream, Duration::from_secs(5)).await;
    assert!(closed && rest.is_empty(), "{rest:?}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1400),
        "closed after {waited:?}"
    );
    // A started head must still be completed within the head timeout.
    let mut slow = TcpStream::connect(proxy.local_addr()).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let (answer, closed) = read_to_close(&mut slow, Duration::from_secs(5)).await;
    assert!(closed && answer.is_empty(), "{answer:?}");
    assert!(started.elapsed() < Duration::from_millis(1400));
    assert_eq!(backend.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_cut_off_while_others_are_served() {
    let backend = TestBackend::start("b").await;
    let mut config = config_for(&[&backend]);
    config.clients.header_timeout = Duration::from_secs(2);
    let proxy = start_proxy(config).await;
    let addr = proxy.local_addr();

    // Many clients sending their head one byte a second.
    let mut slow = Vec::new();
    for _ in 0..50 {
        slow.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let started = Instant::now();
            for byte in b"GET / HTTP/1.1\r\nHost: slow\r\nX-Drip: aaaaaaaaaaaaaaaaaaaaaaa\r\n" {
                if stream.write_all(&[*byte]).await.is_err() {
                    break;
                }
                let mut probe = [0u8; 512];
                match tokio::time::timeout(Duration::from_secs(1), stream.read(&mut probe)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    // hyper answers 408 before closing.
                    Ok(Ok(_)) => break,
                    Err(_) => {}
                }
            }
            started.elapsed()
        }));
    }
    // A normal client is served throughout.
    let http = Http::new(addr);
    for _ in 0..10 {
        assert_eq!(http.get("/").await.status, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for task in slow {
        let held = task.await.unwrap();
        assert!(
            held < Duration::from_secs(5),
            "a slow client was held {held:?}"
        );
    }
    assert_eq!(backend.hits(), 10, "no slow request reached the backend");
}

#[tokio::test]
async fn past_max_connections_new_ones_are_closed_and_old_ones_work() {
    let backend = TestBackend::start("b").await;
    let mut config = config_for(&[&backend]);
    config.clients.max_connections = 5;
    let proxy = start_proxy(config).await;
    let addr = proxy.local_addr();
    let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

    let mut open = Vec::new();
    for _ in 0..5 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut buf = [0u8; 1024];
        let n = stream.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        open.push(stream);
    }
    // The sixth is closed without an answer.
    let (answer, closed) = exchange(addr, request).await;
    assert!(closed && answer.is_empty(), "{answer:?}");
    // The five keep working.
    for stream in &mut open {
        stream.write_all(request).await.unwrap();
        let mut buf = [0u8; 1024];
        let n = stream.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    }
    // Once one leaves, a new client gets in.
    drop(open.pop());
    let mut served = false;
    for _ in 0..50 {
        let (answer, _) = exchange(
            addr,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        if answer.starts_with("HTTP/1.1 200") {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served);
}

#[tokio::test]
async fn a_backend_that_does_not_answer_in_time_gives_504() {
    let backend = TestBackend::start("slow").await;
    backend.state.delay_ms.store(3000, Ordering::SeqCst);
    let mut config = config_for(&[&backend]);
    config.clients.request_timeout = Duration::from_millis(300);
    let proxy = start_proxy(config).await;
    let started = Instant::now();
    let answer = Http::new(proxy.local_addr()).get("/").await;
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "it waited for the backend"
    );
    assert_eq!(backend.hits(), 1, "a timed-out request is not retried");
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_refused_before_any_backend_sees_it() {
    let backend = TestBackend::start("b").await;
    let proxy = start_proxy(config_for(&[&backend])).await;
    // Classic smuggling shapes: by Content-Length the body holds a second
    // request, by chunked encoding it ends at "0" (CL.TE), or the other way
    // round (TE.CL). Either header order. A message with both is answered
    // 400 and the connection closed (RFC 9112 §6.1 allows a server to
    // refuse it; a proxy should): nothing reaches the backend.
    let cases: [&[u8]; 3] = [
        b"POST /record HTTP/1.1\r\nHost: x\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /record HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n2c\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n\r\n0\r\n\r\n",
        b"POST /record HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nTransfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n",
    ];
    for raw in cases {
        let (answer, closed) = exchange(proxy.local_addr(), raw).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
        assert!(closed, "the connection must not be reused: {answer:?}");
        assert_eq!(
            answer.matches("HTTP/1.1 ").count(),
            1,
            "one answer only: {answer:?}"
        );
    }
    assert_eq!(backend.hits(), 0, "nothing of them reached the backend");
    assert_eq!(
        Http::new(proxy.local_addr()).get("/").await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_module_importing_wasi_gets_no_environment_files_network_or_clock() {
    // snoop.wasm is built for wasm32-wasip2, so it imports WASI. On every
    // call it tries to read an env var, /etc/passwd and /, to connect a
    // socket and to read the clock; had anything worked it would answer
    // position 0 every time. The host grants no import: each attempt traps,
    // the request is served by round robin, and the module never learns a
    // thing.
    let backends = [
        TestBackend::start("b0").await,
        TestBackend::start("b1").await,
    ];
    let mut config = config_for(&backends.iter().collect::<Vec<_>>());
    config.strategy = rust_load_balancer::config::StrategySource::Path(support::dist("snoop.wasm"));
    let proxy = start_proxy(config).await;
    let http = Http::new(proxy.local_addr());
    for _ in 0..20 {
        assert_eq!(http.get("/").await.status, StatusCode::OK);
    }
    assert!(
        backends[1].hits() >= 9,
        "requests went where a snooping module sends them"
    );
    let state = proxy.state();
    let traps = state
        .balancer()
        .faults(rust_load_balancer::balancer::FaultKind::Trap);
    assert!(traps >= 1, "the WASI calls must trap");
}
