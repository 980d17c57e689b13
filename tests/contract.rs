//! Contract 0.2.0 end to end, over real sockets, real backends and the
//! real `probe` fixture module (`plugins/fixtures/probe`), which logs what
//! it is given as JSON lines: the request fields a strategy sees, each
//! `hash_key` source against XXH3 computed here, options and labels through
//! `configure`, outcomes through `observe`, a refusing `configure`, the log
//! rate limit, and an observer steering away from a 5xx backend.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::Full;
use rust_load_balancer::balancer::FaultKind;
use rust_load_balancer::Config;
use serde_json::{json, Value};
use support::{Binary, Http, TestBackend};
use xxhash_rust::xxh3::xxh3_64;

fn probe() -> String {
    support::dist("probe.wasm").display().to_string()
}

/// Writes `config` as `lb.json` in a fresh folder.
fn write(config: &Value) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lb.json");
    std::fs::write(&path, serde_json::to_vec_pretty(config).unwrap()).unwrap();
    (dir, path)
}

/// The balancer binary on `config` with JSON logs.
async fn spawn(config: &Value) -> (Binary, Http, tempfile::TempDir) {
    let (dir, path) = write(config);
    let binary = Binary::spawn(&path, &["--log-format", "json"]).await;
    let http = Http::new(binary.addr().unwrap());
    (binary, http, dir)
}

/// The module's events of one kind, waiting briefly for them to be written.
async fn events(binary: &Binary, event: &str, at_least: usize) -> Vec<Value> {
    let mut found = Vec::new();
    for _ in 0..100 {
        found = binary
            .strategy_events()
            .into_iter()
            .filter(|e| e["event"] == event)
            .collect();
        if found.len() >= at_least {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    found
}

fn get(http: &Http, path: &str, headers: &[(&str, &str)]) -> Request<Full<bytes::Bytes>> {
    let mut request = Request::get(format!("{}{path}", http.base()));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(Full::default()).unwrap()
}

#[test]
fn the_hash_is_xxh3_64_with_seed_0() {
    // The published test vector of XXH3-64 for empty input, seed 0: pins
    // the function the contract promises, whatever crate computes it.
    assert_eq!(xxh3_64(b""), 0x2d06_8005_38d3_94c2);
}

#[tokio::test]
async fn a_strategy_sees_the_request_options_and_labels() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let options = json!({"log_select": true, "pick": "last"});
    let config = json!({
        "listen_address": "127.0.0.1:0",
        "backend_servers": [
            a.address(),
            {"address": b.address(), "weight": 3, "labels": {"zone": "b", "version": "2.1"}},
        ],
        "strategy": probe(),
        "strategy_options": options,
        "hash_key": "header:x-user",
        "strategy_headers": ["X-User", "cookie", "x-absent"],
    });
    let (binary, http, _dir) = spawn(&config).await;

    let configured = events(&binary, "configure", 1).await;
    assert_eq!(configured.len(), 1, "{}", binary.log());
    assert_eq!(
        configured[0]["options"],
        json!({"log_select": true, "pick": "last"})
    );
    assert_eq!(
        configured[0]["backends"],
        json!([
            {"id": 0, "address": a.address(), "weight": 1, "labels": []},
            {"id": 1, "address": b.address(), "weight": 3, "labels": [["version", "2.1"], ["zone", "b"]]},
        ])
    );

    let answer = http
        .send(get(
            &http,
            "/cart?id=7",
            &[
                ("host", "shop.example:8443"),
                ("x-user", "  ann "),
                ("cookie", "sid=1"),
                ("x-other", "not named"),
            ],
        ))
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.text(), "b", "the module's pick (the last) is used");
    let answer = http
        .send(
            Request::post(format!("{}/p", http.base()))
                .body(Full::new(bytes::Bytes::from_static(b"body")))
                .unwrap(),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK);

    let selects = events(&binary, "select", 2).await;
    assert_eq!(selects.len(), 2, "{}", binary.log());
    let first = &selects[0];
    assert_eq!(first["method"], "GET");
    assert_eq!(first["path"], "/cart?id=7");
    assert_eq!(first["authority"], "shop.example:8443");
    assert_eq!(first["client"], "127.0.0.1");
    assert_eq!(first["hash_key"], json!(xxh3_64(b"ann")), "trimmed value");
    assert_eq!(
        first["headers"],
        json!([["x-user", "ann"], ["cookie", "sid=1"]])
    );
    assert_eq!(first["attempt"], 0);
    assert_eq!(
        first["backends"],
        json!([
            {"id": 0, "weight": 1, "in_flight": 0, "latency_micros": 0},
            {"id": 1, "weight": 3, "in_flight": 0, "latency_micros": 0},
        ])
    );
    let second = &selects[1];
    assert_eq!(second["method"], "POST");
    assert_eq!(second["path"], "/p");
    assert_eq!(second["hash_key"], Value::Null, "no x-user header, no key");
    assert_eq!(second["headers"], json!([]));
    assert_ne!(first["id"], second["id"]);
    assert_ne!(first["random"], second["random"]);
    // After one response from b its latency is known.
    assert!(second["backends"][1]["latency_micros"].as_u64().unwrap() > 0);
}

