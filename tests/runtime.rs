//! Run-time control of backends on the admin listener and outlier
//! detection, through the real binary: drain and enable under load with no
//! failed request and no new request to a drained backend, a weight set at
//! run time, both surviving a reload, and a backend answering 5xx ejected,
//! kept out, readmitted, and never more than the allowed share ejected.

mod support;

use std::time::Duration;

use http::{Method, Request, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};
use support::{wait_until, Binary, Http, Load, TestBackend};

struct Lb {
    dir: tempfile::TempDir,
    binary: Binary,
    admin: Http,
    http: Http,
}

impl Lb {
    async fn start(config: Value) -> Lb {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lb.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
        let binary = Binary::spawn(&path, &[]).await;
        wait_until("the admin listener", Duration::from_secs(10), || {
            binary.admin_addr().is_some()
        })
        .await;
        let admin = Http::new(binary.admin_addr().unwrap());
        let http = Http::new(binary.addr().unwrap());
        Lb {
            dir,
            binary,
            admin,
            http,
        }
    }

    async fn backends(&self) -> Value {
        serde_json::from_str(&self.admin.get("/backends").await.text()).unwrap()
    }

    async fn call(&self, method: Method, path: &str, body: &str) -> (StatusCode, String) {
        let answer = self
            .admin
            .send(
                Request::builder()
                    .method(method)
                    .uri(format!("{}{path}", self.admin.base()))
                    .body(Full::from(body.to_string()))
                    .unwrap(),
            )
            .await;
        (answer.status, answer.text())
    }

    fn rewrite(&self, config: &Value) {
        let path = self.dir.path().join("lb.json");
        std::fs::write(path, serde_json::to_vec_pretty(config).unwrap()).unwrap();
    }
}

fn base_config(backends: &[&TestBackend], extra: Value) -> Value {
    let mut config = json!({
        "listen_address": "127.0.0.1:0",
        "admin_address": "127.0.0.1:0",
        "backend_servers": backends.iter().map(|b| b.address()).collect::<Vec<_>>(),
        "worker_threads": 2,
        "health_check_interval": 3600,
    });
    for (key, value) in extra.as_object().unwrap() {
        config[key] = value.clone();
    }
    config
}

#[tokio::test]
async fn drain_and_enable_under_load_fail_nothing_and_a_drained_backend_gets_nothing_new() {
    let (a, b, c) = (
        TestBackend::start("a").await,
        TestBackend::start("b").await,
        TestBackend::start("c").await,
    );
    let lb = Lb::start(base_config(&[&a, &b, &c], json!({}))).await;
    let load = Load::start(&lb.http, 8);
    wait_until("traffic on b", Duration::from_secs(10), || b.hits() > 50).await;
    assert!(b.open_connections() > 0, "the pool keeps connections to b");

    let (status, body) = lb.call(Method::POST, "/backends/1/drain", "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["state"],
        "draining"
    );
    // Requests already sent to b finish; none is sent after the drain.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let settled = b.hits();
    let others = a.hits() + c.hits();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(b.hits(), settled, "a drained backend got new requests");
    assert!(
        a.hits() + c.hits() > others + 50,
        "the others carry the load"
    );
    assert_eq!(lb.backends().await[1]["state"], "draining");
    // Its idle pooled connections are closed (by each worker's sweep).
    wait_until(
        "b's pooled connections closed",
        Duration::from_secs(5),
        || b.open_connections() == 0,
    )
    .await;

    let (status, body) = lb.call(Method::POST, "/backends/1/enable", "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_until("traffic on b again", Duration::from_secs(10), || {
        b.hits() > settled + 50
    })
    .await;
    assert_eq!(lb.backends().await[1]["state"], "active");
    let (ok, failed) = load.stop().await;
    assert_eq!(failed, 0, "{} failed of {}", failed, ok + failed);
    assert!(ok > 300, "{ok}");
}

