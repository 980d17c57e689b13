//! Binary upgrade on SIGUSR2 and the drain that ends the old process (as on
//! SIGTERM), through the real binary: it re-executes itself
//! (`CARGO_BIN_EXE_rust_load_balancer`), hands its listening sockets over,
//! and no request fails on the way.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use support::{wait_until, Binary, Http, Load, TestBackend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// Writes `lb.json` over `backends`, both listeners on port 0 (the new
/// process of an upgrade takes the ports the old one got with its sockets).
fn write_config(dir: &std::path::Path, backends: &[&TestBackend]) -> std::path::PathBuf {
    let path = dir.join("lb.json");
    let list: Vec<String> = backends
        .iter()
        .map(|b| format!("\"{}\"", b.address()))
        .collect();
    std::fs::write(
        &path,
        format!(
            r#"{{ "listen_address": "127.0.0.1:0", "admin_address": "127.0.0.1:0",
                 "backend_servers": [{}], "worker_threads": 2, "shutdown_timeout": 10 }}"#,
            list.join(", ")
        ),
    )
    .unwrap();
    path
}

/// The admin listener's address, once logged.
async fn admin_addr(binary: &Binary) -> SocketAddr {
    let mut found = None;
    wait_until("the admin line", Duration::from_secs(10), || {
        found = binary.admin_addr();
        found.is_some()
    })
    .await;
    found.unwrap()
}

/// The PID `GET /status` reports.
async fn status_pid(admin: &Http) -> u64 {
    let status: serde_json::Value =
        serde_json::from_slice(&admin.get("/status").await.body).unwrap();
    status["pid"].as_u64().expect("a pid")
}

/// Whether `pid` is a live process (a zombie is not: nothing may reap a
/// reparented process here).
fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat.rsplit_once(") ")?.1.chars().next()?;
            Some(state != 'Z' && state != 'X')
        })
        .unwrap_or(false)
}

/// The new process of an upgrade: not the test's child (its parent has
/// exited), so stopped by its PID here, with SIGTERM, and killed if the
/// test ends early.
struct Adopted(u64);

impl Adopted {
    fn signal(&self, name: &str) {
        let _ = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.0.to_string())
            .status();
    }
}

impl Drop for Adopted {
    fn drop(&mut self) {
        if alive(self.0) {
            self.signal("KILL");
        }
    }
}

/// Clients that open a new connection for each request (`Connection:
/// close`), back to back until stopped; counts 200s and everything else
/// (a refused or reset connection, no answer, another status).
struct Reconnecting {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    first_failure: Arc<std::sync::Mutex<Option<String>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Reconnecting {
    fn start(addr: SocketAddr, clients: usize) -> Reconnecting {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let first_failure = Arc::new(std::sync::Mutex::new(None));
        let tasks = (0..clients)
            .map(|_| {
                let (stop, ok, failed, first_failure) = (
                    stop.clone(),
                    ok.clone(),
                    failed.clone(),
                    first_failure.clone(),
                );
                tokio::spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        match one_request(addr).await {
                            Ok(200) => {
                                ok.fetch_add(1, Ordering::SeqCst);
                            }
                            other => {
                                failed.fetch_add(1, Ordering::SeqCst);
                                first_failure
                                    .lock()
                                    .unwrap()
                                    .get_or_insert(format!("{other:?}"));
                            }
                        }
                    }
                })
            })
            .collect();
        Reconnecting {
            stop,
            ok,
            failed,
            first_failure,
            tasks,
        }
    }

    fn ok(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
    }

    /// `(answered 200, failed, the first failure)`.
    async fn stop(self) -> (usize, usize, Option<String>) {
        self.stop.store(true, Ordering::SeqCst);
        for task in self.tasks {
            task.await.unwrap();
        }
        let first = self.first_failure.lock().unwrap().take();
        (
            self.ok.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
            first,
        )
    }
}

/// `GET /` on a new connection; the status.
async fn one_request(addr: SocketAddr) -> Result<u16, String> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut answer = Vec::new();
        stream
            .read_to_end(&mut answer)
            .await
            .map_err(|e| format!("read: {e}"))?;
        status_of(&answer).ok_or_else(|| format!("no status line in {answer:?}"))
    };
    tokio::time::timeout(Duration::from_secs(20), exchange)
        .await
        .map_err(|_| "no answer within 20 s".to_string())?
}

fn status_of(answer: &[u8]) -> Option<u16> {
    let line = answer.split(|&b| b == b'\r').next()?;
    std::str::from_utf8(line.strip_prefix(b"HTTP/1.1 ")?)
        .ok()?
        .get(..3)?
        .parse()
        .ok()
}

