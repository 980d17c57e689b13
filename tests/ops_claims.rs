//! README claims about running the balancer, through the real binary on a
//! config file (ports 0, addresses read from its log): the `native:`
//! strategies, the warnings for a WASI-importing module and a non-loopback
//! admin listener, reloads (start-only keys kept with a warning; backends,
//! weights and health settings swapped while a staying backend keeps its
//! stats; `POST /reload`'s answer and the reload counter), and
//! `max_retries` as a limit with each retry asking the strategy again
//! without the backends already tried.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use support::{dist, Binary, Http, ResetBackend, TestBackend};

/// A config file in its own folder, rewritable for reloads.
struct ConfigFile {
    dir: tempfile::TempDir,
}

impl ConfigFile {
    fn new(config: &Value) -> ConfigFile {
        let file = ConfigFile {
            dir: tempfile::tempdir().unwrap(),
        };
        file.write(config);
        file
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("lb.json")
    }

    fn write(&self, config: &Value) {
        std::fs::write(self.path(), serde_json::to_vec_pretty(config).unwrap()).unwrap();
    }
}

/// The binary on `config` (with `args`), its client and admin clients.
async fn spawn(config: &Value, args: &[&str]) -> (ConfigFile, Binary, Http, Option<Http>) {
    let file = ConfigFile::new(config);
    let binary = Binary::spawn(&file.path(), args).await;
    let http = Http::new(binary.addr().unwrap());
    let admin = if config.get("admin_address").is_some() {
        let started = std::time::Instant::now();
        // The admin line may come just after the listening line.
        while binary.admin_addr().is_none() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "no admin line: {}",
                binary.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Some(Http::new(binary.admin_addr().unwrap()))
    } else {
        None
    };
    (file, binary, http, admin)
}

async fn json_of(admin: &Http, path: &str) -> Value {
    let answer = admin.get(path).await;
    assert_eq!(answer.status, StatusCode::OK, "{path}");
    serde_json::from_slice(&answer.body).unwrap()
}

async fn scrape(admin: &Http) -> prometheus_parse::Scrape {
    let text = admin.get("/metrics").await.text();
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap()
}

fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
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

