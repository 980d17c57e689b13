//! Health checks, passive ejection and retries, with real backends that the
//! tests stop and restart: a dying backend must cost the client nothing.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use rust_load_balancer::Config;
use support::{
    config_for, start_proxy, wait_until, BlackHole, Http, Load, ResetBackend, TestBackend,
};
use tokio::io::AsyncReadExt;

fn fast_checks(config: &mut Config) {
    config.health.interval = Duration::from_millis(100);
    config.health.timeout = Duration::from_millis(300);
    config.health.unhealthy_threshold = 2;
    config.health.healthy_threshold = 2;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_dying_under_load_costs_no_request() {
    let mut backends = vec![
        TestBackend::start("a").await,
        TestBackend::start("b").await,
        TestBackend::start("c").await,
    ];
    let mut config = config_for(&backends.iter().collect::<Vec<_>>());
    fast_checks(&mut config);
    let proxy = start_proxy(config).await;
    let http = Http::new(proxy.local_addr());

    // Continuous load from four clients until told to stop.
    let load = Load::start(&http, 4);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Stop b mid-run.
    let b = backends.remove(1);
    let (b_addr, b_state) = (b.addr(), Arc::clone(&b.state));
    b.stop().await;
    let state = proxy.state();
    let pool = state.pool();
    let b_in_pool = &pool.backends()[1];
    wait_until("b ejected", Duration::from_secs(5), || {
        !b_in_pool.is_healthy()
    })
    .await;
    // Once ejected, the proxy sends b nothing at all.
    let attempts_at_ejection = b_in_pool.requests_total();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(b_in_pool.requests_total(), attempts_at_ejection);

    // Restarted on the same port, b is back within healthy_threshold
    // intervals (plus scheduling slack) and gets its share again.
    let hits_before = b_state.hits.load(Ordering::SeqCst);
    let restarted = TestBackend::start_on(b_addr, "b", b_state).await;
    wait_until("b back in rotation", Duration::from_secs(3), || {
        b_in_pool.is_healthy()
    })
    .await;
    let others_before: usize = backends.iter().map(|x| x.hits()).sum();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (ok, failed) = load.stop().await;
    let b_share = restarted.hits() - hits_before;
    let others_share: usize = backends.iter().map(|x| x.hits()).sum::<usize>() - others_before;
    assert!(b_share > 0, "b got nothing after it came back");
    // Round robin over three: b's share is about half the other two's.
    assert!(
        b_share * 4 >= others_share,
        "b got {b_share}, the other two {others_share}"
    );

    assert_eq!(failed, 0, "failed requests");
    assert!(ok > 100);
}

#[tokio::test]
async fn http_checks_eject_a_backend_whose_path_fails_while_its_port_accepts() {
    let backends = [TestBackend::start("a").await, TestBackend::start("b").await];
    let mut config = config_for(&backends.iter().collect::<Vec<_>>());
    fast_checks(&mut config);
    config.health.path = Some("/health".into());
    let proxy = start_proxy(config).await;
    let http = Http::new(proxy.local_addr());
    let state = proxy.state();
    let b = &state.pool().backends()[1];

    backends[1].state.health_status.store(500, Ordering::SeqCst);
    wait_until("b ejected", Duration::from_secs(3), || !b.is_healthy()).await;
    let b_hits = backends[1].hits();
    for _ in 0..10 {
        assert_eq!(http.get("/").await.text(), "a");
    }
    // Only health checks reached b; no client request.
    let b_requests = backends[1].hits() - b_hits;
    assert!(b_requests <= 3, "{b_requests}");

    backends[1].state.health_status.store(200, Ordering::SeqCst);
    wait_until("b restored", Duration::from_secs(3), || b.is_healthy()).await;
    let answers: Vec<String> = texts_of(&http, 4).await;
    assert!(answers.contains(&"b".to_string()), "{answers:?}");
}

async fn texts_of(http: &Http, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(http.get("/").await.text());
    }
    out
}

