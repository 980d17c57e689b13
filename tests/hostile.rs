//! Hostile clients over raw TCP: malformed requests, oversized heads, slow
//! senders, too many connections, slow backends. Each gets the right status
//! (or is cut off), never reaches a backend it should not, and the balancer
//! keeps serving everyone else.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use support::{config_for, read_to_close, start_proxy, wait_until, Http, TestBackend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
    let header_timeout = Duration::from_millis(200);
    let keepalive_timeout = Duration::from_millis(2000);
    config.clients.header_timeout = header_timeout;
    config.clients.keepalive_timeout = keepalive_timeout;
    let proxy = start_proxy(config).await;
    let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut buf = [0u8; 4096];

    // A: served once, then idle on its keep-alive timer.
    let mut idle = TcpStream::connect(proxy.local_addr()).await.unwrap();
    idle.write_all(request).await.unwrap();
    let n = idle.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));

    // B, opened after A went idle: a started head, never finished. It is
    // cut by the head timeout (no answer), while A, idle since before B's
    // timer started, is still open: an idle connection is not held to the
    // head timeout.
    let before_connect = Instant::now();
    let mut slow = TcpStream::connect(proxy.local_addr()).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let (answer, closed) = read_to_close(&mut slow, Duration::from_secs(10)).await;
    assert!(closed && answer.is_empty(), "{answer:?}");
    assert!(
        before_connect.elapsed() >= header_timeout,
        "cut before the head timeout"
    );
    // A has been idle longer than the head timeout and still serves.
    let sent_second = Instant::now();
    idle.write_all(request).await.unwrap();
    let n = idle.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "the idle connection was closed: {:?}",
        String::from_utf8_lossy(&buf[..n])
    );

    // Idle past the keep-alive timeout: closed by the balancer, with
    // nothing sent. Its timer starts after the second answer was written,
    // so after the request was, and `sent_second` was read before that.
    let (rest, closed) = read_to_close(&mut idle, Duration::from_secs(10)).await;
    assert!(closed && rest.is_empty(), "{rest:?}");
    let waited = sent_second.elapsed();
    assert!(waited >= keepalive_timeout, "closed after {waited:?}");
    assert_eq!(backend.hits(), 2);
}

/// How one slow client fared.
#[derive(Debug)]
struct Dripped {
    /// Bytes of its head it got to write before the balancer closed.
    written: usize,
    /// What the balancer sent it.
    answer: Vec<u8>,
    /// Whether the balancer closed the connection (end of stream or reset).
    closed: bool,
    /// From before its connect until the close.
    held: Duration,
}

