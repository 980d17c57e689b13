//! Operating the balancer: hot reload by signal and admin API, metrics,
//! graceful shutdown, JSON logs, through the real binary where a signal is
//! involved.

mod support;

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use std::time::Duration;

use http::StatusCode;
use support::{config_for, dist, start_proxy, wait_until, Binary, Http, Load, TestBackend};

/// Writes `lb.json` naming `backends`, with both listeners on port 0 (the
/// binary logs the ports it got; a reload keeps its listeners).
fn write_config(
    dir: &std::path::Path,
    backends: &[&TestBackend],
    strategy: &str,
) -> std::path::PathBuf {
    let path = dir.join("lb.json");
    let list: Vec<String> = backends
        .iter()
        .map(|b| format!("\"{}\"", b.address()))
        .collect();
    std::fs::write(
        &path,
        format!(
            r#"{{ "listen_address": "127.0.0.1:0", "admin_address": "127.0.0.1:0",
                 "backend_servers": [{}], "strategy": "{strategy}", "health_check_interval": 0.2 }}"#,
            list.join(", ")
        ),
    )
    .unwrap();
    path
}

async fn admin_config(admin: &Http) -> serde_json::Value {
    serde_json::from_slice(&admin.get("/config").await.body).unwrap()
}

/// The binary on a config file naming `backends` and an admin listener.
struct Running {
    dir: tempfile::TempDir,
    binary: Binary,
    http: Http,
    admin: Http,
}

impl Running {
    async fn start(backends: &[&TestBackend], strategy: &str) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(dir.path(), backends, strategy);
        let binary = Binary::spawn(&path, &[]).await;
        let admin = admin_addr(&binary).await;
        Running {
            http: Http::new(binary.addr().unwrap()),
            admin: Http::new(admin),
            binary,
            dir,
        }
    }

    /// Rewrites the config file with another strategy; returns its path.
    fn rewrite(&self, backends: &[&TestBackend], strategy: &str) -> std::path::PathBuf {
        write_config(self.dir.path(), backends, strategy)
    }
}

/// The admin listener's address, from the binary's log (its line may come
/// just after the one saying where it listens).
async fn admin_addr(binary: &Binary) -> std::net::SocketAddr {
    let started = std::time::Instant::now();
    loop {
        if let Some(addr) = binary.admin_addr() {
            return addr;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no admin line: {}",
            binary.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_swaps_the_strategy_under_load_without_a_failed_request() {
    let backends = [
        TestBackend::start("b0").await,
        TestBackend::start("b1").await,
        TestBackend::start("b2").await,
    ];
    let refs: Vec<&TestBackend> = backends.iter().collect();
    let running = Running::start(&refs, "round-robin").await;
    let load = Load::start(&running.http, 4);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        backends.iter().all(|b| b.hits() > 0),
        "round robin reached all"
    );

    // Edit the config to a custom module and send SIGHUP.
    let module = dist("pick-last.wasm");
    running.rewrite(&refs, module.to_str().unwrap());
    running.binary.signal("HUP");
    let mut reloaded = false;
    for _ in 0..200 {
        if admin_config(&running.admin).await["strategy"] == module.to_str().unwrap() {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reloaded, "no reload: {}", running.binary.log());

    // Every request that starts after the swap follows the new strategy.
    let before: Vec<usize> = backends.iter().map(|b| b.hits()).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after: Vec<usize> = backends.iter().map(|b| b.hits()).collect();
    // Requests already in flight at the swap may still land on b0/b1: at
    // most one per client.
    assert!(
        after[0] + after[1] - before[0] - before[1] <= 4,
        "{before:?} -> {after:?}"
    );
    for _ in 0..20 {
        assert_eq!(running.http.get("/").await.text(), "b2");
    }
    let (ok, failed) = load.stop().await;
    assert_eq!(failed, 0, "failed requests ({ok} answered)");
    assert!(
        running.binary.log().contains("config reloaded"),
        "{}",
        running.binary.log()
    );
}

#[tokio::test]
async fn a_bad_reload_keeps_the_old_config_and_is_counted() {
    let backends = [
        TestBackend::start("b0").await,
        TestBackend::start("b1").await,
    ];
    let refs: Vec<&TestBackend> = backends.iter().collect();
    let running = Running::start(&refs, "round-robin").await;
    let (binary, http, admin) = (&running.binary, &running.http, &running.admin);

    // A module that does not exist, by SIGHUP.
    let path = running.rewrite(&refs, "gone.wasm");
    binary.signal("HUP");
    let log_has = |needle: &str| binary.log().contains(needle);
    wait_until("the rejection logged", Duration::from_secs(10), || {
        log_has("config reload rejected")
    })
    .await;
    assert!(
        log_has("gone.wasm") && log_has("cannot read"),
        "{}",
        binary.log()
    );

    // A syntax error, by the admin API: the answer says why.
    std::fs::write(&path, "{ \"listen_address\": ").unwrap();
    let answer = admin.post("/reload", "").await;
    assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY);
    let outcome: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(outcome["result"], "failure");
    assert!(
        outcome["error"].as_str().unwrap().contains("lb.json"),
        "{outcome}"
    );

    // The old round robin still serves, exactly.
    let mut seen = HashMap::new();
    for _ in 0..10 {
        *seen.entry(http.get("/").await.text()).or_insert(0) += 1;
    }
    assert_eq!(seen["b0"], 5);
    assert_eq!(seen["b1"], 5);
    let metrics = admin.get("/metrics").await.text();
    assert!(
        metrics.contains("lb_config_reloads_total{result=\"failure\"} 2"),
        "{metrics}"
    );
}

/// The value of the sample `name` whose labels include all of `labels`.
fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(ref buckets) => {
                buckets.last().map_or(0.0, |b| b.count)
            }
            _ => f64::NAN,
        })
}

