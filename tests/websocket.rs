//! WebSocket tunnels through the real binary: upgrades forwarded on both
//! listeners (ws and wss) to a real WebSocket server, many tunnels at once,
//! refused upgrades as normal responses, `h2c` not forwarded, the idle
//! timeout, shutdown and reload with a tunnel open, and the tunnel counted
//! in `/backends` and `lb_tunnels_active`.

mod support;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use serde_json::{json, Value};
use support::tls::{client_config, tls_addr, TestCa};
use support::{wait_until, Binary, Http, TestBackend};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

// ---------------------------------------------------------------------------
// A WebSocket endpoint over any async stream: tokio-tungstenite's
// `WebSocketStream`, with the few steps the tests need.
// ---------------------------------------------------------------------------

/// One end of a WebSocket connection.
struct Ws<S> {
    ws: WebSocketStream<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Ws<S> {
    /// The client handshake for `path` over `io` (tungstenite's: a random
    /// key, the answer's accept proof checked); `Err` with the answer's
    /// status if the server did not switch protocols.
    async fn client(io: S, host: &str, path: &str) -> Result<Ws<S>, WsError> {
        let request = format!("ws://{host}{path}").into_client_request()?;
        let (ws, response) = tokio_tungstenite::client_async(request, io).await?;
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        Ok(Ws { ws })
    }

    /// The server side after a `101` was written; `early` is what the
    /// client sent after its request head.
    async fn server(io: S, early: Vec<u8>) -> Ws<S> {
        Ws {
            ws: WebSocketStream::from_partially_read(io, early, Role::Server, None).await,
        }
    }

    /// Sends one message.
    async fn send(&mut self, message: Message) -> Result<(), WsError> {
        self.ws.send(message).await
    }

    /// The next data message (pings are answered by tungstenite, pongs
    /// skipped); `None` once the connection is closed, by a close frame or
    /// the end of the stream.
    async fn recv(&mut self) -> Result<Option<Message>, WsError> {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {
                    // A ping's pong is queued: send it.
                    self.ws.flush().await?;
                }
                Some(Ok(Message::Close(_))) => {
                    // tungstenite queues the answering close frame: send
                    // it, so the peer's close handshake ends now.
                    let _ = self.ws.flush().await;
                    return Ok(None);
                }
                None => return Ok(None),
                Some(Ok(data)) => return Ok(Some(data)),
                Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => return Ok(None),
                Some(Err(error)) => return Err(error),
            }
        }
    }

    /// The next data message within 10 s; panics on a close, an error or
    /// silence.
    async fn expect(&mut self, what: &str) -> Message {
        match tokio::time::timeout(Duration::from_secs(10), self.recv()).await {
            Ok(Ok(Some(message))) => message,
            Ok(Ok(None)) => panic!("{what}: the tunnel closed"),
            Ok(Err(error)) => panic!("{what}: {error}"),
            Err(_) => panic!("{what}: nothing within 10 s"),
        }
    }

    /// Sends `text` and expects it back.
    async fn echo(&mut self, text: &str) {
        self.send(Message::text(text)).await.expect("send");
        assert_eq!(self.expect(text).await, Message::text(text));
    }

    /// Starts the close handshake and waits (10 s at most) for its end.
    async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            let _ = self.ws.close(None).await;
            while let Ok(Some(_)) = self.recv().await {}
        })
        .await;
    }

    /// Waits (at most `limit`) for the end of the byte stream (or a
    /// reset), ignoring any bytes before it.
    async fn expect_eof(&mut self, what: &str, limit: Duration) {
        let drained = tokio::time::timeout(limit, async {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = self.ws.get_mut().read(&mut chunk).await {
                if n == 0 {
                    return;
                }
            }
        })
        .await;
        assert!(drained.is_ok(), "{what}: no end of stream within {limit:?}");
    }

    /// Waits until the connection is closed without another data message;
    /// panics if it stays open `limit`.
    async fn expect_closed(&mut self, what: &str, limit: Duration) {
        match tokio::time::timeout(limit, self.recv()).await {
            Ok(Ok(None)) | Ok(Err(_)) => {}
            Ok(Ok(Some(message))) => panic!("{what}: got {message:?} instead of a close"),
            Err(_) => panic!("{what}: still open after {limit:?}"),
        }
    }
}

// ---------------------------------------------------------------------------
// The WebSocket backend.
// ---------------------------------------------------------------------------