/// Reads one response with a `Content-Length` body from `stream`; returns
/// its head (lowercased) and body.
async fn read_response(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .expect("an answer within 10 s")
            .expect("a readable connection");
        assert!(
            n > 0,
            "the connection closed before a whole head: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&got[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .expect("a content-length");
    while got.len() < head_end + length {
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the body was cut");
        got.extend_from_slice(&chunk[..n]);
    }
    (head, got[head_end..head_end + length].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_hands_over_to_a_new_process_under_load_without_a_failed_request() {
    let backends = [
        TestBackend::start("b0").await,
        TestBackend::start("b1").await,
    ];
    let refs: Vec<&TestBackend> = backends.iter().collect();
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &refs);
    let mut binary = Binary::spawn(&path, &[]).await;
    let addr = binary.addr().unwrap();
    let admin = Http::new(admin_addr(&binary).await);
    let old_pid = u64::from(binary.child.id());
    assert_eq!(status_pid(&admin).await, old_pid);

    // Keep-alive clients and clients connecting anew for each request, both
    // running through the whole upgrade.
    let keep_alive = Load::start(&Http::new(addr), 4);
    let reconnecting = Reconnecting::start(addr, 4);
    wait_until("load on the old process", Duration::from_secs(10), || {
        reconnecting.ok() > 200
    })
    .await;

    binary.signal("USR2");
    let status = binary.wait_exit(Duration::from_secs(60)).await;
    assert!(status.success(), "{status:?}: {}", binary.log());
    let log = binary.log();
    let new_pid: u64 = log
        .lines()
        .find_map(|l| {
            let rest = &l[l.find("upgrade: the new process (pid ")? + 30..];
            rest[..rest.find(')')?].parse().ok()
        })
        .unwrap_or_else(|| panic!("no upgrade line: {log}"));
    let new = Adopted(new_pid);
    assert_ne!(new_pid, old_pid);
    assert!(alive(new_pid), "{log}");

    // The old process has gone: whatever answers now is the new one.
    let served_before = reconnecting.ok();
    wait_until("load on the new process", Duration::from_secs(10), || {
        reconnecting.ok() > served_before + 200
    })
    .await;
    assert_eq!(status_pid(&admin).await, new_pid);
    let (ok, failed) = keep_alive.stop().await;
    assert_eq!(
        failed, 0,
        "keep-alive clients: {failed} failed, {ok} answered"
    );
    eprintln!("keep-alive clients: {ok} answered");
    let (ok, failed, first) = reconnecting.stop().await;
    eprintln!(
        "new-connection clients: {ok} answered, {served_before} before the old process exited"
    );
    assert_eq!(
        failed,
        0,
        "new-connection clients: {failed} failed ({first:?}), {ok} answered: {}",
        binary.log()
    );
    assert!(
        backends.iter().all(|b| b.hits() > 0),
        "both backends were used"
    );
    let log = binary.log();
    assert!(log.contains("SIGUSR2: upgrading"), "{log}");
    assert!(log.contains("taking over from the old process"), "{log}");

    // The new process stops on SIGTERM as any would.
    new.signal("TERM");
    wait_until("the new process stopped", Duration::from_secs(20), || {
        !alive(new_pid)
    })
    .await;
}

#[tokio::test]
async fn an_upgrade_whose_new_process_fails_leaves_the_old_one_serving() {
    let backend = TestBackend::start("b0").await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &[&backend]);
    let mut binary = Binary::spawn(&path, &[]).await;
    let http = Http::new(binary.addr().unwrap());
    let admin = Http::new(admin_addr(&binary).await);
    assert_eq!(http.get("/").await.status, StatusCode::OK);

    // The new process reads the config again, and exits 1 on this one.
    std::fs::write(
        &path,
        r#"{ "listen_address": "127.0.0.1:0", "backend_servers": [] "#,
    )
    .unwrap();
    binary.signal("USR2");
    wait_until("the failed upgrade logged", Duration::from_secs(30), || {
        binary.log().contains("upgrade failed")
    })
    .await;
    let log = binary.log();
    let line = log.lines().find(|l| l.contains("upgrade failed")).unwrap();
    assert!(
        line.contains("exited before it was serving (exit status: 1)")
            && line.contains("this process keeps serving"),
        "{line}"
    );
    assert!(binary.child.try_wait().unwrap().is_none(), "{log}");
    assert_eq!(http.get("/").await.text(), "b0");
    assert_eq!(status_pid(&admin).await, u64::from(binary.child.id()));

    binary.signal("TERM");
    let status = binary.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "{status:?}: {}", binary.log());
}

#[tokio::test]
async fn a_request_on_an_idle_keep_alive_connection_during_the_drain_is_answered() {
    let backend = TestBackend::start("b0").await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &[&backend]);
    let mut binary = Binary::spawn(&path, &[]).await;
    let mut stream = TcpStream::connect(binary.addr().unwrap()).await.unwrap();
    let request = b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n";
    stream.write_all(request).await.unwrap();
    let (head, body) = read_response(&mut stream).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    assert_eq!(body, b"b0");

    // The connection is idle when the drain begins; its next request comes
    // just after.
    binary.signal("TERM");
    wait_until("the drain began", Duration::from_secs(10), || {
        binary.log().contains("stopping")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stream.write_all(request).await.unwrap();
    let (head, body) = read_response(&mut stream).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(body, b"b0");
    // Then the balancer closes it.
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
        .await
        .expect("closed within 10 s")
        .unwrap_or(0);
    assert_eq!(n, 0, "{rest:?}");
    let status = binary.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "{status:?}: {}", binary.log());
}
