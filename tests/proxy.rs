//! The request path end to end: real backends on loopback, the real
//! balancer, the real round-robin module.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use support::{config_for, start_proxy, wait_until, Http, TestBackend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn round_robin_is_exact_over_three_backends() {
    let backends = [
        TestBackend::start("a").await,
        TestBackend::start("b").await,
        TestBackend::start("c").await,
    ];
    let proxy = start_proxy(config_for(&backends.iter().collect::<Vec<_>>())).await;
    let http = Http::new(proxy.local_addr());

    let mut answers: HashMap<String, usize> = HashMap::new();
    for _ in 0..300 {
        let answer = http.get("/").await;
        assert_eq!(answer.status, StatusCode::OK);
        *answers.entry(answer.text()).or_default() += 1;
    }
    for backend in &backends {
        assert_eq!(backend.hits(), 100, "backend {}", backend.name);
        assert_eq!(answers[&backend.name], 100);
    }
    // The strategy answered every time: no fault, no fallback.
    assert_eq!(
        rust_load_balancer::balancer::FaultKind::ALL
            .iter()
            .map(|k| proxy.state().balancer().faults(*k))
            .sum::<u64>(),
        0
    );
}

#[tokio::test]
async fn one_mebibyte_post_round_trips_intact() {
    let backend = TestBackend::start("echo").await;
    let proxy = start_proxy(config_for(&[&backend])).await;
    let http = Http::new(proxy.local_addr());

    let body: Vec<u8> = (0..(1 << 20)).map(|i: u32| (i * 31 % 251) as u8).collect();
    let answer = http.post("/echo", body.clone()).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body.len(), body.len());
    assert!(answer.body == body, "the echoed body differs");
}

#[tokio::test]
async fn streamed_response_is_forwarded_as_it_arrives() {
    let backend = TestBackend::start("stream").await;
    let proxy = start_proxy(config_for(&[&backend])).await;
    let http = Http::new(proxy.local_addr());

    let request = Request::get(format!("{}/stream", http.base()))
        .body(Full::<Bytes>::default())
        .unwrap();
    let response = http.raw().request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    // The backend sends each next chunk only after we have read the previous
    // one through the balancer: a balancer that buffered would hang here.
    for i in 1..=3 {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .unwrap_or_else(|_| panic!("chunk {i} was not forwarded before the body ended"))
            .expect("a frame")
            .expect("no error");
        assert_eq!(frame.into_data().unwrap(), format!("part{i} "));
        backend.state.gate.notify_one();
    }
    let end = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .unwrap();
    assert!(end.is_none(), "the body ends after three chunks");
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let backend = TestBackend::start("pooled").await;
    let proxy = start_proxy(config_for(&[&backend])).await;
    let http = Http::new(proxy.local_addr());
    for _ in 0..100 {
        assert_eq!(http.get("/").await.status, StatusCode::OK);
    }
    assert_eq!(backend.hits(), 100);
    // Sequential requests reuse one pooled connection; allow a few for the
    // health checker's connects.
    assert!(
        backend.accepts() <= 5,
        "100 requests opened {} upstream connections",
        backend.accepts()
    );
}

/// A port on which nothing listens: bind an ephemeral port, then close it.
async fn refused_address() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    drop(listener);
    address
}

#[tokio::test]
async fn refused_connection_gives_502_promptly_and_service_continues() {
    let dead = refused_address().await;
    let config = rust_load_balancer::Config::new("127.0.0.1:0".parse().unwrap(), &[&dead]);
    let proxy = start_proxy(config).await;
    let http = Http::new(proxy.local_addr());

    let started = Instant::now();
    let answer = http.get("/").await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert!(
        answer.text().starts_with("502 Bad Gateway"),
        "{}",
        answer.text()
    );
    assert!(
        started.elapsed() < proxy.state().config().connect_timeout,
        "a refused connect must not wait for the connect timeout"
    );

    // The balancer itself is fine: a healthy backend next to the dead one
    // serves every request, the dead one's share retried onto it.
    let alive = TestBackend::start("alive").await;
    let config =
        rust_load_balancer::Config::new("127.0.0.1:0".parse().unwrap(), &[&dead, &alive.address()]);
    let proxy = start_proxy(config).await;
    let http = Http::new(proxy.local_addr());
    for _ in 0..10 {
        let answer = http.get("/").await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.text(), "alive");
    }
}

