//! The upstream side of the proxy: HTTP/1.1 to backends over keep-alive
//! connections owned by the worker thread that uses them.
//!
//! A request is written and its response read by the task that serves the
//! client's request, with no connection task, channel or lock in between;
//! idle connections wait in a per-thread pool. Parsing is `httparse`'s (as
//! in hyper); framing follows RFC 9112 §6: no body for `HEAD`, 1xx, 204 and
//! 304, then `Transfer-Encoding: chunked`, then `Content-Length`, else the
//! body runs to the end of the connection.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, HOST};
use http::{Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::body::RequestBody;
use crate::config::Tuning;

/// Largest response head accepted from a backend.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Most header fields accepted in a response head (as hyper's default).
const MAX_RESPONSE_HEADERS: usize = 100;
/// Longest chunk-size line (with extensions) or trailer line.
const MAX_CHUNK_LINE: usize = 4096;
/// How much is read from a backend at a time.
const READ_CHUNK: usize = 16 * 1024;

/// Why an attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made; nothing was sent.
    #[error("connect: {0}")]
    Connect(io::Error),
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
}

impl UpstreamError {
    /// Whether nothing of the request reached a backend.
    pub fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect(_))
    }
}

/// An open connection to a backend, with what has been read but not used.
#[derive(Debug)]
struct Connection {
    stream: TcpStream,
    buf: BytesMut,
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
    static IDLE: RefCell<HashMap<String, Vec<Idle>>> = RefCell::new(HashMap::new());
}

/// Takes the newest idle connection to `address` that is still open, or
/// `None`.
fn checkout(address: &str, idle_timeout: Duration) -> Option<Connection> {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.get_mut(address)?;
        while let Some(Idle {
            mut connection,
            since,
        }) = list.pop()
        {
            if since.elapsed() >= idle_timeout {
                // Everything older is expired too.
                list.clear();
                break;
            }
            // An idle connection has nothing to read: data or the end of
            // the stream means the backend closed it (or broke framing).
            let mut probe = [0u8; 1];
            match connection.stream.try_read(&mut probe) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    connection.reused = true;
                    return Some(connection);
                }
                _ => continue,
            }
        }
        None
    })
}

/// Puts a connection whose last exchange ended cleanly back in the pool.
fn checkin(address: &str, mut connection: Connection, keepalive: usize) {
    if keepalive == 0 || !connection.buf.is_empty() {
        return;
    }
    connection.buf.clear();
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        if let Some(list) = idle.get_mut(address) {
            if list.len() >= keepalive {
                // Keep the newest: drop the oldest.
                list.remove(0);
            }
            list.push(Idle {
                connection,
                since: Instant::now(),
            });
        } else {
            idle.insert(
                address.to_string(),
                vec![Idle {
                    connection,
                    since: Instant::now(),
                }],
            );
        }
    });
}

/// Closes this thread's idle connections that have waited `idle_timeout`
/// or longer, and any whose backend closed them.
pub fn sweep(idle_timeout: Duration) {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        for list in idle.values_mut() {
            list.retain(|i| i.since.elapsed() < idle_timeout);
        }
        idle.retain(|_, list| !list.is_empty());
    });
}

/// What an attempt needs besides the request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time to connect.
    pub connect_timeout: Duration,
    /// Socket and pool settings.
    pub tuning: Tuning,
}

/// A request head ready to be written: everything up to and including the
/// blank line.
#[derive(Debug)]
pub struct RequestHead {
    bytes: Vec<u8>,
    head_request: bool,
}