#[tokio::test]
async fn a_drain_and_a_weight_survive_a_reload_while_the_address_stays() {
    let (a, b) = (TestBackend::start("a").await, TestBackend::start("b").await);
    let config = base_config(&[&a, &b], json!({"strategy": "weighted-round-robin"}));
    let lb = Lb::start(config.clone()).await;

    let (status, body) = lb.call(Method::PUT, "/backends/0/weight", "3").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Weighted round robin over one cycle of 4: a three times, b once.
    let mut names = Vec::new();
    for _ in 0..8 {
        names.push(lb.http.get("/").await.text());
    }
    assert_eq!(names.iter().filter(|n| *n == "a").count(), 6, "{names:?}");

    for (bad, why) in [
        ("0", "below 1"),
        ("x", "not a number"),
        ("2000000", "above the maximum"),
    ] {
        let (status, body) = lb.call(Method::PUT, "/backends/0/weight", bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{why}: {body}");
    }
    assert_eq!(
        lb.call(Method::POST, "/backends/9/drain", "").await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        lb.call(Method::GET, "/backends/0/drain", "").await.0,
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(
        lb.call(Method::POST, "/backends/1/drain", "").await.0,
        StatusCode::OK
    );

    // A reload that puts b first: both settings follow the addresses.
    let mut reordered = config.clone();
    reordered["backend_servers"] = json!([b.address(), a.address()]);
    lb.rewrite(&reordered);
    let (status, body) = lb.call(Method::POST, "/reload", "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let listed = lb.backends().await;
    assert_eq!(listed[0]["address"], b.address().as_str());
    assert_eq!(listed[0]["state"], "draining", "{listed}");
    assert_eq!(listed[1]["weight"], 3, "{listed}");
    assert_eq!(listed[1]["configured_weight"], 1, "{listed}");
    let before = b.hits();
    for _ in 0..6 {
        assert_eq!(lb.http.get("/").await.text(), "a");
    }
    assert_eq!(b.hits(), before);
}

#[tokio::test]
async fn a_backend_answering_5xx_is_ejected_then_readmitted() {
    let (a, b, c) = (
        TestBackend::start("a").await,
        TestBackend::start("b").await,
        TestBackend::start("c").await,
    );
    b.state
        .status
        .store(500, std::sync::atomic::Ordering::SeqCst);
    let lb = Lb::start(base_config(
        &[&a, &b, &c],
        json!({"outlier_consecutive_5xx": 3, "outlier_base_ejection_time": 1.5,
               "worker_threads": 1}),
    ))
    .await;
    // Round robin: b gets every third request; its third 500 ejects it.
    let mut statuses = Vec::new();
    for _ in 0..9 {
        statuses.push(lb.http.get("/").await.status.as_u16());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 500).count(),
        3,
        "{statuses:?}"
    );
    let listed = lb.backends().await;
    assert_eq!(listed[1]["state"], "ejected", "{listed}");
    assert_eq!(listed[1]["ejections_total"], 1);
    assert!(lb
        .binary
        .log()
        .contains("ejected for 1.5s after 3 consecutive 5xx"));
    // While out, every request goes elsewhere.
    let before = b.hits();
    for _ in 0..12 {
        assert_eq!(lb.http.get("/").await.status, StatusCode::OK);
    }
    assert_eq!(b.hits(), before);
    let metrics = lb.admin.get("/metrics").await.text();
    assert!(
        metrics.contains(&format!(
            "lb_outlier_ejections_total{{backend=\"{}\"}} 1",
            b.address()
        )),
        "{metrics}"
    );

    // Back after its time, fixed: it serves again.
    b.state
        .status
        .store(200, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let before = b.hits();
    for _ in 0..6 {
        assert_eq!(lb.http.get("/").await.status, StatusCode::OK);
    }
    assert_eq!(b.hits(), before + 2, "b readmitted");
    assert_eq!(lb.backends().await[1]["state"], "active");

    // Failing again: a second ejection in a row lasts twice as long.
    b.state
        .status
        .store(503, std::sync::atomic::Ordering::SeqCst);
    for _ in 0..9 {
        lb.http.get("/").await;
    }
    assert!(
        lb.binary
            .log()
            .contains("ejected for 3s after 3 consecutive 5xx"),
        "{}",
        lb.binary.log()
    );
}

#[tokio::test]
async fn no_more_than_the_allowed_share_is_ejected() {
    // Three backends all answering 500, at most 50 %: one is ejected, the
    // other two stay in (rounded down, 1 of 3).
    let backends = [
        TestBackend::start("a").await,
        TestBackend::start("b").await,
        TestBackend::start("c").await,
    ];
    for b in &backends {
        b.state
            .status
            .store(500, std::sync::atomic::Ordering::SeqCst);
    }
    let refs: Vec<&TestBackend> = backends.iter().collect();
    let lb = Lb::start(base_config(
        &refs,
        json!({"outlier_consecutive_5xx": 2, "outlier_base_ejection_time": 60}),
    ))
    .await;
    for _ in 0..30 {
        assert_eq!(
            lb.http.get("/").await.status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
    let listed = lb.backends().await;
    let ejected = listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["state"] == "ejected")
        .count();
    assert_eq!(ejected, 1, "{listed}");
    assert!(lb
        .binary
        .log()
        .contains("stays in: outlier_max_ejection_percent (50 %)"));

    // 0 turns detection off.
    let lb = Lb::start(base_config(&refs, json!({"outlier_consecutive_5xx": 0}))).await;
    for _ in 0..30 {
        lb.http.get("/").await;
    }
    let listed = lb.backends().await;
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["state"] == "active"),
        "{listed}"
    );
}
