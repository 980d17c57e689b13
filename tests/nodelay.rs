//! `tcp_nodelay`: the option is set (or not) on the balancer's client and
//! backend sockets. Its effect cannot be seen from outside on loopback (the
//! balancer writes each head and the body that came with it in one
//! `writev`, so Nagle's algorithm has nothing to hold back), so the test
//! reads the option itself: the in-process balancer's sockets are
//! descriptors of this test process, found in `/proc/self/fd` by their
//! addresses. This file holds only this test, so no other test opens or
//! closes sockets meanwhile.

mod support;

use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::start_proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// `(local, peer, TCP_NODELAY)` of every connected TCP socket this process
/// has open.
fn tcp_sockets() -> Vec<(SocketAddr, SocketAddr, bool)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<RawFd>() else {
            continue;
        };
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
        if !is_socket {
            continue;
        }
        // SAFETY: `fd` was listed open an instant ago and the borrow lives
        // only for the `dup` on the next line. Should another thread close
        // it in between, `dup` fails (skipped) or duplicates whatever took
        // the number, whose addresses then do not match below.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let Ok(owned) = borrowed.try_clone_to_owned() else {
            continue;
        };
        // Only the duplicate is closed when this is dropped.
        let socket = std::net::TcpStream::from(owned);
        if let (Ok(local), Ok(peer), Ok(nodelay)) =
            (socket.local_addr(), socket.peer_addr(), socket.nodelay())
        {
            found.push((local, peer, nodelay));
        }
    }
    found
}

/// A raw backend answering every request `200 ok` on kept connections,
/// noting the peer address of each connection that carried a request.
async fn backend() -> (SocketAddr, Arc<Mutex<Vec<SocketAddr>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let peers = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&peers);
    tokio::spawn(async move {
        while let Ok((mut stream, peer)) = listener.accept().await {
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let mut first = true;
                loop {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        if std::mem::take(&mut first) {
                            seen.lock().unwrap().push(peer);
                        }
                        let _ = stream
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                            .await;
                    }
                }
            });
        }
    });
    (addr, peers)
}

#[tokio::test]
async fn tcp_nodelay_true_and_false_both_serve_and_set_the_option_on_both_hops() {
    for nodelay in [true, false] {
        let (backend, peers) = backend().await;
        let mut config = rust_load_balancer::Config::new(
            "127.0.0.1:0".parse().unwrap(),
            &[&backend.to_string()],
        );
        config.tuning.tcp_nodelay = nodelay;
        // One round of TCP checks at start-up; none while the test looks.
        config.health.interval = Duration::from_secs(60);
        let proxy = start_proxy(config).await;

        // A kept-alive client connection, served end to end, left open; the
        // backend connection stays in the pool.
        let mut client = TcpStream::connect(proxy.local_addr()).await.unwrap();
        for _ in 0..2 {
            client
                .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut answer = Vec::new();
            while !answer.ends_with(b"\r\n\r\nok") {
                let mut chunk = [0u8; 1024];
                let n = tokio::time::timeout(Duration::from_secs(10), client.read(&mut chunk))
                    .await
                    .expect("an answer")
                    .unwrap();
                assert!(n > 0, "closed: {answer:?}");
                answer.extend_from_slice(&chunk[..n]);
            }
            assert!(answer.starts_with(b"HTTP/1.1 200 "), "{answer:?}");
        }
        let upstream: Vec<SocketAddr> = peers.lock().unwrap().clone();
        assert_eq!(upstream.len(), 1, "one pooled backend connection");
        let client_addr = client.local_addr().unwrap();

        let sockets = tcp_sockets();
        let option = |local: SocketAddr, peer: SocketAddr| {
            let matching: Vec<bool> = sockets
                .iter()
                .filter(|(l, p, _)| *l == local && *p == peer)
                .map(|(_, _, n)| *n)
                .collect();
            assert_eq!(matching.len(), 1, "{local} -> {peer} in {sockets:?}");
            matching[0]
        };
        assert_eq!(
            option(proxy.local_addr(), client_addr),
            nodelay,
            "the balancer's client socket"
        );
        assert_eq!(
            option(upstream[0], backend),
            nodelay,
            "the balancer's backend socket"
        );
        // The test's own sockets keep the kernel's default (off), so an
        // option found set was set by the balancer.
        assert!(!option(client_addr, proxy.local_addr()));
        assert!(!option(backend, upstream[0]));
    }
}
