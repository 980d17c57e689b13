//! HTTP/1.1 framing between the balancer and backends that answer with raw
//! bytes: chunked bodies in pieces, interim responses, bodies delimited by
//! closing the connection, bodiless answers, pooled connections the backend
//! closed, and answers that come before the request body is sent.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use support::{start_proxy, Http};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use rust_load_balancer::Config;

/// What a scripted backend does with one request.
struct Reply {
    /// Written in order, with a short pause between pieces.
    pieces: Vec<&'static [u8]>,
    /// Close the connection afterwards.
    close: bool,
    /// Answer as soon as the head is read, without reading a body.
    early: bool,
    /// The pause between pieces.
    gap: Duration,
}

fn reply(pieces: Vec<&'static [u8]>, close: bool) -> Reply {
    Reply {
        pieces,
        close,
        early: false,
        gap: Duration::from_millis(5),
    }
}

/// Pieces written `gap` apart, the connection kept.
fn paused(pieces: Vec<&'static [u8]>, gap: Duration) -> Reply {
    Reply {
        gap,
        ..reply(pieces, false)
    }
}

/// A backend over raw TCP whose answers are chosen by the request path.
struct ScriptedBackend {
    addr: SocketAddr,
    /// Connections that carried at least one request (health checks only
    /// connect).
    used: Arc<AtomicUsize>,
}

impl ScriptedBackend {
    async fn start(script: fn(&str) -> Reply) -> ScriptedBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let used = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&used);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, script, Arc::clone(&counter)));
            }
        });
        ScriptedBackend { addr, used }
    }

    fn connections(&self) -> usize {
        self.used.load(Ordering::SeqCst)
    }
}

async fn serve(mut stream: TcpStream, script: fn(&str) -> Reply, used: Arc<AtomicUsize>) {
    let mut buf = Vec::new();
    let mut first = true;
    loop {
        // Read one head.
        let end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        if std::mem::take(&mut first) {
            used.fetch_add(1, Ordering::SeqCst);
        }
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        buf.drain(..end);
        let path = head.split(' ').nth(1).unwrap_or("/").to_string();
        let reply = script(&path);
        if !reply.early {
            // Skip a Content-Length body.
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            while buf.len() < length {
                let mut chunk = [0u8; 65536];
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            buf.drain(..length);
        }
        for (i, piece) in reply.pieces.iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(reply.gap).await;
            }
            if stream.write_all(piece).await.is_err() {
                return;
            }
        }
        if reply.close {
            if reply.early {
                // Lingering close, as servers do after an early answer: stop
                // sending, drain what the client still sends.
                let _ = stream.shutdown().await;
                let mut sink = [0u8; 65536];
                while let Ok(n) = stream.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            }
            return;
        }
    }
}

async fn proxy_for(backend: &ScriptedBackend) -> rust_load_balancer::Proxy {
    let config = Config::new("127.0.0.1:0".parse().unwrap(), &[&backend.addr.to_string()]);
    start_proxy(config).await
}

