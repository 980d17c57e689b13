//! The client side of the proxy: one task per client connection reads
//! request heads, has each request forwarded, and writes the answer back,
//! keeping the connection for the next request when both sides allow.
//!
//! Limits (all from the config generation current when a request starts):
//! a new connection has `client_header_timeout` to send its first complete
//! head; a kept-alive connection has `client_keepalive_timeout` to start its
//! next one and then `client_header_timeout` to complete it; a head larger
//! than `max_request_header_kib` gets 431; a malformed or ambiguous head
//! gets 400 (see [`super::headers::parse_request`]). Every such answer
//! closes the connection, and nothing of the request reaches a backend.

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};

use super::deadline::Deadline;
use super::error::ProxyError;
use super::forward;
use super::headers::{parse_request, HeadError, RequestHead};
use super::http1::{read_more_within, write_body, Framing, LAST_CHUNK};
use super::idle;
use super::parked::{self, PARK_AFTER};
use super::tunnel::{self, TunnelEnd};
use crate::transport::Stream;

/// How long an idle client connection stays open once the balancer is
/// stopping (at most `shutdown_timeout`): a request it sends meanwhile is
/// still served, with `Connection: close`. Long enough for a client that
/// was already sending when the drain began (and for a connection accepted
/// just before the listener closed to send its first request); short, as
/// it delays the exit of a balancer whose clients sit idle.
pub(super) const DRAIN_IDLE_GRACE: Duration = Duration::from_secs(2);

/// The buffer a request head is first read into; it grows for larger heads
/// (up to `max_request_header_kib`) and bodies.
const HEAD_BUFFER: usize = 4096;
use super::upstream::{UpstreamBody, UpstreamResponse};
use super::{Held, Shared};
use crate::config::ClientLimits;
use crate::generation::State;
use crate::metrics::NO_BACKEND;
use crate::server::ConnectionGuard;

/// The connecting client: its address, and that address as text (for
/// `X-Forwarded-For` and logs), and whether it came over TLS.
#[derive(Debug)]
pub(super) struct Client {
    ip: IpAddr,
    text: Box<str>,
    tls: bool,
}

impl Client {
    /// The client at `ip`, connected over TLS if `tls`.
    pub(super) fn new(ip: IpAddr, tls: bool) -> Client {
        Client {
            ip,
            text: ip_text(ip),
            tls,
        }
    }

    /// Its address.
    pub(super) fn ip(&self) -> IpAddr {
        self.ip
    }

    /// Its address as text.
    pub(super) fn text(&self) -> &str {
        &self.text
    }
}

/// An address as text, as `Display` writes it. IPv4 is written directly:
/// through the formatting machinery it cost about 1,300 instructions, a
/// twentieth of a request on a new connection.
fn ip_text(ip: IpAddr) -> Box<str> {
    match ip {
        IpAddr::V4(v4) => {
            // At most "255.255.255.255"; one allocation, of the exact size.
            let mut text = [0u8; 15];
            let mut len = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    text[len] = b'.';
                    len += 1;
                }
                let mut digits = itoa::Buffer::new();
                let digits = digits.format(octet).as_bytes();
                text[len..len + digits.len()].copy_from_slice(digits);
                len += digits.len();
            }
            // Digits and dots: always UTF-8.
            Box::from(std::str::from_utf8(&text[..len]).unwrap_or_default())
        }
        IpAddr::V6(_) => ip.to_string().into(),
    }
}

/// Serves one client connection until it closes, breaks the protocol, times
/// out, or the balancer shuts down; then closes it (a TLS connection with
/// a `close_notify`, so that the client can tell the end from a cut), and
/// drops `held` (the guards that count the connection). A plain connection
/// kept alive and idle for a while is parked instead (see
/// [`super::parked`]), and served on by [`resume`] when it has more to say.
pub(super) fn serve(
    stream: Stream,
    client: Client,
    shared: Arc<Shared>,
    held: Held,
) -> impl Future<Output = ()> + Send {
    serve_from(stream, client, shared, held, None)
}

