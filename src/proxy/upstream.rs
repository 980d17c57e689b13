//! The upstream side of the proxy: HTTP/1.1 to backends over keep-alive
//! connections owned by the worker thread that uses them.
//!
//! A request is written and its response read by the task that serves the
//! client's request, with no connection task, channel or lock in between;
//! idle connections wait in a per-thread pool. Heads are parsed and
//! rewritten in [`super::headers`]; bodies are framed by
//! [`super::http1::Framing`].

use std::cell::RefCell;
use std::io;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use rustc_hash::FxHashMap;
use tokio::net::TcpStream;

use super::deadline::Deadline;
use super::downstream::ClientBody;
use super::headers::{parse_response, ParsedResponse, RequestHead, ResponseHead};
use super::http1::{self, read_more_within, Framing, LAST_CHUNK, READ_CHUNK};
use crate::config::Tuning;
use crate::transport::{Stream, TlsTarget};

/// Largest response head accepted from a backend.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Why an attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made; nothing was sent.
    #[error("connect: {0}")]
    Connect(io::Error),
    /// The TLS handshake failed (the certificate did not verify, say);
    /// nothing was sent.
    #[error("TLS handshake: {0}")]
    Tls(io::Error),
    /// The connection failed before a whole response head arrived.
    #[error("{0}")]
    Io(io::Error),
    /// A reused keep-alive connection turned out to be closed before any
    /// of the response arrived; the backend most likely closed it while it
    /// was idle.
    #[error("the backend closed an idle keep-alive connection")]
    StaleConnection,
    /// The backend's answer is not valid HTTP/1.
    #[error("invalid response: {0}")]
    Invalid(&'static str),
    /// The client's request body could not be read (it broke the framing
    /// it announced, paused longer than `request_timeout`, or went away).
    #[error("reading the client's body: {0}")]
    Client(io::Error),
    /// The request was sent and no response head came within
    /// `request_timeout`.
    #[error("no response within request_timeout ({0:?})")]
    Timeout(Duration),
}

impl UpstreamError {
    /// Whether nothing of the request reached a backend.
    pub fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect(_) | UpstreamError::Tls(_))
    }
}

/// An open connection to a backend, with what has been read but not used.
#[derive(Debug)]
struct Connection {
    stream: Stream,
    buf: BytesMut,
    /// The backend address, the key it goes back to the pool under: kept
    /// per connection so that returning it costs no allocation per request.
    address: Box<str>,
    /// Whether it served a request before this one.
    reused: bool,
}

#[derive(Debug)]
struct Idle {
    connection: Connection,
    since: Instant,
}

thread_local! {
    /// Idle keep-alive connections of this worker thread, by backend
    /// address; newest last.
    static IDLE: RefCell<FxHashMap<String, Vec<Idle>>> = RefCell::new(FxHashMap::default());
}

/// Takes the newest idle connection to `address` that is still open (and
/// TLS if `tls`, as the backend's config may have changed), or `None`. `now`
/// is the request's start, read once for everything it times.
fn checkout(address: &str, tls: bool, idle_timeout: Duration, now: Instant) -> Option<Connection> {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.get_mut(address)?;
        while let Some(Idle {
            mut connection,
            since,
        }) = list.pop()
        {
            if now.saturating_duration_since(since) >= idle_timeout {
                // Everything older is expired too.
                list.clear();
                break;
            }
            // An idle connection has nothing to read: data or the end of
            // the stream means the backend closed it (or broke framing).
            if connection.stream.is_tls() == tls && connection.stream.is_idle_and_open() {
                connection.reused = true;
                return Some(connection);
            }
        }
        None
    })
}

/// Puts a connection whose last exchange ended cleanly back in the pool;
/// it counts as idle from `since` (when its answer arrived: the clock is
/// not read again for this).
fn checkin(mut connection: Connection, keepalive: usize, since: Instant) {
    if keepalive == 0 || !connection.buf.is_empty() {
        return;
    }
    connection.buf.clear();
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        if let Some(list) = idle.get_mut(&*connection.address) {
            if list.len() >= keepalive {
                // Keep the newest: drop the oldest.
                list.remove(0);
            }
            list.push(Idle { connection, since });
        } else {
            idle.insert(
                connection.address.to_string(),
                vec![Idle { connection, since }],
            );
        }
    });
}

