//! The admin listener (`admin_address`): `GET /metrics`, `GET /backends`,
//! `GET /config`, `GET /status`, `POST /reload`, and run-time control of
//! one backend: `POST /backends/{id}/drain`, `POST /backends/{id}/enable`,
//! `PUT /backends/{id}/weight`. Off unless configured; it has no
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

async fn route(shared: &Arc<Generations>, request: Request<Incoming>) -> Response<Full<Bytes>> {
    if let Some(rest) = request.uri().path().strip_prefix("/backends/") {
        let rest = rest.to_string();
        return control(shared, &rest, request).await;
    }
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
                        "source": b.source(),
                        "weight": b.weight(),
                        "configured_weight": b.configured_weight(),
                        "id": b.id(),
                        "labels": b.labels().iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
                        "healthy": b.is_healthy(),
                        "state": b.state().as_str(),
                        "active_connections": b.in_flight(),
                        "latency_micros": b.latency_micros(),
                        "requests_total": b.requests_total(),
                        "ejections_total": b.ejections_total(),
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

/// `POST /backends/{id}/drain`, `POST /backends/{id}/enable` and
/// `PUT /backends/{id}/weight` (`rest` is what follows `/backends/`). The
/// id is the backend's in `/backends`. What is set stays across reloads
/// while the backend's address stays in the config.
async fn control(
    shared: &Generations,
    rest: &str,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let state = shared.current();
    let Some((id, action)) = rest.split_once('/') else {
        return text(
            StatusCode::NOT_FOUND,
            "not found: try /backends/{id}/drain, /enable or /weight\n",
        );
    };
    let backend = match id.parse::<u32>().ok().and_then(|id| state.pool().get(id)) {
        Some(backend) => Arc::clone(backend),
        None => {
            return text(
                StatusCode::NOT_FOUND,
                &format!("no backend with id {id:?}: see GET /backends\n"),
            )
        }
    };
    let wanted = match action {
        "drain" | "enable" => Method::POST,
        "weight" => Method::PUT,
        _ => {
            return text(
                StatusCode::NOT_FOUND,
                "not found: try /drain, /enable or /weight\n",
            )
        }
    };
    if request.method() != wanted {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        response.headers_mut().insert(
            ALLOW,
            HeaderValue::from_str(wanted.as_str()).expect("a method is a valid header"),
        );
        return response;
    }
    match action {
        "drain" => {
            backend.set_draining(true);
            tracing::info!(
                backend = backend.address(),
                "backend {} draining: no new requests; {} in flight finish",
                backend.address(),
                backend.in_flight()
            );
        }
        "enable" => {
            backend.set_draining(false);
            backend.readmit();
            tracing::info!(
                backend = backend.address(),
                "backend {} enabled",
                backend.address()
            );
        }
        _ => {
            let body = match http_body_util::BodyExt::collect(request.into_body()).await {
                Ok(body) => body.to_bytes(),
                Err(error) => return text(StatusCode::BAD_REQUEST, &format!("{error}\n")),
            };
            let weight = std::str::from_utf8(&body)
                .ok()
                .and_then(|t| t.trim().parse::<u64>().ok())
                .filter(|w| (1..=crate::config::MAX_WEIGHT).contains(w));
            let Some(weight) = weight else {
                return text(
                    StatusCode::BAD_REQUEST,
                    &format!(
                        "the body must be a whole number from 1 to {}, got {:?}\n",
                        crate::config::MAX_WEIGHT,
                        String::from_utf8_lossy(&body)
                    ),
                );
            };
            backend.set_weight(Some(weight as u32));
            // Strategies that plan from the weights (a 0.2.0 module's
            // `configure`) are told at once.
            state.balancer().configure(&state.pool().infos());
            tracing::info!(
                backend = backend.address(),
                "backend {} weight set to {weight}",
                backend.address()
            );
        }
    }
    json(
        StatusCode::OK,
        &serde_json::json!({
            "id": backend.id(),
            "address": backend.address(),
            "state": backend.state().as_str(),
            "weight": backend.weight(),
        }),
    )
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    respond(status, "text/plain", body.to_string())
}
