//! One stream type for every connection, client side and backend side,
//! plain TCP or TLS, so that HTTP/1.1 is written once (in `proxy`) and
//! never asks which it has.
//!
//! Every operation takes `&Stream`: one task reads a request body from a
//! connection while it writes to it (`100 Continue`), and sends a body to
//! a backend while it reads the answer, so reading and writing must not
//! need exclusive access. Plain TCP gets that from tokio's `&TcpStream`
//! readiness API, and keeps the proxy's read trick (a short read marks the
//! socket drained, as NGINX does, so the next read waits for an event
//! instead of failing with `EAGAIN`). A TLS session is one rustls state
//! machine for both directions: it sits behind a mutex that is only ever
//! held for one non-blocking poll, never across an `.await`, so it is never
//! contended (a connection is served by one task of one worker thread).

pub mod tls;

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, Interest};
use tokio::net::TcpStream;

pub use tokio_rustls::{TlsAcceptor, TlsConnector};

/// How much is read from a socket at a time.
pub const READ_CHUNK: usize = 16 * 1024;
/// Below this much free space a read first grows the buffer.
const MIN_READ: usize = 1024;

/// A client or backend connection.
#[derive(Debug)]
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP, either side.
    Tls(Box<Mutex<tokio_rustls::TlsStream<TcpStream>>>),
}

impl Stream {
    /// Completes a server-side TLS handshake on an accepted connection.
    pub async fn accept_tls(tcp: TcpStream, acceptor: &TlsAcceptor) -> io::Result<Stream> {
        let tls = acceptor.accept(tcp).await?;
        Ok(Stream::Tls(Box::new(Mutex::new(tls.into()))))
    }

    /// Completes a client-side TLS handshake with a backend, verifying its
    /// certificate for `name`.
    pub async fn connect_tls(
        tcp: TcpStream,
        connector: &TlsConnector,
        name: rustls_pki_types::ServerName<'static>,
    ) -> io::Result<Stream> {
        let tls = connector.connect(name, tcp).await?;
        Ok(Stream::Tls(Box::new(Mutex::new(tls.into()))))
    }

    /// Whether this is a TLS connection.
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// Reads what the connection has into `buf` (growing it if it is nearly
    /// full), waiting until something, or the end of the stream (`Ok(0)`),
    /// arrives.
    pub async fn read_more(&self, buf: &mut BytesMut) -> io::Result<usize> {
        poll_fn(|cx| self.poll_read_more(cx, buf)).await
    }

    /// [`Stream::read_more`] for poll-based callers.
    pub fn poll_read_more(
        &self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        if buf.capacity() - buf.len() < MIN_READ {
            buf.reserve(READ_CHUNK);
        }
        match self {
            Stream::Plain(tcp) => poll_read_plain(tcp, cx, buf),
            Stream::Tls(tls) => {
                let mut tls = lock(tls);
                // `read_buf` fills the spare capacity without unsafe code;
                // its future keeps no state between polls.
                let read = std::future::Future::poll(std::pin::pin!(tls.read_buf(buf)), cx);
                match ready!(read) {
                    // Many peers close without a `close_notify`; the HTTP
                    // framing tells a cut-short body from a complete one,
                    // as it does for plain TCP.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Poll::Ready(Ok(0)),
                    other => Poll::Ready(other),
                }
            }
        }
    }