#[tokio::test]
async fn a_backend_that_never_answers_checks_is_ejected_and_delays_no_other() {
    let hole = BlackHole::start().await;
    let normal = TestBackend::start("n").await;
    let mut config = Config::new(
        "127.0.0.1:0".parse().unwrap(),
        &[&hole.address(), &normal.address()],
    );
    config.health.path = Some("/health".into());
    config.health.interval = Duration::from_millis(100);
    config.health.timeout = Duration::from_millis(1500);
    config.health.unhealthy_threshold = 2;
    let proxy = start_proxy(config).await;
    let state = proxy.state();
    let pool = state.pool();

    // The normal backend starts failing: it is ejected after two of its own
    // checks, long before the black hole's first check has timed out.
    normal.state.health_status.store(503, Ordering::SeqCst);
    let took = wait_until("normal ejected", Duration::from_secs(5), || {
        !pool.backends()[1].is_healthy()
    })
    .await;
    assert!(
        took < Duration::from_millis(1500),
        "waited on the black hole: {took:?}"
    );
    assert!(pool.backends()[0].is_healthy(), "not yet timed out twice");

    wait_until("black hole ejected", Duration::from_secs(6), || {
        !pool.backends()[0].is_healthy()
    })
    .await;
}

#[tokio::test]
async fn with_every_backend_down_requests_get_503_at_once_until_one_returns() {
    let backends = [TestBackend::start("a").await, TestBackend::start("b").await];
    let mut config = config_for(&backends.iter().collect::<Vec<_>>());
    fast_checks(&mut config);
    let proxy = start_proxy(config).await;
    let http = Http::new(proxy.local_addr());
    let state = proxy.state();
    let pool = state.pool();

    let [a, b] = backends;
    let (a_addr, a_state) = (a.addr(), Arc::clone(&a.state));
    a.stop().await;
    b.stop().await;
    wait_until("all ejected", Duration::from_secs(5), || {
        pool.backends().iter().all(|x| !x.is_healthy())
    })
    .await;
    for _ in 0..20 {
        let started = Instant::now();
        let answer = http.get("/").await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            answer.text().contains("no healthy backend"),
            "{}",
            answer.text()
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "503 must not wait"
        );
    }

    let _a = TestBackend::start_on(a_addr, "a", a_state).await;
    wait_until("a back", Duration::from_secs(3), || {
        pool.backends()[0].is_healthy()
    })
    .await;
    let answer = http.get("/").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.text(), "a");
}

#[tokio::test]
async fn a_sent_post_is_not_retried_but_a_reset_get_is() {
    let reset = ResetBackend::start().await;
    let good = TestBackend::start("good").await;

    // Round robin sends each fresh balancer's first request to the reset
    // backend (position 0).
    let config = || {
        Config::new(
            "127.0.0.1:0".parse().unwrap(),
            &[&reset.address(), &good.address()],
        )
    };

    let proxy = start_proxy(config()).await;
    let answer = Http::new(proxy.local_addr())
        .post("/record", "payment=1")
        .await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        reset.received.load(Ordering::SeqCst),
        1,
        "the POST was sent once"
    );
    assert!(
        good.state.recorded.lock().unwrap().is_empty(),
        "and never retried"
    );

    let proxy = start_proxy(config()).await;
    let answer = Http::new(proxy.local_addr()).get("/").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.text(),
        "good",
        "the GET was retried on the good backend"
    );
    assert_eq!(reset.received.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_refused_connect_is_retried_even_for_a_post() {
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap().to_string();
    drop(dead);
    let good = TestBackend::start("good").await;
    let config = Config::new(
        "127.0.0.1:0".parse().unwrap(),
        &[&dead_addr, &good.address()],
    );
    let proxy = start_proxy(config).await;
    let body = vec![b'x'; 100_000];
    let answer = Http::new(proxy.local_addr())
        .post("/record", body.clone())
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.text(), "good");
    let recorded = good.state.recorded.lock().unwrap();
    assert_eq!(recorded.len(), 1);
    assert_eq!(
        recorded[0].len(),
        body.len(),
        "the body arrived whole on the retry"
    );
}

