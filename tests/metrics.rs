//! Each metric of the README's table moves by exactly what the event that
//! should move it does: upstream errors by kind (`connect`, `io`,
//! `timeout`) and backend, retries, the balancer's own answers under
//! `backend="none"`, the in-flight gauge (and `/backends`) while a request
//! is open, and strategy faults after a module really trapped.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use rust_load_balancer::config::StrategySource;
use rust_load_balancer::{Config, Proxy};
use serde_json::{json, Value};
use support::{config_for, dist, start_proxy, Http, ResetBackend, TestBackend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Scrape = prometheus_parse::Scrape;

/// The value of the sample `name` whose labels include all of `labels`.
fn sample(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

/// How many series of `name` carry the label `key="value"`.
fn series_with(scrape: &Scrape, name: &str, key: &str, value: &str) -> usize {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && s.labels.get(key) == Some(value))
        .count()
}

async fn scrape(admin: &Http) -> Scrape {
    let answer = admin.get("/metrics").await;
    assert_eq!(answer.status, StatusCode::OK);
    let text = answer.text();
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("valid Prometheus text")
}

/// Scrapes until `ready` holds (a request is counted once its last byte is
/// written, which the client may see first), for at most 10 s.
async fn scrape_when(admin: &Http, what: &str, ready: impl Fn(&Scrape) -> bool) -> Scrape {
    let started = std::time::Instant::now();
    loop {
        let scrape = scrape(admin).await;
        if ready(&scrape) {
            return scrape;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}: {:#?}",
            scrape.samples
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `lb_requests_total{backend, code}`, 0 when the series does not exist.
fn requests(scrape: &Scrape, backend: &str, code: &str) -> f64 {
    sample(
        scrape,
        "lb_requests_total",
        &[("backend", backend), ("code", code)],
    )
    .unwrap_or(0.0)
}

fn upstream_errors(scrape: &Scrape, backend: &str, kind: &str) -> Option<f64> {
    sample(
        scrape,
        "lb_upstream_errors_total",
        &[("backend", backend), ("kind", kind)],
    )
}

fn retries(scrape: &Scrape, backend: &str) -> Option<f64> {
    sample(scrape, "lb_retries_total", &[("backend", backend)])
}

/// A config over `addresses` with the admin API on, the `probe` fixture
/// picking as `options` say, and nothing ejected by failures.
fn probe_config(addresses: &[String], options: Value) -> Config {
    let refs: Vec<&str> = addresses.iter().map(String::as_str).collect();
    let mut config = Config::new("127.0.0.1:0".parse().unwrap(), &refs);
    config.admin_address = Some("127.0.0.1:0".parse().unwrap());
    config.strategy = StrategySource::Path(dist("probe.wasm"));
    config.strategy_options = options;
    config.health.unhealthy_threshold = 1000;
    config.health.interval = Duration::from_secs(3600);
    config
}

async fn start(config: Config) -> (Proxy, Http, Http) {
    let proxy = start_proxy(config).await;
    let http = Http::new(proxy.local_addr());
    let admin = Http::new(proxy.admin_addr().unwrap());
    (proxy, http, admin)
}

/// An address nothing listens on: a backend started, then stopped.
async fn dead_address() -> String {
    let backend = TestBackend::start("dead").await;
    let address = backend.address();
    backend.stop().await;
    address
}

#[tokio::test]
async fn a_refused_connect_counts_a_connect_error_and_a_retry_on_that_backend() {
    let dead = dead_address().await;
    let live = TestBackend::start("live").await;
    // The probe picks the first of the list: the dead one, then (its retry
    // list leaves it out) the live one.
    let (_proxy, http, admin) = start(probe_config(
        &[dead.clone(), live.address()],
        json!({"pick": "first", "log_configure": false}),
    ))
    .await;

    let before = scrape(&admin).await;
    assert_eq!(upstream_errors(&before, &dead, "connect"), None);
    assert_eq!(retries(&before, &dead), None);

    for n in 1..=3u32 {
        // Any method: nothing was sent, so even a POST with a body is retried.
        let answer = if n == 2 {
            http.post("/p", "body").await
        } else {
            http.get("/").await
        };
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.text(), "live");
        let now = scrape_when(&admin, "the request counted", |s| {
            requests(s, &live.address(), "200") == f64::from(n)
        })
        .await;
        assert_eq!(
            upstream_errors(&now, &dead, "connect"),
            Some(f64::from(n)),
            "one connect error per request"
        );
        assert_eq!(retries(&now, &dead), Some(f64::from(n)));
    }
    let last = scrape(&admin).await;
    assert_eq!(upstream_errors(&last, &dead, "io"), None);
    assert_eq!(upstream_errors(&last, &dead, "timeout"), None);
    assert_eq!(
        series_with(
            &last,
            "lb_upstream_errors_total",
            "backend",
            &live.address()
        ),
        0,
        "the live backend never failed"
    );
    assert_eq!(retries(&last, &live.address()), None);
    assert_eq!(live.hits(), 3);
}

#[tokio::test]
async fn a_reset_after_sending_counts_an_io_error_and_is_retried_only_when_safe() {
    let reset = ResetBackend::start().await;
    let live = TestBackend::start("live").await;
    let (_proxy, http, admin) = start(probe_config(
        &[reset.address(), live.address()],
        json!({"pick": "first", "log_configure": false}),
    ))
    .await;

    // A GET without a body is retried on the live backend.
    let answer = http.get("/").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.text(), "live");
    let now = scrape_when(&admin, "the GET counted", |s| {
        requests(s, &live.address(), "200") == 1.0
    })
    .await;
    assert_eq!(upstream_errors(&now, &reset.address(), "io"), Some(1.0));
    assert_eq!(upstream_errors(&now, &reset.address(), "connect"), None);
    assert_eq!(retries(&now, &reset.address()), Some(1.0));

    // A POST with a body is not: 502, an io error, no retry.
    let answer = http.post("/p", "not twice").await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    let now = scrape_when(&admin, "the 502 counted", |s| {
        requests(s, "none", "502") == 1.0
    })
    .await;
    assert_eq!(upstream_errors(&now, &reset.address(), "io"), Some(2.0));
    assert_eq!(
        retries(&now, &reset.address()),
        Some(1.0),
        "the POST was not retried"
    );
    assert_eq!(reset.received.load(Ordering::SeqCst), 2);
    assert_eq!(live.hits(), 1, "the POST never reached the live backend");
    assert_eq!(
        series_with(&now, "lb_upstream_errors_total", "backend", &live.address()),
        0
    );
}

#[tokio::test]
async fn a_backend_slower_than_request_timeout_counts_a_timeout_and_a_504() {
    let slow = TestBackend::start("slow").await;
    // Far longer than the timeout: the 504 can only come from the timeout.
    slow.state.delay_ms.store(30_000, Ordering::SeqCst);
    let live = TestBackend::start("live").await;
    let mut config = probe_config(
        &[slow.address(), live.address()],
        json!({"pick": "first", "log_configure": false}),
    );
    config.clients.request_timeout = Duration::from_millis(300);
    let (_proxy, http, admin) = start(config).await;

    let answer = http.get("/").await;
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    let now = scrape_when(&admin, "the 504 counted", |s| {
        requests(s, "none", "504") == 1.0
    })
    .await;
    assert_eq!(upstream_errors(&now, &slow.address(), "timeout"), Some(1.0));
    assert_eq!(upstream_errors(&now, &slow.address(), "io"), None);
    assert_eq!(upstream_errors(&now, &slow.address(), "connect"), None);
    assert_eq!(
        retries(&now, &slow.address()),
        None,
        "a timeout is not retried"
    );
    assert_eq!(slow.hits(), 1);
    assert_eq!(live.hits(), 0, "not retried on the live backend");
    assert_eq!(requests(&now, &slow.address(), "200"), 0.0);
}

#[tokio::test]
async fn the_balancer_s_own_answers_are_counted_under_backend_none() {
    let backend = TestBackend::start("b").await;
    let (proxy, http, admin) = start(probe_config(
        &[backend.address()],
        json!({"pick": "refuse", "log_configure": false}),
    ))
    .await;

    // The strategy refuses: 503, twice.
    for n in 1..=2 {
        let answer = http.get("/").await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        scrape_when(&admin, "the 503 counted", |s| {
            requests(s, "none", "503") == f64::from(n)
        })
        .await;
    }
    // A request that cannot be forwarded (HTTP/1.1 without Host): 400.
    let mut stream = tokio::net::TcpStream::connect(proxy.local_addr())
        .await
        .unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut answer))
        .await
        .expect("the balancer answers and closes")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let now = scrape_when(&admin, "the 400 counted", |s| {
        requests(s, "none", "400") == 1.0
    })
    .await;
    assert_eq!(requests(&now, "none", "503"), 2.0);
    assert_eq!(backend.hits(), 0);
    assert_eq!(
        series_with(&now, "lb_requests_total", "backend", &backend.address()),
        0,
        "nothing counted against the backend"
    );
    // The refusals were the module's answers, not faults.
    for kind in ["trap", "out_of_fuel", "timeout", "memory", "bad_index"] {
        assert_eq!(
            sample(&now, "lb_strategy_faults_total", &[("kind", kind)]),
            Some(0.0),
            "{kind}"
        );
    }
}

