//! Forwarding one request: pick a backend, send, and retry on another
//! backend when that is safe.

use std::time::Instant;

use super::downstream::ClientBody;
use super::error::{describe, ProxyError};
use super::headers::RequestHead;
use super::upstream::{self, Limits, UpstreamError, UpstreamResponse};
use super::{Shared, State};
use crate::server::ConnectionGuard;

/// Sends `head` (and `body`) to a backend the strategy picks, and returns
/// the response head with its body still to be read, and the guard that
/// counts the request as active on its backend.
///
/// A failed connect is retried on another backend (nothing was sent); a
/// failure after sending only for an idempotent request without a body.
/// `max_retries` bounds the other backends tried.
pub(super) async fn forward(
    shared: &Shared,
    state: &State,
    head: &RequestHead,
    body: &mut ClientBody<'_>,
) -> Result<(UpstreamResponse, ConnectionGuard), ProxyError> {
    let retry_after_send = head.is_idempotent() && head.framing.is_done();
    let max_retries = state.config.health.max_retries as usize;
    let limits = Limits {
        connect_timeout: state.config.connect_timeout,
        read_timeout: state.config.clients.request_timeout,
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
        if body.started() {
            // Part of the body went to a backend that failed: it cannot be
            // sent again.
            return Err(ProxyError::Upstream);
        }

        let guard = backend.track();
        let sent = Instant::now();
        let answer = tokio::time::timeout(
            state.config.clients.request_timeout,
            upstream::send(backend.address(), head, body, limits),
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
                    method = %head.method,
                    path = head.target(),
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
                return Ok((response, guard));
            }
            Err(UpstreamError::Client(error)) => {
                // The client's fault, not the backend's.
                drop(guard);
                tracing::debug!("request body from the client failed: {error}");
                return Err(ProxyError::BadRequest);
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
                    method = %head.method,
                    path = head.target(),
                    "upstream request failed: {reason}"
                );
                return Err(ProxyError::Upstream);
            }
        }
    }
}