/// A `hash_key` value, a request (path, headers) that has the value, the
/// value hashed, and a request that lacks it.
type Case = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static [u8],
    Option<(&'static str, &'static [(&'static str, &'static str)])>,
);

/// Each `hash_key` source, a request that has the value, the value hashed,
/// and a request that lacks it.
#[tokio::test]
async fn every_hash_key_source_hashes_the_documented_value() {
    let backend = TestBackend::start("a").await;
    let cases: [Case; 6] = [
        ("client_ip", "/", &[], b"127.0.0.1", None),
        (
            "header:X-Tenant",
            "/",
            &[("x-tenant", " acme ")],
            b"acme",
            Some(("/", &[("x-other", "acme")])),
        ),
        (
            "cookie:sid",
            "/",
            &[("cookie", "a=1; sid=s3cr3t; z=2")],
            b"s3cr3t",
            Some(("/", &[("cookie", "a=1")])),
        ),
        (
            "query:id",
            "/cart?x=1&id=42&y",
            &[],
            b"42",
            Some(("/cart?ids=42", &[])),
        ),
        ("path", "/cart/items?id=42", &[], b"/cart/items", None),
        ("uri", "/cart/items?id=42", &[], b"/cart/items?id=42", None),
    ];
    for (key, path, headers, value, absent) in cases {
        let config = json!({
            "listen_address": "127.0.0.1:0",
            "backend_servers": [backend.address()],
            "strategy": probe(),
            "strategy_options": {"log_select": true, "log_configure": false},
            "hash_key": key,
        });
        let (binary, http, _dir) = spawn(&config).await;
        assert_eq!(
            http.send(get(&http, path, headers)).await.status,
            StatusCode::OK
        );
        if let Some((path, headers)) = absent {
            assert_eq!(
                http.send(get(&http, path, headers)).await.status,
                StatusCode::OK
            );
        }
        let want = 1 + usize::from(absent.is_some());
        let selects = events(&binary, "select", want).await;
        assert_eq!(selects.len(), want, "{key}: {}", binary.log());
        assert_eq!(selects[0]["hash_key"], json!(xxh3_64(value)), "{key}");
        if absent.is_some() {
            assert_eq!(selects[1]["hash_key"], Value::Null, "{key} absent");
        }
    }
}