/// Serves a parked connection on, from its idle wait with `deadline`.
pub(super) fn resume(
    stream: Stream,
    client: Client,
    shared: Arc<Shared>,
    held: Held,
    deadline: Instant,
) -> impl Future<Output = ()> + Send {
    serve_from(stream, client, shared, held, Some(deadline))
}

/// What this future holds stays with the connection for its whole life,
/// idle waits included: the stream, the client's address, one timer (see
/// [`Deadline`]), an empty buffer handle and the idle wait. A request in
/// progress (its buffer, head and forwarding state) lives in a boxed
/// future of its own, so an idle connection's task is a few hundred bytes.
/// (An `async` block rather than an `async fn`: the latter would store its
/// arguments twice.)
#[allow(clippy::manual_async_fn)]
fn serve_from(
    stream: Stream,
    client: Client,
    shared: Arc<Shared>,
    held: Held,
    resumed: Option<Instant>,
) -> impl Future<Output = ()> + Send {
    async move {
        let limits = shared.generations.peek().config().clients;
        // A new connection has the head timeout from its start; a resumed
        // one its keep-alive deadline.
        let timer = match resumed {
            Some(deadline) => tokio::time::sleep_until(deadline.into()),
            None => tokio::time::sleep(limits.header_timeout),
        };
        tokio::pin!(timer);
        let mut deadline = Deadline::new(timer, &limits);
        let slot = idle::Slot::new();
        let mut buf = BytesMut::new();
        let mut first = resumed.is_none();
        let park = loop {
            if buf.is_empty() {
                // No buffer while waiting: it is taken when bytes arrive.
                give_back(std::mem::take(&mut buf));
                match wait_for_bytes(&stream, &mut deadline, &slot).await {
                    Wait::Bytes => {}
                    Wait::Close => break false,
                    Wait::Park => break true,
                }
            }
            // Boxed: the state of a request in flight is allocated for its
            // duration only.
            let served = Box::pin(serve_next(
                &stream,
                &mut buf,
                &client,
                &shared,
                first,
                &mut deadline,
            ))
            .await;
            let Some(answered) = served else {
                break false;
            };
            first = false;
            // A kept-alive connection has the keep-alive timeout until its
            // next request starts, from the generation current now (so a
            // connection idle across a reload follows the new config, and
            // holds no generation while idle).
            let limits = shared.generations.peek().config().clients;
            deadline.set_limits(&limits);
            deadline.set(answered + limits.keepalive_timeout);
            // Parking pays for a longer wait only.
            if !stream.is_tls() && limits.keepalive_timeout >= 2 * PARK_AFTER {
                slot.parkable_since(answered);
            }
        };
        // For the worker's next connection (a client that closes after one
        // request would otherwise cost an allocation of it each time).
        give_back(std::mem::take(&mut buf));
        if park {
            // Only plain connections are parkable.
            if let Stream::Plain(tcp) = stream {
                let at = deadline.at();
                drop(slot);
                parked::park(tcp, client, shared, held, at);
            }
            return;
        }
        stream.close().await;
        drop(held);
    }
}

/// How an idle wait ends.
enum Wait {
    /// The client sent something (or closed, or the socket failed: the
    /// read tells).
    Bytes,
    /// The deadline passed, or the grace a drain leaves an idle
    /// connection: the connection is to be closed.
    Close,
    /// The connection has waited long enough to be parked.
    Park,
}