impl RequestHead {
    /// Encodes `method target HTTP/1.1` and `headers` (already rewritten
    /// for this hop). A request without `Host` gets `host` (the backend's
    /// address). A body of unknown length is sent chunked.
    pub fn encode(
        method: &Method,
        target: &str,
        headers: &HeaderMap,
        host: &str,
        body: &RequestBody,
    ) -> RequestHead {
        let mut bytes = Vec::with_capacity(256);
        bytes.extend_from_slice(method.as_str().as_bytes());
        bytes.push(b' ');
        bytes.extend_from_slice(target.as_bytes());
        bytes.extend_from_slice(b" HTTP/1.1\r\n");
        if !headers.contains_key(HOST) {
            bytes.extend_from_slice(b"host: ");
            bytes.extend_from_slice(host.as_bytes());
            bytes.extend_from_slice(b"\r\n");
        }
        for (name, value) in headers {
            bytes.extend_from_slice(name.as_str().as_bytes());
            bytes.extend_from_slice(b": ");
            bytes.extend_from_slice(value.as_bytes());
            bytes.extend_from_slice(b"\r\n");
        }
        if !body.is_end_stream() && !headers.contains_key(CONTENT_LENGTH) {
            bytes.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        bytes.extend_from_slice(b"\r\n");
        RequestHead {
            bytes,
            head_request: method == Method::HEAD,
        }
    }
}

/// Sends one request to `address` over an idle connection of this thread
/// or a new one, and reads the response head. The body streams when the
/// returned response's body is polled; the connection goes back to the
/// pool after it, if the exchange allows.
pub async fn send(
    address: &str,
    head: &RequestHead,
    body: RequestBody,
    limits: Limits,
) -> Result<Response<UpstreamBody>, UpstreamError> {
    let mut body = Some(body);
    loop {
        let connection = match checkout(address, limits.tuning.upstream_idle_timeout) {
            Some(connection) => connection,
            None => connect(address, limits).await?,
        };
        let reused = connection.reused;
        let replayable = body.as_ref().is_some_and(|b| b.is_end_stream());
        let attempt_body = if replayable {
            RequestBody::empty()
        } else {
            body.take().unwrap_or_else(RequestBody::empty)
        };
        match exchange(connection, head, attempt_body).await {
            // A pooled connection the backend had closed: nothing reached
            // it, so a bodiless request goes again on a fresh connection.
            Err(UpstreamError::StaleConnection) if reused && replayable => continue,
            Err(UpstreamError::StaleConnection) => {
                return Err(UpstreamError::Io(io::ErrorKind::ConnectionReset.into()))
            }
            Err(error) => return Err(error),
            Ok(exchange) => return Ok(exchange.into_response(address, limits.tuning)),
        }
    }
}

async fn connect(address: &str, limits: Limits) -> Result<Connection, UpstreamError> {
    let stream =
        match tokio::time::timeout(limits.connect_timeout, TcpStream::connect(address)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => return Err(UpstreamError::Connect(error)),
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
    if limits.tuning.tcp_nodelay {
        stream.set_nodelay(true).map_err(UpstreamError::Connect)?;
    }
    Ok(Connection {
        stream,
        buf: BytesMut::with_capacity(READ_CHUNK),
        reused: false,
    })
}

/// A response head read, and the connection its body follows on.
struct Exchange {
    connection: Connection,
    parts: http::response::Parts,
    framing: Framing,
    /// Whether the connection may serve another request afterwards.
    keep_alive: bool,
}

impl Exchange {
    fn into_response(self, address: &str, tuning: Tuning) -> Response<UpstreamBody> {
        let Exchange {
            connection,
            parts,
            framing,
            keep_alive,
        } = self;
        let mut body = UpstreamBody {
            connection: Some(connection),
            framing,
            pool: keep_alive.then(|| (address.to_string(), tuning.upstream_keepalive)),
        };
        if matches!(body.framing, Framing::Done) {
            body.finish();
        }
        Response::from_parts(parts, body)
    }
}

async fn exchange(
    mut connection: Connection,
    head: &RequestHead,
    body: RequestBody,
) -> Result<Exchange, UpstreamError> {
    let mut request_done = body.is_end_stream();
    let response = if request_done {
        if let Err(error) = connection.stream.write_all(&head.bytes).await {
            return Err(stale_or(connection.reused, error));
        }
        read_head(&mut connection, head.head_request).await?
    } else {
        // The body is written while the head is awaited: a backend may
        // answer (413, say) before reading all of it.
        let chunked = !std::str::from_utf8(&head.bytes)
            .unwrap_or("")
            .contains("\r\ncontent-length:");
        let Connection {
            stream,
            buf,
            reused,
            ..
        } = &mut connection;
        let (mut reader, mut writer) = stream.split();
        let write = write_request(&mut writer, &head.bytes, body, chunked);
        let read = read_head_from(&mut reader, buf, *reused, head.head_request);
        tokio::pin!(write, read);
        loop {
            tokio::select! {
                written = &mut write, if !request_done => {
                    written.map_err(|e| stale_or(*reused, e))?;
                    request_done = true;
                }
                response = &mut read => break response?,
            }
        }
    };
    let (parts, framing, mut keep_alive) = response;
    // What remains of an unsent body cannot be sent later: the connection
    // is not reused.
    keep_alive &= request_done;
    Ok(Exchange {
        connection,
        parts,
        framing,
        keep_alive,
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

async fn write_request(
    writer: &mut tokio::net::tcp::WriteHalf<'_>,
    head: &[u8],
    mut body: RequestBody,
    chunked: bool,
) -> io::Result<()> {
    writer.write_all(head).await?;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(io::Error::other)?;
        let Ok(mut data) = frame.into_data() else {
            // Trailers are not forwarded.
            continue;
        };
        if data.is_empty() {
            continue;
        }
        if chunked {
            writer
                .write_all(format!("{:x}\r\n", data.len()).as_bytes())
                .await?;
            writer.write_all_buf(&mut data).await?;
            writer.write_all(b"\r\n").await?;
        } else {
            writer.write_all_buf(&mut data).await?;
        }
    }
    if chunked {
        writer.write_all(b"0\r\n\r\n").await?;
    }
    Ok(())
}

type Head = (http::response::Parts, Framing, bool);

async fn read_head(connection: &mut Connection, head_request: bool) -> Result<Head, UpstreamError> {
    let Connection {
        stream,
        buf,
        reused,
    } = connection;
    let (mut reader, _) = stream.split();
    read_head_from(&mut reader, buf, *reused, head_request).await
}

/// Reads until a final (non-1xx) response head is in `buf`, parses it and
/// takes it out of `buf`.
async fn read_head_from(
    reader: &mut tokio::net::tcp::ReadHalf<'_>,
    buf: &mut BytesMut,
    reused: bool,
    head_request: bool,
) -> Result<Head, UpstreamError> {
    let mut received_any = false;
    loop {
        if !buf.is_empty() {
            received_any = true;
            match parse_head(buf, head_request)? {
                Parsed::Final(head) => return Ok(head),
                Parsed::Interim => continue,
                Parsed::Partial => {}
            }
        }
        if buf.len() >= MAX_RESPONSE_HEAD {
            return Err(UpstreamError::Invalid("response head too large"));
        }
        buf.reserve(READ_CHUNK);
        let read = loop {
            match reader.try_read_buf(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Err(e) = reader.readable().await {
                        break Err(e);
                    }
                }
                other => break other,
            }
        };
        match read {
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

enum Parsed {
    Final(Head),
    /// A 1xx head was consumed; another head follows.
    Interim,
    Partial,
}

fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Parsed, UpstreamError> {
    let mut fields = [const { MaybeUninit::uninit() }; MAX_RESPONSE_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut fields,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(UpstreamError::Invalid("too many header fields"))
        }
        Err(_) => return Err(UpstreamError::Invalid("malformed response head")),
    };
    let code = response.code.unwrap_or(0);
    let status =
        StatusCode::from_u16(code).map_err(|_| UpstreamError::Invalid("invalid status code"))?;
    if status.is_informational() {
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(UpstreamError::Invalid("unrequested protocol switch"));
        }
        buf.advance(len);
        return Ok(Parsed::Interim);
    }
    let version = match response.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    // Where each name and value sits in the head, so that the values can
    // be slices of the head, shared rather than copied, once it is split
    // off the buffer.
    let base = buf.as_ptr() as usize;
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_RESPONSE_HEADERS];
    let count = response.headers.len();
    for (span, field) in spans.iter_mut().zip(response.headers.iter()) {
        let name = field.name.as_ptr() as usize - base;
        let value = field.value.as_ptr() as usize - base;
        // A head is at most MAX_RESPONSE_HEAD (+ one read) bytes long.
        *span = (
            name as u32,
            field.name.len() as u32,
            value as u32,
            field.value.len() as u32,
        );
    }
    let head = buf.split_to(len).freeze();
    let mut map = HeaderMap::with_capacity(count);
    for &(name, name_len, value, value_len) in &spans[..count] {
        let (name, value) = (name as usize, value as usize);
        let name = HeaderName::from_bytes(&head[name..name + name_len as usize])
            .map_err(|_| UpstreamError::Invalid("invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(value..value + value_len as usize))
            .map_err(|_| UpstreamError::Invalid("invalid header value"))?;
        map.append(name, value);
    }
    let (framing, framing_keeps_alive) = framing(&map, status, head_request)?;
    let keep_alive = framing_keeps_alive
        && version == Version::HTTP_11
        && !map
            .get_all(CONNECTION)
            .iter()
            .any(|v| has_token(v.as_bytes(), b"close"));
    let mut parts = Response::new(()).into_parts().0;
    parts.status = status;
    parts.version = version;
    parts.headers = map;
    Ok(Parsed::Final((parts, framing, keep_alive)))
}

/// How the body is delimited (RFC 9112 §6.3), and whether the connection
/// can carry another message after it.
fn framing(
    headers: &HeaderMap,
    status: StatusCode,
    head_request: bool,
) -> Result<(Framing, bool), UpstreamError> {
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok((Framing::Done, true));
    }
    if let Some(last) = headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .next_back()
    {
        let chunked = last
            .as_bytes()
            .rsplit(|b| *b == b',')
            .next()
            .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        // With Content-Length as well, the message is suspect (RFC 9112
        // §6.3): Transfer-Encoding wins and the connection is not reused.
        let reusable = chunked && !headers.contains_key(CONTENT_LENGTH);
        return Ok(if chunked {
            (Framing::Chunked(Chunked::Size), reusable)
        } else {
            (Framing::UntilClose, false)
        });
    }
    let mut length = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        for part in value.as_bytes().split(|b| *b == b',') {
            let n = std::str::from_utf8(part.trim_ascii())
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or(UpstreamError::Invalid("invalid content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(UpstreamError::Invalid("conflicting content-length"));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(0) => (Framing::Done, true),
        Some(n) => (Framing::Length(n), true),
        None => (Framing::UntilClose, false),
    })
}

fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

#[derive(Debug)]
enum Framing {
    /// Fully read.
    Done,
    /// This many bytes to go.
    Length(u64),
    Chunked(Chunked),
    /// Until the backend closes the connection.
    UntilClose,
}

#[derive(Debug, Clone, Copy)]
enum Chunked {
    /// Expecting a chunk-size line.
    Size,
    /// In a chunk's data, this many bytes to go.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines up to an empty one.
    Trailers,
}

/// A backend's response body, read from its connection as the client takes
/// it.
#[derive(Debug)]
pub struct UpstreamBody {
    connection: Option<Connection>,
    framing: Framing,
    /// Where the connection goes when the body has been read, if it may be
    /// reused: the backend address and the pool size.
    pool: Option<(String, usize)>,
}

impl UpstreamBody {
    /// The body has been read completely: the connection goes back to the
    /// pool, if it may.
    fn finish(&mut self) {
        self.framing = Framing::Done;
        if let (Some(connection), Some((address, keepalive))) =
            (self.connection.take(), self.pool.take())
        {
            checkin(&address, connection, keepalive);
        }
    }

    /// Reads more from the backend into the buffer; `Ok(0)` at its end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Some(connection) = self.connection.as_mut() else {
            return Poll::Ready(Ok(0));
        };
        connection.buf.reserve(READ_CHUNK);
        loop {
            match connection.stream.try_read_buf(&mut connection.buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(connection.stream.poll_read_ready(cx))?;
                }
                other => return Poll::Ready(other),
            }
        }
    }

    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        loop {
            let buffered = self.connection.as_ref().map_or(0, |c| c.buf.len());
            match self.framing {
                Framing::Done => return Poll::Ready(None),
                Framing::Length(remaining) => {
                    if buffered > 0 {
                        let n = buffered.min(usize::try_from(remaining).unwrap_or(usize::MAX));
                        let data = self.take(n);
                        let remaining = remaining - n as u64;
                        if remaining == 0 {
                            self.finish();
                        } else {
                            self.framing = Framing::Length(remaining);
                        }
                        return Poll::Ready(Some(Ok(data)));
                    }
                    if ready!(self.poll_fill(cx))? == 0 {
                        return Poll::Ready(Some(Err(eof("the body was cut short"))));
                    }
                }
                Framing::UntilClose => {
                    if buffered > 0 {
                        return Poll::Ready(Some(Ok(self.take(buffered))));
                    }
                    if ready!(self.poll_fill(cx))? == 0 {
                        // The end of the connection is the end of the body.
                        self.framing = Framing::Done;
                        self.connection = None;
                        return Poll::Ready(None);
                    }
                }
                Framing::Chunked(state) => {
                    if let Some(data) = self.step_chunked(state)? {
                        return Poll::Ready(Some(Ok(data)));
                    }
                    if matches!(self.framing, Framing::Done) {
                        return Poll::Ready(None);
                    }
                    if ready!(self.poll_fill(cx))? == 0 {
                        return Poll::Ready(Some(Err(eof("the chunked body was cut short"))));
                    }
                }
            }
        }
    }

    /// Advances the chunked decoder over what is buffered; returns data
    /// when some is ready, `None` when it needs more input (or is done).
    fn step_chunked(&mut self, mut state: Chunked) -> io::Result<Option<Bytes>> {
        loop {
            let Some(connection) = self.connection.as_mut() else {
                return Err(eof("the chunked body was cut short"));
            };
            let buf = &mut connection.buf;
            match state {
                Chunked::Size => {
                    let Some(line) = take_line(buf)? else { break };
                    let digits = line[..]
                        .split(|b: &u8| *b == b';')
                        .next()
                        .unwrap_or(&[])
                        .trim_ascii();
                    let size = std::str::from_utf8(digits)
                        .ok()
                        .filter(|s| !s.is_empty() && s.len() <= 16)
                        .and_then(|s| u64::from_str_radix(s, 16).ok())
                        .ok_or_else(|| invalid("invalid chunk size"))?;
                    state = if size == 0 {
                        Chunked::Trailers
                    } else {
                        Chunked::Data(size)
                    };
                }
                Chunked::Data(remaining) => {
                    if buf.is_empty() {
                        break;
                    }
                    let n = buf
                        .len()
                        .min(usize::try_from(remaining).unwrap_or(usize::MAX));
                    let data = buf.split_to(n).freeze();
                    let remaining = remaining - n as u64;
                    self.framing = Framing::Chunked(if remaining == 0 {
                        Chunked::DataEnd
                    } else {
                        Chunked::Data(remaining)
                    });
                    return Ok(Some(data));
                }
                Chunked::DataEnd => {
                    let Some(line) = take_line(buf)? else { break };
                    if !line.is_empty() {
                        return Err(invalid("missing CRLF after chunk data"));
                    }
                    state = Chunked::Size;
                }
                Chunked::Trailers => {
                    let Some(line) = take_line(buf)? else { break };
                    if line.is_empty() {
                        self.finish();
                        return Ok(None);
                    }
                }
            }
        }
        self.framing = Framing::Chunked(state);
        Ok(None)
    }

    fn take(&mut self, n: usize) -> Bytes {
        match self.connection.as_mut() {
            Some(connection) => connection.buf.split_to(n).freeze(),
            None => Bytes::new(),
        }
    }
}

/// Takes one CRLF-terminated line (without the CRLF) out of `buf`.
fn take_line(buf: &mut BytesMut) -> io::Result<Option<BytesMut>> {
    match buf.iter().position(|b| *b == b'\n') {
        Some(end) => {
            let mut line = buf.split_to(end + 1);
            line.truncate(end);
            if line.last() == Some(&b'\r') {
                line.truncate(end - 1);
            }
            Ok(Some(line))
        }
        None if buf.len() > MAX_CHUNK_LINE => Err(invalid("chunk line too long")),
        None => Ok(None),
    }
}

fn eof(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, what)
}

fn invalid(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        let polled = ready!(this.poll_data(cx));
        if let Some(Err(_)) = &polled {
            this.framing = Framing::Done;
            this.connection = None;
        }
        Poll::Ready(polled.map(|r| r.map(Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.framing, Framing::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Done => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}