/// Waits (bounded) until the log contains `needle`.
async fn logged(binary: &Binary, needle: &str) {
    let started = std::time::Instant::now();
    while !binary.log().contains(needle) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the log never said {needle:?}: {}",
            binary.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The names of the backends that answered `n` sequential GETs.
async fn names(http: &Http, n: usize) -> Vec<String> {
    let mut names = Vec::new();
    for _ in 0..n {
        let answer = http.get("/").await;
        assert_eq!(answer.status, StatusCode::OK);
        names.push(answer.text());
    }
    names
}

#[tokio::test]
async fn native_strategies_from_a_config_file_serve_outside_the_sandbox() {
    let backends = [
        TestBackend::start("a").await,
        TestBackend::start("b").await,
        TestBackend::start("c").await,
    ];
    let list = |weights: [u32; 3]| -> Value {
        backends
            .iter()
            .zip(weights)
            .map(|(b, w)| json!({"address": b.address(), "weight": w}))
            .collect()
    };
    // Sandbox limits no wasm module could run under: one unit of fuel and
    // 1 MiB of memory. A native strategy never enters the sandbox.
    let config = |strategy: &str, weights: [u32; 3]| {
        json!({
            "listen_address": "127.0.0.1:0",
            "admin_address": "127.0.0.1:0",
            "backend_servers": list(weights),
            "strategy": strategy,
            "strategy_fuel": 1,
            "strategy_memory_mib": 1,
        })
    };
    // The wasm twin cannot even start under them.
    let twin = ConfigFile::new(&config("round-robin", [1, 1, 1]));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rust_load_balancer"))
        .args(["--check", "--config"])
        .arg(twin.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("exceeded its memory limit"), "{err}");

    for (strategy, weights, want) in [
        (
            "native:round-robin",
            [1, 1, 1],
            &["a", "b", "c", "a", "b", "c", "a"][..],
        ),
        (
            "native:weighted-round-robin",
            [5, 1, 1],
            &[
                "a", "a", "b", "a", "c", "a", "a", "a", "a", "b", "a", "c", "a", "a",
            ][..],
        ),
    ] {
        let (_file, binary, http, admin) = spawn(&config(strategy, weights), &[]).await;
        let admin = admin.unwrap();
        assert!(
            binary
                .log()
                .contains(&format!("3 backends, strategy {strategy}")),
            "{}",
            binary.log()
        );
        assert_eq!(json_of(&admin, "/config").await["strategy"], strategy);
        assert_eq!(names(&http, want.len()).await, want, "{strategy}");
        let metrics = scrape(&admin).await;
        for kind in ["out_of_fuel", "memory", "trap", "timeout"] {
            assert_eq!(
                sample(&metrics, "lb_strategy_faults_total", &[("kind", kind)]),
                Some(0.0),
                "{strategy}: {kind}"
            );
        }
        assert_eq!(
            sample(&metrics, "lb_strategy_select_duration_seconds_count", &[]),
            Some(want.len() as f64),
            "{strategy}: every request asked the strategy"
        );
    }

    // Least connections: with a request held open on one backend, the
    // others take every new request, in turn; round robin would not.
    let (_file, binary, http, admin) =
        spawn(&config("native:least-connections", [1, 1, 1]), &[]).await;
    let admin = admin.unwrap();
    assert!(
        binary
            .log()
            .contains("3 backends, strategy native:least-connections"),
        "{}",
        binary.log()
    );
    let hits_before: Vec<usize> = backends.iter().map(TestBackend::hits).collect();
    let request = Request::get(format!("{}/stream", http.base()))
        .body(Full::<Bytes>::default())
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(20), http.raw().request(request))
        .await
        .expect("the head arrives")
        .unwrap();
    let mut held = response.into_body();
    let first = tokio::time::timeout(Duration::from_secs(20), held.frame())
        .await
        .unwrap();
    assert_eq!(first.unwrap().unwrap().into_data().unwrap(), &b"part1 "[..]);
    let busy = (0..3)
        .find(|&i| backends[i].hits() == hits_before[i] + 1)
        .expect("one backend has the held request");
    let listed = json_of(&admin, "/backends").await;
    assert_eq!(listed[busy]["active_connections"], 1, "{listed}");
    let others = names(&http, 6).await;
    let busy_name = backends[busy].name.as_str();
    assert!(
        !others.iter().any(|n| n == busy_name),
        "a request went to the busy backend: {others:?}"
    );
    assert!(
        others.windows(2).all(|w| w[0] != w[1]),
        "the two idle backends take turns: {others:?}"
    );
    let metrics = scrape(&admin).await;
    assert_eq!(
        sample(
            &metrics,
            "lb_strategy_faults_total",
            &[("kind", "out_of_fuel")]
        ),
        Some(0.0)
    );
    let gate = &backends[busy].state.gate;
    gate.notify_one();
    gate.notify_one();
}

#[tokio::test]
async fn a_module_that_imports_wasi_loads_with_a_warning_and_is_served_around() {
    let backend = TestBackend::start("b").await;
    let warning =
        "strategy module imports host functions; none are granted, calls to them will trap";
    let config = |module: &str| {
        json!({
            "listen_address": "127.0.0.1:0",
            "backend_servers": [backend.address()],
            "strategy": dist(module).display().to_string(),
        })
    };
    let (_file, binary, http, _) = spawn(&config("snoop.wasm"), &[]).await;
    let log = binary.log();
    let line = log
        .lines()
        .find(|l| l.contains(warning))
        .unwrap_or_else(|| panic!("no warning: {log}"));
    assert!(line.contains("WARN"), "{line}");
    assert!(
        line.contains("wasi:"),
        "the warning names the imports: {line}"
    );
    assert!(line.contains("snoop.wasm"), "and the module: {line}");
    // It serves (its calls trap; round robin answers for it).
    assert_eq!(http.get("/").await.status, StatusCode::OK);
    logged(&binary, "strategy fault").await;

    // A module that imports only the contract's interfaces gets no warning.
    let (_file, binary, http, _) = spawn(&config("probe.wasm"), &[]).await;
    assert_eq!(http.get("/").await.status, StatusCode::OK);
    assert!(!binary.log().contains(warning), "{}", binary.log());
}