#[tokio::test]
async fn retries_are_observed_with_their_attempt_number() {
    // Backend 0 accepts connections (so its TCP health check passes) and
    // resets every request: the attempt fails after sending, and a GET
    // without a body is retried on the next backend.
    let reset = support::ResetBackend::start().await;
    let live = TestBackend::start("live").await;
    let config = json!({
        "listen_address": "127.0.0.1:0",
        "backend_servers": [reset.address(), live.address()],
        "strategy": probe(),
        "strategy_options": {"log_select": true, "log_observe": true, "log_configure": false},
        "unhealthy_threshold": 100,
    });
    let (binary, http, _dir) = spawn(&config).await;
    let answer = http.get("/").await;
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "a GET is retried after an I/O failure"
    );
    assert_eq!(answer.text(), "live");
    let selects = events(&binary, "select", 2).await;
    let observed = events(&binary, "observe", 2).await;
    assert_eq!(selects.len(), 2, "{}", binary.log());
    assert_eq!(selects[0]["attempt"], 0);
    assert_eq!(selects[1]["attempt"], 1);
    assert_eq!(
        selects[0]["id"], selects[1]["id"],
        "one request, two attempts"
    );
    let ids: Vec<u64> = selects[1]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ids,
        [1],
        "the retry's list leaves out the backend already tried"
    );
    assert_eq!(observed.len(), 2, "{}", binary.log());
    assert_eq!(observed[0]["backend_id"], 0);
    assert_eq!(observed[0]["failure"], "io");
    assert_eq!(observed[0]["attempt"], 0);
    assert_eq!(observed[1]["backend_id"], 1);
    assert_eq!(observed[1]["status"], 200);
    assert_eq!(observed[1]["attempt"], 1);
    for outcome in &observed {
        assert_eq!(outcome["request_id"], selects[0]["id"]);
    }
}

#[tokio::test]
async fn a_refusing_configure_stops_the_start_with_its_message() {
    let backend = TestBackend::start("a").await;
    let config = json!({
        "listen_address": "127.0.0.1:0",
        "backend_servers": [backend.address()],
        "strategy": probe(),
        "strategy_options": {"refuse": "table_size must be prime"},
    });
    let (_dir, path) = write(&config);
    for args in [&["--check"][..], &[][..]] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_rust_load_balancer"))
            .arg("--config")
            .arg(&path)
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("probe.wasm: configure refused the config: table_size must be prime"),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[tokio::test]
async fn a_refusing_configure_at_reload_keeps_the_old_config() {
    let backend = TestBackend::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lb.json");
    let write = |options: Value| {
        let config = json!({
            "listen_address": "127.0.0.1:0",
            "backend_servers": [backend.address()],
            "strategy": probe(),
            "strategy_options": options,
        });
        std::fs::write(&path, config.to_string()).unwrap();
    };
    write(json!({}));
    let config = Config::load(&path).unwrap();
    let proxy = rust_load_balancer::Proxy::start_from_file(config, path.clone())
        .await
        .unwrap();
    let http = Http::new(proxy.local_addr());
    write(json!({"refuse": "no zone labels"}));
    let error = proxy.reload().await.unwrap_err().to_string();
    assert!(
        error.contains("configure refused the config: no zone labels"),
        "{error}"
    );
    assert_eq!(http.get("/").await.status, StatusCode::OK);
    assert_eq!(proxy.state().config().strategy_options, json!({}));
    // And a good one goes in.
    write(json!({"pick": "last"}));
    proxy.reload().await.unwrap();
    assert_eq!(
        proxy.state().config().strategy_options,
        json!({"pick": "last"})
    );
    assert_eq!(http.get("/").await.status, StatusCode::OK);
}

#[tokio::test]
async fn module_log_lines_are_limited_to_ten_a_second_and_the_rest_counted() {
    let backend = TestBackend::start("a").await;
    let config = json!({
        "listen_address": "127.0.0.1:0",
        "admin_address": "127.0.0.1:0",
        "backend_servers": [backend.address()],
        "strategy": probe(),
        "strategy_options": {"spam": 50, "log_configure": false, "level": "warn"},
    });
    let (binary, http, _dir) = spawn(&config).await;
    // One request: one select call logs 50 lines within microseconds.
    assert_eq!(http.get("/").await.status, StatusCode::OK);
    let admin = Http::new(binary.admin_addr().expect("admin address logged"));
    let metrics = admin.get("/metrics").await.text();
    let dropped = metrics
        .lines()
        .find(|l| l.starts_with("lb_strategy_log_dropped_total "))
        .unwrap_or_else(|| panic!("{metrics}"));
    assert_eq!(dropped, "lb_strategy_log_dropped_total 40");
    let spam = events(&binary, "spam", 10).await;
    let numbers: Vec<u64> = spam.iter().map(|e| e["n"].as_u64().unwrap()).collect();
    assert_eq!(numbers, (0..10).collect::<Vec<_>>(), "the first ten pass");
    // Each line is logged at the module's level with the module's name.
    let raw: Vec<Value> = binary
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["target"] == "strategy")
        .collect();
    assert!(raw.iter().all(|l| l["level"] == "WARN"), "{raw:?}");
    assert!(raw.iter().all(|l| l["fields"]["module"]
        .as_str()
        .unwrap()
        .ends_with("probe.wasm")));
}