/// Waits, idle and without a buffer, until the client sends something (or
/// closes), the deadline passes, or (for a wait that may end in parking,
/// see [`idle::Slot::parkable_since`]) the worker's sweep marks it for
/// parking.
fn wait_for_bytes<'a, 't>(
    stream: &'a Stream,
    deadline: &'a mut Deadline<'t>,
    slot: &'a idle::Slot,
) -> impl Future<Output = Wait> + use<'a, 't> {
    let mut draining = false;
    std::future::poll_fn(move |cx| {
        // Bytes that arrived are served even when the deadline has passed
        // meanwhile. A failed socket is "readable" too: the read reports it.
        if stream.poll_readable(cx).is_ready() {
            slot.busy();
            return Poll::Ready(Wait::Bytes);
        }
        if !draining {
            match slot.poll_idle(cx) {
                Poll::Ready(idle::Wake::Drain(timeout)) => {
                    // The balancer is stopping and this connection is idle
                    // (or new, before its first byte). Closing it at once
                    // would race a client that is sending its next request
                    // right now: that request would be lost with no answer.
                    // It gets a short grace instead; a request that arrives
                    // within it is served and answered with `Connection:
                    // close`.
                    draining = true;
                    let grace = Instant::now() + timeout.min(DRAIN_IDLE_GRACE);
                    deadline.set(deadline.at().min(grace));
                }
                Poll::Ready(idle::Wake::Park) => {
                    slot.busy();
                    return Poll::Ready(Wait::Park);
                }
                Poll::Pending => {}
            }
        }
        if deadline.poll_expired(cx).is_ready() {
            return Poll::Ready(Wait::Close);
        }
        Poll::Pending
    })
}

/// Reads the head of the request whose first bytes are in `buf` or on the
/// connection, forwards it and writes the answer. Returns when the answer
/// was written if the connection can carry another request.
async fn serve_next(
    stream: &Stream,
    buf: &mut BytesMut,
    client: &Client,
    shared: &Arc<Shared>,
    first: bool,
    deadline: &mut Deadline<'_>,
) -> Option<Instant> {
    // The generation current when the request's first bytes arrive serves
    // it.
    let state = shared.state();
    let limits = state.config().clients;
    // The head has client_header_timeout from its first bytes (a new
    // connection's, from accept).
    let arrived = Instant::now();
    if !first {
        deadline.set(arrived + limits.header_timeout);
    }
    if buf.capacity() == 0 {
        *buf = take_buffer();
    }
    // The request starts once its head is in: at once, usually, so the
    // clock read above serves for both.
    let (head, started) = match read_head(stream, buf, client, limits, deadline).await {
        Ok((head, false)) => (head, arrived),
        Ok((head, true)) => (head, Instant::now()),
        Err(HeadFailure::Closed) => return None,
        Err(HeadFailure::Refused(error)) => {
            let status = match error {
                HeadError::BadRequest(_) => 400,
                HeadError::TooLarge => 431,
                HeadError::NotImplemented(_) => 501,
                HeadError::ExpectationFailed => 417,
            };
            tracing::debug!(
                client = client.text(),
                "refused a request head ({status}): {error}"
            );
            shared
                .metrics()
                .record_request(NO_BACKEND, status, Duration::ZERO);
            let _ = write_error(stream, status, &error.to_string(), false, true).await;
            return None;
        }
    };
    serve_request(stream, buf, head, client, shared, &state, started, deadline).await
}

enum HeadFailure {
    /// The client went, or was too slow, or the balancer is stopping.
    Closed,
    /// The head is malformed or too large: answered, then closed.
    Refused(HeadError),
}

