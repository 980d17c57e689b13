//! Body types that stream through the proxy without being buffered whole.
//!
//! [`RequestBody`] lets a request whose connect attempt failed be sent again:
//! the client's body stays in a shared slot until the upstream connection
//! first polls it, so if nothing was sent it can be taken back for a retry.
//! [`ResponseBody`] carries a [`Completion`] (the backend's
//! [`ConnectionGuard`], the metrics and access log record) until the last
//! byte is out, so a backend's active count and the request's duration cover
//! the whole response.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::Method;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::upstream::UpstreamBody;
use crate::metrics::{Metrics, NO_BACKEND};
use crate::server::ConnectionGuard;

/// A client's request body on its way upstream.
#[derive(Debug)]
pub struct RequestBody {
    kind: RequestKind,
}

#[derive(Debug)]
enum RequestKind {
    /// No body: free to send any number of times.
    Empty,
    /// A body still in `slot` until first polled, then in `taken`.
    Streaming {
        slot: Arc<Mutex<Option<Incoming>>>,
        taken: Option<Incoming>,
        size_hint: SizeHint,
    },
}

/// Where a streaming request body waits until it is first sent; lets the
/// proxy take it back when an attempt failed before sending anything.
#[derive(Debug, Clone)]
pub struct BodySlot {
    slot: Option<Arc<Mutex<Option<Incoming>>>>,
    size_hint: SizeHint,
}

impl BodySlot {
    /// Holds the client's body. A body that is already at its end (a `GET`
    /// without one, say) is not kept at all.
    pub fn new(body: Incoming) -> BodySlot {
        if body.is_end_stream() {
            BodySlot {
                slot: None,
                size_hint: SizeHint::with_exact(0),
            }
        } else {
            BodySlot {
                size_hint: body.size_hint(),
                slot: Some(Arc::new(Mutex::new(Some(body)))),
            }
        }
    }

    /// Whether the request has no body.
    pub fn is_empty(&self) -> bool {
        self.slot.is_none()
    }

    /// A body to send, or `None` if the body has already been (partly) sent
    /// and cannot be sent again.
    pub fn body(&self) -> Option<RequestBody> {
        let kind = match &self.slot {
            None => RequestKind::Empty,
            Some(slot) => {
                if slot.lock().unwrap_or_else(|e| e.into_inner()).is_none() {
                    return None;
                }
                RequestKind::Streaming {
                    slot: Arc::clone(slot),
                    taken: None,
                    size_hint: self.size_hint,
                }
            }
        };
        Some(RequestBody { kind })
    }
}

impl RequestBody {
    /// A request without a body.
    pub fn empty() -> RequestBody {
        RequestBody {
            kind: RequestKind::Empty,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.get_mut().kind {
            RequestKind::Empty => Poll::Ready(None),
            RequestKind::Streaming { slot, taken, .. } => {
                if taken.is_none() {
                    *taken = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
                }
                match taken {
                    Some(body) => Pin::new(body).poll_frame(cx),
                    // Another attempt took the body; this one has nothing.
                    None => Poll::Ready(None),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RequestKind::Empty => true,
            RequestKind::Streaming { taken, .. } => {
                taken.as_ref().is_some_and(|b| b.is_end_stream())
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RequestKind::Empty => SizeHint::with_exact(0),
            RequestKind::Streaming { taken: Some(b), .. } => b.size_hint(),
            RequestKind::Streaming { size_hint, .. } => *size_hint,
        }
    }
}

/// What happens when a response is finished (its last byte handed to the
/// connection, or the client gone): the backend's in-flight count drops, and
/// the request is counted and timed and, if enabled, access-logged.
pub struct Completion {
    guard: Option<ConnectionGuard>,
    metrics: Arc<Metrics>,
    status: u16,
    started: Instant,
    access: Option<(Method, String)>,
}

impl Completion {
    /// A completion for a request received at `started`, answered with
    /// `status`, by the backend of `guard` (or by the balancer itself).
    /// `access` is the method and path, when access logging is on.
    pub fn new(
        metrics: Arc<Metrics>,
        guard: Option<ConnectionGuard>,
        status: u16,
        started: Instant,
        access: Option<(Method, String)>,
    ) -> Completion {
        Completion {
            guard,
            metrics,
            status,
            started,
            access,
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        let backend = self
            .guard
            .as_ref()
            .map_or(NO_BACKEND, |g| g.backend().address());
        self.metrics.record_request(backend, self.status, elapsed);
        if let Some((method, path)) = &self.access {
            tracing::info!(
                target: "access",
                %method,
                path = %path,
                status = self.status,
                backend,
                duration_ms = elapsed.as_secs_f64() * 1000.0,
                "request"
            );
        }
    }
}

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Completion")
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// A response on its way to the client: a backend's streamed body, or a
/// short body the proxy wrote itself (errors).
#[derive(Debug)]
pub struct ResponseBody {
    kind: ResponseKind,
    completion: Option<Completion>,
}

#[derive(Debug)]
enum ResponseKind {
    Upstream(UpstreamBody),
    Full(Option<Bytes>),
}

impl ResponseBody {
    /// Streams `body` from a backend.
    pub fn upstream(body: UpstreamBody) -> ResponseBody {
        ResponseBody {
            kind: ResponseKind::Upstream(body),
            completion: None,
        }
    }

    /// A complete body.
    pub fn full(bytes: impl Into<Bytes>) -> ResponseBody {
        let bytes: Bytes = bytes.into();
        ResponseBody {
            kind: ResponseKind::Full((!bytes.is_empty()).then_some(bytes)),
            completion: None,
        }
    }

    /// Runs `completion` when the body ends or is dropped.
    pub fn on_completion(mut self, completion: Completion) -> ResponseBody {
        if self.is_end_stream() {
            drop(completion);
        } else {
            self.completion = Some(completion);
        }
        self
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        let polled = match &mut this.kind {
            ResponseKind::Upstream(body) => Pin::new(body).poll_frame(cx),
            ResponseKind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        };
        let finished = match &polled {
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => true,
            Poll::Ready(Some(Ok(_))) => this.is_end_stream(),
            Poll::Pending => false,
        };
        if finished {
            this.completion = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Upstream(body) => body.is_end_stream(),
            ResponseKind::Full(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Upstream(body) => body.size_hint(),
            ResponseKind::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}
