//! Test support over real loopback sockets: [`TestBackend`] is a small HTTP
//! server that counts what it receives; [`start_proxy`] runs the balancer on
//! an ephemeral port; [`Http`] is a keep-alive client.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::channel::Channel;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rust_load_balancer::{Config, Proxy};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

pub mod tls;

/// A path inside the repo's committed plugin outputs.
pub fn dist(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("plugins/dist")
        .join(name)
}

/// What a test backend counts and how it behaves; shared with its tasks.
#[derive(Debug, Default)]
pub struct BackendState {
    /// Requests received.
    pub hits: AtomicUsize,
    /// TCP connections accepted.
    pub accepts: AtomicUsize,
    /// TCP connections that have ended (closed by either side).
    pub closed: AtomicUsize,
    /// Milliseconds to wait before answering any request.
    pub delay_ms: AtomicU64,
    /// Status of `GET /health` (200 unless set).
    pub health_status: AtomicU16,
    /// Status of the default route (200 unless set).
    pub status: AtomicU16,
    /// Headers of the last request, as `name: value` lines.
    pub last_headers: Mutex<Vec<(String, String)>>,
    /// Bodies of requests to `/record`, in arrival order.
    pub recorded: Mutex<Vec<Bytes>>,
    /// `/stream` sends its second and third chunk only after a notification.
    pub gate: Arc<tokio::sync::Notify>,
}

/// A real HTTP/1.1 server on 127.0.0.1. Routes:
/// - any path: `200` with the backend's name as body;
/// - `/echo`: the request body back;
/// - `/stream`: `part1 `, then `part2 ` and `part3 ` each after a `gate`
///   notification, so a test can prove chunks are forwarded as they come;
/// - `/health`: the status in `health_status`;
/// - `/record`: stores the body, then answers `200`.
pub struct TestBackend {
    /// The name it answers with.
    pub name: String,
    addr: SocketAddr,
    /// Counters and behaviour.
    pub state: Arc<BackendState>,
    task: JoinHandle<()>,
}

impl TestBackend {
    /// Starts a backend on an ephemeral port.
    pub async fn start(name: &str) -> TestBackend {
        TestBackend::start_on("127.0.0.1:0".parse().unwrap(), name, Arc::default()).await
    }