/// A request head as the backend received it.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    /// Lowercased names, values as sent.
    headers: Vec<(String, String)>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether `Connection` lists `token` (case-insensitive).
    fn connection_has(&self, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(k, _)| k == "connection")
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }
}

#[derive(Default)]
struct WsState {
    /// Every request head, in order.
    seen: Mutex<Vec<Seen>>,
    /// `101` answers sent.
    upgrades: AtomicUsize,
    /// Tunnels whose connection has ended on the backend's side.
    ended: AtomicUsize,
}

/// A real HTTP/1.1 + WebSocket server on 127.0.0.1. Paths:
/// - `/ws...` with `Upgrade: websocket`: `101`, then a WebSocket echo
///   (`tick N MS` sends N messages MS apart; `silent` stops echoing until
///   `loud`; `bye` closes from the backend's side); `/ws/greet...` sends
///   `welcome` first, in the same write as the `101`;
/// - `/refuse/400`, `/refuse/426`: that status with a body, keep-alive;
/// - anything else: `200` with body `plain PATH`, keep-alive, even if an
///   upgrade was asked for.
struct WsBackend {
    addr: SocketAddr,
    state: Arc<WsState>,
    task: JoinHandle<()>,
}

impl WsBackend {
    async fn start() -> WsBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(WsState::default());
        let task = tokio::spawn({
            let state = Arc::clone(&state);
            async move {
                let mut connections = JoinSet::new();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    connections.spawn(serve_ws_backend(stream, Arc::clone(&state)));
                    while connections.try_join_next().is_some() {}
                }
            }
        });
        WsBackend { addr, state, task }
    }

    fn address(&self) -> String {
        self.addr.to_string()
    }

    fn upgrades(&self) -> usize {
        self.state.upgrades.load(Ordering::SeqCst)
    }

    fn ended(&self) -> usize {
        self.state.ended.load(Ordering::SeqCst)
    }

    fn seen(&self, path: &str) -> Vec<Seen> {
        let seen = self.state.seen.lock().unwrap();
        seen.iter().filter(|s| s.path == path).cloned().collect()
    }
}

impl Drop for WsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request head from `stream` into `buf`; returns the head and
/// leaves what followed it in `buf`. `None` at the end of the stream.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Seen> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut request = httparse::Request::new(&mut headers);
            request.parse(&buf[..end + 4]).ok()?;
            let seen = Seen {
                path: request.path.unwrap_or_default().to_string(),
                headers: request
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect(),
            };
            buf.drain(..end + 4);
            return Some(seen);
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn serve_ws_backend(mut stream: TcpStream, state: Arc<WsState>) {
    let mut buf = Vec::new();
    while let Some(seen) = read_head(&mut stream, &mut buf).await {
        state.seen.lock().unwrap().push(seen.clone());
        let wants_ws = seen
            .header("upgrade")
            .is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
        if wants_ws && seen.path.starts_with("/ws") {
            let key = seen.header("sec-websocket-key").unwrap_or_default();
            let head = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                derive_accept_key(key.as_bytes())
            );
            let mut bytes = head.into_bytes();
            if seen.path.starts_with("/ws/greet") {
                // A greeting in the same write as the 101: the balancer
                // must pass on what follows the head it reads. A server's
                // text frame (FIN, opcode 1, unmasked, RFC 6455 §5.2).
                bytes.extend_from_slice(&[0x81, 7]);
                bytes.extend_from_slice(b"welcome");
            }
            if stream.write_all(&bytes).await.is_err() {
                return;
            }
            let ws = Ws::server(stream, std::mem::take(&mut buf)).await;
            state.upgrades.fetch_add(1, Ordering::SeqCst);
            echo(ws).await;
            state.ended.fetch_add(1, Ordering::SeqCst);
            return;
        }
        let (status, body) = match seen.path.as_str() {
            "/refuse/400" => ("400 Bad Request", "refused 400".to_string()),
            "/refuse/426" => ("426 Upgrade Required", "refused 426".to_string()),
            path => ("200 OK", format!("plain {path}")),
        };
        let answer = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{body}",
            body.len()
        );
        if stream.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// The backend's side of a tunnel: echo, with the commands above.
