//! Request and response heads at the proxy boundary, as bytes: parsed with
//! `httparse`, checked (RFC 9112 framing rules), and rewritten for the next
//! hop without building a header map. Hop-by-hop headers stay on their hop
//! (RFC 9110 §7.6.1), and the backend learns who the client was through
//! `X-Forwarded-For`, `-Proto` and `-Host`.

use std::mem::MaybeUninit;
use std::ops::Range;

use http::Method;

use super::http1::{content_length, has_token, is_hop_by_hop, ConnectionList, Framing};

/// Most header fields accepted in a head (as hyper's default).
pub const MAX_HEADERS: usize = 100;

/// Why a request head is refused. Each maps to one status; the connection
/// is closed after the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// Malformed or ambiguous: 400.
    #[error("{0}")]
    BadRequest(&'static str),
    /// More header fields than accepted: 431 (the size limit is the
    /// caller's).
    #[error("too many header fields")]
    TooLarge,
    /// A feature this proxy does not offer (`CONNECT`, transfer codings
    /// other than chunked): 501.
    #[error("{0}")]
    NotImplemented(&'static str),
    /// An `Expect` other than `100-continue`: 417.
    #[error("unsupported expectation")]
    ExpectationFailed,
}

/// A client's request head, checked and rewritten for the backend.
///
/// The rewritten request line and header fields are one buffer, so a
/// request costs one allocation for its head (the `Host` line the upstream
/// side may add goes between them, as its own slice of a vectored write).
#[derive(Debug)]
pub struct RequestHead {
    /// `METHOD target HTTP/1.1\r\n`, then the rewritten header fields and
    /// the blank line that ends the head.
    bytes: Vec<u8>,
    /// Where the request line ends in `bytes`.
    line_end: usize,
    /// Where the target is in `bytes`.
    target: Range<usize>,
    /// Where the forwarded `host` field's value is in `bytes` (empty when
    /// there is none).
    host: Range<usize>,
    /// Whether the rewritten fields already carry `host` (the client's
    /// `Host`, or the authority of an absolute-form target); if not, the
    /// backend's address is sent.
    pub has_host: bool,
    /// The method.
    pub method: Method,
    /// How the request body is delimited.
    pub framing: Framing,
    /// Whether the client wants to keep the connection open afterwards.
    pub keep_alive: bool,
    /// Whether the client waits for `100 Continue` before sending its body.
    pub expect_continue: bool,
    /// Whether the client spoke HTTP/1.1 (else 1.0).
    pub http11: bool,
    /// Whether this is a WebSocket handshake (`Connection: upgrade`,
    /// `Upgrade: websocket`), forwarded with both fields: a `101` answer
    /// turns the two connections into a tunnel.
    pub upgrade: bool,
}

impl RequestHead {
    /// `METHOD target HTTP/1.1\r\n`.
    pub fn request_line(&self) -> &[u8] {
        &self.bytes[..self.line_end]
    }

    /// The rewritten header fields and the blank line that ends the head.
    pub fn fields(&self) -> &[u8] {
        &self.bytes[self.line_end..]
    }

    /// The request target as forwarded (origin form, or `*`), for the
    /// access log.
    pub fn target(&self) -> &str {
        // httparse admits only visible ASCII in a target.
        std::str::from_utf8(&self.bytes[self.target.clone()]).unwrap_or_default()
    }

    /// The `Host` the request is forwarded with (the client's, or an
    /// absolute-form target's authority); `""` when there is none, or it is
    /// not UTF-8.
    pub fn host(&self) -> &str {
        std::str::from_utf8(&self.bytes[self.host.clone()]).unwrap_or_default()
    }

    /// The header fields as forwarded, in request order: what the backend
    /// gets, so no hop-by-hop field, and this hop's `X-Forwarded-*` at the
    /// end. Values as raw bytes (`httparse` admits obs-text).
    pub fn forwarded_fields(&self) -> impl Iterator<Item = (&str, &[u8])> {
        // The fields were written by `parse_request` as `name: value\r\n`
        // lines, names being tokens (ASCII), up to the blank line.
        self.fields().split(|b| *b == b'\n').filter_map(|line| {
            let line = line.strip_suffix(b"\r")?;
            let colon = line.iter().position(|b| *b == b':')?;
            let name = std::str::from_utf8(&line[..colon]).ok()?;
            Some((name, line.get(colon + 2..).unwrap_or_default()))
        })
    }
}

impl RequestHead {
    /// Whether the method's requests may be sent twice without changing
    /// the outcome (RFC 9110 §9.2.2).
    pub fn is_idempotent(&self) -> bool {
        matches!(
            self.method,
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        )
    }
}

/// Parses the request head at the start of `buf` and rewrites it for a
/// backend, the client being `client` (its address as text), connected
/// over TLS if `tls` (which `X-Forwarded-Proto` says). `Ok(None)`: the
/// head is not complete yet. `Ok(Some((len, head)))`: the head took `len`
/// bytes.
pub fn parse_request(
    buf: &[u8],
    client: &str,
    tls: bool,
) -> Result<Option<(usize, RequestHead)>, HeadError> {
    let mut fields = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut request,
        buf,
        &mut fields,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(httparse::Error::Version) => return Err(HeadError::BadRequest("unsupported version")),
        Err(_) => return Err(HeadError::BadRequest("malformed request head")),
    };
    let method_text = request.method.unwrap_or_default();
    let target = request.path.unwrap_or_default();
    let http11 = request.version == Some(1);
    let headers: &[httparse::Header<'_>] = request.headers;

    let method = Method::from_bytes(method_text.as_bytes())
        .map_err(|_| HeadError::BadRequest("invalid method"))?;
    if method == Method::CONNECT {
        return Err(HeadError::NotImplemented("CONNECT is not supported"));
    }
    // The target: origin-form, absolute-form (its authority stands in for a
    // missing Host), or `*` for OPTIONS.
    let origin_form = target.starts_with('/') || (target == "*" && method == Method::OPTIONS);
    let (path, authority) = if origin_form {
        (target, None)
    } else if let Some(rest) = strip_prefix_ignore_case(target, "http://") {
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        if authority.is_empty() || authority.contains('@') {
            return Err(HeadError::BadRequest("invalid request target"));
        }
        (if path.is_empty() { "/" } else { path }, Some(authority))
    } else {
        return Err(HeadError::BadRequest("invalid request target"));
    };

    let mut hosts = 0;
    let mut host_value: Option<&[u8]> = None;
    let mut transfer_encoding: Option<&[u8]> = None;
    let mut te_fields = 0;
    let mut lengths: [&[u8]; 4] = [&[]; 4];
    let mut length_fields = 0;
    let mut keep_alive = http11;
    let mut close = false;
    let mut expect_continue = false;
    let mut connection_upgrade = false;
    let mut websocket = false;
    for h in headers {
        let name = h.name;
        if name.eq_ignore_ascii_case("upgrade") {
            // A protocol list; `websocket` (any version suffix) is the one
            // upgrade forwarded. `h2c` and the rest stay on this hop.
            websocket |= h.value.split(|b| *b == b',').any(|p| {
                let name = p.split(|b| *b == b'/').next().unwrap_or_default();
                name.trim_ascii().eq_ignore_ascii_case(b"websocket")
            });
        } else if name.eq_ignore_ascii_case("host") {
            hosts += 1;
            host_value = Some(h.value);
        } else if name.eq_ignore_ascii_case("content-length") {
            if length_fields == lengths.len() {
                return Err(HeadError::BadRequest("too many Content-Length fields"));
            }
            lengths[length_fields] = h.value;
            length_fields += 1;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            te_fields += 1;
            transfer_encoding = Some(h.value);
        } else if name.eq_ignore_ascii_case("connection") {
            close |= has_token(h.value, b"close");
            keep_alive |= has_token(h.value, b"keep-alive");
            connection_upgrade |= has_token(h.value, b"upgrade");
        } else if name.eq_ignore_ascii_case("expect") {
            if h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue") {
                expect_continue = true;
            } else {
                return Err(HeadError::ExpectationFailed);
            }
        }
    }
    if hosts > 1 {
        return Err(HeadError::BadRequest("more than one Host field"));
    }
    if http11 && hosts == 0 {
        return Err(HeadError::BadRequest("HTTP/1.1 request without Host"));
    }
    if let Some(host) = host_value {
        if host.is_empty() && authority.is_none() && http11 {
            return Err(HeadError::BadRequest("empty Host"));
        }
    }
    let keep_alive = keep_alive && !close;

    // Framing (RFC 9112 §6.1-6.3). Both Content-Length and
    // Transfer-Encoding is the shape of a smuggling attempt: refused.
    let length = content_length(&lengths[..length_fields]).map_err(HeadError::BadRequest)?;
    let framing = match transfer_encoding {
        Some(_) if length_fields > 0 => {
            return Err(HeadError::BadRequest(
                "both Content-Length and Transfer-Encoding",
            ))
        }
        Some(_) if !http11 => return Err(HeadError::BadRequest("Transfer-Encoding in HTTP/1.0")),
        Some(value) => {
            let last = value
                .rsplit(|b| *b == b',')
                .next()
                .unwrap_or(&[])
                .trim_ascii();
            if !last.eq_ignore_ascii_case(b"chunked") {
                return Err(HeadError::BadRequest(
                    "chunked is not the final transfer coding",
                ));
            }
            if te_fields > 1 || value.contains(&b',') {
                return Err(HeadError::NotImplemented(
                    "transfer codings other than chunked",
                ));
            }
            Framing::CHUNKED
        }
        None => match length {
            Some(0) | None => Framing::Done,
            Some(n) => Framing::Length(n),
        },
    };

    // The head for the backend: the request line, then the fields.
    let mut out = Vec::with_capacity(buf.len().min(len) + 128);
    out.extend_from_slice(method_text.as_bytes());
    out.push(b' ');
    let target_start = out.len();
    if !path.starts_with(['/', '*']) {
        // `http://host?query` has an empty path: it is `/`.
        out.push(b'/');
    }
    out.extend_from_slice(path.as_bytes());
    let target_range = target_start..out.len();
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let line_end = out.len();

    let mut forwarded_for: Vec<&[u8]> = Vec::new();
    let mut host_range = 0..0;
    let listed = ConnectionList::of(headers);
    for h in headers {
        let name = h.name;
        if is_hop_by_hop(name)
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("content-length")
            || name.eq_ignore_ascii_case("x-forwarded-proto")
            || name.eq_ignore_ascii_case("x-forwarded-host")
            || (listed.contains(name) && !is_kept_whatever_connection_says(name))
        {
            continue;
        }
        if name.eq_ignore_ascii_case("x-forwarded-for") {
            let value = h.value.trim_ascii();
            if !value.is_empty() {
                forwarded_for.push(value);
            }
            continue;
        }
        if name.eq_ignore_ascii_case("host") {
            if h.value.is_empty() {
                continue;
            }
            host_range = push_field(&mut out, name.as_bytes(), h.value);
            continue;
        }
        push_field(&mut out, name.as_bytes(), h.value);
    }
    let host = host_value
        .filter(|h| !h.is_empty())
        .or(authority.map(str::as_bytes));
    if host_value.is_none_or(<[u8]>::is_empty) {
        if let Some(authority) = authority {
            host_range = push_field(&mut out, b"host", authority.as_bytes());
        }
    }
    // X-Forwarded-For is appended to (earlier proxies keep their entries,
    // several fields joined into one list, RFC 9110 §5.3); -Proto and -Host
    // describe this hop and are overwritten, so a client cannot claim
    // another scheme or host.
    out.extend_from_slice(b"x-forwarded-for: ");
    for value in forwarded_for {
        out.extend_from_slice(value);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(client.as_bytes());
    out.extend_from_slice(if tls {
        b"\r\nx-forwarded-proto: https\r\n"
    } else {
        b"\r\nx-forwarded-proto: http\r\n"
    });
    if let Some(host) = host {
        push_field(&mut out, b"x-forwarded-host", host);
    }
    match framing {
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked(_) => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        // A client's explicit zero length is kept: it matters for POST.
        _ if length == Some(0) => out.extend_from_slice(b"content-length: 0\r\n"),
        _ => {}
    }
    // The WebSocket handshake (RFC 6455 §4.1: a GET, HTTP/1.1, no body)
    // keeps its two hop-by-hop fields for the backend.
    let upgrade = connection_upgrade
        && websocket
        && method == Method::GET
        && http11
        && framing.is_done()
        && length.is_none();
    if upgrade {
        out.extend_from_slice(b"connection: upgrade\r\nupgrade: websocket\r\n");
    }
    out.extend_from_slice(b"\r\n");

    Ok(Some((
        len,
        RequestHead {
            bytes: out,
            line_end,
            target: target_range,
            host: host_range,
            has_host: host.is_some(),
            method,
            framing,
            keep_alive,
            expect_continue,
            http11,
            upgrade,
        },
    )))
}

/// `Host` and the fields this hop writes itself (framing, `X-Forwarded-*`)
/// are not dropped because a client's `Connection` names them: a request
/// without `Host` is invalid, and the forwarding fields are this hop's
/// anyway (the client's values are replaced or appended to).
fn is_kept_whatever_connection_says(name: &str) -> bool {
    ["host", "x-forwarded-for"]
        .iter()
        .any(|kept| kept.eq_ignore_ascii_case(name))
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

/// Writes `name: value\r\n`; returns where the value went.
fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) -> Range<usize> {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    let start = out.len();
    out.extend_from_slice(value);
    let range = start..out.len();
    out.extend_from_slice(b"\r\n");
    range
}

/// A backend's response head, rewritten for the client: everything but the
/// framing fields, which depend on the client.
#[derive(Debug)]
pub struct ResponseHead {
    /// The status code.
    pub status: u16,
    /// `HTTP/1.1 code reason\r\n` and the end-to-end fields; no
    /// `Content-Length`, `Transfer-Encoding` or `Connection`, no blank line.
    pub head: Vec<u8>,
    /// How the body is delimited on the backend connection.
    pub framing: Framing,
    /// A `Content-Length` to pass on although there is no body to read
    /// (responses to `HEAD`, 304).
    pub declared_length: Option<u64>,
    /// Whether the backend connection can carry another request after it.
    pub reusable: bool,
    /// A `101 Switching Protocols` to WebSocket, for a request that asked
    /// for it: the connection is now a tunnel (and `head` has the
    /// backend's `Upgrade` field).
    pub upgraded: bool,
}

/// What [`parse_response`] found.
#[derive(Debug)]
pub enum ParsedResponse {
    /// A final response whose head took this many bytes.
    Final(usize, ResponseHead),
    /// An interim (1xx) response of this many bytes, to be skipped.
    Interim(usize),
    /// More bytes are needed.
    Partial,
}

/// Parses the response head at the start of `buf`, received for a request
/// that was a `HEAD` if `head_request`, and asked for a WebSocket upgrade
/// if `upgrade`.
pub fn parse_response(
    buf: &[u8],
    head_request: bool,
    upgrade: bool,
) -> Result<ParsedResponse, &'static str> {
    let mut fields = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut fields,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(ParsedResponse::Partial),
        Err(httparse::Error::TooManyHeaders) => return Err("too many header fields"),
        Err(_) => return Err("malformed response head"),
    };
    let status = response.code.unwrap_or(0);
    if !(100..=999).contains(&status) {
        return Err("invalid status code");
    }
    let upgraded = status == 101;
    if upgraded && !upgrade {
        return Err("unrequested protocol switch");
    }
    if status < 200 && !upgraded {
        return Ok(ParsedResponse::Interim(len));
    }
    let http11 = response.version == Some(1);
    let headers: &[httparse::Header<'_>] = response.headers;

    let mut lengths: [&[u8]; 4] = [&[]; 4];
    let mut length_fields = 0;
    let mut transfer_encoding: Option<&[u8]> = None;
    let mut close = !http11;
    let listed = ConnectionList::of(headers);
    let mut switched = false;
    let mut head = Vec::with_capacity(len + 16);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(itoa::Buffer::new().format(status).as_bytes());
    head.push(b' ');
    head.extend_from_slice(response.reason.unwrap_or_default().as_bytes());
    head.extend_from_slice(b"\r\n");
    for h in headers {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            if length_fields == lengths.len() {
                return Err("too many Content-Length fields");
            }
            lengths[length_fields] = h.value;
            length_fields += 1;
            continue;
        }
        if name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = Some(h.value);
            continue;
        }
        if name.eq_ignore_ascii_case("connection") {
            close |= has_token(h.value, b"close");
            if !http11 && has_token(h.value, b"keep-alive") {
                close = false;
            }
            continue;
        }
        if upgraded && name.eq_ignore_ascii_case("upgrade") {
            if !h.value.trim_ascii().eq_ignore_ascii_case(b"websocket") {
                return Err("switched to another protocol than the WebSocket asked for");
            }
            push_field(&mut head, b"upgrade", b"websocket");
            switched = true;
            continue;
        }
        if is_hop_by_hop(name) || listed.contains(name) {
            continue;
        }
        push_field(&mut head, name.as_bytes(), h.value);
    }
    if upgraded {
        if !switched {
            return Err("101 without Upgrade: websocket");
        }
        return Ok(ParsedResponse::Final(
            len,
            ResponseHead {
                status,
                head,
                framing: Framing::Done,
                declared_length: None,
                reusable: false,
                upgraded: true,
            },
        ));
    }
    let length = content_length(&lengths[..length_fields])?;
    // RFC 9112 §6.3, in order.
    let no_body = head_request || status == 204 || status == 304;
    let (framing, declared_length, framing_reusable) = if no_body {
        (Framing::Done, length, true)
    } else if let Some(value) = transfer_encoding {
        let chunked = value
            .rsplit(|b| *b == b',')
            .next()
            .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        if chunked {
            // With Content-Length as well, the message is suspect:
            // Transfer-Encoding wins and the connection is not reused.
            (Framing::CHUNKED, None, length_fields == 0)
        } else {
            (Framing::UntilClose, None, false)
        }
    } else {
        match length {
            Some(0) => (Framing::Done, Some(0), true),
            Some(n) => (Framing::Length(n), Some(n), true),
            None => (Framing::UntilClose, None, false),
        }
    };
    Ok(ParsedResponse::Final(
        len,
        ResponseHead {
            status,
            head,
            framing,
            declared_length,
            reusable: framing_reusable && !close,
            upgraded: false,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forward(raw: &str) -> Result<RequestHead, HeadError> {
        parse_request(raw.as_bytes(), "127.0.0.9", false).map(|r| r.expect("complete").1)
    }

    fn fields(head: &RequestHead) -> String {
        String::from_utf8(head.fields().to_vec()).unwrap()
    }

    #[test]
    fn removes_standard_and_listed_hop_by_hop_headers() {
        let head = forward(
            "GET /p?q HTTP/1.1\r\nConnection: keep-alive, X-Secret\r\nConnection: x-other\r\n\
             Keep-Alive: timeout=5\r\nTE: trailers\r\nUpgrade: websocket\r\n\
             Proxy-Authorization: Basic x\r\nX-Secret: 1\r\nX-Other: 2\r\nX-Kept: 3\r\n\
             Host: example.com\r\n\r\n",
        )
        .unwrap();
        assert_eq!(head.request_line(), b"GET /p?q HTTP/1.1\r\n");
        assert_eq!(head.target(), "/p?q");
        assert_eq!(
            fields(&head),
            "X-Kept: 3\r\nHost: example.com\r\nx-forwarded-for: 127.0.0.9\r\n\
             x-forwarded-proto: http\r\nx-forwarded-host: example.com\r\n\r\n"
        );
        assert!(head.keep_alive && head.http11 && head.has_host);
    }

    #[test]
    fn connection_cannot_drop_host_or_the_forwarding_fields() {
        // Found by the headers fuzz target: a client listing Host or
        // X-Forwarded-* in Connection.
        let head = forward(
            "GET / HTTP/1.1\r\nHost: example.com\r\nX-Forwarded-For: 10.0.0.1\r\n\
             Connection: close, host, x-forwarded-host, X-Forwarded-For\r\n\r\n",
        )
        .unwrap();
        let text = fields(&head);
        assert!(text.starts_with("Host: example.com\r\n"), "{text}");
        assert!(head.has_host);
        assert!(
            text.contains("x-forwarded-for: 10.0.0.1, 127.0.0.9\r\n"),
            "{text}"
        );
        assert!(text.contains("x-forwarded-host: example.com\r\n"), "{text}");
        assert_eq!(text.matches("x-forwarded-").count(), 3, "{text}");
    }

    #[test]
    fn appends_forwarded_for_and_overwrites_proto_and_host() {
        let head = forward(
            "GET / HTTP/1.1\r\nHost: example.com:8080\r\nX-Forwarded-For: 10.0.0.1\r\n\
             X-Forwarded-For: 10.0.0.2, 10.0.0.3\r\nX-Forwarded-Proto: https\r\n\
             X-Forwarded-Host: evil\r\n\r\n",
        )
        .unwrap();
        let text = fields(&head);
        assert!(text.contains("x-forwarded-for: 10.0.0.1, 10.0.0.2, 10.0.0.3, 127.0.0.9\r\n"));
        assert!(text.contains("x-forwarded-proto: http\r\n"));
        assert!(text.contains("x-forwarded-host: example.com:8080\r\n"));
        assert!(!text.contains("https") && !text.contains("evil"));
    }

    #[test]
    fn framing_is_checked() {
        let bad = |raw: &str| forward(raw).unwrap_err();
        assert!(matches!(
            bad("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"),
            HeadError::BadRequest(_)
        ));
        assert!(matches!(
            bad("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\n"),
            HeadError::BadRequest(_)
        ));
        assert!(matches!(
            bad("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"),
            HeadError::BadRequest(_)
        ));
        assert!(matches!(
            bad("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            HeadError::NotImplemented(_)
        ));
        assert!(matches!(
            bad("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            HeadError::BadRequest(_)
        ));
        assert!(matches!(
            bad("GET / HTTP/1.1\r\n\r\n"),
            HeadError::BadRequest(_)
        ));
        assert!(matches!(
            bad("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
            HeadError::BadRequest(_)
        ));
        assert!(matches!(
            bad("CONNECT x:443 HTTP/1.1\r\nHost: x\r\n\r\n"),
            HeadError::NotImplemented(_)
        ));
        assert!(matches!(
            bad("GET / HTTP/1.1\r\nHost: x\r\nExpect: magic\r\n\r\n"),
            HeadError::ExpectationFailed
        ));

        let chunked =
            forward("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n\r\n").unwrap();
        assert_eq!(chunked.framing, Framing::CHUNKED);
        assert!(fields(&chunked).ends_with("transfer-encoding: chunked\r\n\r\n"));
        let sized = forward("PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\n").unwrap();
        assert_eq!(sized.framing, Framing::Length(5));
        assert!(fields(&sized).ends_with("content-length: 5\r\n\r\n"));
    }

    #[test]
    fn only_a_websocket_handshake_keeps_upgrade_and_connection() {
        let ws = "GET /chat HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\n\
                  Upgrade: WebSocket\r\nSec-WebSocket-Key: k\r\nSec-WebSocket-Version: 13\r\n\r\n";
        let head = forward(ws).unwrap();
        assert!(head.upgrade);
        assert_eq!(
            fields(&head),
            "Host: x\r\nSec-WebSocket-Key: k\r\nSec-WebSocket-Version: 13\r\n\
             x-forwarded-for: 127.0.0.9\r\nx-forwarded-proto: http\r\nx-forwarded-host: x\r\n\
             connection: upgrade\r\nupgrade: websocket\r\n\r\n"
        );
        for not_forwarded in [
            // h2c, and an Upgrade that Connection does not name.
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AA\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n",
            // Not a GET, or with a body, or HTTP/1.0.
            "POST / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 2\r\n\r\n",
            "GET / HTTP/1.0\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        ] {
            let head = forward(not_forwarded).unwrap();
            assert!(!head.upgrade, "{not_forwarded:?}");
            let fields = fields(&head).to_ascii_lowercase();
            assert!(
                !fields.contains("upgrade") && !fields.contains("connection:"),
                "{fields}"
            );
        }
    }

    #[test]
    fn a_tls_client_is_forwarded_as_https_whatever_it_claims() {
        let raw = "GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-Proto: http\r\n\r\n";
        let (_, head) = parse_request(raw.as_bytes(), "127.0.0.9", true)
            .unwrap()
            .unwrap();
        let fields = fields(&head);
        assert!(fields.contains("x-forwarded-proto: https\r\n"), "{fields}");
        assert_eq!(fields.matches("x-forwarded-proto").count(), 1);
        assert!(forward(raw)
            .map(|h| self::fields(&h).contains("x-forwarded-proto: http\r\n"))
            .unwrap());
    }

    #[test]
    fn a_101_is_final_only_for_a_websocket_handshake() {
        let switch = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                       Connection: Upgrade\r\nSec-WebSocket-Accept: a\r\n\r\nFRAME";
        let ParsedResponse::Final(len, head) = parse_response(switch, false, true).unwrap() else {
            panic!("a 101 to a handshake is the final answer");
        };
        assert_eq!(&switch[len..], b"FRAME");
        assert!(head.upgraded && !head.reusable && head.framing.is_done());
        assert_eq!(
            String::from_utf8(head.head).unwrap(),
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nSec-WebSocket-Accept: a\r\n"
        );
        assert!(
            parse_response(switch, false, false).is_err(),
            "not asked for"
        );
        let other =
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n";
        assert!(parse_response(other, false, true).is_err());
        let bare = b"HTTP/1.1 101 Switching Protocols\r\n\r\n";
        assert!(parse_response(bare, false, true).is_err());
        // A refusal is an ordinary response.
        let refused = b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n";
        let ParsedResponse::Final(_, head) = parse_response(refused, false, true).unwrap() else {
            panic!("a 426 is final");
        };
        assert!(!head.upgraded && head.reusable);
    }

    #[test]
    fn absolute_form_targets_become_origin_form() {
        let head = forward("GET http://example.com:81?x=1 HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!(head.request_line(), b"GET /?x=1 HTTP/1.1\r\n");
        assert_eq!(head.target(), "/?x=1");
        assert!(fields(&head).starts_with("host: example.com:81\r\n"));
        assert!(!head.keep_alive && !head.http11);
    }

    #[test]
    fn responses_lose_hop_by_hop_and_framing_fields() {
        let raw = b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n\
                    Content-Length: 3\r\nServer: b\r\n\r\nabc";
        let ParsedResponse::Final(len, head) = parse_response(raw, false, false).unwrap() else {
            panic!("complete");
        };
        assert_eq!(&raw[len..], b"abc");
        assert_eq!(head.head, b"HTTP/1.1 200 OK\r\nServer: b\r\n");
        assert_eq!(head.framing, Framing::Length(3));
        assert!(head.reusable);

        let ParsedResponse::Final(_, head) =
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true, false).unwrap()
        else {
            panic!("complete");
        };
        assert_eq!(
            (head.framing, head.declared_length),
            (Framing::Done, Some(9))
        );

        let ParsedResponse::Final(_, head) = parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
            false,
        )
        .unwrap() else {
            panic!("complete");
        };
        assert_eq!(head.framing, Framing::CHUNKED);
        assert!(!head.reusable);

        let ParsedResponse::Final(_, head) =
            parse_response(b"HTTP/1.0 200 OK\r\n\r\n", false, false).unwrap()
        else {
            panic!("complete");
        };
        assert_eq!(head.framing, Framing::UntilClose);
        assert!(!head.reusable);

        assert!(matches!(
            parse_response(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200", false, false),
            Ok(ParsedResponse::Interim(25))
        ));
        assert!(parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            false,
            false
        )
        .is_err());
    }
}