/// A raw backend that accepts (so TCP checks pass), reads a request head,
/// then resets the connection: every proxied request fails with an I/O
/// error. Counts connections and requests.
struct Resetting {
    address: String,
    accepts: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

impl Resetting {
    async fn start() -> Resetting {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let accepts = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (a, r) = (Arc::clone(&accepts), Arc::clone(&requests));
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let requests = Arc::clone(&r);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    requests.fetch_add(1, Ordering::SeqCst);
                    let _ = stream.set_zero_linger();
                });
            }
        });
        Resetting {
            address,
            accepts,
            requests,
        }
    }
}

/// The `lb_upstream_errors_total` count of `backend` and `kind`.
fn upstream_errors(proxy: &rust_load_balancer::Proxy, backend: &str, kind: &str) -> u64 {
    let text = proxy.metrics().encode(proxy.state().pool());
    let prefix = format!("lb_upstream_errors_total{{backend=\"{backend}\",kind=\"{kind}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// `dead` (position 0) fails every proxied request with `kind`; its one
/// active check, at start-up, has passed and the next is a minute away.
/// Live requests alone must take it out after exactly
/// `unhealthy_threshold` failures, each of them retried on `good`.
async fn ejected_by_traffic(proxy: &rust_load_balancer::Proxy, dead: &str, kind: &str) {
    let state = proxy.state();
    let threshold = state.config().health.unhealthy_threshold as u64;
    let http = Http::new(proxy.local_addr());
    let dead_in_pool = &state.pool().backends()[0];
    let mut sent = 0;
    loop {
        assert!(sent < 30, "{sent} requests and the dead backend still in");
        let answer = http.get("/").await;
        sent += 1;
        assert_eq!(answer.status, StatusCode::OK, "a client saw the failure");
        assert_eq!(answer.text(), "good");
        let failures = upstream_errors(proxy, dead, kind);
        if failures < threshold {
            assert!(
                dead_in_pool.is_healthy(),
                "out after {failures} failures, fewer than unhealthy_threshold"
            );
        } else {
            assert_eq!(failures, threshold);
            break;
        }
    }
    assert!(!dead_in_pool.is_healthy());
    let admin = Http::new(proxy.admin_addr().unwrap());
    let listed: serde_json::Value =
        serde_json::from_slice(&admin.get("/backends").await.body).unwrap();
    assert_eq!(listed[0]["address"], dead);
    assert_eq!(listed[0]["healthy"], false, "{listed}");
    assert_eq!(listed[1]["healthy"], true, "{listed}");
    // Out of rotation: no request tries it any more.
    for _ in 0..10 {
        assert_eq!(http.get("/").await.text(), "good");
    }
    assert_eq!(upstream_errors(proxy, dead, kind), threshold);
}

fn passive_only(addresses: &[&str]) -> Config {
    let mut config = Config::new("127.0.0.1:0".parse().unwrap(), addresses);
    config.admin_address = Some("127.0.0.1:0".parse().unwrap());
    // One round of active checks at start-up, the next only after the test.
    config.health.interval = Duration::from_secs(60);
    config.health.unhealthy_threshold = 3;
    config
}

#[tokio::test]
async fn live_traffic_alone_ejects_a_backend_that_fails_requests_after_they_are_sent() {
    let dead = Resetting::start().await;
    let good = TestBackend::start("good").await;
    let proxy = start_proxy(passive_only(&[&dead.address, &good.address()])).await;
    // The start-up check (a TCP connect) passes.
    wait_until("the start-up check", Duration::from_secs(5), || {
        dead.accepts.load(Ordering::SeqCst) >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(proxy.state().pool().backends()[0].is_healthy());
    ejected_by_traffic(&proxy, &dead.address, "io").await;
    assert_eq!(dead.requests.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn live_traffic_alone_ejects_a_backend_that_refuses_connections() {
    let dying = TestBackend::start("dying").await;
    let good = TestBackend::start("good").await;
    let dead = dying.address();
    let proxy = start_proxy(passive_only(&[&dead, &good.address()])).await;
    // The start-up check (a TCP connect) passes; then the backend goes.
    wait_until("the start-up check", Duration::from_secs(5), || {
        dying.accepts() >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    dying.stop().await;
    assert!(proxy.state().pool().backends()[0].is_healthy());
    ejected_by_traffic(&proxy, &dead, "connect").await;
}