/// Reads and parses a request head, within the connection's deadline; says
/// whether it had to wait for more of it than the connection had at once.
async fn read_head(
    stream: &Stream,
    buf: &mut BytesMut,
    client: &Client,
    limits: ClientLimits,
    deadline: &mut Deadline<'_>,
) -> Result<(RequestHead, bool), HeadFailure> {
    let mut waited = false;
    loop {
        if !buf.is_empty() {
            match parse_request(buf, client.text(), client.tls) {
                Ok(Some((len, head))) if len <= limits.max_header_bytes => {
                    buf.advance(len);
                    return Ok((head, waited));
                }
                Ok(Some(_)) => return Err(HeadFailure::Refused(HeadError::TooLarge)),
                Ok(None) if buf.len() > limits.max_header_bytes => {
                    return Err(HeadFailure::Refused(HeadError::TooLarge))
                }
                Ok(None) => {}
                Err(error) => return Err(HeadFailure::Refused(error)),
            }
        }
        let read = std::future::poll_fn(|cx| {
            if let Poll::Ready(read) = stream.poll_read_more(cx, buf) {
                return Poll::Ready(Some(read));
            }
            waited = true;
            deadline.poll_expired(cx).map(|()| None)
        })
        .await;
        match read {
            Some(Ok(0) | Err(_)) => return Err(HeadFailure::Closed),
            Some(Ok(_)) => {}
            None => {
                if !buf.is_empty() {
                    tracing::debug!(client = client.text(), "client_header_timeout: closing a connection with an incomplete request head");
                }
                return Err(HeadFailure::Closed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for text in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "255.255.255.255",
            "192.168.0.100",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:1.2.3.4",
        ] {
            let ip: IpAddr = text.parse().unwrap();
            assert_eq!(&*ip_text(ip), ip.to_string(), "{text}");
        }
    }
}

thread_local! {
    /// Empty head buffers of this worker, reused from request to request.
    static BUFFERS: std::cell::RefCell<Vec<BytesMut>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Most spare buffers a worker keeps.
const SPARE_BUFFERS: usize = 256;

fn take_buffer() -> BytesMut {
    BUFFERS
        .with(|spare| spare.borrow_mut().pop())
        .unwrap_or_else(|| BytesMut::with_capacity(HEAD_BUFFER))
}

/// Keeps `buf` for another request if it is an unshared buffer of the
/// usual size.
fn give_back(mut buf: BytesMut) {
    buf.clear();
    // `try_reclaim` succeeds only when no frozen part of it is alive; it
    // moves the free space back to the start of the allocation.
    if !buf.try_reclaim(HEAD_BUFFER) || buf.capacity() > 4 * HEAD_BUFFER {
        return;
    }
    BUFFERS.with(|spare| {
        let mut spare = spare.borrow_mut();
        if spare.len() < SPARE_BUFFERS {
            spare.push(buf);
        }
    });
}

/// A client's request body, read from its connection as the backend
/// connection takes it.
#[derive(Debug)]
pub struct ClientBody<'a> {
    stream: &'a Stream,
    buf: &'a mut BytesMut,
    framing: Framing,
    /// `100 Continue` is owed before the first read.
    continue_pending: bool,
    started: bool,
    stall: Duration,
}

impl ClientBody<'_> {
    /// Whether any of the body has been taken (so it cannot be sent again).
    pub fn started(&self) -> bool {
        self.started
    }

    /// Whether all of the body has been read (a request without one: at
    /// once).
    pub fn is_done(&self) -> bool {
        self.framing.is_done()
    }

    /// The next piece of body; `None` at its end.
    pub async fn next(&mut self) -> io::Result<Option<Bytes>> {
        if self.framing.is_done() {
            return Ok(None);
        }
        self.started = true;
        if self.continue_pending {
            self.continue_pending = false;
            self.stream
                .write_all(&[b"HTTP/1.1 100 Continue\r\n\r\n"], Some(self.stall))
                .await?;
        }
        loop {
            if let Some(data) = self.framing.decode(self.buf)? {
                return Ok(Some(data));
            }
            if self.framing.is_done() {
                return Ok(None);
            }
            let read = read_more_within(
                self.stream,
                self.buf,
                self.stall,
                "the client stopped sending its body",
            )
            .await?;
            if read == 0 {
                self.framing.at_eof()?;
            }
        }
    }
}

/// Forwards one request and writes its answer. Returns when the answer was
/// written if the connection can carry another request.
// Each argument is borrowed from a different owner (the connection, its
// task, the worker, the generation).
#[allow(clippy::too_many_arguments)]
async fn serve_request(
    stream: &Stream,
    buf: &mut BytesMut,
    head: RequestHead,
    client: &Client,
    shared: &Shared,
    state: &State,
    started: Instant,
    deadline: &mut Deadline<'_>,
) -> Option<Instant> {
    let stall = state.config().clients.request_timeout;
    let mut body = ClientBody {
        stream,
        buf,
        framing: head.framing,
        continue_pending: head.expect_continue && !head.framing.is_done(),
        started: false,
        stall,
    };
    let result = forward::forward(shared, state, &head, client, &mut body, deadline, started).await;
    // An unread rest of the body leaves no way to find the next request.
    let body_done = body.is_done();
    let keep_alive = head.keep_alive && body_done && idle::draining().is_none();
    let (status, guard, ok) = match result {
        Ok((response, guard)) if response.head.upgraded => {
            record(shared, state, Some(&guard), 101, started, &head);
            // Boxed: a tunnel's state is needed by upgraded connections
            // only.
            Box::pin(upgrade(stream, buf, response, guard, shared, state)).await;
            return None;
        }
        Ok((response, guard)) => {
            let status = response.head.status;
            let (ok, keep_alive) = write_response(stream, response, &head, keep_alive, stall).await;
            (status, Some(guard), ok && keep_alive)
        }
        Err(error) => {
            let status = error.status().as_u16();
            let close = !keep_alive || error == ProxyError::BadRequest;
            let ok = write_error(
                stream,
                status,
                &error.to_string(),
                head.method == http::Method::HEAD,
                close,
            )
            .await
            .is_ok();
            (status, None, ok && !close)
        }
    };
    let answered = record(shared, state, guard.as_ref(), status, started, &head);
    ok.then_some(answered)
}

/// Sends a backend's `101` on to the client and carries the two
/// connections' bytes until the tunnel ends. The tunnel counts as an
/// active connection of its backend (`guard`) for as long as it is open.
/// What the client sent past its handshake is in `buf`.
async fn upgrade(
    stream: &Stream,
    buf: &mut BytesMut,
    response: UpstreamResponse,
    guard: ConnectionGuard,
    shared: &Shared,
    state: &State,
) {
    let UpstreamResponse { head, body, .. } = response;
    let Some((backend, from_backend)) = body.into_upgraded() else {
        return;
    };
    let mut out = head.head;
    out.extend_from_slice(b"connection: upgrade\r\n\r\n");
    let stall = state.config().clients.request_timeout;
    // The first frames the backend sent after its 101 go in the same write.
    if stream
        .write_all(&[&out, &from_backend], Some(stall))
        .await
        .is_err()
    {
        return;
    }
    let _open = shared.metrics().open_tunnel();
    let idle = state.config().tunnel_idle_timeout;
    let to_backend = std::mem::take(buf);
    let end = tunnel::run(stream, to_backend, &backend, BytesMut::new(), idle).await;
    let backend_address = guard.backend().address();
    match end {
        TunnelEnd::Closed => tracing::debug!(backend = backend_address, "tunnel closed"),
        TunnelEnd::Idle => tracing::debug!(
            backend = backend_address,
            "tunnel closed: no bytes either way for tunnel_idle_timeout ({idle:?})"
        ),
        TunnelEnd::Failed(error) => {
            tracing::debug!(backend = backend_address, "tunnel ended: {error}")
        }
    }
}

/// Writes a backend's response: the head with this hop's framing fields,
/// then the body as it arrives. Returns whether it was all written, and
/// whether the connection may be kept.
async fn write_response(
    stream: &Stream,
    response: UpstreamResponse,
    request: &RequestHead,
    keep_alive: bool,
    stall: Duration,
) -> (bool, bool) {
    let UpstreamResponse { head, mut body, .. } = response;
    let mut out = head.head;
    let mut keep_alive = keep_alive;
    let chunked = match body.framing() {
        Framing::Done => {
            if let Some(n) = head.declared_length {
                push_length(&mut out, n);
            }
            false
        }
        Framing::Length(n) => {
            push_length(&mut out, n);
            false
        }
        // A body of unknown length: chunked for HTTP/1.1 clients; an
        // HTTP/1.0 client reads it to the end of the connection.
        _ if request.http11 => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            true
        }
        _ => {
            keep_alive = false;
            false
        }
    };
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else if !request.http11 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");

    // What already arrived with the head goes out in the same write.
    let first = match body.next_buffered() {
        Ok(first) => first,
        Err(error) => {
            tracing::debug!("backend response body: {error}");
            return (false, false);
        }
    };
    let written = match &first {
        Some(data) if chunked => {
            let size = super::http1::chunk_size_line(data.len());
            let end: &[u8] = if body.is_done() {
                b"\r\n0\r\n\r\n"
            } else {
                b"\r\n"
            };
            stream
                .write_all(&[&out, size.as_bytes(), data, end], Some(stall))
                .await
        }
        Some(data) => stream.write_all(&[&out, data], Some(stall)).await,
        None if chunked && body.is_done() => {
            stream.write_all(&[&out, LAST_CHUNK], Some(stall)).await
        }
        None => stream.write_all(&[&out], Some(stall)).await,
    };
    if written.is_err() {
        return (false, false);
    }
    if body.is_done() {
        return (true, keep_alive);
    }
    // Boxed: most bodies arrive with their head; inline, the state of
    // streaming one would be part of every request's future.
    let streamed = Box::pin(stream_body(stream, &mut body, chunked, stall)).await;
    (streamed, streamed && keep_alive)
}