    /// Ready when reading would make progress: bytes (or the end) on the
    /// socket, or, for TLS, plaintext the session already decrypted. Lets
    /// an idle connection wait without a buffer. It keeps no waiter of
    /// its own (the socket's single reader slot holds the waker), so
    /// polling it costs no registration, and dropping it none either.
    pub fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Plain(tcp) => tcp.poll_read_ready(cx),
            Stream::Tls(tls) => {
                let mut tls = lock(tls);
                let (tcp, buffered) = match &mut *tls {
                    tokio_rustls::TlsStream::Client(c) => {
                        let (tcp, session) = c.get_mut();
                        (tcp, has_plaintext(session.reader()))
                    }
                    tokio_rustls::TlsStream::Server(s) => {
                        let (tcp, session) = s.get_mut();
                        (tcp, has_plaintext(session.reader()))
                    }
                };
                if buffered {
                    return Poll::Ready(Ok(()));
                }
                tcp.poll_read_ready(cx)
            }
        }
    }

    /// Writes some of `slices`, waiting while the connection takes nothing;
    /// returns how much was taken. For TLS the bytes may still be in the
    /// session's buffer: [`Stream::poll_flush`] sends them.
    pub fn poll_write_vectored(
        &self,
        cx: &mut Context<'_>,
        slices: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self {
            Stream::Plain(tcp) => loop {
                match tcp.try_write_vectored(slices) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        ready!(tcp.poll_write_ready(cx))?;
                    }
                    other => return Poll::Ready(other),
                }
            },
            Stream::Tls(tls) => Pin::new(&mut *lock(tls)).poll_write_vectored(cx, slices),
        }
    }

    /// Sends what a TLS session holds of earlier writes (nothing to do for
    /// plain TCP).
    pub fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Plain(_) => Poll::Ready(Ok(())),
            Stream::Tls(tls) => Pin::new(&mut *lock(tls)).poll_flush(cx),
        }
    }

    /// Ends the writing direction (a TCP FIN; for TLS a `close_notify`
    /// first), the reading direction staying open.
    pub fn poll_shutdown(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Plain(tcp) => Poll::Ready(
                rustix::net::shutdown(tcp, rustix::net::Shutdown::Write).map_err(io::Error::from),
            ),
            Stream::Tls(tls) => Pin::new(&mut *lock(tls)).poll_shutdown(cx),
        }
    }

    /// Closes the connection's writing side as a well-behaved peer does:
    /// for TLS a `close_notify` first (within a second; a client that has
    /// gone is not waited for), for plain TCP nothing, as dropping the
    /// socket closes it.
    pub async fn close(&self) {
        if self.is_tls() {
            // Boxed: its timer is needed once, at the end, and only for
            // TLS; inline, it would be part of every connection's future.
            let _ = Box::pin(tokio::time::timeout(
                Duration::from_secs(1),
                poll_fn(|cx| self.poll_shutdown(cx)),
            ))
            .await;
        }
    }

    /// Writes all of `parts`, in order, with as few system calls (and TLS
    /// records) as the connection allows. With `stall`, waiting longer
    /// than that for the connection to take more is an error (a reader
    /// that stopped reading). No timer is set unless the connection is
    /// full.
    pub async fn write_all(&self, parts: &[&[u8]], stall: Option<Duration>) -> io::Result<()> {
        let mut part = 0;
        let mut offset = 0;
        while part < parts.len() {
            if parts[part].len() == offset {
                part += 1;
                offset = 0;
                continue;
            }
            let mut slices = [IoSlice::new(&[]); 4];
            let mut count = 0;
            for (i, p) in parts[part..].iter().take(slices.len()).enumerate() {
                slices[i] = IoSlice::new(if i == 0 { &p[offset..] } else { p });
                count += 1;
            }
            let written = self
                .within(stall, |cx| self.poll_write_vectored(cx, &slices[..count]))
                .await?;
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            // Skip what was written.
            let mut left = written;
            while left > 0 && part < parts.len() {
                let available = parts[part].len() - offset;
                if left >= available {
                    left -= available;
                    part += 1;
                    offset = 0;
                } else {
                    offset += left;
                    left = 0;
                }
            }
        }
        if self.is_tls() {
            self.within(stall, |cx| self.poll_flush(cx)).await?;
        }
        Ok(())
    }

    /// Runs `poll` to completion; with `stall`, failing with `TimedOut` if
    /// it is not ready within that long. The first poll happens before any
    /// timer exists, so the common case (the socket takes the bytes at
    /// once) costs no timer.
    async fn within<T>(
        &self,
        stall: Option<Duration>,
        mut poll: impl FnMut(&mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> io::Result<T> {
        if let Poll::Ready(result) = poll(&mut Context::from_waker(std::task::Waker::noop())) {
            return result;
        }
        match stall {
            None => poll_fn(poll).await,
            // Boxed: the timer is the rare, blocked case; inline, it would
            // be part of every future that writes.
            Some(stall) => Box::pin(tokio::time::timeout(stall, poll_fn(poll)))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the peer stopped reading"))?,
        }
    }

    /// Whether an idle pooled connection still looks usable: nothing to
    /// read and not closed (a backend that closed it, or sent something
    /// unasked, has made it useless). Does not wait.
    pub fn is_idle_and_open(&self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self {
            Stream::Plain(tcp) => {
                let mut probe = [0u8; 1];
                matches!(tcp.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            Stream::Tls(tls) => {
                // Session tickets and other handshake messages a backend
                // sends after the handshake are taken in by rustls and
                // yield no plaintext: still open.
                let mut probe = [0u8; 1];
                let mut probe = tokio::io::ReadBuf::new(&mut probe);
                matches!(
                    Pin::new(&mut *lock(tls)).poll_read(&mut cx, &mut probe),
                    Poll::Pending
                )
            }
        }
    }
}

fn lock(
    tls: &Mutex<tokio_rustls::TlsStream<TcpStream>>,
) -> MutexGuard<'_, tokio_rustls::TlsStream<TcpStream>> {
    // Held for one poll only; a panic while holding it leaves nothing
    // half-done that the next poll could not handle.
    tls.lock().unwrap_or_else(|e| e.into_inner())
}

fn has_plaintext(mut reader: rustls::Reader<'_>) -> bool {
    // `Err(WouldBlock)`: nothing yet; any other answer (data, a clean or
    // unclean end) lets a read proceed.
    !matches!(std::io::BufRead::fill_buf(&mut reader), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// A plain read. A read that returns less than it asked for has emptied
/// the socket's receive queue, so the socket is marked not readable until
/// the event loop says otherwise (as NGINX does): the next read waits for
/// the peer instead of making a system call that would only fail with
/// `EAGAIN`. New data always brings a new readiness event, so nothing is
/// missed.
fn poll_read_plain(
    tcp: &TcpStream,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    loop {
        let asked = buf.capacity() - buf.len();
        let mut got = None;
        let result = tcp.try_io(Interest::READABLE, || {
            let n = tcp.try_read_buf(buf)?;
            got = Some(n);
            if n > 0 && n < asked {
                // Drained: have tokio clear the readiness it saw.
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(n)
            }
        });
        if let Some(n) = got {
            return Poll::Ready(Ok(n));
        }
        match result {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                ready!(tcp.poll_read_ready(cx))?;
            }
            Err(e) => return Poll::Ready(Err(e)),
            Ok(n) => return Poll::Ready(Ok(n)),
        }
    }
}

/// How to reach a backend over TLS: the session settings and the name its
/// certificate must carry.
#[derive(Clone)]
pub struct TlsTarget {
    /// The connector (trust roots, ALPN).
    pub connector: TlsConnector,
    /// The name sent as SNI and verified.
    pub name: rustls_pki_types::ServerName<'static>,
}

impl std::fmt::Debug for TlsTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsTarget")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}
