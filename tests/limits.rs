//! Running under a service manager: the open-file limit raised at start-up
//! and a warning when it is still too low for the config, accepts that
//! fail for lack of descriptors logged once a second while the balancer
//! keeps serving, logs without colour codes when they go to a file, and
//! `GET /status`.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::{wait_until, Binary, Http, TestBackend};

fn write_config(dir: &std::path::Path, config: &Value) -> std::path::PathBuf {
    let path = dir.join("lb.json");
    std::fs::write(&path, serde_json::to_vec_pretty(config).unwrap()).unwrap();
    path
}

/// The soft and hard open-file limits of process `pid`, from `/proc`.
fn file_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let fields: Vec<&str> = line.split_whitespace().collect();
    (fields[3].to_string(), fields[4].to_string())
}

fn accept_failures(log: &str) -> usize {
    log.lines().filter(|l| l.contains("accept failed")).count()
}

#[tokio::test]
async fn the_soft_file_limit_is_raised_to_the_hard_one() {
    let backend = TestBackend::start("b").await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &json!({"listen_address": "127.0.0.1:0", "backend_servers": [backend.address()],
                "max_connections": 100, "worker_threads": 1}),
    );
    // A low soft limit under a higher hard one, as a service manager may
    // leave it.
    let binary = Binary::spawn_under("ulimit -Sn 64 && ulimit -Hn 4096", &path, &[]).await;
    let (soft, hard) = file_limits(binary.child.id());
    assert_eq!(hard, "4096");
    assert_eq!(soft, "4096", "the soft limit was not raised");
    assert!(
        !binary.log().contains("open-file limit"),
        "no warning when the raised limit suffices: {}",
        binary.log()
    );
}

#[tokio::test]
async fn too_low_a_limit_is_a_warning_and_running_out_is_logged_once_a_second() {
    let backend = TestBackend::start("b").await;
    let dir = tempfile::tempdir().unwrap();
    // max_connections (default 10,000) cannot fit under 128 descriptors.
    let path = write_config(
        dir.path(),
        &json!({"listen_address": "127.0.0.1:0", "backend_servers": [backend.address()],
                "worker_threads": 1}),
    );
    let binary = Binary::spawn_under("ulimit -n 128", &path, &[]).await;
    let log = binary.log();
    assert!(
        log.contains("open-file limit (128)") && log.contains("max_connections (10000)"),
        "{log}"
    );
    let addr = binary.addr().unwrap();
    let http = Http::new(addr);
    assert_eq!(http.get("/").await.status, 200);

    // More connections than descriptors: the rest wait in the accept
    // queue while accepts fail with EMFILE.
    let mut held = Vec::new();
    for _ in 0..200 {
        match tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
            .await
        {
            Ok(Ok(stream)) => held.push(stream),
            _ => break,
        }
    }
    assert!(held.len() > 128, "only {} connections made", held.len());
    wait_until("an accept failure logged", Duration::from_secs(10), || {
        accept_failures(&binary.log()) > 0
    })
    .await;
    let before = accept_failures(&binary.log());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = accept_failures(&binary.log()) - before;
    // Once a second at most (a spinning loop wrote about 90 a second).
    assert!(during <= 4, "{during} accept failure lines in 3 s");
    assert!(
        binary.log().contains("Too many open files"),
        "{}",
        binary.log()
    );

    // Descriptors back: the waiting connections are accepted and served.
    drop(held);
    let answer = tokio::time::timeout(Duration::from_secs(10), http.get("/"))
        .await
        .expect("served again within 10 s");
    assert_eq!(answer.status, 200);
}

#[tokio::test]
async fn logs_to_a_file_carry_no_colour_codes() {
    let backend = TestBackend::start("b").await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &json!({"listen_address": "127.0.0.1:0", "backend_servers": [backend.address()],
                "access_log": true}),
    );
    // Both with NO_COLOR unset and set: stderr is a file either way.
    for setup in ["unset NO_COLOR", "export NO_COLOR=1"] {
        let binary = Binary::spawn_under(setup, &path, &[]).await;
        Http::new(binary.addr().unwrap()).get("/").await;
        wait_until("the access log line", Duration::from_secs(5), || {
            binary.log().contains("request")
        })
        .await;
        let log = binary.log();
        assert!(log.contains(" INFO "), "{log}");
        assert!(
            !log.contains('\u{1b}'),
            "colour codes in a log file: {log:?}"
        );
    }
}

#[tokio::test]
async fn status_tells_pid_version_uptime_and_reloads() {
    let backend = TestBackend::start("b").await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &json!({"listen_address": "127.0.0.1:0", "admin_address": "127.0.0.1:0",
                "backend_servers": [backend.address()]}),
    );
    let binary = Binary::spawn(&path, &[]).await;
    wait_until("the admin listener", Duration::from_secs(10), || {
        binary.admin_addr().is_some()
    })
    .await;
    let admin = Http::new(binary.admin_addr().unwrap());
    let status: Value = serde_json::from_str(&admin.get("/status").await.text()).unwrap();
    assert_eq!(status["pid"], binary.child.id());
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(status["config_reloads"], 0);
    assert!(status["uptime_seconds"].as_u64().unwrap() < 60);

    binary.signal("HUP");
    wait_until("the reload", Duration::from_secs(10), || {
        binary.log().contains("config reloaded")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let status: Value = serde_json::from_str(&admin.get("/status").await.text()).unwrap();
    assert_eq!(status["config_reloads"], 1);
    assert!(status["uptime_seconds"].as_u64().unwrap() >= 1);
    // A rejected reload is not counted.
    std::fs::write(&path, "{").unwrap();
    let answer = admin
        .send(
            http::Request::post(format!("{}/reload", admin.base()))
                .body(Default::default())
                .unwrap(),
        )
        .await;
    assert_eq!(answer.status, 422);
    let status: Value = serde_json::from_str(&admin.get("/status").await.text()).unwrap();
    assert_eq!(status["config_reloads"], 1);
}