/// Writes `head` to `addr` one byte per `gap`, watching for the balancer to
/// close the connection; after the last byte, waits up to 5 s for an answer.
async fn drip(addr: SocketAddr, head: &'static [u8], gap: Duration) -> Dripped {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut answer = Vec::new();
    let mut probe = [0u8; 512];
    let mut written = 0;
    let mut closed = false;
    'drip: for byte in head {
        if stream.write_all(&[*byte]).await.is_err() {
            closed = true;
            break;
        }
        written += 1;
        let until = Instant::now() + gap;
        // Read whatever comes during the gap.
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match tokio::time::timeout(left, stream.read(&mut probe)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    closed = true;
                    break 'drip;
                }
                Ok(Ok(n)) => answer.extend_from_slice(&probe[..n]),
                Err(_) => break,
            }
        }
    }
    if !closed {
        let (rest, was_closed) = read_to_close(&mut stream, Duration::from_secs(5)).await;
        answer.extend_from_slice(rest.as_bytes());
        closed = was_closed;
    }
    Dripped {
        written,
        answer,
        closed,
        held: started.elapsed(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_cut_off_while_others_are_served() {
    let backend = TestBackend::start("b").await;
    let mut config = config_for(&[&backend]);
    let header_timeout = Duration::from_secs(1);
    config.clients.header_timeout = header_timeout;
    let proxy = start_proxy(config).await;
    let addr = proxy.local_addr();

    // Many clients sending a complete head, one byte every 100 ms: 4 s for
    // the whole head, four times the head timeout. Left alone, each would
    // finish its head and reach the backend.
    const HEAD: &[u8] = b"GET /slow HTTP/1.1\r\nHost: slow\r\nX-Drip: aaaaaa\r\n\r\n";
    assert!(HEAD.len() >= 40);
    let mut slow = Vec::new();
    for _ in 0..50 {
        slow.push(tokio::spawn(drip(addr, HEAD, Duration::from_millis(100))));
    }
    // A normal client is served throughout.
    let http = Http::new(addr);
    for _ in 0..10 {
        let answer = http.get("/").await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.text(), "b");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for task in slow {
        let dripped = task.await.unwrap();
        // Closed without a word (no 408, no 400), before its head was
        // complete, and not before the head timeout.
        assert!(dripped.closed, "a slow client was never cut: {dripped:?}");
        assert!(
            dripped.answer.is_empty(),
            "a slow client got an answer: {dripped:?}"
        );
        assert!(
            dripped.written < HEAD.len(),
            "a slow client finished its head: {dripped:?}"
        );
        assert!(
            dripped.held >= header_timeout,
            "cut before the head timeout: {dripped:?}"
        );
    }
    // Had any slow head got through, the backend would count it.
    assert_eq!(backend.hits(), 10, "a slow request reached the backend");
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

/// The status code of the first answer in `raw`, and how many answers
/// (`HTTP/1.1 ` status lines) it holds.
fn statuses(raw: &str) -> (u16, usize) {
    let code = |line: &str| {
        line.strip_prefix("HTTP/1.1 ")
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse::<u16>().ok())
    };
    let answers = raw.lines().filter_map(code).count();
    (code(raw).unwrap_or(0), answers)
}

#[tokio::test]
async fn refused_heads_get_400_501_or_417_on_the_wire_and_nothing_reaches_a_backend() {
    let backend = TestBackend::start("b").await;
    let proxy = start_proxy(config_for(&[&backend])).await;
    let addr = proxy.local_addr();
    // Each bad request is followed, in the same write, by a valid one: had
    // the balancer kept the connection, the second would be answered (and
    // reach the backend).
    let follow = "GET /record HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nnext";
    let cases: [(&str, &str, u16); 10] = [
        (
            "request line without a version",
            "GET /\r\nHost: x\r\n\r\n",
            400,
        ),
        (
            "request line with spaces in the target",
            "GET /a b HTTP/1.1\r\nHost: x\r\n\r\n",
            400,
        ),
        ("HTTP/1.1 without Host", "GET / HTTP/1.1\r\n\r\n", 400),
        (
            "two Host fields",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            400,
        ),
        (
            "Transfer-Encoding in HTTP/1.0",
            "POST /record HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (
            "chunked not the final coding",
            "POST /record HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
            400,
        ),
        (
            "CONNECT",
            "CONNECT backend.example:443 HTTP/1.1\r\nHost: backend.example:443\r\n\r\n",
            501,
        ),
        (
            "a transfer coding before chunked",
            "POST /record HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            501,
        ),
        (
            "an Expect other than 100-continue",
            "POST /record HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: something-else\r\n\r\nabc",
            417,
        ),
        (
            "an Expect other than 100-continue, without a body",
            "GET / HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\n\r\n",
            417,
        ),
    ];
    for (what, raw, expected) in cases {
        let (answer, closed) = exchange(addr, format!("{raw}{follow}").as_bytes()).await;
        let (status, answers) = statuses(&answer);
        assert_eq!(status, expected, "{what}: {answer:?}");
        assert_eq!(answers, 1, "{what}: one answer only: {answer:?}");
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("\r\nconnection: close\r\n"),
            "{what}: the answer says it closes: {answer:?}"
        );
        assert!(closed, "{what}: connection left open");
    }
    assert_eq!(backend.hits(), 0, "a refused request reached the backend");
    assert!(backend.state.recorded.lock().unwrap().is_empty());
    // The balancer serves on.
    assert_eq!(Http::new(addr).get("/").await.status, StatusCode::OK);
    assert_eq!(backend.hits(), 1);
}

/// A raw backend that answers every request `200` with the number of
/// header fields it received as the body; counts the requests.
async fn field_counting_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&requests);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 16384];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end + 4);
                        counter.fetch_add(1, Ordering::SeqCst);
                        let fields = head.lines().count() - 1;
                        let body = fields.to_string();
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if stream.write_all(answer.as_bytes()).await.is_err() {
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
    (addr, requests)
}

