//! `strategy_scope`: one strategy instance for the process (the default)
//! or one per worker, through the real binary and a real module: the
//! number of instances configured, each one told of a weight change, and
//! round robin exact over all requests with one instance, per worker with
//! one each.

mod support;

use std::time::Duration;

use http::{Method, Request};
use http_body_util::Full;
use serde_json::{json, Value};
use support::{wait_until, Binary, Http, TestBackend};

async fn start(
    scope: &str,
    backends: &[&TestBackend],
    strategy: &str,
) -> (Binary, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lb.json");
    let config = json!({
        "listen_address": "127.0.0.1:0",
        "admin_address": "127.0.0.1:0",
        "backend_servers": backends.iter().map(|b| b.address()).collect::<Vec<_>>(),
        "worker_threads": 2,
        "strategy": strategy,
        "strategy_scope": scope,
        "health_check_interval": 3600,
    });
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    let binary = Binary::spawn(&path, &["--log-format", "json"]).await;
    wait_until("the admin listener", Duration::from_secs(10), || {
        binary.admin_addr().is_some()
    })
    .await;
    (binary, dir)
}

fn configures(binary: &Binary) -> usize {
    binary
        .strategy_events()
        .iter()
        .filter(|e| e["event"] == "configure")
        .count()
}

#[tokio::test]
async fn worker_scope_runs_one_configured_instance_per_worker() {
    let (a, b) = (TestBackend::start("a").await, TestBackend::start("b").await);
    let probe = support::dist("probe.wasm").display().to_string();
    for (scope, instances) in [("process", 1), ("worker", 2)] {
        let (binary, _dir) = start(scope, &[&a, &b], &probe).await;
        wait_until("the instances' configure", Duration::from_secs(10), || {
            configures(&binary) >= instances
        })
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(configures(&binary), instances, "{scope}: {}", binary.log());

        // A weight set at run time reaches every instance.
        let admin = Http::new(binary.admin_addr().unwrap());
        let answer = admin
            .send(
                Request::builder()
                    .method(Method::PUT)
                    .uri(format!("{}/backends/1/weight", admin.base()))
                    .body(Full::from("4"))
                    .unwrap(),
            )
            .await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        wait_until("configure again", Duration::from_secs(10), || {
            configures(&binary) >= 2 * instances
        })
        .await;
        let last: Vec<Value> = binary
            .strategy_events()
            .into_iter()
            .filter(|e| e["event"] == "configure")
            .collect();
        assert_eq!(last.len(), 2 * instances, "{scope}");
        assert_eq!(last.last().unwrap()["backends"][1]["weight"], 4, "{scope}");
        // And it serves.
        let http = Http::new(binary.addr().unwrap());
        assert_eq!(http.get("/").await.status, 200);
    }
}

#[tokio::test]
async fn round_robin_is_exact_for_one_connection_in_either_scope() {
    // One keep-alive connection is served by one worker: its requests
    // rotate exactly whatever the scope.
    let backends = [
        TestBackend::start("a").await,
        TestBackend::start("b").await,
        TestBackend::start("c").await,
    ];
    let refs: Vec<&TestBackend> = backends.iter().collect();
    for scope in ["process", "worker"] {
        let (binary, _dir) = start(scope, &refs, "round-robin").await;
        let http = Http::new(binary.addr().unwrap());
        let mut names = Vec::new();
        for _ in 0..9 {
            names.push(http.get("/").await.text());
        }
        for name in ["a", "b", "c"] {
            assert_eq!(
                names.iter().filter(|n| *n == name).count(),
                3,
                "{scope}: {names:?}"
            );
        }
        // Rotating: no backend twice in a row.
        assert!(names.windows(2).all(|w| w[0] != w[1]), "{scope}: {names:?}");
    }
}

#[tokio::test]
async fn an_unknown_scope_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lb.json");
    std::fs::write(
        &path,
        r#"{"listen_address": "127.0.0.1:0", "backend_servers": ["127.0.0.1:1"], "strategy_scope": "thread"}"#,
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_rust_load_balancer"))
        .arg("--config")
        .arg(&path)
        .arg("--check")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("strategy_scope") && stderr.contains("\"thread\""),
        "{stderr}"
    );
}