#[tokio::test]
async fn a_request_in_flight_shows_in_the_gauge_and_in_backends_until_its_body_is_sent() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let mut config = config_for(&[&a, &b]);
    config.admin_address = Some("127.0.0.1:0".parse().unwrap());
    let (_proxy, http, admin) = start(config).await;
    let (a_addr, b_addr) = (a.address(), b.address());

    let gauge = |s: &Scrape, backend: &str| {
        sample(s, "lb_backend_active_connections", &[("backend", backend)])
    };
    let listed = |v: &Value, i: usize| v[i]["active_connections"].as_u64();
    let idle = scrape(&admin).await;
    assert_eq!(gauge(&idle, &a_addr), Some(0.0));
    assert_eq!(gauge(&idle, &b_addr), Some(0.0));

    // `/stream` sends its head and first chunk, then waits for the gate
    // before each further chunk: the request stays in flight until then.
    let request = Request::get(format!("{}/stream", http.base()))
        .body(Full::<Bytes>::default())
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(20), http.raw().request(request))
        .await
        .expect("the head arrives")
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut next_chunk = async || {
        let frame = tokio::time::timeout(Duration::from_secs(20), body.frame())
            .await
            .expect("a chunk arrives");
        frame.map(|f| f.unwrap().into_data().unwrap())
    };
    assert_eq!(next_chunk().await.as_deref(), Some(&b"part1 "[..]));

    let (busy, quiet) = if a.hits() == 1 { (&a, &b) } else { (&b, &a) };
    assert_eq!((busy.hits(), quiet.hits()), (1, 0));
    let now = scrape(&admin).await;
    assert_eq!(gauge(&now, &busy.address()), Some(1.0), "in flight");
    assert_eq!(gauge(&now, &quiet.address()), Some(0.0));
    let backends: Value = serde_json::from_slice(&admin.get("/backends").await.body).unwrap();
    let (busy_id, quiet_id) = if busy.address() == a_addr {
        (0, 1)
    } else {
        (1, 0)
    };
    assert_eq!(listed(&backends, busy_id), Some(1), "{backends}");
    assert_eq!(listed(&backends, quiet_id), Some(0), "{backends}");

    // Still in flight after the second chunk; finished after the last.
    busy.state.gate.notify_one();
    assert_eq!(next_chunk().await.as_deref(), Some(&b"part2 "[..]));
    assert_eq!(gauge(&scrape(&admin).await, &busy.address()), Some(1.0));
    busy.state.gate.notify_one();
    assert_eq!(next_chunk().await.as_deref(), Some(&b"part3 "[..]));
    assert_eq!(next_chunk().await, None, "the body ended");

    let done = scrape_when(&admin, "the gauge back at 0", |s| {
        gauge(s, &busy.address()) == Some(0.0)
    })
    .await;
    assert_eq!(requests(&done, &busy.address(), "200"), 1.0);
    let backends: Value = serde_json::from_slice(&admin.get("/backends").await.body).unwrap();
    assert_eq!(listed(&backends, busy_id), Some(0), "{backends}");
    assert_eq!(backends[busy_id]["requests_total"], 1);
}