#[tokio::test]
async fn an_admin_listener_off_loopback_is_warned_about() {
    // 0.0.0.0 on an ephemeral port is the one non-loopback address a test
    // can bind without knowing the machine's interfaces. The admin API only
    // listens; the balancer is stopped as soon as the warning is read.
    let backend = TestBackend::start("b").await;
    let warning = "is not on a loopback address; it has no authentication";
    let config = |admin: &str| {
        json!({
            "listen_address": "127.0.0.1:0",
            "admin_address": admin,
            "backend_servers": [backend.address()],
        })
    };
    let (_file, mut binary, _, admin) = spawn(&config("0.0.0.0:0"), &[]).await;
    logged(&binary, warning).await;
    let port = binary.admin_addr().unwrap().port();
    assert!(
        binary
            .log()
            .contains(&format!("the admin API on 0.0.0.0:{port} {warning}")),
        "{}",
        binary.log()
    );
    drop(admin);
    binary.signal("TERM");
    assert!(binary.wait_exit(Duration::from_secs(10)).await.success());

    let (_file, binary, _, admin) = spawn(&config("127.0.0.1:0"), &[]).await;
    // Once it answers, its start-up lines are all written.
    assert_eq!(admin.unwrap().get("/config").await.status, StatusCode::OK);
    assert!(binary.log().contains("admin API on http://127.0.0.1:"));
    assert!(!binary.log().contains(warning), "{}", binary.log());
}

/// The balancer's worker threads (named `lb-worker-N`), from /proc.
fn worker_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("lb-worker-"))
        .count()
}