async fn echo(mut ws: Ws<TcpStream>) {
    let mut silent = false;
    while let Ok(Some(message)) = ws.recv().await {
        let text = message.to_text().unwrap_or_default().to_string();
        let mut words = text.split(' ');
        match (words.next(), words.next(), words.next()) {
            (Some("tick"), Some(n), Some(ms)) => {
                let (n, ms): (u64, u64) = (n.parse().unwrap(), ms.parse().unwrap());
                for i in 0..n {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    if ws.send(Message::text(format!("tick {i}"))).await.is_err() {
                        return;
                    }
                }
            }
            (Some("silent"), None, None) => silent = true,
            (Some("loud"), None, None) => silent = false,
            (Some("bye"), None, None) => {
                ws.close().await;
                return;
            }
            _ if silent => {}
            _ => {
                if ws.send(message).await.is_err() {
                    return;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The balancer.
// ---------------------------------------------------------------------------

/// Writes `lb.json` in `dir`: the plain listener and the admin API on port
/// 0, `backends`, and `extra` keys on top; with `ca`, a TLS listener too,
/// serving a certificate for `site.test` signed by it.
fn write_config(dir: &Path, ca: Option<&TestCa>, backends: &[String], extra: Value) -> PathBuf {
    let mut config = json!({
        "listen_address": "127.0.0.1:0",
        "admin_address": "127.0.0.1:0",
        "backend_servers": backends,
        "health_check_interval": 30,
    });
    if let Some(ca) = ca {
        if !dir.join("site.crt").exists() {
            ca.leaf(&["site.test", "127.0.0.1"]).write(dir, "site");
        }
        config["tls_listen_address"] = json!("127.0.0.1:0");
        config["tls_certificates"] = json!([{"cert": "site.crt", "key": "site.key"}]);
    }
    for (key, value) in extra.as_object().unwrap() {
        config[key] = value.clone();
    }
    let path = dir.join("lb.json");
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    path
}

/// The running balancer and what it needs.
struct Lb {
    dir: tempfile::TempDir,
    ca: TestCa,
    with_tls: bool,
    binary: Binary,
    plain: SocketAddr,
    tls: Option<SocketAddr>,
}

impl Lb {
    /// The balancer with its plain listener only (so that these tests
    /// depend on TLS termination only where they say so).
    async fn start(backends: &[String], extra: Value) -> Lb {
        Lb::launch(backends, extra, false).await
    }

    /// The balancer with a TLS listener as well.
    async fn start_tls(backends: &[String], extra: Value) -> Lb {
        Lb::launch(backends, extra, true).await
    }

    async fn launch(backends: &[String], extra: Value, with_tls: bool) -> Lb {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("ws CA");
        let path = write_config(dir.path(), with_tls.then_some(&ca), backends, extra);
        let binary = Binary::spawn(&path, &[]).await;
        let tls = match with_tls {
            true => Some(tls_addr(&binary).await),
            false => None,
        };
        Lb {
            plain: binary.addr().unwrap(),
            dir,
            ca,
            with_tls,
            binary,
            tls,
        }
    }

    /// Rewrites the config file (listeners as at the start).
    fn rewrite(&self, backends: &[String], extra: Value) {
        let ca = self.with_tls.then_some(&self.ca);
        write_config(self.dir.path(), ca, backends, extra);
    }

    /// A wss:// tunnel through the TLS listener to `path`.
    async fn wss(&self, path: &str) -> Ws<tokio_rustls::client::TlsStream<TcpStream>> {
        let tls = self.tls.expect("started with a TLS listener");
        let stream = support::tls::connect(tls, "site.test", client_config(&self.ca))
            .await
            .unwrap_or_else(|e| panic!("TLS handshake: {e}: {}", self.binary.log()));
        let handshake = Ws::client(stream, "site.test", path);
        tokio::time::timeout(Duration::from_secs(10), handshake)
            .await
            .expect("the upgrade answered within 10 s")
            .unwrap_or_else(|e| panic!("wss upgrade: {e}: {}", self.binary.log()))
    }

    /// A ws:// tunnel through the plain listener to `path`.
    async fn ws(&self, path: &str) -> Ws<TcpStream> {
        let tcp = TcpStream::connect(self.plain).await.unwrap();
        let handshake = Ws::client(tcp, "site.test", path);
        tokio::time::timeout(Duration::from_secs(10), handshake)
            .await
            .expect("the upgrade answered within 10 s")
            .unwrap_or_else(|e| panic!("ws upgrade: {e}: {}", self.binary.log()))
    }

    async fn admin(&self) -> Http {
        let started = std::time::Instant::now();
        loop {
            if let Some(addr) = self.binary.admin_addr() {
                return Http::new(addr);
            }
            assert!(started.elapsed() < Duration::from_secs(10), "no admin line");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Opens `n` tunnels with `connect`, holds them all open at once, then has
/// each exchange several text messages and a 64 KiB binary one, and
/// closes them; all within 60 s.
async fn many_tunnels<S, F, Fut>(n: usize, connect: F)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = Ws<S>> + Send + 'static,
{
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let mut tasks = JoinSet::new();
    for id in 0..n {
        let (opening, barrier) = (connect(), Arc::clone(&barrier));
        tasks.spawn(async move {
            let mut ws = opening.await;
            // Every tunnel is open before any talks.
            barrier.wait().await;
            for k in 0..5 {
                ws.echo(&format!("tunnel {id} message {k}")).await;
            }
            let blob: Vec<u8> = (0..64 * 1024).map(|i| (i * 7 + id) as u8).collect();
            ws.send(Message::binary(blob.clone())).await.unwrap();
            assert_eq!(ws.expect("the blob").await, Message::binary(blob));
            ws.close().await;
        });
    }
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(done) = tasks.join_next().await {
            done.expect("a tunnel task");
        }
    })
    .await
    .expect("all tunnels done within 60 s");
}

fn assert_upgrades_forwarded(backend: &WsBackend, path: &str, n: usize) {
    let seen = backend.seen(path);
    assert_eq!(seen.len(), n);
    for s in seen {
        assert!(s.connection_has("upgrade"), "{s:?}");
        assert_eq!(s.header("upgrade"), Some("websocket"), "{s:?}");
        assert!(s.header("sec-websocket-key").is_some(), "{s:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_echo_through_fifty_concurrent_tunnels() {
    let backend = WsBackend::start().await;
    let lb = Lb::start(&[backend.address()], json!({})).await;
    let plain = lb.plain;
    many_tunnels(50, || async move {
        let tcp = TcpStream::connect(plain).await.unwrap();
        Ws::client(tcp, "site.test", "/ws/echo").await.unwrap()
    })
    .await;
    assert_eq!(backend.upgrades(), 50);
    assert_upgrades_forwarded(&backend, "/ws/echo", 50);
    // The client's close reached the backend through every tunnel.
    wait_until("the backend ends all 50", Duration::from_secs(10), || {
        backend.ended() == 50
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_echo_through_fifty_concurrent_tunnels() {
    let backend = WsBackend::start().await;
    let lb = Lb::start_tls(&[backend.address()], json!({})).await;
    let (tls, config) = (lb.tls.unwrap(), client_config(&lb.ca));
    many_tunnels(50, || {
        let config = Arc::clone(&config);
        async move {
            let stream = support::tls::connect(tls, "site.test", config)
                .await
                .expect("TLS handshake");
            Ws::client(stream, "site.test", "/ws/secure").await.unwrap()
        }
    })
    .await;
    assert_eq!(backend.upgrades(), 50);
    assert_upgrades_forwarded(&backend, "/ws/secure", 50);
    let seen = backend.seen("/ws/secure");
    assert!(
        seen.iter()
            .all(|s| s.header("x-forwarded-proto") == Some("https")),
        "{seen:?}"
    );
}

/// A raw HTTP/1.1 client connection, to see exactly what comes back.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Raw {
        Raw {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    /// Sends `head` (a whole request head) and reads one response with a
    /// `Content-Length` body, within 10 s: (status, lowercased headers,
    /// body).
    async fn exchange(&mut self, head: &str) -> (u16, Vec<(String, String)>, String) {
        self.stream.write_all(head.as_bytes()).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.response())
            .await
            .expect("a response within 10 s")
    }

    /// Sends a raw upgrade request head and reads the answer's head; on
    /// a `101`, what follows is WebSocket (client side), with any bytes
    /// that came behind the head.
    async fn upgrade(mut self, head: &str) -> (u16, Vec<(String, String)>, Ws<TcpStream>) {
        self.stream.write_all(head.as_bytes()).await.unwrap();
        let (status, headers) = tokio::time::timeout(Duration::from_secs(10), self.read_head())
            .await
            .expect("an answer within 10 s");
        let ws = Ws {
            ws: WebSocketStream::from_partially_read(self.stream, self.buf, Role::Client, None)
                .await,
        };
        (status, headers, ws)
    }

    async fn response(&mut self) -> (u16, Vec<(String, String)>, String) {
        let (status, headers) = self.read_head().await;
        let length: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .map(|(_, v)| v.trim().parse().unwrap())
            .expect("a Content-Length answer");
        while self.buf.len() < length {
            self.fill().await;
        }
        let body = String::from_utf8_lossy(&self.buf[..length]).into_owned();
        self.buf.drain(..length);
        (status, headers, body)
    }

    /// Reads a response head (status, lower-cased field names) and takes it
    /// out of the buffer; what follows it stays.
    async fn read_head(&mut self) -> (u16, Vec<(String, String)>) {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let mut slots = [httparse::EMPTY_HEADER; 64];
                let mut response = httparse::Response::new(&mut slots);
                response
                    .parse(&self.buf[..end + 4])
                    .expect("a response head");
                let status = response.code.unwrap();
                let headers: Vec<(String, String)> = response
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                self.buf.drain(..end + 4);
                return (status, headers);
            }
            self.fill().await;
        }
    }

    async fn fill(&mut self) {
        let mut chunk = [0u8; 4096];
        let n = self.stream.read(&mut chunk).await.expect("read");
        assert!(n > 0, "the balancer closed the client connection");
        self.buf.extend_from_slice(&chunk[..n]);
    }
}

const UPGRADE_HEAD: &str = "Host: site.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

#[tokio::test]
async fn a_refused_upgrade_is_a_normal_response_and_the_connection_stays_usable() {
    let backend = WsBackend::start().await;
    let lb = Lb::start(&[backend.address()], json!({})).await;
    let mut client = Raw::connect(lb.plain).await;
    for (path, status, body) in [
        ("/refuse/426", 426, "refused 426"),
        ("/refuse/400", 400, "refused 400"),
        ("/plain-answer", 200, "plain /plain-answer"),
    ] {
        let (got, _, text) = client
            .exchange(&format!("GET {path} HTTP/1.1\r\n{UPGRADE_HEAD}"))
            .await;
        assert_eq!((got, text.as_str()), (status, body), "{path}");
        // The same connection carries an ordinary request next, and the
        // balancer parses and forwards it (a tunnel would pass it raw,
        // without the balancer's X-Forwarded-For).
        let next = format!("{path}/next");
        let (got, _, text) = client
            .exchange(&format!("GET {next} HTTP/1.1\r\nHost: site.test\r\n\r\n"))
            .await;
        assert_eq!(got, 200, "after {path}");
        assert_eq!(text, format!("plain {next}"));
        let seen = backend.seen(&next);
        assert_eq!(seen.len(), 1, "{next}");
        assert!(seen[0].header("x-forwarded-for").is_some(), "{seen:?}");
        assert!(seen[0].header("upgrade").is_none(), "{seen:?}");
    }
    assert_eq!(backend.upgrades(), 0);
    // The refused requests did carry the upgrade to the backend.
    assert_upgrades_forwarded(&backend, "/refuse/426", 1);
}

#[tokio::test]
async fn an_h2c_upgrade_is_not_forwarded() {
    let backend = TestBackend::start("h1").await;
    let lb = Lb::start(&[backend.address()], json!({})).await;
    let mut client = Raw::connect(lb.plain).await;
    let (status, headers, body) = client
        .exchange(
            "GET /h2c HTTP/1.1\r\nHost: site.test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
        )
        .await;
    assert_eq!((status, body.as_str()), (200, "h1"), "{headers:?}");
    let seen = backend.state.last_headers.lock().unwrap().clone();
    assert!(
        !seen.iter().any(|(k, _)| k == "upgrade"),
        "the backend was asked to upgrade: {seen:?}"
    );
    assert!(
        !seen
            .iter()
            .filter(|(k, _)| k == "connection")
            .any(|(_, v)| v.to_ascii_lowercase().contains("upgrade")),
        "{seen:?}"
    );
    // Still an HTTP/1.1 connection.
    let (status, _, _) = client
        .exchange("GET /after HTTP/1.1\r\nHost: site.test\r\n\r\n")
        .await;
    assert_eq!(status, 200);
    assert_eq!(backend.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_idle_for_tunnel_idle_timeout_is_closed_but_a_busy_one_is_not() {
    let backend = WsBackend::start().await;
    let lb = Lb::start(&[backend.address()], json!({"tunnel_idle_timeout": 1})).await;
    let mut ws = lb.ws("/ws/idle").await;

    // 2.4 s of bytes from the backend only, then 2.4 s from the client
    // only: each direction alone keeps the tunnel open past 1 s.
    ws.send(Message::text("tick 8 300")).await.unwrap();
    for i in 0..8 {
        assert_eq!(
            ws.expect("a tick").await,
            Message::text(format!("tick {i}"))
        );
    }
    ws.send(Message::text("silent")).await.unwrap();
    for i in 0..8 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        ws.send(Message::text(format!("unanswered {i}")))
            .await
            .expect("the tunnel is open while the client talks");
    }
    ws.send(Message::text("loud")).await.unwrap();
    ws.echo("still here").await;
    assert_eq!(backend.ended(), 0);

    // Then silence both ways: closed, on both sides.
    ws.expect_closed("an idle tunnel", Duration::from_secs(8))
        .await;
    wait_until(
        "the backend side of the idle tunnel closed",
        Duration::from_secs(8),
        || backend.ended() == 1,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_an_open_tunnel_after_shutdown_timeout() {
    let backend = WsBackend::start().await;
    let mut lb = Lb::start(&[backend.address()], json!({"shutdown_timeout": 3})).await;
    let mut ws = lb.ws("/ws/shutdown").await;
    ws.echo("before").await;

    let signalled = std::time::Instant::now();
    lb.binary.signal("TERM");
    // Not cut at once: the tunnel still carries messages a second later.
    tokio::time::sleep(Duration::from_secs(1)).await;
    ws.echo("during the grace period").await;
    // Nor kept forever: the process exits after about shutdown_timeout.
    let status = lb.binary.wait_exit(Duration::from_secs(20)).await;
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "exited {took:?} after SIGTERM, before its 3 s shutdown_timeout: {status:?}"
    );
    ws.expect_closed("a tunnel after the exit", Duration::from_secs(5))
        .await;
    wait_until("the backend side closed", Duration::from_secs(5), || {
        backend.ended() == 1
    })
    .await;
    assert!(lb.binary.log().contains("stopped"), "{}", lb.binary.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_leaves_open_tunnels_working() {
    let backend = WsBackend::start().await;
    let lb = Lb::start_tls(&[backend.address()], json!({})).await;
    let mut plain = lb.ws("/ws/reload-plain").await;
    let mut secure = lb.wss("/ws/reload-tls").await;
    plain.echo("before").await;
    secure.echo("before").await;

    // A changed config (another strategy, a second backend), by SIGHUP.
    let other = WsBackend::start().await;
    lb.rewrite(
        &[backend.address(), other.address()],
        json!({"strategy": "least-connections"}),
    );
    lb.binary.signal("HUP");
    let admin = lb.admin().await;
    let started = std::time::Instant::now();
    loop {
        let backends: Value = serde_json::from_slice(&admin.get("/backends").await.body).unwrap();
        if backends.as_array().unwrap().len() == 2 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no reload: {}",
            lb.binary.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    for i in 0..5 {
        plain.echo(&format!("after the reload {i}")).await;
        secure.echo(&format!("after the reload {i}")).await;
    }
    // New tunnels open as before.
    let mut fresh = lb.ws("/ws/reload-new").await;
    fresh.echo("new").await;
    assert_eq!(backend.ended() + other.ended(), 0);
    plain.close().await;
    secure.close().await;
    fresh.close().await;
}

/// The sum of the samples named `name` on `/metrics`.
async fn metric(admin: &Http, name: &str) -> Option<f64> {
    let answer = admin.get("/metrics").await;
    assert_eq!(answer.status, StatusCode::OK);
    let text = answer.text();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("valid Prometheus text");
    let values: Vec<f64> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .map(|s| match s.value {
            prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// `active_connections` of the backend at `address` in `/backends`.
async fn active(admin: &Http, address: &str) -> Option<u64> {
    let backends: Value = serde_json::from_slice(&admin.get("/backends").await.body).unwrap();
    backends
        .as_array()?
        .iter()
        .find(|b| b["address"] == address)?["active_connections"]
        .as_u64()
}

/// Waits (10 s at most) until the gauge and the backend's active count
/// both read `n`.
async fn wait_for_counts(admin: &Http, address: &str, n: u64, when: &str) {
    let started = std::time::Instant::now();
    loop {
        let (gauge, count) = (
            metric(admin, "lb_tunnels_active").await,
            active(admin, address).await,
        );
        // Before any tunnel a gauge not yet written may be absent.
        let gauge_ok = gauge == Some(n as f64) || (n == 0 && gauge.is_none());
        if gauge_ok && count == Some(n) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{when}: lb_tunnels_active {gauge:?}, active_connections {count:?}, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_tunnel_counts_as_active_until_the_client_closes_it() {
    let backend = WsBackend::start().await;
    let lb = Lb::start_tls(&[backend.address()], json!({})).await;
    let admin = lb.admin().await;
    let address = backend.address();
    wait_for_counts(&admin, &address, 0, "before any tunnel").await;

    let mut by_client = lb.ws("/ws/a").await;
    let mut dropped = lb.wss("/ws/c").await;
    by_client.echo("hello").await;
    dropped.echo("hello").await;
    // Held open, idle, the tunnels stay counted.
    wait_for_counts(&admin, &address, 2, "two tunnels open").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    wait_for_counts(&admin, &address, 2, "two tunnels still open").await;

    // Closed by the client (a close handshake through the tunnel).
    by_client.close().await;
    wait_for_counts(&admin, &address, 1, "after the client closed one").await;
    // A wss client that just goes away, no close frame.
    drop(dropped);
    wait_for_counts(&admin, &address, 0, "after a client vanished").await;
    wait_until("the backend saw both end", Duration::from_secs(10), || {
        backend.ended() == 2
    })
    .await;
    // Ordinary requests never counted as tunnels.
    let plain = Http::new(lb.plain);
    assert_eq!(plain.get("/plain").await.status, StatusCode::OK);
    assert_eq!(metric(&admin, "lb_tunnels_active").await, Some(0.0));
    assert_eq!(active(&admin, &address).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_the_backend_closes_ends_and_stops_counting() {
    let backend = WsBackend::start().await;
    let lb = Lb::start(&[backend.address()], json!({})).await;
    let admin = lb.admin().await;
    let address = backend.address();
    let mut ws = lb.ws("/ws/bye").await;
    ws.echo("hello").await;
    wait_for_counts(&admin, &address, 1, "a tunnel open").await;

    // The backend sends its close frame, then closes its connection.
    ws.send(Message::text("bye")).await.unwrap();
    ws.expect_closed("the backend's close frame", Duration::from_secs(10))
        .await;
    wait_until("the backend side ended", Duration::from_secs(10), || {
        backend.ended() == 1
    })
    .await;
    // The client is told (end of stream) ...
    ws.expect_eof("the backend's close", Duration::from_secs(10))
        .await;
    // ... and the tunnel is over: one side closing ends it, even while
    // this client has not closed its socket yet.
    wait_for_counts(&admin, &address, 0, "after the backend closed it").await;
}

#[tokio::test]
async fn an_upgrade_among_other_connection_tokens_is_forwarded() {
    // As browsers send it: `Connection: keep-alive, Upgrade`, and the
    // token's case is free.
    let backend = WsBackend::start().await;
    let lb = Lb::start(&[backend.address()], json!({})).await;
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let head = format!(
        "GET /ws/tokens HTTP/1.1\r\nHost: site.test\r\nConnection: keep-alive, Upgrade\r\nUpgrade: WebSocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
    );
    let (status, headers, mut ws) = Raw::connect(lb.plain).await.upgrade(&head).await;
    assert_eq!(status, 101, "{headers:?}");
    let accept = headers
        .iter()
        .find(|(k, _)| k == "sec-websocket-accept")
        .map(|(_, v)| v.clone());
    assert_eq!(accept, Some(derive_accept_key(key.as_bytes())));
    ws.echo("through a listed upgrade").await;
    let seen = backend.seen("/ws/tokens");
    assert_eq!(seen.len(), 1);
    assert!(seen[0].connection_has("upgrade"), "{seen:?}");
    assert!(
        seen[0]
            .header("upgrade")
            .is_some_and(|u| u.eq_ignore_ascii_case("websocket")),
        "{seen:?}"
    );
    ws.close().await;
}

#[tokio::test]
async fn a_greeting_behind_the_101_reaches_the_client() {
    let backend = WsBackend::start().await;
    let lb = Lb::start(&[backend.address()], json!({})).await;
    let mut ws = lb.ws("/ws/greet").await;
    assert_eq!(ws.expect("the greeting").await, Message::text("welcome"));
    ws.echo("and then").await;
    ws.close().await;
}