#[tokio::test]
async fn more_than_100_header_fields_get_431_and_100_are_forwarded() {
    let (backend, requests) = field_counting_backend().await;
    let config =
        rust_load_balancer::Config::new("127.0.0.1:0".parse().unwrap(), &[&backend.to_string()]);
    let proxy = start_proxy(config).await;
    // `fields` header fields in all, Host included; a few bytes each, far
    // under the size limit.
    let head = |fields: usize| {
        let mut head = String::from("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
        for i in 2..fields {
            head.push_str(&format!("X-F{i}: v\r\n"));
        }
        head.push_str("\r\n");
        head
    };

    let (answer, closed) = exchange(proxy.local_addr(), head(101).as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer:?}");
    assert!(closed);
    assert_eq!(requests.load(Ordering::SeqCst), 0, "it reached the backend");

    // Exactly 100 are fine: the backend gets them without `Connection`,
    // with the three X-Forwarded-* fields.
    let (answer, _) = exchange(proxy.local_addr(), head(100).as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer:?}");
    assert!(answer.ends_with("\r\n\r\n102"), "{answer:?}");
    assert_eq!(requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_client_pausing_inside_its_body_past_request_timeout_gets_504_and_a_close() {
    let backend = TestBackend::start("b").await;
    let mut config = config_for(&[&backend]);
    let request_timeout = Duration::from_millis(500);
    config.clients.request_timeout = request_timeout;
    let proxy = start_proxy(config).await;
    let addr = proxy.local_addr();
    // Several clients at once, each keep-alive (HTTP/1.1, no Connection
    // field), announcing 10 bytes of body and sending 3.
    let clients: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(async move {
                let mut stream = TcpStream::connect(addr).await.unwrap();
                let started = Instant::now();
                stream
                    .write_all(b"POST /record HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
                    .await
                    .unwrap();
                let (answer, closed) = read_to_close(&mut stream, Duration::from_secs(10)).await;
                (answer, closed, started.elapsed())
            })
        })
        .collect();
    for client in clients {
        let (answer, closed, took) = client.await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 504 "), "{answer:?}");
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("\r\nconnection: close\r\n"),
            "{answer:?}"
        );
        assert_eq!(statuses(&answer).1, 1, "{answer:?}");
        assert!(closed, "the connection stays open with a body half read");
        assert!(
            took >= request_timeout,
            "answered before the pause reached request_timeout"
        );
    }
    // The backend never got a whole body.
    wait_until(
        "the backend saw the requests",
        Duration::from_secs(5),
        || backend.hits() == 4,
    )
    .await;
    let recorded = backend.state.recorded.lock().unwrap().clone();
    assert!(recorded.iter().all(|body| body.len() < 10), "{recorded:?}");
}

#[tokio::test]
async fn an_upload_that_never_pauses_for_request_timeout_is_not_cut_however_long_it_takes() {
    // README: request_timeout is the time a backend has to start answering
    // a sent request, and the longest pause allowed in a body. An upload
    // whose pauses are each a fifth of it, but which takes three times as
    // long in all, is neither.
    let backend = TestBackend::start("b").await;
    let mut config = config_for(&[&backend]);
    let request_timeout = Duration::from_millis(1000);
    config.clients.request_timeout = request_timeout;
    let proxy = start_proxy(config).await;
    let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
    let pieces = 15;
    let started = Instant::now();
    stream
        .write_all(
            format!("POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {pieces}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    for _ in 0..pieces {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if stream.write_all(b"x").await.is_err() {
            break;
        }
    }
    let sending_took = started.elapsed();
    let (answer, _) = read_to_close(&mut stream, Duration::from_secs(10)).await;
    assert!(
        answer.starts_with("HTTP/1.1 200 "),
        "a steady upload was cut after {sending_took:?}: {answer:?}"
    );
    assert!(sending_took >= 2 * request_timeout);
    assert!(answer.ends_with(&"x".repeat(pieces)), "{answer:?}");
}