#[tokio::test]
async fn an_observer_steers_away_from_a_backend_answering_5xx() {
    let bad = TestBackend::start("bad").await;
    bad.state
        .status
        .store(500, std::sync::atomic::Ordering::SeqCst);
    let good = TestBackend::start("good").await;
    let mut config = support::config_for(&[&bad, &good]);
    config.strategy = rust_load_balancer::config::StrategySource::Path(support::dist("probe.wasm"));
    config.strategy_options = json!({"pick": "avoid-failing", "log_configure": false});
    let proxy = support::start_proxy(config).await;
    let http = Http::new(proxy.local_addr());
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(http.get("/").await.status.as_u16());
    }
    // Round robin starts on the bad backend: its one 500 is passed on
    // unchanged (a strategy never alters a response), then it is avoided.
    assert_eq!(statuses[0], 500);
    assert!(statuses[1..].iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(bad.hits(), 1);
    assert_eq!(good.hits(), 19);
    let faults: u64 = FaultKind::ALL
        .iter()
        .map(|k| proxy.state().balancer().faults(*k))
        .sum();
    assert_eq!(faults, 0);
}

#[tokio::test]
async fn a_trapping_0_2_0_module_is_contained_and_reconfigured() {
    let backend = TestBackend::start("a").await;
    let config = json!({
        "listen_address": "127.0.0.1:0",
        "backend_servers": [backend.address()],
        "strategy": probe(),
        "strategy_options": {"trap_on_select": true},
    });
    let (binary, http, _dir) = spawn(&config).await;
    for _ in 0..2 {
        assert_eq!(http.get("/").await.status, StatusCode::OK);
    }
    // Start-up configured one instance; each trap drops it, and the next
    // call's fresh instance is configured before it selects.
    let configured = events(&binary, "configure", 2).await;
    assert!(configured.len() >= 2, "{}", binary.log());
    assert!(binary.log().contains("strategy fault"), "{}", binary.log());
}