/// Closes this thread's idle connections that have waited `idle_timeout`
/// or longer, and all of those to a backend `drained` says is draining.
pub fn sweep(idle_timeout: Duration, drained: impl Fn(&str) -> bool) {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        for (address, list) in idle.iter_mut() {
            if drained(address) {
                list.clear();
            } else {
                list.retain(|i| i.since.elapsed() < idle_timeout);
            }
        }
        idle.retain(|_, list| !list.is_empty());
    });
}

/// What an attempt needs besides the request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time to connect.
    pub connect_timeout: Duration,
    /// How long a backend has to start answering once the request is sent,
    /// and the longest pause allowed in a body, either way.
    pub read_timeout: Duration,
    /// Socket and pool settings.
    pub tuning: Tuning,
}

/// A backend's answer: its head, rewritten for the client, and its body,
/// still on the connection.
#[derive(Debug)]
pub struct UpstreamResponse {
    /// When the head arrived.
    pub arrived: Instant,
    /// The head.
    pub head: ResponseHead,
    /// The body.
    pub body: UpstreamBody,
}

/// Where an attempt goes: a backend's address, and how to speak TLS to it
/// if it wants TLS.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// `host:port`.
    pub address: &'a str,
    /// `Some` for a backend with `"tls": true`.
    pub tls: Option<&'a TlsTarget>,
}

/// Sends `head` (and `body`) to `target` over an idle connection of this
/// thread or a new one, and reads the response head. `sent` is when the
/// attempt started: the backend's time to answer runs from it.
pub async fn send(
    target: Target<'_>,
    head: &RequestHead,
    body: &mut ClientBody<'_>,
    deadline: &mut Deadline<'_>,
    limits: Limits,
    sent: Instant,
) -> Result<UpstreamResponse, UpstreamError> {
    let address = target.address;
    loop {
        let connection = match checkout(
            address,
            target.tls.is_some(),
            limits.tuning.upstream_idle_timeout,
            sent,
        ) {
            Some(connection) => connection,
            // Boxed: a new connection (TCP, maybe a TLS handshake) is the
            // rare case with pooling; inline, its state would make every
            // request's future that much larger.
            None => Box::pin(connect(target, limits)).await?,
        };
        let reused = connection.reused;
        match exchange(connection, address, head, body, deadline, limits, sent).await {
            // A pooled connection the backend had closed: nothing of the
            // body was read yet, so the request goes again on a fresh
            // connection.
            Err(UpstreamError::StaleConnection) if reused && !body.started() => continue,
            Err(UpstreamError::StaleConnection) => {
                return Err(UpstreamError::Io(io::ErrorKind::ConnectionReset.into()))
            }
            other => return other,
        }
    }
}

/// A new connection to `target`: TCP, and the TLS handshake for a TLS
/// backend, both within `connect_timeout`.
async fn connect(target: Target<'_>, limits: Limits) -> Result<Connection, UpstreamError> {
    let connecting = async {
        let tcp = TcpStream::connect(target.address)
            .await
            .map_err(UpstreamError::Connect)?;
        if limits.tuning.tcp_nodelay {
            tcp.set_nodelay(true).map_err(UpstreamError::Connect)?;
        }
        match target.tls {
            None => Ok(Stream::Plain(tcp)),
            Some(tls) => Stream::connect_tls(tcp, &tls.connector, tls.name.clone())
                .await
                .map_err(UpstreamError::Tls),
        }
    };
    let stream = match tokio::time::timeout(limits.connect_timeout, connecting).await {
        Ok(stream) => stream?,
        Err(_) => {
            return Err(UpstreamError::Connect(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "no connection within connect_timeout ({:?})",
                    limits.connect_timeout
                ),
            )))
        }
    };
    Ok(Connection {
        stream,
        buf: BytesMut::with_capacity(READ_CHUNK),
        address: target.address.into(),
        reused: false,
    })
}

