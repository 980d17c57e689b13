//! The request path end to end: real backends on loopback, the real
//! balancer, the real round-robin module.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use support::{config_for, start_proxy, Http, TestBackend};

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