#[tokio::test]
async fn a_reload_keeps_the_start_only_keys_says_so_and_applies_the_rest() {
    let backend = TestBackend::start("b").await;
    let mut config = json!({
        "listen_address": "127.0.0.1:0",
        "admin_address": "127.0.0.1:0",
        "backend_servers": [backend.address()],
        "worker_threads": 1,
        "listen_backlog": 100,
        "max_retries": 2,
    });
    let (file, binary, http, admin) = spawn(&config, &[]).await;
    let admin = admin.unwrap();
    let pid = binary.child.id();
    assert_eq!(worker_threads(pid), 1);

    config["listen_address"] = json!("127.0.0.1:1");
    config["admin_address"] = json!("127.0.0.1:2");
    config["worker_threads"] = json!(2);
    config["listen_backlog"] = json!(200);
    config["max_retries"] = json!(5);
    config["access_log"] = json!(true);
    file.write(&config);
    let answer = admin.post("/reload", "").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let outcome: Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(outcome["result"], "success", "{outcome}");
    assert_eq!(
        outcome["config"], "listen 127.0.0.1:0, 1 backend, strategy round-robin",
        "{outcome}"
    );

    for needle in [
        "listen_address changed to 127.0.0.1:1: this needs a restart; still listening on 127.0.0.1:0",
        "admin_address changed: this needs a restart",
        "worker_threads and listen_backlog need a restart; keeping 1 workers and a backlog of 100",
    ] {
        logged(&binary, needle).await;
    }
    let effective = json_of(&admin, "/config").await;
    assert_eq!(effective["listen_address"], "127.0.0.1:0");
    assert_eq!(effective["admin_address"], "127.0.0.1:0");
    assert_eq!(effective["worker_threads"], 1);
    assert_eq!(effective["listen_backlog"], 100);
    // The keys that can be reloaded were.
    assert_eq!(effective["max_retries"], 5);
    assert_eq!(effective["access_log"], true);
    assert_eq!(worker_threads(pid), 1, "no worker was started");
    // The old listeners serve on; the new keys are live (an access line).
    assert_eq!(http.get("/after").await.status, StatusCode::OK);
    logged(&binary, "/after").await;
    let metrics = scrape(&admin).await;
    assert_eq!(
        sample(
            &metrics,
            "lb_config_reloads_total",
            &[("result", "success")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "lb_config_reloads_total",
            &[("result", "failure")]
        ),
        Some(0.0)
    );
}

#[tokio::test]
async fn a_reload_swaps_backends_weights_and_health_while_a_staying_backend_keeps_its_stats() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let c = TestBackend::start("c").await;
    let health = |path: &str, healthy: u32| {
        json!({
            "health_check_path": path,
            "health_check_interval": 0.1,
            "unhealthy_threshold": 1,
            "healthy_threshold": healthy,
        })
    };
    let config = |backends: Value, health: Value| {
        let mut config = json!({
            "listen_address": "127.0.0.1:0",
            "admin_address": "127.0.0.1:0",
            "backend_servers": backends,
            "strategy": "weighted-round-robin",
        });
        for (k, v) in health.as_object().unwrap() {
            config[k] = v.clone();
        }
        config
    };
    let (file, binary, http, admin) = spawn(
        &config(json!([a.address(), b.address()]), health("/health", 1000)),
        &[],
    )
    .await;
    let admin = admin.unwrap();

    let mut served = names(&http, 4).await;
    served.sort();
    assert_eq!(served, ["a", "a", "b", "b"]);
    // b fails its check and is ejected; then it would pass again, but it
    // needs 1000 passing checks in a row to come back.
    b.state
        .health_status
        .store(500, std::sync::atomic::Ordering::SeqCst);
    let started = std::time::Instant::now();
    while json_of(&admin, "/backends").await[1]["healthy"] != false {
        assert!(started.elapsed() < Duration::from_secs(10), "b not ejected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    b.state
        .health_status
        .store(200, std::sync::atomic::Ordering::SeqCst);

    // Reload 1: a leaves, c joins first, b stays with weight 7.
    file.write(&config(
        json!([c.address(), {"address": b.address(), "weight": 7}]),
        health("/health", 1000),
    ));
    let answer = admin.post("/reload", "").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let listed = json_of(&admin, "/backends").await;
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
    assert_eq!(listed[0]["address"], c.address().as_str());
    assert_eq!(listed[0]["id"], 0);
    assert_eq!(listed[0]["healthy"], true);
    assert_eq!(listed[0]["requests_total"], 0);
    assert_eq!(listed[1]["address"], b.address().as_str());
    assert_eq!(listed[1]["id"], 1, "a backend's id is its new position");
    assert_eq!(listed[1]["weight"], 7);
    assert_eq!(
        listed[1]["healthy"], false,
        "b kept its health state (a fresh backend starts healthy): {listed}"
    );
    assert_eq!(listed[1]["requests_total"], 2, "b kept its statistics");
    // The gauges follow the new list; the counters survive the reload.
    let metrics = scrape(&admin).await;
    assert_eq!(
        sample(&metrics, "lb_backend_healthy", &[("backend", &a.address())]),
        None
    );
    assert_eq!(
        sample(&metrics, "lb_backend_healthy", &[("backend", &b.address())]),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "lb_requests_total",
            &[("backend", &a.address()), ("code", "200")]
        ),
        Some(2.0)
    );
    // (New connections: see the keep-alive test below for one kept open.)
    let http = Http::new(binary.addr().unwrap());
    assert_eq!(names(&http, 3).await, ["c", "c", "c"], "b is still out");

    // Reload 2, by SIGHUP: a check path that b passes while /health fails,
    // and 2 checks to come back. Only the new settings bring b back.
    b.state
        .health_status
        .store(500, std::sync::atomic::Ordering::SeqCst);
    file.write(&config(
        json!([c.address(), {"address": b.address(), "weight": 7}]),
        health("/ready", 2),
    ));
    binary.signal("HUP");
    let started = std::time::Instant::now();
    while json_of(&admin, "/backends").await[1]["healthy"] != true {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "b did not come back under the new health settings: {}",
            binary.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reloads = sample(
        &scrape(&admin).await,
        "lb_config_reloads_total",
        &[("result", "success")],
    );
    assert_eq!(reloads, Some(2.0));
    // The new weights: over one cycle of 8, b gets 7 and c 1.
    let http = Http::new(binary.addr().unwrap());
    let mut served = names(&http, 8).await;
    served.sort();
    assert_eq!(served, ["b", "b", "b", "b", "b", "b", "b", "c"]);
    let listed = json_of(&admin, "/backends").await;
    assert_eq!(listed[1]["requests_total"], 9, "{listed}");
    // a got no request after it left (its health checks stopped counting).
    // A request is counted in lb_requests_total just after its response
    // is written, so the client may see the answer first: wait for it.
    let started = std::time::Instant::now();
    let metrics = loop {
        let metrics = scrape(&admin).await;
        let b_total = sample(
            &metrics,
            "lb_requests_total",
            &[("backend", &b.address()), ("code", "200")],
        );
        if b_total >= Some(9.0) || started.elapsed() > Duration::from_secs(5) {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        sample(
            &metrics,
            "lb_requests_total",
            &[("backend", &a.address()), ("code", "200")]
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "lb_requests_total",
            &[("backend", &b.address()), ("code", "200")]
        ),
        Some(9.0)
    );
}

/// Sends `GET /` on `stream` and reads the answer's body (the backends
/// answer with a `Content-Length`).
async fn get_on(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n")
        .await
        .unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&received).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let head = text[..end].to_ascii_lowercase();
            assert!(head.starts_with("http/1.1 200"), "{text}");
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .expect("a Content-Length");
            if received.len() >= end + 4 + length {
                return text[end + 4..end + 4 + length].to_string();
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf))
            .await
            .expect("an answer within 20 s")
            .unwrap();
        assert!(n > 0, "the balancer closed the connection: {text}");
        received.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test]
async fn a_keep_alive_connection_idle_across_a_reload_sends_its_next_request_by_the_new_config() {
    // "Requests in flight finish on the config they started with; new
    // requests use the new one": a request that arrives after the reload on
    // a connection opened before it is a new request.
    let a = TestBackend::start("a").await;
    let c = TestBackend::start("c").await;
    let config = |backend: &TestBackend| {
        json!({
            "listen_address": "127.0.0.1:0",
            "admin_address": "127.0.0.1:0",
            "backend_servers": [backend.address()],
        })
    };
    let (file, binary, _, admin) = spawn(&config(&a), &[]).await;
    let admin = admin.unwrap();
    let mut kept = tokio::net::TcpStream::connect(binary.addr().unwrap())
        .await
        .unwrap();
    assert_eq!(get_on(&mut kept).await, "a");

    // The only backend is replaced; the reload has completed when it answers.
    file.write(&config(&c));
    let answer = admin.post("/reload", "").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(
        json_of(&admin, "/backends").await[0]["address"],
        c.address().as_str()
    );
    let mut fresh = tokio::net::TcpStream::connect(binary.addr().unwrap())
        .await
        .unwrap();
    assert_eq!(get_on(&mut fresh).await, "c", "a new connection");
    assert_eq!(
        get_on(&mut kept).await,
        "c",
        "a request sent after the reload went to a backend the config no longer has"
    );
    assert_eq!(a.hits(), 1);
}

/// The probe's `select` events (the binary runs with `--log-format json`),
/// waiting (bounded) until there are `n`.
async fn selects(binary: &Binary, n: usize) -> Vec<Value> {
    let mut found = Vec::new();
    for _ in 0..250 {
        found = binary
            .strategy_events()
            .into_iter()
            .filter(|e| e["event"] == "select")
            .collect();
        if found.len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    found
}

#[tokio::test]
async fn max_retries_bounds_the_backends_tried_and_each_retry_leaves_the_failed_out() {
    for max_retries in [0u32, 2, 4] {
        // Four backends that fail every request after reading it, then a
        // good one; the probe always picks the first of its list.
        let failing = [
            ResetBackend::start().await,
            ResetBackend::start().await,
            ResetBackend::start().await,
            ResetBackend::start().await,
        ];
        let live = TestBackend::start("live").await;
        let mut addresses: Vec<String> = failing.iter().map(ResetBackend::address).collect();
        addresses.push(live.address());
        let config = json!({
            "listen_address": "127.0.0.1:0",
            "backend_servers": addresses,
            "strategy": dist("probe.wasm").display().to_string(),
            "strategy_options": {"pick": "first", "log_select": true, "log_configure": false},
            "max_retries": max_retries,
            "unhealthy_threshold": 1000,
        });
        let (_file, binary, http, _) = spawn(&config, &["--log-format", "json"]).await;
        let answer = http.get("/").await;

        let tries = max_retries as usize + 1;
        let received: Vec<usize> = failing
            .iter()
            .map(|f| f.received.load(std::sync::atomic::Ordering::SeqCst))
            .collect();
        let want: Vec<usize> = (0..4).map(|i| usize::from(i < tries)).collect();
        assert_eq!(
            received, want,
            "max_retries {max_retries}: exactly {tries} backends tried, once each"
        );
        if tries > 4 {
            assert_eq!(answer.status, StatusCode::OK, "max_retries {max_retries}");
            assert_eq!(answer.text(), "live");
        } else {
            assert_eq!(
                answer.status,
                StatusCode::BAD_GATEWAY,
                "max_retries {max_retries}"
            );
            assert_eq!(live.hits(), 0, "max_retries {max_retries}");
        }

        // The strategy was asked once per attempt, each time without the
        // backends already tried, with the attempt number, for one request.
        let events = selects(&binary, tries.min(5)).await;
        assert_eq!(events.len(), tries.min(5), "{}", binary.log());
        for (attempt, event) in events.iter().enumerate() {
            assert_eq!(event["attempt"], attempt, "{event}");
            assert_eq!(event["id"], events[0]["id"], "{event}");
            let ids: Vec<u64> = event["backends"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b["id"].as_u64().unwrap())
                .collect();
            let want: Vec<u64> = (attempt as u64..5).collect();
            assert_eq!(ids, want, "max_retries {max_retries}, attempt {attempt}");
        }
    }
}
