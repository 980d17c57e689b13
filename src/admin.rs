//! The admin listener (`admin_address`): `GET /metrics`, `GET /backends`,
//! `GET /config`, `GET /status`, `POST /reload`. Off unless configured; it has no
//! authentication, so it belongs on a loopback or private address.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::generation::Generations;

/// Serves the admin API until shutdown is signalled.
pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Generations>,
    mut shutdown: watch::Receiver<Option<Duration>>,
) {
    if let Ok(address) = listener.local_addr() {
        if !address.ip().is_loopback() {
            tracing::warn!(
                "the admin API on {address} is not on a loopback address; it has no authentication"
            );
        }
        tracing::info!(
            "admin API on http://{address} (/metrics, /backends, /config, /status, /reload)"
        );
    }
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!("admin accept failed: {error}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let shared = Arc::clone(&shared);
                async move { Ok::<_, Infallible>(route(&shared, request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.push('\n');
    respond(status, "application/json", text)
}

async fn route(shared: &Generations, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let allowed = match request.uri().path() {
        "/metrics" | "/backends" | "/config" | "/status" => Method::GET,
        "/reload" => Method::POST,
        _ => {
            return respond(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found: try /metrics, /backends, /config, /status or POST /reload\n",
            )
        }
    };
    if request.method() != allowed {
        let mut response = respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n",
        );
        response.headers_mut().insert(
            ALLOW,
            HeaderValue::from_str(allowed.as_str()).expect("a method is a valid header"),
        );
        return response;
    }
    let state = shared.current();
    match request.uri().path() {
        "/metrics" => respond(
            StatusCode::OK,
            crate::metrics::CONTENT_TYPE,
            shared.metrics().encode(state.pool()),
        ),
        "/backends" => {
            let backends: Vec<serde_json::Value> = state
                .pool()
                .backends()
                .iter()
                .map(|b| {
                    serde_json::json!({
                        "address": b.address(),
                        "weight": b.weight(),
                        "id": b.id(),
                        "labels": b.labels().iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
                        "healthy": b.is_healthy(),
                        "state": b.state().as_str(),
                        "active_connections": b.in_flight(),
                        "latency_micros": b.latency_micros(),
                        "requests_total": b.requests_total(),
                    })
                })
                .collect();
            json(StatusCode::OK, &serde_json::Value::Array(backends))
        }
        "/config" => json(StatusCode::OK, &state.config().to_json()),
        "/status" => json(
            StatusCode::OK,
            &serde_json::json!({
                "pid": std::process::id(),
                "version": env!("CARGO_PKG_VERSION"),
                "uptime_seconds": shared.uptime().as_secs(),
                "config_reloads": shared.reloads(),
                "config": state.config().summary(),
            }),
        ),
        _ => match shared.reload().await {
            Ok(summary) => json(
                StatusCode::OK,
                &serde_json::json!({"result": "success", "config": summary}),
            ),
            Err(error) => json(
                StatusCode::UNPROCESSABLE_ENTITY,
                &serde_json::json!({"result": "failure", "error": error.to_string()}),
            ),
        },
    }
}