#[tokio::test]
async fn a_trapping_module_counts_one_trap_fault_per_call_and_round_robin_serves() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let mut config = config_for(&[&a, &b]);
    config.admin_address = Some("127.0.0.1:0".parse().unwrap());
    config.strategy = StrategySource::Path(dist("misbehave-trap.wasm"));
    let (_proxy, http, admin) = start(config).await;
    let traps = |s: &Scrape| sample(s, "lb_strategy_faults_total", &[("kind", "trap")]);
    assert_eq!(traps(&scrape(&admin).await), Some(0.0));

    // Three calls, three traps (the third starts the module's quarantine,
    // so later requests may not call it at all).
    let mut served = Vec::new();
    for n in 1..=3 {
        let answer = http.get("/").await;
        assert_eq!(answer.status, StatusCode::OK, "the fallback serves");
        served.push(answer.text());
        let now = scrape(&admin).await;
        assert_eq!(traps(&now), Some(f64::from(n)), "after {n} requests");
        for kind in [
            "out_of_fuel",
            "timeout",
            "memory",
            "bad_index",
            "instantiate",
            "configure",
        ] {
            assert_eq!(
                sample(&now, "lb_strategy_faults_total", &[("kind", kind)]),
                Some(0.0),
                "{kind}"
            );
        }
    }
    assert_eq!(served, ["a", "b", "a"], "native round robin served them");
}