/// Sends `raw` on a fresh connection and reads until the balancer closes.
async fn raw_exchange(addr: SocketAddr, raw: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(raw).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("the balancer closes the connection")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

fn script(path: &str) -> Reply {
    match path {
        "/chunked" => reply(
            vec![
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n",
                b"5;name=value\r\nhel",
                b"lo\r",
                b"\n1",
                b"\r\n \r\n6\r\nworld!\r\n0\r\nX-Trailer: t\r\n",
                b"\r\n",
            ],
            false,
        ),
        "/interim" => reply(
            vec![
                b"HTTP/1.1 100 Continue\r\n\r\n",
                b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            ],
            false,
        ),
        "/until-close" => reply(
            vec![b"HTTP/1.0 200 OK\r\n\r\nno length, ", b"ends at close"],
            true,
        ),
        "/head" => reply(
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"],
            false,
        ),
        "/empty" => reply(vec![b"HTTP/1.1 204 No Content\r\n\r\n"], false),
        // Closes every connection after answering without saying so: the
        // next request on it finds it closed.
        "/then-close" => reply(
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nonce"],
            true,
        ),
        "/too-large" => Reply {
            pieces: vec![
                b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\nConnection: close\r\n\r\nnope",
            ],
            close: true,
            early: true,
            gap: Duration::from_millis(5),
        },
        "/hop-by-hop" => reply(
            vec![
                b"HTTP/1.1 200 OK\r\nProxy-Connection: keep-alive\r\nTrailer: X-Checksum\r\n\
                  Keep-Alive: timeout=5, max=100\r\nProxy-Authenticate: Basic realm=\"x\"\r\n\
                  Upgrade: h2c\r\nTE: trailers\r\nConnection: X-Private\r\nX-Private: secret\r\n\
                  X-End: kept\r\nContent-Length: 2\r\n\r\nok",
            ],
            false,
        ),
        // The head and 4 of 10 bytes, a pause of 1.5 s, the rest.
        "/stall-length" => paused(
            vec![
                b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123",
                b"456789",
            ],
            Duration::from_millis(1500),
        ),
        "/stall-chunked" => paused(
            vec![
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n0123\r\n",
                b"6\r\n456789\r\n0\r\n\r\n",
            ],
            Duration::from_millis(1500),
        ),
        // The same body in five pieces 300 ms apart.
        "/pause-length" => paused(
            vec![
                b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123",
                b"45",
                b"67",
                b"8",
                b"9",
            ],
            Duration::from_millis(300),
        ),
        "/pause-chunked" => paused(
            vec![
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n0123\r\n",
                b"2\r\n45\r\n",
                b"2\r\n67\r\n",
                b"1\r\n8\r\n",
                b"1\r\n9\r\n0\r\n\r\n",
            ],
            Duration::from_millis(300),
        ),
        _ => reply(
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"],
            false,
        ),
    }
}

#[tokio::test]
async fn a_chunked_body_in_odd_pieces_arrives_whole_and_the_connection_is_reused() {
    let backend = ScriptedBackend::start(script).await;
    let proxy = proxy_for(&backend).await;
    let http = Http::new(proxy.local_addr());
    for _ in 0..3 {
        let answer = http.get("/chunked").await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.text(), "hello world!");
        assert!(answer.headers.get("x-trailer").is_none());
    }
    assert_eq!(http.get("/").await.text(), "ok");
    assert_eq!(
        backend.connections(),
        1,
        "one backend connection carried all"
    );
}

#[tokio::test]
async fn interim_responses_are_skipped() {
    let backend = ScriptedBackend::start(script).await;
    let proxy = proxy_for(&backend).await;
    let answer = Http::new(proxy.local_addr()).get("/interim").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.text(), "ok");
    assert!(answer.headers.get("link").is_none());
}

#[tokio::test]
async fn a_body_delimited_by_close_is_chunked_for_http11_and_closed_for_http10() {
    let backend = ScriptedBackend::start(script).await;
    let proxy = proxy_for(&backend).await;
    let http = Http::new(proxy.local_addr());
    let answer = http.get("/until-close").await;
    assert_eq!(answer.text(), "no length, ends at close");
    assert_eq!(answer.headers["transfer-encoding"], "chunked");
    // The client connection stays usable: the chunked framing ended it.
    assert_eq!(http.get("/").await.text(), "ok");

    let raw = raw_exchange(proxy.local_addr(), b"GET /until-close HTTP/1.0\r\n\r\n").await;
    assert!(raw.starts_with("HTTP/1.1 200 OK\r\n"), "{raw}");
    assert!(
        !raw.to_ascii_lowercase().contains("transfer-encoding"),
        "{raw}"
    );
    assert!(raw.ends_with("\r\n\r\nno length, ends at close"), "{raw}");
}