async fn scrape_metrics(admin: &Http) -> prometheus_parse::Scrape {
    let answer = admin.get("/metrics").await;
    assert_eq!(answer.status, StatusCode::OK);
    let text = answer.text();
    let lines = text.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text")
}

#[tokio::test]
async fn metrics_count_what_was_sent_and_backends_show_health() {
    let backends = [TestBackend::start("a").await, TestBackend::start("b").await];
    let mut config = config_for(&backends.iter().collect::<Vec<_>>());
    config.admin_address = Some("127.0.0.1:0".parse().unwrap());
    config.health.interval = Duration::from_millis(100);
    config.health.unhealthy_threshold = 1;
    let proxy = start_proxy(config).await;
    let http = Http::new(proxy.local_addr());
    let admin = Http::new(proxy.admin_addr().unwrap());

    for _ in 0..7 {
        assert_eq!(http.get("/").await.status, StatusCode::OK);
    }
    assert_eq!(http.get("/missing-is-fine").await.status, StatusCode::OK);
    // A request is counted once its last byte is written, which is when
    // the client can already have it: wait (bounded) until all eight are.
    let started = std::time::Instant::now();
    let scrape = loop {
        let scrape = scrape_metrics(&admin).await;
        let counted: f64 = scrape
            .samples
            .iter()
            .filter(|s| s.metric == "lb_requests_total")
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum();
        if counted >= 8.0 {
            break scrape;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "only {counted} of 8 requests counted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let a = backends[0].address();
    let b = backends[1].address();
    assert_eq!(
        sample(
            &scrape,
            "lb_requests_total",
            &[("backend", &a), ("code", "200")]
        ),
        Some(4.0)
    );
    assert_eq!(
        sample(
            &scrape,
            "lb_requests_total",
            &[("backend", &b), ("code", "200")]
        ),
        Some(4.0)
    );
    assert_eq!(
        sample(
            &scrape,
            "lb_request_duration_seconds_count",
            &[("backend", &a)]
        ),
        Some(4.0)
    );
    assert_eq!(
        sample(&scrape, "lb_strategy_select_duration_seconds_count", &[]),
        Some(8.0)
    );
    assert_eq!(
        sample(&scrape, "lb_backend_healthy", &[("backend", &a)]),
        Some(1.0)
    );
    assert_eq!(
        sample(&scrape, "lb_backend_active_connections", &[("backend", &a)]),
        Some(0.0)
    );
    assert_eq!(
        sample(&scrape, "lb_strategy_faults_total", &[("kind", "trap")]),
        Some(0.0)
    );

    // A backend going down shows in /backends and in the gauge.
    let [a_backend, b_backend] = backends;
    b_backend.stop().await;
    let state = proxy.state();
    wait_until("b ejected", Duration::from_secs(5), || {
        !state.pool().backends()[1].is_healthy()
    })
    .await;
    let listed: serde_json::Value =
        serde_json::from_slice(&admin.get("/backends").await.body).unwrap();
    assert_eq!(listed[0]["address"], a.as_str());
    assert_eq!(listed[0]["healthy"], true);
    assert_eq!(listed[0]["requests_total"], 4);
    assert_eq!(listed[1]["address"], b.as_str());
    assert_eq!(listed[1]["healthy"], false);
    assert_eq!(listed[1]["weight"], 1);
    let scrape = scrape_metrics(&admin).await;
    assert_eq!(
        sample(&scrape, "lb_backend_healthy", &[("backend", &b)]),
        Some(0.0)
    );
    drop(a_backend);

    // Unknown paths and wrong methods are told so.
    assert_eq!(admin.get("/nope").await.status, StatusCode::NOT_FOUND);
    assert_eq!(
        admin.post("/metrics", "").await.status,
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(
        admin.get("/reload").await.status,
        StatusCode::METHOD_NOT_ALLOWED
    );
}

#[tokio::test]
async fn sigterm_lets_a_slow_request_finish_then_exits_zero() {
    let slow = TestBackend::start("slow").await;
    slow.state.delay_ms.store(1500, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lb.json");
    std::fs::write(
        &path,
        format!(
            r#"{{ "listen_address": "127.0.0.1:0", "backend_servers": ["{}"], "shutdown_timeout": 10 }}"#,
            slow.address()
        ),
    )
    .unwrap();
    let mut binary = Binary::spawn(&path, &[]).await;
    let addr = binary.addr().unwrap();
    let http = Http::new(addr);

    let in_flight = tokio::spawn({
        let http = http.clone();
        async move { http.get("/").await }
    });
    wait_until(
        "the request reached the backend",
        Duration::from_secs(5),
        || slow.hits() == 1,
    )
    .await;
    binary.signal("TERM");
    // New connections are refused once the listener is closed.
    wait_until("the listener closed", Duration::from_secs(5), || {
        std::net::TcpStream::connect(addr).is_err()
    })
    .await;
    let answer = in_flight.await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.text(), "slow");
    assert_eq!(
        answer
            .headers
            .get("connection")
            .map(|v| v.to_str().unwrap()),
        Some("close")
    );
    let status = binary.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}: {}", binary.log());
    assert!(binary.log().contains("stopped"));
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let backend = TestBackend::start("j").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lb.yaml");
    std::fs::write(
        &path,
        format!(
            "listen_address: 127.0.0.1:0\nbackend_servers: [\"{}\"]\naccess_log: true\n",
            backend.address()
        ),
    )
    .unwrap();
    let mut binary = Binary::spawn(&path, &["--log-format", "json"]).await;
    let http = Http::new(binary.addr().unwrap());
    for _ in 0..3 {
        http.get("/some/path?x=1").await;
    }
    binary.signal("TERM");
    binary.wait_exit(Duration::from_secs(10)).await;
    let log = binary.log();
    let mut access = 0;
    for line in log.lines() {
        let object: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(object.is_object());
        if object["target"] == "access" {
            access += 1;
            assert_eq!(object["fields"]["path"], "/some/path");
            assert_eq!(object["fields"]["status"], 200);
            assert_eq!(object["fields"]["method"], "GET");
            assert_eq!(object["fields"]["backend"], backend.address().as_str());
        }
    }
    assert_eq!(access, 3, "{log}");
}
