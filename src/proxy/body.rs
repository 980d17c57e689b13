//! Body types that stream through the proxy without being buffered whole.
//!
//! [`RequestBody`] lets a request whose connect attempt failed be sent again:
//! the client's body stays in a shared slot until the upstream connection
//! first polls it, so if nothing was sent it can be taken back for a retry.
//! [`ResponseBody`] carries the backend's [`ConnectionGuard`] until the last
//! byte is out, so a backend's active count covers the whole response.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

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

/// A response on its way to the client: a backend's streamed body, or a
/// short body the proxy wrote itself (errors).
#[derive(Debug)]
pub struct ResponseBody {
    kind: ResponseKind,
}

#[derive(Debug)]
enum ResponseKind {
    Upstream {
        body: Incoming,
        guard: Option<ConnectionGuard>,
    },
    Full(Option<Bytes>),
}

impl ResponseBody {
    /// Streams `body` from a backend; `guard` is dropped when it ends.
    pub fn upstream(body: Incoming, guard: ConnectionGuard) -> ResponseBody {
        let guard = if body.is_end_stream() {
            None
        } else {
            Some(guard)
        };
        ResponseBody {
            kind: ResponseKind::Upstream { body, guard },
        }
    }

    /// A complete body.
    pub fn full(bytes: impl Into<Bytes>) -> ResponseBody {
        let bytes: Bytes = bytes.into();
        ResponseBody {
            kind: ResponseKind::Full((!bytes.is_empty()).then_some(bytes)),
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.get_mut().kind {
            ResponseKind::Upstream { body, guard } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                match &polled {
                    Poll::Ready(None) | Poll::Ready(Some(Err(_))) => *guard = None,
                    Poll::Ready(Some(Ok(_))) if body.is_end_stream() => *guard = None,
                    _ => {}
                }
                polled
            }
            ResponseKind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Upstream { body, .. } => body.is_end_stream(),
            ResponseKind::Full(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Upstream { body, .. } => body.size_hint(),
            ResponseKind::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}
