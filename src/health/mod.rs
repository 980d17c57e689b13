//! Active health checks: every `health_check_interval`, each backend is
//! checked (a TCP connect, or an HTTP `GET health_check_path` that must answer
//! 2xx/3xx) within `health_check_timeout`. Each backend is checked by its
//! own loop, so one slow backend delays no other. Passive checks (failed
//! proxied requests) feed the same thresholds from `proxy`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::config::HealthConfig;
use crate::server::Backend;

type CheckClient = Client<HttpConnector, Empty<Bytes>>;

/// Checks `backends` with `health`'s settings for as long as the task
/// lives. Each backend has its own loop, its first check at once: a
/// backend that is slow to answer delays only its own next check, never
/// another backend's.
pub async fn run(backends: Vec<Arc<Backend>>, health: HealthConfig) {
    let client = check_client();
    let health = Arc::new(health);
    let mut checkers = JoinSet::new();
    for backend in backends {
        checkers.spawn(check_loop(Arc::clone(&health), backend, client.clone()));
    }
    // Dropping the set (when this task is aborted) aborts every loop.
    while checkers.join_next().await.is_some() {}
}

async fn check_loop(health: Arc<HealthConfig>, backend: Arc<Backend>, client: CheckClient) {
    let mut ticker = tokio::time::interval(health.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let result = check(&client, &backend, health.path.as_deref(), health.timeout).await;
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

/// A client for HTTP checks that keeps no idle connections: every check
/// proves a fresh connection can be made.
fn check_client() -> CheckClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(connector)
}

/// One check of one backend, bounded by `timeout`.
pub async fn check(
    client: &CheckClient,
    backend: &Backend,
    path: Option<&str>,
    timeout: Duration,
) -> Result<(), String> {
    let attempt = async {
        match path {
            None => TcpStream::connect(backend.address())
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            Some(path) => {
                let uri = Uri::builder()
                    .scheme("http")
                    .authority(backend.authority().clone())
                    .path_and_query(path)
                    .build()
                    .map_err(|e| e.to_string())?;
                let request = Request::get(uri)
                    .header(http::header::USER_AGENT, "rust_load_balancer health check")
                    .body(Empty::new())
                    .map_err(|e| e.to_string())?;
                let response = client
                    .request(request)
                    .await
                    .map_err(|e| crate::describe::describe(&e))?;
                let status = response.status();
                if status.is_success() || status.is_redirection() {
                    Ok(())
                } else {
                    Err(format!("GET {path} answered {status}"))
                }
            }
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}
