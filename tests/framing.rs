//! HTTP/1.1 framing between the balancer and backends that answer with raw
//! bytes: chunked bodies in pieces, interim responses, bodies delimited by
//! closing the connection, bodiless answers, pooled connections the backend
//! closed, and answers that come before the request body is sent.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
}

fn reply(pieces: Vec<&'static [u8]>, close: bool) -> Reply {
    Reply {
        pieces,
        close,
        early: false,
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
        for piece in reply.pieces {
            if stream.write_all(piece).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
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
        },
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