/// Writes a config over `backends` with `strategy` (and extra keys) to `path`.
fn write_strategy(path: &std::path::Path, backends: &[&TestBackend], strategy: &str, extra: Value) {
    let mut config = json!({
        "listen_address": "127.0.0.1:0",
        "backend_servers": backends.iter().map(|b| b.address()).collect::<Vec<_>>(),
        "strategy": strategy,
    });
    for (key, value) in extra.as_object().unwrap() {
        config[key] = value.clone();
    }
    std::fs::write(path, config.to_string()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_between_0_1_0_and_0_2_0_modules_under_load_lose_no_request() {
    let backends = [
        TestBackend::start("b0").await,
        TestBackend::start("b1").await,
        TestBackend::start("b2").await,
    ];
    let refs: Vec<&TestBackend> = backends.iter().collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lb.json");
    write_strategy(&path, &refs, "round-robin", json!({}));
    let proxy =
        rust_load_balancer::Proxy::start_from_file(Config::load(&path).unwrap(), path.clone())
            .await
            .unwrap();
    let http = Http::new(proxy.local_addr());
    let load = support::Load::start(&http, 4);
    let probe = probe();
    let steps: [(&str, Value); 6] = [
        ("consistent-hash", json!({"hash_key": "client_ip"})),
        ("round-robin", json!({})),
        ("peak-ewma", json!({})),
        ("least-connections", json!({})),
        (
            &probe,
            json!({"strategy_options": {"pick": "round-robin", "log_configure": false}}),
        ),
        ("weighted-round-robin", json!({})),
    ];
    for (strategy, extra) in steps {
        tokio::time::sleep(Duration::from_millis(150)).await;
        write_strategy(&path, &refs, strategy, extra);
        let summary = proxy
            .reload()
            .await
            .unwrap_or_else(|e| panic!("{strategy}: {e}"));
        assert!(summary.contains(strategy), "{summary}");
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (ok, failed) = load.stop().await;
    assert_eq!(failed, 0, "failed requests ({ok} answered)");
    assert!(ok > 100, "only {ok} requests answered");
    let faults: u64 = FaultKind::ALL
        .iter()
        .map(|k| proxy.state().balancer().faults(*k))
        .sum();
    assert_eq!(faults, 0);
}

/// The backend (its name) that answers a request keyed `user`.
async fn owner(http: &Http, user: &str) -> String {
    let answer = http.send(get(http, "/", &[("x-user", user)])).await;
    assert_eq!(answer.status, StatusCode::OK, "{user}");
    answer.text()
}

#[tokio::test]
async fn consistent_hashing_agrees_across_balancers_and_moves_only_a_leaving_backends_keys() {
    let mut backends = Vec::new();
    for i in 0..5 {
        backends.push(TestBackend::start(&format!("b{i}")).await);
    }
    let refs: Vec<&TestBackend> = backends.iter().collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lb.json");
    // Only live traffic marks a backend (after one failure); the active
    // checks' first round, at start, finds every backend up.
    write_strategy(
        &path,
        &refs,
        "consistent-hash",
        json!({"hash_key": "header:x-user", "unhealthy_threshold": 1, "health_check_interval": 3600}),
    );
    let config = Config::load(&path).unwrap();
    let one = rust_load_balancer::Proxy::start(config.clone())
        .await
        .unwrap();
    let other = rust_load_balancer::Proxy::start(config).await.unwrap();
    let (http_one, http_other) = (Http::new(one.local_addr()), Http::new(other.local_addr()));

    let users: Vec<String> = (0..300).map(|i| format!("user-{i}")).collect();
    let mut before = Vec::new();
    for user in &users {
        let a = owner(&http_one, user).await;
        assert_eq!(
            owner(&http_other, user).await,
            a,
            "the balancers disagree on {user}"
        );
        assert_eq!(
            owner(&http_one, user).await,
            a,
            "{user} moved between calls"
        );
        before.push(a);
    }
    for b in &backends {
        let keys = before.iter().filter(|o| **o == b.name).count();
        assert!(keys >= 30, "{} owns only {keys} of 300 keys", b.name);
    }

    // b2 goes away: its keys move (each answered, by retry, then because b2
    // is out of rotation), every other key stays where it was, and both
    // balancers still agree.
    let gone = backends.remove(2);
    gone.stop().await;
    let mut moved_to = std::collections::HashSet::new();
    for (user, was) in users.iter().zip(&before) {
        let now = owner(&http_one, user).await;
        assert_eq!(
            owner(&http_other, user).await,
            now,
            "the balancers disagree on {user}"
        );
        if was == "b2" {
            moved_to.insert(now);
        } else {
            assert_eq!(&now, was, "{user} moved although its backend stayed");
        }
    }
    assert!(moved_to.len() >= 2, "b2's keys all went to {moved_to:?}");
    assert!(!moved_to.contains("b2"));
    assert!(!one.state().pool().backends()[2].is_healthy());
}
