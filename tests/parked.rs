//! Parked idle connections: a kept-alive plain connection idle for a while
//! leaves its task for the worker's epoll set (the
//! `lb_client_connections_parked` gauge counts it), and is served again,
//! closed at its keep-alive deadline, released when its client closes, and
//! drained on shutdown as an idle connection is.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rust_load_balancer::Proxy;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

/// The parked-connections gauge.
fn parked(proxy: &Proxy) -> u64 {
    let text = proxy.metrics().encode(proxy.state().pool());
    let line = text
        .lines()
        .find(|line| line.starts_with("lb_client_connections_parked "))
        .unwrap_or_else(|| panic!("no lb_client_connections_parked in {text}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Waits (at most 10 s) until the gauge reads `count`.
async fn wait_parked(proxy: &Proxy, count: u64) {
    let started = Instant::now();
    while parked(proxy) != count {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{} parked, not {count}, after 10 s",
            parked(proxy)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends a request on `stream` and reads its whole answer (the test
/// backend's is short: one read after the head, whose length it gives).
async fn request(stream: &mut TcpStream) -> String {
    stream.write_all(REQUEST).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("answered within 5 s")
            .unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&answer).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|line| {
                    line.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse().unwrap())
                })
                .expect("a content-length");
            if answer.len() >= end + 4 + length {
                return text;
            }
        }
    }
}

async fn served(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let answer = request(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    stream
}

#[tokio::test]
async fn idle_connections_are_parked_and_served_again_busy_ones_are_not() {
    let backend = TestBackend::start("b").await;
    let proxy = start_proxy(config_for(&[&backend])).await;
    // Twenty, so that both workers park some and places are reused.
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(served(proxy.local_addr()).await);
    }
    // One more that sends a request every 100 ms: never idle a second.
    let mut busy = served(proxy.local_addr()).await;
    let started = Instant::now();
    while parked(&proxy) < 20 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{} parked after 10 s",
            parked(&proxy)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let answer = request(&mut busy).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    }
    // A further second of it: the busy one is still not parked.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        request(&mut busy).await;
        assert_eq!(parked(&proxy), 20);
    }
    drop(busy);
    // Each parked connection answers its next request on the same
    // connection, and leaves the set; the backend is still told the
    // client's address.
    for (i, stream) in idle.iter_mut().enumerate() {
        let answer = request(stream).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
        assert!(answer.ends_with('b'), "{answer:?}");
        assert_eq!(parked(&proxy), 19 - i as u64);
        let headers = backend.state.last_headers.lock().unwrap().clone();
        assert!(
            headers.contains(&("x-forwarded-for".to_string(), "127.0.0.1".to_string())),
            "{headers:?}"
        );
    }
    // Idle again: parked again.
    wait_parked(&proxy, 20).await;
    let answer = request(&mut idle[0]).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
}

#[tokio::test]
async fn a_parked_connection_closes_at_its_keepalive_deadline_and_frees_its_place() {
    let backend = TestBackend::start("b").await;
    let mut config = config_for(&[&backend]);
    let keepalive = Duration::from_secs(3);
    config.clients.keepalive_timeout = keepalive;
    // One place: a new connection is served only once the parked one has
    // given its place back.
    config.clients.max_connections = 1;
    let proxy = start_proxy(config).await;
    let mut stream = served(proxy.local_addr()).await;
    let answered = Instant::now();
    wait_parked(&proxy, 1).await;
    let (rest, closed) = read_to_close(&mut stream, Duration::from_secs(10)).await;
    assert!(closed && rest.is_empty(), "closed {closed}, sent {rest:?}");
    let waited = answered.elapsed();
    assert!(
        waited >= keepalive - Duration::from_millis(100),
        "closed after {waited:?}"
    );
    assert_eq!(parked(&proxy), 0);
    served(proxy.local_addr()).await;
}

#[tokio::test]
async fn a_parked_connection_its_client_closes_is_released() {
    let backend = TestBackend::start("b").await;
    let mut config = config_for(&[&backend]);
    config.clients.max_connections = 1;
    let proxy = start_proxy(config).await;
    let stream = served(proxy.local_addr()).await;
    wait_parked(&proxy, 1).await;
    drop(stream);
    wait_parked(&proxy, 0).await;
    // Its place is free again (the release may trail the gauge by a
    // moment: retried for up to 5 s).
    let started = Instant::now();
    loop {
        let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
        stream.write_all(REQUEST).await.unwrap();
        let (answer, _) = read_to_close(&mut stream, Duration::from_millis(500)).await;
        if answer.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no place after 5 s: {answer:?}"
        );
    }
}

#[tokio::test]
async fn shutdown_gives_parked_connections_the_idle_grace() {
    let backend = TestBackend::start("b").await;
    let proxy = start_proxy(config_for(&[&backend])).await;
    let addr = proxy.local_addr();
    let mut quiet = served(addr).await;
    let mut late = served(addr).await;
    wait_parked(&proxy, 2).await;
    let started = Instant::now();
    let shutdown = tokio::spawn(proxy.shutdown(Duration::from_secs(60)));
    // A request sent as the drain begins is still answered, and told the
    // connection closes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    late.write_all(REQUEST).await.unwrap();
    let (answer, closed) = read_to_close(&mut late, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer:?}"
    );
    assert!(closed);
    // The quiet one is closed after the grace (2 s), not the shutdown
    // timeout (60 s), and the shutdown is over then.
    let (rest, closed) = read_to_close(&mut quiet, Duration::from_secs(30)).await;
    assert!(closed && rest.is_empty(), "closed {closed}, sent {rest:?}");
    tokio::time::timeout(Duration::from_secs(30), shutdown)
        .await
        .expect("shut down within 30 s, not at its 60 s timeout")
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "closed before the grace"
    );
}
