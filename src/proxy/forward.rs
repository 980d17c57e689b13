//! Forwarding one request: pick a backend, send, and retry on another
//! backend when that is safe.

use std::time::Instant;

use super::deadline::Deadline;
use super::downstream::{Client, ClientBody};
use super::error::{describe, ProxyError};
use super::headers::RequestHead;
use super::upstream::{self, Limits, Target, UpstreamError, UpstreamResponse};
use super::view::RequestFacts;
use super::Shared;
use crate::balancer::{Failure, Outcome};
use crate::generation::{Pick, State};
use crate::server::ConnectionGuard;

/// Sends `head` (and `body`) to a backend the strategy picks, and returns
/// the response head with its body still to be read, and the guard that
/// counts the request as active on its backend.
///
/// A failed connect is retried on another backend (nothing was sent); a
/// failure after sending only for an idempotent request without a body.
/// `max_retries` bounds the other backends tried. Each attempt's outcome is
/// recorded once, in [`State::record`].
pub(super) async fn forward(
    shared: &Shared,
    state: &State,
    head: &RequestHead,
    client: &Client,
    body: &mut ClientBody<'_>,
    deadline: &mut Deadline<'_>,
    started: Instant,
) -> Result<(UpstreamResponse, ConnectionGuard), ProxyError> {
    let retry_after_send = head.is_idempotent() && head.framing.is_done();
    let max_retries = state.config().health.max_retries as usize;
    let limits = Limits {
        connect_timeout: state.config().connect_timeout,
        read_timeout: state.config().clients.request_timeout,
        tuning: state.config().tuning,
    };
    let metrics = shared.metrics();
    let facts = RequestFacts::new(state, head, client.ip(), client.text());
    let mut tried: Vec<u32> = Vec::new();
    // Why the last attempt failed, for the log line if no backend is left
    // to retry on.
    let mut last_failure: Option<(&str, String)> = None;

    loop {
        let attempt = tried.len() as u32;
        let backend = match state.pick(metrics, &facts.view(attempt), &tried) {
            Pick::Backend(backend) => backend,
            // Every other backend is out: the answer is the failure of the
            // attempt already made, not an outage.
            Pick::NoneEligible if !tried.is_empty() => {
                if let Some((address, reason)) = last_failure {
                    tracing::warn!(
                        backend = address,
                        method = %head.method,
                        path = head.target(),
                        "upstream request failed, no other backend to retry on: {reason}"
                    );
                }
                return Err(ProxyError::Upstream);
            }
            Pick::NoneEligible => {
                shared.generations.log_outage();
                return Err(ProxyError::NoHealthyBackend);
            }
            Pick::Refused => return Err(ProxyError::Refused),
        };
        if body.started() {
            // Part of the body went to a backend that failed: it cannot be
            // sent again.
            return Err(ProxyError::Upstream);
        }

        let guard = backend.track();
        // The first attempt starts with the request (the clock was read
        // then; a pick takes a microsecond or two); a retry reads it anew.
        let sent = if attempt == 0 {
            started
        } else {
            Instant::now()
        };
        // Connecting has connect_timeout, the backend's answer
        // request_timeout from when the request is sent, and each pause in
        // a body either way request_timeout (see upstream::exchange).
        let target = Target {
            address: backend.address(),
            tls: state.upstream_tls(backend),
        };
        let answer = upstream::send(target, head, body, deadline, limits, sent).await;
        let outcome = |status: Option<u16>, failure: Option<Failure>, at: Instant| Outcome {
            backend_id: backend.id(),
            status,
            failure,
            latency_micros: u32::try_from(at.saturating_duration_since(sent).as_micros())
                .unwrap_or(u32::MAX),
            attempt,
            request_id: facts.id(),
        };
        match answer {
            Ok(response) => {
                state.record(
                    metrics,
                    backend,
                    &outcome(Some(response.head.status), None, response.arrived),
                    false,
                );
                return Ok((response, guard));
            }
            Err(UpstreamError::Timeout(timeout)) => {
                // Sent, and no answer: not safe to send again, and the
                // backend is struggling.
                drop(guard);
                state.record(
                    metrics,
                    backend,
                    &outcome(None, Some(Failure::Timeout), Instant::now()),
                    false,
                );
                tracing::warn!(
                    backend = backend.address(),
                    method = %head.method,
                    path = head.target(),
                    "upstream request failed: no response within request_timeout ({timeout:?})"
                );
                return Err(ProxyError::Timeout);
            }
            Err(UpstreamError::Client(error)) => {
                // The client's fault, not the backend's: no outcome. A
                // client that paused in its body longer than
                // request_timeout gets 504, as a backend pausing in its
                // answer would; one that broke its framing, 400.
                drop(guard);
                tracing::debug!("request body from the client failed: {error}");
                return Err(if error.kind() == std::io::ErrorKind::TimedOut {
                    ProxyError::Timeout
                } else {
                    ProxyError::BadRequest
                });
            }
            Err(error) => {
                drop(guard);
                let connect_failed = error.is_connect();
                tried.push(backend.id());
                let retry = (connect_failed || retry_after_send) && tried.len() <= max_retries;
                let failure = if connect_failed {
                    Failure::Connect
                } else {
                    Failure::Io
                };
                state.record(
                    metrics,
                    backend,
                    &outcome(None, Some(failure), Instant::now()),
                    retry,
                );
                let reason = describe(&error);
                if retry {
                    tracing::debug!(
                        backend = backend.address(),
                        "retrying on another backend after: {reason}"
                    );
                    last_failure = Some((backend.address(), reason));
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