#[tokio::test]
async fn head_and_204_answers_have_no_body_and_keep_the_connections() {
    let backend = ScriptedBackend::start(script).await;
    let proxy = proxy_for(&backend).await;
    let http = Http::new(proxy.local_addr());
    let head = Request::builder()
        .method(Method::HEAD)
        .uri(format!("{}/head", http.base()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let answer = http.send(head).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.headers["content-length"], "10");
    assert!(answer.body.is_empty());
    let answer = http.get("/empty").await;
    assert_eq!(answer.status, StatusCode::NO_CONTENT);
    assert_eq!(http.get("/").await.text(), "ok");
    assert_eq!(backend.connections(), 1);
}

#[tokio::test]
async fn a_pooled_connection_the_backend_closed_is_replaced_without_an_error() {
    let backend = ScriptedBackend::start(script).await;
    let proxy = proxy_for(&backend).await;
    let http = Http::new(proxy.local_addr());
    for round in 1..=3 {
        let answer = http.get("/then-close").await;
        assert_eq!(answer.status, StatusCode::OK, "round {round}");
        assert_eq!(answer.text(), "once");
        // Let the close arrive while the connection sits in the pool.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(backend.connections(), 3);
    let metrics = proxy.metrics().encode(proxy.state().pool());
    assert!(
        !metrics.contains("lb_upstream_errors_total{"),
        "no attempt failed: {metrics}"
    );
    assert!(proxy.state().pool().backends()[0].is_healthy());
}

#[tokio::test]
async fn an_answer_before_the_upload_ends_reaches_the_client() {
    let backend = ScriptedBackend::start(script).await;
    let proxy = proxy_for(&backend).await;
    let http = Http::new(proxy.local_addr());
    let answer = http
        .post("/too-large", Bytes::from(vec![b'x'; 4 << 20]))
        .await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(answer.text(), "nope");
    // The balancer serves on.
    assert_eq!(http.get("/").await.text(), "ok");
}

/// Reads one response from `stream`: its head (lowercase field names,
/// values as sent) and `body_len` bytes of body after it.
async fn read_response(
    stream: &mut TcpStream,
    body_len: usize,
) -> (String, Vec<(String, String)>, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .expect("a response head")
            .unwrap();
        assert!(n > 0, "closed before a whole head: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut body = buf[end + 4..].to_vec();
    while body.len() < body_len {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .expect("the body")
            .unwrap();
        assert!(n > 0, "closed inside the body");
        body.extend_from_slice(&chunk[..n]);
    }
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default().to_string();
    let fields = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, fields, body)
}

#[tokio::test]
async fn hop_by_hop_response_fields_stay_on_the_backend_hop() {
    let backend = ScriptedBackend::start(script).await;
    let proxy = proxy_for(&backend).await;
    let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
    // Keep-alive: whatever `Connection` the client gets is the backend's.
    for _ in 0..2 {
        stream
            .write_all(b"GET /hop-by-hop HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (status, fields, body) = read_response(&mut stream, 2).await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(body, b"ok");
        let names: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
        for hop in [
            "proxy-connection",
            "trailer",
            "keep-alive",
            "proxy-authenticate",
            "upgrade",
            "te",
            "connection",
            "x-private",
        ] {
            assert!(
                !names.contains(&hop),
                "{hop} reached the client: {fields:?}"
            );
        }
        assert!(
            fields.contains(&("x-end".into(), "kept".into())),
            "{fields:?}"
        );
        assert!(
            fields.contains(&("content-length".into(), "2".into())),
            "{fields:?}"
        );
    }
}

#[tokio::test]
async fn a_backend_pausing_inside_its_body_past_request_timeout_cuts_the_body_short() {
    // Too late for a status: the client has the head and what came before
    // the pause, then the connection closes, the body short of its
    // Content-Length, or a chunked one without its last chunk.
    let backend = ScriptedBackend::start(script).await;
    let request_timeout = Duration::from_millis(500);
    let mut config = Config::new("127.0.0.1:0".parse().unwrap(), &[&backend.addr.to_string()]);
    config.clients.request_timeout = request_timeout;
    let proxy = start_proxy(config).await;
    for (path, expected_head, expected_body) in [
        ("/stall-length", "content-length: 10", "0123"),
        (
            "/stall-chunked",
            "transfer-encoding: chunked",
            "4\r\n0123\r\n",
        ),
    ] {
        let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
        let sent = Instant::now();
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let (status, fields, body) = read_response(&mut stream, 0).await;
        assert_eq!(status, "HTTP/1.1 200 OK", "{path}");
        let (name, value) = expected_head.split_once(": ").unwrap();
        assert!(
            fields.contains(&(name.into(), value.into())),
            "{path}: {fields:?}"
        );
        let mut rest = body;
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            let mut chunk = [0u8; 4096];
            loop {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => rest.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "{path}: the connection was not closed");
        assert_eq!(
            String::from_utf8_lossy(&rest),
            expected_body,
            "{path}: what came before the pause, and nothing after"
        );
        // The balancer's wait began when the piece before the pause
        // arrived, after the request was sent.
        assert!(
            sent.elapsed() >= request_timeout,
            "{path}: cut before the timeout"
        );
    }
    // Each cut connection was dropped, not pooled: the next request has a
    // new one.
    let used = backend.connections();
    assert_eq!(used, 2);
    assert_eq!(Http::new(proxy.local_addr()).get("/").await.text(), "ok");
    assert_eq!(backend.connections(), 3);
}

#[tokio::test]
async fn a_backend_pausing_inside_its_body_for_less_than_request_timeout_is_waited_for() {
    let backend = ScriptedBackend::start(script).await;
    let mut config = Config::new("127.0.0.1:0".parse().unwrap(), &[&backend.addr.to_string()]);
    // Each pause is 300 ms, the body takes 1.2 s, longer than the timeout
    // in all: only a pause counts.
    config.clients.request_timeout = Duration::from_millis(1000);
    let proxy = start_proxy(config).await;
    let http = Http::new(proxy.local_addr());
    for path in ["/pause-length", "/pause-chunked"] {
        let answer = http.get(path).await;
        assert_eq!(answer.status, StatusCode::OK, "{path}");
        assert_eq!(answer.text(), "0123456789", "{path}");
    }
    assert_eq!(backend.connections(), 1, "the connection was kept");
}