async fn exchange(
    mut connection: Connection,
    address: &str,
    head: &RequestHead,
    body: &mut ClientBody<'_>,
    deadline: &mut Deadline<'_>,
    limits: Limits,
    sent: Instant,
) -> Result<UpstreamResponse, UpstreamError> {
    let host_line;
    let host: &[u8] = if head.has_host {
        &[]
    } else {
        host_line = format!("host: {address}\r\n");
        host_line.as_bytes()
    };
    let parts = [head.request_line(), host, head.fields()];
    let head_request = head.method == http::Method::HEAD;
    let Connection {
        stream,
        buf,
        reused,
        ..
    } = &mut connection;
    let stream: &Stream = stream;
    let reused = *reused;
    let stall = Some(limits.read_timeout);
    if let Err(error) = stream.write_all(&parts, stall).await {
        return Err(stale_or(reused, error));
    }
    // The body is written while the head is awaited: a backend may answer
    // (413, say) before reading all of it. Its time to answer,
    // request_timeout, runs from when the request has been sent (or the
    // sending stopped); while the body goes out, each write and each read
    // of the client's body has that long, so a long upload is cut only by
    // a pause.
    let (response, request_done) = {
        let mut request_done = body.is_done();
        let chunked = matches!(head.framing, Framing::Chunked(_));
        let write = send_body(stream, body, chunked, stall);
        let read = read_head(stream, buf, reused, head_request, head.upgrade);
        // From the attempt's start, which the caller has read already (the
        // write usually completes at once); a body that takes longer to
        // send moves it below. The client connection's one timer watches it.
        deadline.set(sent + limits.read_timeout);
        tokio::pin!(write, read);
        let mut write_error = None;
        let response = loop {
            let sending = !request_done && write_error.is_none();
            tokio::select! {
                written = &mut write, if sending => {
                    match written {
                        Ok(()) => request_done = true,
                        // The client's body broke or stalled: nothing more
                        // will come.
                        Err(error @ UpstreamError::Client(_)) => return Err(error),
                        // The backend stopped reading: it may have answered
                        // already (413, say), so the head is still awaited.
                        Err(error) => write_error = Some(error),
                    }
                    deadline.set(Instant::now() + limits.read_timeout);
                },
                response = &mut read => break response,
                () = deadline.expired(), if !sending => {
                    return Err(write_error.unwrap_or(UpstreamError::Timeout(limits.read_timeout)))
                }
            }
        };
        let response = match (response, write_error) {
            (Ok(response), _) => response,
            (Err(_), Some(error)) => return Err(error),
            (Err(error), None) => return Err(error),
        };
        (response, request_done)
    };
    // What remains of an unsent body cannot be sent later: the connection
    // is not reused.
    let reusable = response.reusable && request_done;
    let arrived = Instant::now();
    let mut body = UpstreamBody {
        framing: response.framing,
        connection: Some(connection),
        pool: reusable.then_some(limits.tuning.upstream_keepalive),
        read_timeout: limits.read_timeout,
        arrived,
    };
    // After a 101 the connection is the tunnel's, not the pool's.
    if body.framing.is_done() && !response.upgraded {
        body.finish();
    }
    Ok(UpstreamResponse {
        arrived,
        head: response,
        body,
    })
}

/// A write failure on a reused connection before anything was read is the
/// backend having closed it while idle.
fn stale_or(reused: bool, error: io::Error) -> UpstreamError {
    if reused
        && matches!(
            error.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        )
    {
        UpstreamError::StaleConnection
    } else {
        UpstreamError::Io(error)
    }
}

async fn send_body(
    stream: &Stream,
    body: &mut ClientBody<'_>,
    chunked: bool,
    stall: Option<Duration>,
) -> Result<(), UpstreamError> {
    if body.is_done() {
        return Ok(());
    }
    // Boxed: most requests have no body; inline, the state of reading and
    // writing one would be part of every request's future.
    Box::pin(send_body_pieces(stream, body, chunked, stall)).await
}