#[tokio::test]
async fn forwarding_headers_are_set_and_hop_by_hop_headers_removed() {
    let backend = TestBackend::start("h").await;
    let proxy = start_proxy(config_for(&[&backend])).await;
    let http = Http::new(proxy.local_addr());
    let request = Request::get(format!("{}/path?q=1", http.base()))
        .header("host", "shop.example:8080")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-forwarded-proto", "https")
        .header("connection", "x-private")
        .header("x-private", "secret")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("x-app", "kept")
        .body(Full::<Bytes>::default())
        .unwrap();
    let answer = http.send(request).await;
    assert_eq!(answer.status, StatusCode::OK);

    let seen: HashMap<String, String> = backend
        .state
        .last_headers
        .lock()
        .unwrap()
        .iter()
        .cloned()
        .collect();
    assert_eq!(seen["host"], "shop.example:8080");
    assert_eq!(seen["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "shop.example:8080");
    assert_eq!(seen["x-app"], "kept");
    assert!(!seen.contains_key("x-private"), "{seen:?}");
    assert!(!seen.contains_key("proxy-authorization"), "{seen:?}");
}

#[tokio::test]
async fn a_second_balancer_on_the_same_port_fails_to_start() {
    let backend = TestBackend::start("a").await;
    let first = start_proxy(config_for(&[&backend])).await;
    let mut config = config_for(&[&backend]);
    config.listen_address = first.local_addr();
    let error = rust_load_balancer::Proxy::start(config)
        .await
        .expect_err("the port is taken");
    assert!(
        error.to_string().contains("in use"),
        "names the problem: {error}"
    );
    // The first one keeps all the traffic.
    let http = Http::new(first.local_addr());
    for _ in 0..4 {
        assert_eq!(http.get("/").await.status, StatusCode::OK);
    }
    assert_eq!(backend.hits(), 4);
}

#[tokio::test]
async fn one_worker_thread_serves_too() {
    let backends = [TestBackend::start("a").await, TestBackend::start("b").await];
    let mut config = config_for(&backends.iter().collect::<Vec<_>>());
    config.tuning.worker_threads = 1;
    let proxy = start_proxy(config).await;
    let http = Http::new(proxy.local_addr());
    for _ in 0..10 {
        assert_eq!(http.get("/").await.status, StatusCode::OK);
    }
    assert_eq!((backends[0].hits(), backends[1].hits()), (5, 5));
}

#[tokio::test]
async fn proxy_connection_trailer_and_the_other_hop_by_hop_request_fields_stay_on_their_hop() {
    let backend = TestBackend::start("h").await;
    let proxy = start_proxy(config_for(&[&backend])).await;
    // Raw bytes, so that no client library adds or drops a field.
    let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
    stream
        .write_all(
            b"POST /record HTTP/1.1\r\nHost: x\r\nProxy-Connection: keep-alive\r\n\
              Trailer: X-Checksum\r\nTE: trailers\r\nKeep-Alive: timeout=5\r\n\
              Upgrade: websocket\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\n\
              X-Before: 1\r\nTransfer-Encoding: chunked\r\nX-After: 2\r\nConnection: close\r\n\r\n\
              4\r\nbody\r\n0\r\nX-Checksum: abc\r\n\r\n",
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("answered and closed")
        .unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200 "), "{answer:?}");

    let seen: HashMap<String, String> = backend
        .state
        .last_headers
        .lock()
        .unwrap()
        .iter()
        .cloned()
        .collect();
    for hop in [
        "proxy-connection",
        "trailer",
        "te",
        "keep-alive",
        "upgrade",
        "proxy-authorization",
        "connection",
        "x-checksum",
    ] {
        assert!(
            !seen.contains_key(hop),
            "{hop} reached the backend: {seen:?}"
        );
    }
    // The end-to-end fields around them are kept, and the body arrives
    // whole in this hop's own framing.
    assert_eq!(seen["x-before"], "1");
    assert_eq!(seen["x-after"], "2");
    assert_eq!(seen["transfer-encoding"], "chunked");
    assert_eq!(
        backend.state.recorded.lock().unwrap()[..],
        [Bytes::from("body")]
    );
}

/// A listening socket whose accept queue is full (backlog 0, one connection
/// queued and never accepted): the kernel drops further SYNs, so a connect
/// to it neither succeeds nor is refused: it hangs, as to a black-holed
/// address.
struct Unreachable {
    address: String,
    _listener: tokio::net::TcpListener,
    _queued: Vec<TcpStream>,
}

impl Unreachable {
    async fn start() -> Unreachable {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut queued = Vec::new();
        // Connect until one hangs: the queue is full.
        for _ in 0..8 {
            match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => queued.push(stream),
                Ok(Err(error)) => panic!("a connect to the full queue failed: {error}"),
                Err(_) => {
                    return Unreachable {
                        address: addr.to_string(),
                        _listener: listener,
                        _queued: queued,
                    }
                }
            }
        }
        panic!("the accept queue never filled");
    }
}

#[tokio::test]
async fn a_connect_that_hangs_fails_after_connect_timeout_with_502_or_is_retried_elsewhere() {
    let hole = Unreachable::start().await;
    let connect_timeout = Duration::from_millis(400);
    let configure = |addresses: &[&str]| {
        let mut config = rust_load_balancer::Config::new("127.0.0.1:0".parse().unwrap(), addresses);
        config.connect_timeout = connect_timeout;
        // Active checks out of the way: one round at start-up only.
        config.health.interval = Duration::from_secs(60);
        config
    };

    // Alone: 502, after waiting the connect timeout.
    let proxy = start_proxy(configure(&[&hole.address])).await;
    let started = Instant::now();
    let answer = Http::new(proxy.local_addr()).get("/").await;
    let took = started.elapsed();
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{}", answer.text());
    assert!(took >= connect_timeout, "gave up after {took:?}");
    let metrics = proxy.metrics().encode(proxy.state().pool());
    assert!(
        metrics.contains(&format!(
            "lb_upstream_errors_total{{backend=\"{}\",kind=\"connect\"}} 1",
            hole.address
        )),
        "{metrics}"
    );

    // Beside a good backend: round robin tries the black hole first (the
    // wait shows it), then the request, a POST with a body even, is
    // retried on the good one.
    let good = TestBackend::start("good").await;
    let proxy = start_proxy(configure(&[&hole.address, &good.address()])).await;
    let started = Instant::now();
    let answer = Http::new(proxy.local_addr()).post("/record", "once").await;
    let took = started.elapsed();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.text(), "good");
    assert!(
        took >= connect_timeout,
        "the black hole was not tried first"
    );
    assert_eq!(
        good.state.recorded.lock().unwrap()[..],
        [Bytes::from("once")]
    );
    let metrics = proxy.metrics().encode(proxy.state().pool());
    assert!(
        metrics.contains(&format!(
            "lb_retries_total{{backend=\"{}\"}} 1",
            hole.address
        )),
        "{metrics}"
    );
}

/// A raw backend answering every request `200 ok`, counting the
/// connections that carried a request and those of them still open.
struct CountingBackend {
    address: String,
    carried: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
}

impl CountingBackend {
    async fn start() -> CountingBackend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let carried = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let (c, o) = (Arc::clone(&carried), Arc::clone(&open));
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (carried, open) = (Arc::clone(&c), Arc::clone(&o));
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let mut first = true;
                    loop {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            if std::mem::take(&mut first) {
                                carried.fetch_add(1, Ordering::SeqCst);
                                open.fetch_add(1, Ordering::SeqCst);
                            }
                            let _ = stream
                                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                                .await;
                        }
                    }
                    if !first {
                        open.fetch_sub(1, Ordering::SeqCst);
                    }
                });
            }
        });
        CountingBackend {
            address,
            carried,
            open,
        }
    }

    fn carried(&self) -> usize {
        self.carried.load(Ordering::SeqCst)
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

#[tokio::test]
async fn upstream_keepalive_0_uses_a_new_backend_connection_per_request_and_closes_it() {
    let pooled = CountingBackend::start().await;
    let unpooled = CountingBackend::start().await;
    let proxy_for = |backend: &CountingBackend, keepalive: usize| {
        let mut config =
            rust_load_balancer::Config::new("127.0.0.1:0".parse().unwrap(), &[&backend.address]);
        config.tuning.upstream_keepalive = keepalive;
        config.tuning.worker_threads = 1;
        config
    };
    let with_pool = start_proxy(proxy_for(&pooled, 1)).await;
    let without = start_proxy(proxy_for(&unpooled, 0)).await;
    let (with_pool, without) = (
        Http::new(with_pool.local_addr()),
        Http::new(without.local_addr()),
    );
    for _ in 0..10 {
        assert_eq!(with_pool.get("/").await.text(), "ok");
        assert_eq!(without.get("/").await.text(), "ok");
    }
    assert_eq!(pooled.carried(), 1, "a pool of one carries them all");
    assert_eq!(pooled.open(), 1);
    assert_eq!(unpooled.carried(), 10, "one connection per request");
    wait_until(
        "every unpooled connection closed",
        Duration::from_secs(5),
        || unpooled.open() == 0,
    )
    .await;
}

#[tokio::test]
async fn an_idle_backend_connection_is_closed_after_upstream_idle_timeout() {
    let short = CountingBackend::start().await;
    let long = CountingBackend::start().await;
    let idle_timeout = Duration::from_millis(1000);
    let proxy_for = |backend: &CountingBackend, idle: Duration| {
        let mut config =
            rust_load_balancer::Config::new("127.0.0.1:0".parse().unwrap(), &[&backend.address]);
        config.tuning.upstream_idle_timeout = idle;
        config.tuning.worker_threads = 1;
        config
    };
    let short_proxy = start_proxy(proxy_for(&short, idle_timeout)).await;
    let long_proxy = start_proxy(proxy_for(&long, Duration::from_secs(60))).await;
    let (to_short, to_long) = (
        Http::new(short_proxy.local_addr()),
        Http::new(long_proxy.local_addr()),
    );
    let started = Instant::now();
    assert_eq!(to_short.get("/").await.text(), "ok");
    assert_eq!(to_long.get("/").await.text(), "ok");
    assert_eq!((short.open(), long.open()), (1, 1), "both pooled");

    // The short one's idle connection is closed by the balancer, not
    // before its timeout; the long one's, idle as long, stays.
    wait_until(
        "the idle connection closed",
        Duration::from_secs(10),
        || short.open() == 0,
    )
    .await;
    assert!(started.elapsed() >= idle_timeout, "closed early");
    assert_eq!(long.open(), 1, "the 60 s pool dropped its connection too");

    // The next request needs a new connection; the other reuses its own.
    assert_eq!(to_short.get("/").await.text(), "ok");
    assert_eq!(to_long.get("/").await.text(), "ok");
    assert_eq!(short.carried(), 2);
    assert_eq!(long.carried(), 1);
}

/// A request already there when its connection is accepted, and one sent a
/// while after connecting (the first read then finds nothing and has to
/// wait for the socket's event), are both read and answered.
#[tokio::test]
async fn requests_sent_at_once_or_a_while_after_connecting_are_served() {
    let backend = TestBackend::start("a").await;
    let proxy = start_proxy(config_for(&[&backend])).await;
    let addr = proxy.local_addr();
    let mut clients = Vec::new();
    for i in 0..20u64 {
        clients.push(tokio::spawn(async move {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            if i % 2 == 1 {
                tokio::time::sleep(Duration::from_millis(50 + 10 * i)).await;
            }
            tcp.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            support::read_to_close(&mut tcp, Duration::from_secs(10)).await
        }));
    }
    for (i, client) in clients.into_iter().enumerate() {
        let (text, closed) = client.await.unwrap();
        assert!(
            closed,
            "client {i}: the connection was not closed after the answer"
        );
        assert!(text.starts_with("HTTP/1.1 200 "), "client {i}: {text:?}");
        assert!(
            text.ends_with("a"),
            "client {i}: not the backend's body: {text:?}"
        );
    }
    assert_eq!(backend.hits(), 20);
}
