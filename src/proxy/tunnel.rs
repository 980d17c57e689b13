//! Upgraded connections: once a backend has answered a WebSocket handshake
//! with `101`, the client's connection and the backend's carry bytes both
//! ways, unread and unchanged, until both sides have finished or
//! `tunnel_idle_timeout` passes with no byte either way.
//!
//! Each direction copies through its own buffer. When one side ends its
//! stream, the other side's writing direction is shut (a FIN, after a TLS
//! `close_notify`), and the opposite direction goes on until it ends too:
//! a WebSocket close handshake in flight completes. Plain and TLS streams
//! on either side, as [`Stream`] makes them all alike.

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::time::Instant;

use crate::transport::{Stream, READ_CHUNK};

/// How a tunnel ended.
#[derive(Debug)]
pub(super) enum TunnelEnd {
    /// Both sides finished.
    Closed,
    /// No byte either way for `tunnel_idle_timeout`.
    Idle,
    /// A read or write failed (a reset, say).
    Failed(io::Error),
}

/// Carries bytes between `client` and `backend` until the tunnel ends.
/// `to_backend` and `to_client` are what each side had sent past the
/// handshake (read, not yet delivered).
pub(super) async fn run(
    client: &Stream,
    to_backend: BytesMut,
    backend: &Stream,
    to_client: BytesMut,
    idle: Duration,
) -> TunnelEnd {
    let mut up = Direction::new(to_backend);
    let mut down = Direction::new(to_client);
    let deadline = tokio::time::sleep(idle);
    tokio::pin!(deadline);
    loop {
        let moved = poll_fn(|cx| {
            let a = up.poll(cx, client, backend);
            let b = down.poll(cx, backend, client);
            match (a, b) {
                (Poll::Ready(Err(e)), _) | (_, Poll::Ready(Err(e))) => Poll::Ready(Err(e)),
                (Poll::Ready(Ok(())), _) | (_, Poll::Ready(Ok(()))) => Poll::Ready(Ok(())),
                _ => Poll::Pending,
            }
        });
        tokio::select! {
            moved = moved => match moved {
                Err(error) => return TunnelEnd::Failed(error),
                Ok(()) if up.finished() && down.finished() => return TunnelEnd::Closed,
                Ok(()) => deadline.as_mut().reset(Instant::now() + idle),
            },
            () = &mut deadline => return TunnelEnd::Idle,
        }
    }
}

/// One direction of a tunnel: bytes read from one side, to be written to
/// the other.
struct Direction {
    buf: BytesMut,
    /// The reading side ended its stream.
    read_done: bool,
    /// ... and the writing side has been shut after the last byte.
    shut: bool,
}

impl Direction {
    fn new(pending: BytesMut) -> Direction {
        let mut buf = pending;
        if buf.capacity() < READ_CHUNK {
            buf.reserve(READ_CHUNK - buf.len());
        }
        Direction {
            buf,
            read_done: false,
            shut: false,
        }
    }

    fn finished(&self) -> bool {
        self.shut
    }

    /// Moves what it can. `Ready(Ok(()))` when something happened (bytes
    /// moved, or the direction finished), `Pending` when it waits for a
    /// side, `Ready(Err)` when a side failed.
    fn poll(&mut self, cx: &mut Context<'_>, from: &Stream, to: &Stream) -> Poll<io::Result<()>> {
        let mut progressed = false;
        loop {
            if self.shut {
                return if progressed {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Pending
                };
            }
            if !self.buf.is_empty() {
                match to.poll_write_vectored(cx, &[IoSlice::new(&self.buf)]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => {
                        self.buf.advance(n);
                        progressed = true;
                        continue;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => break,
                }
            }
            // Everything written: a TLS session may still hold it.
            match to.poll_flush(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => break,
            }
            if self.read_done {
                match to.poll_shutdown(cx) {
                    Poll::Ready(result) => {
                        // A peer that has gone already cannot be told.
                        let _ = result;
                        self.shut = true;
                        progressed = true;
                        continue;
                    }
                    Poll::Pending => break,
                }
            }
            self.buf.clear();
            match from.poll_read_more(cx, &mut self.buf) {
                Poll::Ready(Ok(0)) => {
                    self.read_done = true;
                    progressed = true;
                }
                Poll::Ready(Ok(_)) => progressed = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => break,
            }
        }
        if progressed {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
}