    /// Starts a backend on `addr`, sharing `state` (to restart one in place).
    pub async fn start_on(addr: SocketAddr, name: &str, state: Arc<BackendState>) -> TestBackend {
        let listener = bind_retrying(addr).await;
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(accept_loop(listener, name.to_string(), Arc::clone(&state)));
        TestBackend {
            name: name.to_string(),
            addr,
            state,
            task,
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `host:port` for a config.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// Requests received so far.
    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn accepts(&self) -> usize {
        self.state.accepts.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.accepts() - self.state.closed.load(Ordering::SeqCst)
    }

    /// Stops listening and drops every open connection.
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// Rebinding a port just released can briefly fail; try for a while.
async fn bind_retrying(addr: SocketAddr) -> TcpListener {
    for _ in 0..100 {
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    panic!("cannot bind {addr}");
}

async fn accept_loop(listener: TcpListener, name: String, state: Arc<BackendState>) {
    // Connections live in this set, so aborting the loop drops them all.
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        state.accepts.fetch_add(1, Ordering::SeqCst);
        let state = Arc::clone(&state);
        let name = name.clone();
        connections.spawn(async move {
            let counts = Arc::clone(&state);
            let service = service_fn(move |request| {
                let state = Arc::clone(&state);
                let name = name.clone();
                async move { Ok::<_, Infallible>(respond(request, &name, &state).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
            counts.closed.fetch_add(1, Ordering::SeqCst);
        });
        while connections.try_join_next().is_some() {}
    }
}

type TestBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// The whole request body (empty if the client broke off).
async fn read_body(request: Request<Incoming>) -> Bytes {
    request
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default()
}

async fn respond(
    request: Request<Incoming>,
    name: &str,
    state: &BackendState,
) -> Response<TestBody> {
    state.hits.fetch_add(1, Ordering::SeqCst);
    *state.last_headers.lock().unwrap() = request
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let delay = state.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let full = |status: StatusCode, body: Bytes| {
        let mut r = Response::new(Full::new(body).boxed());
        *r.status_mut() = status;
        r
    };
    match request.uri().path() {
        "/echo" => full(StatusCode::OK, read_body(request).await),
        "/record" => {
            let body = read_body(request).await;
            state.recorded.lock().unwrap().push(body);
            full(StatusCode::OK, Bytes::from(name.to_string()))
        }
        "/stream" => {
            let (mut tx, body) = Channel::<Bytes, Infallible>::new(1);
            let gate = Arc::clone(&state.gate);
            tokio::spawn(async move {
                for i in 1..=3 {
                    if i > 1 {
                        gate.notified().await;
                    }
                    if tx
                        .send_data(Bytes::from(format!("part{i} ")))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
            Response::new(body.boxed())
        }
        "/health" => {
            let status = match state.health_status.load(Ordering::SeqCst) {
                0 => 200,
                s => s,
            };
            full(
                StatusCode::from_u16(status).unwrap(),
                Bytes::from_static(b"health"),
            )
        }
        _ => {
            let status = match state.status.load(Ordering::SeqCst) {
                0 => 200,
                s => s,
            };
            full(
                StatusCode::from_u16(status).unwrap(),
                Bytes::from(name.to_string()),
            )
        }
    }
}

/// Starts the balancer on an ephemeral port with `config`.
pub async fn start_proxy(mut config: Config) -> Proxy {
    config.listen_address = "127.0.0.1:0".parse().unwrap();
    Proxy::start(config).await.expect("balancer starts")
}

/// A config over `backends` with defaults elsewhere.
pub fn config_for(backends: &[&TestBackend]) -> Config {
    let addresses: Vec<String> = backends.iter().map(|b| b.address()).collect();
    let refs: Vec<&str> = addresses.iter().map(String::as_str).collect();
    Config::new("127.0.0.1:0".parse().unwrap(), &refs)
}

/// A keep-alive HTTP client for talking to the balancer.
#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

/// A response, fully read.
#[derive(Debug)]
pub struct Answer {
    /// Status code.
    pub status: StatusCode,
    /// Headers.
    pub headers: http::HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Answer {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Http {
    /// A client for `http://addr`.
    pub fn new(addr: SocketAddr) -> Http {
        Http {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base: format!("http://{addr}"),
        }
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Answer {
        self.send(
            Request::get(format!("{}{path}", self.base))
                .body(Full::default())
                .unwrap(),
        )
        .await
    }

    /// `POST path` with `body`.
    pub async fn post(&self, path: &str, body: impl Into<Bytes>) -> Answer {
        self.send(
            Request::post(format!("{}{path}", self.base))
                .body(Full::new(body.into()))
                .unwrap(),
        )
        .await
    }

    /// Sends a request, reads the whole response; panics on a transport error
    /// (the balancer must always answer).
    pub async fn send(&self, request: Request<Full<Bytes>>) -> Answer {
        let response = tokio::time::timeout(Duration::from_secs(20), self.client.request(request))
            .await
            .expect("the balancer answers within 20 s")
            .expect("the balancer answers");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("a whole body").to_bytes();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    /// The underlying client.
    pub fn raw(&self) -> &Client<HttpConnector, Full<Bytes>> {
        &self.client
    }

    /// `http://addr`.
    pub fn base(&self) -> &str {
        &self.base
    }
}

/// A raw TCP backend that reads each request whole (head and
/// `Content-Length` body), counts it, then resets the connection without
/// answering: a backend failing after the request was sent.
pub struct ResetBackend {
    addr: SocketAddr,
    /// Requests read in full before the reset.
    pub received: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl ResetBackend {
    /// Starts one on an ephemeral port.
    pub async fn start() -> ResetBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&received);
        let task = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                let counter = Arc::clone(&counter);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Ok(n) = stream.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                            let length: usize = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse().ok())
                                .unwrap_or(0);
                            if buf.len() >= end + 4 + length {
                                break;
                            }
                        }
                    }
                    counter.fetch_add(1, Ordering::SeqCst);
                    let _ = stream.set_zero_linger();
                    drop(stream);
                });
            }
        });
        ResetBackend {
            addr,
            received,
            task,
        }
    }

    /// `host:port` for a config.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for ResetBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP listener that accepts connections and never reads or answers.
pub struct BlackHole {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl BlackHole {
    /// Starts one on an ephemeral port.
    pub async fn start() -> BlackHole {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        BlackHole { addr, task }
    }

    /// `host:port` for a config.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until `condition` holds, checking every 20 ms, for at most
/// `limit`; returns how long it took, or panics naming `what`.
pub async fn wait_until(
    what: &str,
    limit: Duration,
    mut condition: impl FnMut() -> bool,
) -> Duration {
    let started = std::time::Instant::now();
    while !condition() {
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

/// A free loopback port: bound, read, released. Another process could take
/// it in between; tests that need a fixed port for the binary accept that.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The balancer binary run as a child process, stderr captured to a file.
/// Killed (by its own PID) when dropped, if still running.
pub struct Binary {
    /// The child process.
    pub child: std::process::Child,
    /// Where its stderr (the logs) goes.
    pub log_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Binary {
    /// Starts `rust_load_balancer --config <config> <args>`, then waits until
    /// `port` accepts connections.
    pub async fn start(config: &std::path::Path, args: &[&str], port: u16) -> Binary {
        let binary = Binary::launch(config, args);
        let started = std::time::Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the balancer did not listen on {port}: {}",
                binary.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        binary
    }

    /// Starts `rust_load_balancer --config <config> <args>` and waits until
    /// it logs where it listens; the config's `listen_address` (and
    /// `admin_address`) may use port 0: the addresses are read from the
    /// balancer's own log lines, so no port is guessed.
    pub async fn spawn(config: &std::path::Path, args: &[&str]) -> Binary {
        Binary::spawn_under("", config, args).await
    }

    /// [`Binary::spawn`] through `sh -c`, running the shell commands
    /// `setup` (such as `ulimit -n 100`) first, then `exec`ing the balancer
    /// (so its PID is the child's).
    pub async fn spawn_under(setup: &str, config: &std::path::Path, args: &[&str]) -> Binary {
        let mut binary = Binary::launch_under(setup, config, args);
        let started = std::time::Instant::now();
        while binary.addr().is_none() {
            if let Some(status) = binary.child.try_wait().unwrap() {
                panic!(
                    "the balancer exited ({status}) before listening: {}",
                    binary.log()
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the balancer did not log where it listens: {}",
                binary.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        binary
    }

    /// Runs `rust_load_balancer --config <config> <args>` with its stderr
    /// going to a log file.
    fn launch(config: &std::path::Path, args: &[&str]) -> Binary {
        Binary::launch_under("", config, args)
    }

    fn launch_under(setup: &str, config: &std::path::Path, args: &[&str]) -> Binary {
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("stderr.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let binary = env!("CARGO_BIN_EXE_rust_load_balancer");
        let mut command = if setup.is_empty() {
            std::process::Command::new(binary)
        } else {
            let mut shell = std::process::Command::new("sh");
            shell
                .arg("-c")
                .arg(format!("{setup} && exec \"$0\" \"$@\""))
                .arg(binary);
            shell
        };
        let child = command
            .arg("--config")
            .arg(config)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the binary starts");
        Binary {
            child,
            log_path,
            _dir: dir,
        }
    }

    /// Where it listens, from its start-up line (`listening on ADDR: ...`).
    pub fn addr(&self) -> Option<SocketAddr> {
        logged_address(&self.log(), "listening on ", ':')
    }

    /// Where its admin API listens, from its log (`admin API on http://ADDR`).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        logged_address(&self.log(), "admin API on http://", ' ')
    }

    /// Where its TLS listener listens, from its log (`TLS listener on
    /// https://ADDR ...`).
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        logged_address(&self.log(), "TLS listener on https://", ' ')
    }

    /// The lines a strategy module logged, each parsed as JSON, in order
    /// (the balancer must run with `--log-format json`; modules such as
    /// `probe` log one JSON object per line).
    pub fn strategy_events(&self) -> Vec<serde_json::Value> {
        self.log()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|line| line["target"] == "strategy")
            .map(|line| {
                let message = line["fields"]["message"].as_str().unwrap_or_default();
                serde_json::from_str(message).unwrap_or(serde_json::Value::String(message.into()))
            })
            .collect()
    }

    /// Sends a signal (`HUP`, `TERM`, ...) to the child, by its PID.
    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits for the child to exit, for at most `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let started = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < limit,
                "the balancer did not exit within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The address after `prefix` in a log, up to `end` after the port (or a
/// quote or the end of the line).
fn logged_address(log: &str, prefix: &str, end: char) -> Option<SocketAddr> {
    log.lines().find_map(|line| {
        let rest = &line[line.find(prefix)? + prefix.len()..];
        let colon = rest.find(':')?;
        let stop = rest[colon + 1..]
            .find([end, '"', ' '])
            .map_or(rest.len(), |i| colon + 1 + i);
        rest[..stop].parse().ok()
    })
}

impl Drop for Binary {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Continuous load: `clients` tasks each sending `GET /` back to back until
/// stopped, counting answers that were not 200.
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts the clients.
    pub fn start(http: &Http, clients: usize) -> Load {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let tasks = (0..clients)
            .map(|_| {
                let (http, stop, ok, failed) =
                    (http.clone(), stop.clone(), ok.clone(), failed.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        if http.get("/").await.status == StatusCode::OK {
                            ok.fetch_add(1, Ordering::SeqCst);
                        } else {
                            failed.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            tasks,
        }
    }

    /// Stops the clients, waits for their last requests, and returns
    /// `(answered 200, answered otherwise)`.
    pub async fn stop(self) -> (usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        for task in self.tasks {
            task.await.unwrap();
        }
        (
            self.ok.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
        )
    }
}

/// Reads `stream` until the peer closes it or `limit` passes; returns what
/// came, and whether it closed (a read error counts as closed).
pub async fn read_to_close(stream: &mut tokio::net::TcpStream, limit: Duration) -> (String, bool) {
    use tokio::io::AsyncReadExt;
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = std::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return (String::from_utf8_lossy(&received).into_owned(), true)
            }
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&received).into_owned(), false),
        }
    }
}
