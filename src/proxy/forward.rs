//! Forwarding one request: pick a backend, send, stream the answer back,
//! retry on another backend when that is safe.

use std::sync::Arc;
use std::time::Instant;

use http::header::{HeaderValue, HOST};
use http::{Method, Request, Response};
use hyper::body::Incoming;

use super::body::{BodySlot, Completion, ResponseBody};
use super::error::{describe, ProxyError};
use super::headers::{add_forwarded_for, remove_hop_by_hop};
use super::upstream::{self, Limits, RequestHead};
use super::{Shared, State};
use crate::server::ConnectionGuard;

/// Methods whose requests may be sent twice without changing the outcome
/// (RFC 9110 §9.2.2).
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Serves one client request with the config generation current when it
/// arrived; a reload meanwhile does not affect it.
pub(super) async fn handle(
    shared: Arc<Shared>,
    client: HeaderValue,
    request: Request<Incoming>,
) -> Response<ResponseBody> {
    let started = Instant::now();
    let state = shared.state.load_full();
    let access = state
        .config
        .access_log
        .then(|| (request.method().clone(), request.uri().path().to_string()));
    let (response, guard) = match forward(&shared, &state, &client, request).await {
        Ok((response, guard)) => (response, Some(guard)),
        Err(error) => (error.into_response(), None),
    };
    let completion = Completion::new(
        Arc::clone(&shared.metrics),
        guard,
        response.status().as_u16(),
        started,
        access,
    );
    response.map(|body| body.on_completion(completion))
}

async fn forward(
    shared: &Shared,
    state: &State,
    client: &HeaderValue,
    request: Request<Incoming>,
) -> Result<(Response<ResponseBody>, ConnectionGuard), ProxyError> {
    let (mut parts, body) = request.into_parts();
    let host = parts.headers.get(HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    remove_hop_by_hop(&mut parts.headers);
    add_forwarded_for(&mut parts.headers, client, host.as_ref());
    let path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    let body = BodySlot::new(body);
    let retry_after_send = is_idempotent(&parts.method) && body.is_empty();
    let max_retries = state.config.health.max_retries as usize;
    let limits = Limits {
        connect_timeout: state.config.connect_timeout,
        tuning: state.config.tuning,
    };
    let mut tried: Vec<u32> = Vec::new();

    loop {
        let backend = match state.pick(&shared.metrics, &tried) {
            Ok(backend) => backend,
            // Every other backend is out: the answer is the failure of the
            // attempt already made, not an outage.
            Err(ProxyError::NoHealthyBackend) if !tried.is_empty() => {
                return Err(ProxyError::Upstream)
            }
            Err(error) => {
                if error == ProxyError::NoHealthyBackend {
                    shared.log_outage();
                }
                return Err(error);
            }
        };
        let Some(attempt_body) = body.body() else {
            return Err(ProxyError::Upstream);
        };
        let head = RequestHead::encode(
            &parts.method,
            path_and_query.as_str(),
            &parts.headers,
            backend.address(),
            &attempt_body,
        );

        let guard = backend.track();
        let sent = Instant::now();
        let answer = tokio::time::timeout(
            state.config.clients.request_timeout,
            upstream::send(backend.address(), &head, attempt_body, limits),
        )
        .await;
        let answer = match answer {
            Ok(answer) => answer,
            Err(_) => {
                // Sent, and no answer: not safe to send again, and the
                // backend is struggling.
                drop(guard);
                let reason = format!(
                    "no response within request_timeout ({:?})",
                    state.config.clients.request_timeout
                );
                state.passive_failure(backend, &reason);
                shared
                    .metrics
                    .record_upstream_error(backend.address(), "timeout", false);
                tracing::warn!(
                    backend = backend.address(),
                    method = %parts.method,
                    path = %path_and_query,
                    "upstream request failed: {reason}"
                );
                return Err(ProxyError::Timeout);
            }
        };
        match answer {
            Ok(response) => {
                backend.record_latency(sent.elapsed());
                let health = &state.config.health;
                backend.observe_health(true, health.healthy_threshold, health.unhealthy_threshold);
                let (mut parts, body) = response.into_parts();
                remove_hop_by_hop(&mut parts.headers);
                let response = Response::from_parts(parts, ResponseBody::upstream(body));
                return Ok((response, guard));
            }
            Err(error) => {
                drop(guard);
                let connect_failed = error.is_connect();
                let reason = describe(&error);
                state.passive_failure(backend, &reason);
                tried.push(backend.id());
                let retry = (connect_failed || retry_after_send) && tried.len() <= max_retries;
                let kind = if connect_failed { "connect" } else { "io" };
                shared
                    .metrics
                    .record_upstream_error(backend.address(), kind, retry);
                if retry {
                    tracing::debug!(
                        backend = backend.address(),
                        "retrying on another backend after: {reason}"
                    );
                    continue;
                }
                tracing::warn!(
                    backend = backend.address(),
                    method = %parts.method,
                    path = %path_and_query,
                    "upstream request failed: {reason}"
                );
                return Err(ProxyError::Upstream);
            }
        }
    }
}