/// Copies the rest of a backend's response body to the client as it
/// arrives (with the last chunk if `chunked`); whether all of it went.
async fn stream_body(
    stream: &Stream,
    body: &mut UpstreamBody,
    chunked: bool,
    stall: Duration,
) -> bool {
    loop {
        match body.next().await {
            Ok(Some(data)) => {
                if write_body(stream, &data, chunked, Some(stall))
                    .await
                    .is_err()
                {
                    return false;
                }
            }
            Ok(None) => break,
            Err(error) => {
                // Too late for a status: the client sees the body end early
                // (no last chunk, or fewer bytes than announced).
                tracing::warn!("backend response body failed: {error}");
                return false;
            }
        }
    }
    !chunked || stream.write_all(&[LAST_CHUNK], Some(stall)).await.is_ok()
}

fn push_length(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Writes a short plain-text answer of the balancer's own; internal details
/// (backend addresses, OS errors) go to the log, not to the client.
async fn write_error(
    stream: &Stream,
    status: u16,
    reason: &str,
    head_request: bool,
    close: bool,
) -> io::Result<()> {
    let phrase = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    let body = format!("{status} {phrase}: {reason}\n");
    let head = format!(
        "HTTP/1.1 {status} {phrase}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n{}\r\n",
        body.len(),
        if close { "connection: close\r\n" } else { "" }
    );
    let body: &[u8] = if head_request { b"" } else { body.as_bytes() };
    stream
        .write_all(&[head.as_bytes(), body], Some(Duration::from_secs(5)))
        .await
}

/// Counts and times a finished request and, if enabled, logs it; returns
/// the time it finished.
fn record(
    shared: &Shared,
    state: &State,
    guard: Option<&ConnectionGuard>,
    status: u16,
    started: Instant,
    head: &RequestHead,
) -> Instant {
    let now = Instant::now();
    let elapsed = now.saturating_duration_since(started);
    let backend = guard.map_or(NO_BACKEND, |g| g.backend().address());
    shared.metrics().record_request(backend, status, elapsed);
    if state.config().access_log {
        // The path without its query, which may carry secrets.
        let path = head.target().split('?').next().unwrap_or_default();
        tracing::info!(
            target: "access",
            method = %head.method,
            path,
            status,
            backend,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            "request"
        );
    }
    now
}
