//! Active health checks: every `health_check_interval`, each backend is
//! checked (a TCP connect, or an HTTP `GET health_check_path` that must answer
//! 2xx/3xx; over TLS for a TLS backend) within `health_check_timeout`. Each backend is checked by its
//! own loop, so one slow backend delays no other. Passive checks (failed
//! proxied requests) feed the same thresholds from `proxy`.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::config::HealthConfig;
use crate::server::Backend;
use crate::transport::{Stream, TlsTarget};

/// Largest response head a check reads.
const MAX_HEAD: usize = 16 * 1024;

/// Checks `backends` with `health`'s settings for as long as the task
/// lives. Each backend has its own loop, its first check at once: a
/// backend that is slow to answer delays only its own next check, never
/// another backend's. A backend with TLS settings is checked over TLS,
/// its certificate verified as for proxied requests.
pub async fn run(backends: Vec<(Arc<Backend>, Option<TlsTarget>)>, health: HealthConfig) {
    let health = Arc::new(health);
    let mut checkers = JoinSet::new();
    for (backend, tls) in backends {
        checkers.spawn(check_loop(Arc::clone(&health), backend, tls));
    }
    // Dropping the set (when this task is aborted) aborts every loop.
    while checkers.join_next().await.is_some() {}
}

async fn check_loop(health: Arc<HealthConfig>, backend: Arc<Backend>, tls: Option<TlsTarget>) {
    let mut ticker = tokio::time::interval(health.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let result = check(
            &backend,
            tls.as_ref(),
            health.path.as_deref(),
            health.timeout,
        )
        .await;
        let flipped = backend.observe_health(
            result.is_ok(),
            health.healthy_threshold,
            health.unhealthy_threshold,
        );
        match (flipped, result) {
            (Some(false), Err(reason)) => tracing::warn!(
                backend = backend.address(),
                "backend {} is unhealthy: {reason}",
                backend.address()
            ),
            (Some(true), _) => tracing::info!(
                backend = backend.address(),
                "backend {} is healthy again",
                backend.address()
            ),
            _ => {}
        }
    }
}

/// One check of one backend, bounded by `timeout`: a fresh connection
/// (and TLS handshake, with `tls`), then, with `path`, `GET path` whose
/// answer must be 2xx or 3xx. Every check proves a new connection can be
/// made; none is kept.
pub async fn check(
    backend: &Backend,
    tls: Option<&TlsTarget>,
    path: Option<&str>,
    timeout: Duration,
) -> Result<(), String> {
    let attempt = async {
        let tcp = TcpStream::connect(backend.address())
            .await
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let stream = match tls {
            None => Stream::Plain(tcp),
            Some(tls) => Stream::connect_tls(tcp, &tls.connector, tls.name.clone())
                .await
                .map_err(|e| format!("TLS handshake: {e}"))?,
        };
        match path {
            None => Ok(()),
            Some(path) => get(&stream, backend.authority().as_str(), path).await,
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// `GET path` on `stream`; `Ok` if the status is 2xx or 3xx.
async fn get(stream: &Stream, host: &str, path: &str) -> Result<(), String> {
    let request = format!(
        "GET {path} HTTP/1.1\r\nhost: {host}\r\nuser-agent: rust_load_balancer health check\r\nconnection: close\r\n\r\n"
    );
    stream
        .write_all(&[request.as_bytes()], None)
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut fields);
        match response.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                let status = response.code.unwrap_or(0);
                return match status {
                    // An interim answer is followed by the real one.
                    100..=199 => Err(format!("GET {path} answered only {status}")),
                    200..=399 => Ok(()),
                    _ => Err(format!(
                        "GET {path} answered {status} {}",
                        response.reason.unwrap_or_default()
                    )),
                };
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => {
                return Err(format!("GET {path}: response head too large"))
            }
            Err(e) => return Err(format!("GET {path}: invalid response: {e}")),
        }
        match stream.read_more(&mut buf).await {
            Ok(0) => return Err(format!("GET {path}: connection closed before a response")),
            Ok(_) => {}
            Err(e) => return Err(format!("GET {path}: {e}")),
        }
    }
}