async fn send_body_pieces(
    stream: &Stream,
    body: &mut ClientBody<'_>,
    chunked: bool,
    stall: Option<Duration>,
) -> Result<(), UpstreamError> {
    while let Some(data) = body.next().await.map_err(UpstreamError::Client)? {
        http1::write_body(stream, &data, chunked, stall)
            .await
            .map_err(UpstreamError::Io)?;
    }
    if chunked {
        stream
            .write_all(&[LAST_CHUNK], stall)
            .await
            .map_err(UpstreamError::Io)?;
    }
    Ok(())
}

/// Reads until a final (non-1xx) response head is in `buf`, parses it and
/// takes it out of `buf`.
async fn read_head(
    stream: &Stream,
    buf: &mut BytesMut,
    reused: bool,
    head_request: bool,
    upgrade: bool,
) -> Result<ResponseHead, UpstreamError> {
    let mut received_any = false;
    loop {
        if !buf.is_empty() {
            received_any = true;
            match parse_response(buf, head_request, upgrade).map_err(UpstreamError::Invalid)? {
                ParsedResponse::Final(len, head) => {
                    buf.advance(len);
                    return Ok(head);
                }
                ParsedResponse::Interim(len) => {
                    buf.advance(len);
                    continue;
                }
                ParsedResponse::Partial => {}
            }
            if buf.len() >= MAX_RESPONSE_HEAD {
                return Err(UpstreamError::Invalid("response head too large"));
            }
        }
        match stream.read_more(buf).await {
            Ok(0) if reused && !received_any => return Err(UpstreamError::StaleConnection),
            Ok(0) => {
                return Err(UpstreamError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed before a complete response head",
                )))
            }
            Ok(_) => {}
            Err(e)
                if reused
                    && !received_any
                    && matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                    ) =>
            {
                return Err(UpstreamError::StaleConnection)
            }
            Err(e) => return Err(UpstreamError::Io(e)),
        }
    }
}

/// A backend's response body, read from its connection as the client takes
/// it.
#[derive(Debug)]
pub struct UpstreamBody {
    connection: Option<Connection>,
    framing: Framing,
    /// The pool size, if the connection may be reused once the body has
    /// been read.
    pool: Option<usize>,
    read_timeout: Duration,
    /// When the head arrived: the connection's idle time in the pool counts
    /// from it.
    arrived: Instant,
}

impl UpstreamBody {
    /// Whether the body has been read completely.
    pub fn is_done(&self) -> bool {
        self.framing.is_done()
    }

    /// The connection's framing of this body.
    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// The body has been read completely: the connection goes back to the
    /// pool, if it may.
    fn finish(&mut self) {
        self.framing = Framing::Done;
        if let (Some(connection), Some(keepalive)) = (self.connection.take(), self.pool.take()) {
            checkin(connection, keepalive, self.arrived);
        }
    }

    /// After a `101`: the connection, now a tunnel's backend side, and
    /// what the backend sent past its answer.
    pub fn into_upgraded(mut self) -> Option<(Stream, BytesMut)> {
        self.connection.take().map(|c| (c.stream, c.buf))
    }

    /// The next piece of body already received, without waiting.
    pub fn next_buffered(&mut self) -> io::Result<Option<Bytes>> {
        let Some(connection) = self.connection.as_mut() else {
            return Ok(None);
        };
        let data = self.framing.decode(&mut connection.buf)?;
        if self.framing.is_done() {
            self.finish();
        }
        Ok(data)
    }

    /// The next piece of body; `None` at its end. Waiting longer than the
    /// read timeout for the backend's next bytes is an error.
    pub async fn next(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            if let Some(data) = self.next_buffered()? {
                return Ok(Some(data));
            }
            let Some(connection) = self.connection.as_mut() else {
                return Ok(None);
            };
            if self.framing.is_done() {
                return Ok(None);
            }
            let read = read_more_within(
                &connection.stream,
                &mut connection.buf,
                self.read_timeout,
                "the backend stopped sending its body",
            )
            .await?;
            if read == 0 {
                self.connection = None;
                self.framing.at_eof()?;
                return Ok(None);
            }
        }
    }
}
