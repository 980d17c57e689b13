//! HTTP/1.1 pieces both sides of the proxy share: body framing and its
//! decoder (RFC 9112 §6, §7.1), header-field classification, and timed
//! reads and body writes on a [`Stream`].

use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use crate::transport::Stream;
pub use crate::transport::READ_CHUNK;
/// Longest chunk-size line (with extensions) or trailer line.
const MAX_CHUNK_LINE: usize = 4096;

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body, or all of it read.
    Done,
    /// This many bytes to go.
    Length(u64),
    /// `Transfer-Encoding: chunked`, in the given state.
    Chunked(Chunked),
    /// Until the sender closes the connection (responses only).
    UntilClose,
}

/// Where a chunked decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunked {
    /// Expecting a chunk-size line.
    Size,
    /// In a chunk's data, this many bytes to go.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines up to an empty one.
    Trailers,
}

impl Framing {
    /// A chunked body, from its start.
    pub const CHUNKED: Framing = Framing::Chunked(Chunked::Size);

    /// Whether the whole body has been read.
    pub fn is_done(self) -> bool {
        self == Framing::Done
    }

    /// Takes the next piece of body out of `buf`: `Some(data)`, or `None`
    /// when more input is needed or the body is done (see
    /// [`Framing::is_done`]). Chunk sizes, CRLFs and trailers are consumed;
    /// only data comes out.
    pub fn decode(&mut self, buf: &mut BytesMut) -> io::Result<Option<Bytes>> {
        loop {
            match *self {
                Framing::Done => return Ok(None),
                Framing::Length(remaining) => {
                    let Some((data, left)) = take_up_to(buf, remaining) else {
                        return Ok(None);
                    };
                    *self = if left == 0 {
                        Framing::Done
                    } else {
                        Framing::Length(left)
                    };
                    return Ok(Some(data));
                }
                Framing::UntilClose => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    return Ok(Some(buf.split().freeze()));
                }
                Framing::Chunked(Chunked::Size) => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(None);
                    };
                    let digits = line[..]
                        .split(|b| *b == b';')
                        .next()
                        .unwrap_or(&[])
                        .trim_ascii();
                    let size = std::str::from_utf8(digits)
                        .ok()
                        .filter(|s| {
                            !s.is_empty()
                                && s.len() <= 15
                                && s.bytes().all(|b| b.is_ascii_hexdigit())
                        })
                        .and_then(|s| u64::from_str_radix(s, 16).ok())
                        .ok_or_else(|| invalid("invalid chunk size"))?;
                    *self = Framing::Chunked(if size == 0 {
                        Chunked::Trailers
                    } else {
                        Chunked::Data(size)
                    });
                }
                Framing::Chunked(Chunked::Data(remaining)) => {
                    let Some((data, left)) = take_up_to(buf, remaining) else {
                        return Ok(None);
                    };
                    *self = Framing::Chunked(if left == 0 {
                        Chunked::DataEnd
                    } else {
                        Chunked::Data(left)
                    });
                    return Ok(Some(data));
                }
                Framing::Chunked(Chunked::DataEnd) => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(None);
                    };
                    if !line.is_empty() {
                        return Err(invalid("missing CRLF after chunk data"));
                    }
                    *self = Framing::CHUNKED;
                }
                Framing::Chunked(Chunked::Trailers) => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(None);
                    };
                    // Trailer fields are not forwarded.
                    if line.is_empty() {
                        *self = Framing::Done;
                    }
                }
            }
        }
    }

    /// The sender closed the connection: the end of an until-close body,
    /// an error for any other unfinished body.
    pub fn at_eof(&mut self) -> io::Result<()> {
        match *self {
            Framing::Done => Ok(()),
            Framing::UntilClose => {
                *self = Framing::Done;
                Ok(())
            }
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the body was cut short",
            )),
        }
    }
}

/// Takes up to `remaining` bytes out of `buf`: the data and how many bytes
/// are still to come; `None` when `buf` is empty.
fn take_up_to(buf: &mut BytesMut, remaining: u64) -> Option<(Bytes, u64)> {
    if buf.is_empty() {
        return None;
    }
    let n = buf
        .len()
        .min(usize::try_from(remaining).unwrap_or(usize::MAX));
    Some((buf.split_to(n).freeze(), remaining - n as u64))
}

/// Takes one LF-terminated line (without the CRLF) out of `buf`.
fn take_line(buf: &mut BytesMut) -> io::Result<Option<BytesMut>> {
    match buf.iter().position(|b| *b == b'\n') {
        Some(end) if end <= MAX_CHUNK_LINE => {
            let mut line = buf.split_to(end + 1);
            line.truncate(end);
            if line.last() == Some(&b'\r') {
                line.truncate(end - 1);
            }
            Ok(Some(line))
        }
        Some(_) => Err(invalid("chunk line too long")),
        None if buf.len() > MAX_CHUNK_LINE => Err(invalid("chunk line too long")),
        None => Ok(None),
    }
}

/// An `InvalidData` error: the peer broke HTTP/1 framing.
pub fn invalid(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// [`Stream::read_more`], failing with `TimedOut` and `stalled` as the
/// message if nothing arrives within `stall`.
pub async fn read_more_within(
    stream: &Stream,
    buf: &mut BytesMut,
    stall: Duration,
    stalled: &'static str,
) -> io::Result<usize> {
    tokio::time::timeout(stall, stream.read_more(buf))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, stalled))?
}

/// Writes one piece of a body in the given framing: as is, or as a chunk.
pub async fn write_body(
    stream: &Stream,
    data: &[u8],
    chunked: bool,
    stall: Option<Duration>,
) -> io::Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    if chunked {
        let size = chunk_size_line(data.len());
        stream
            .write_all(&[size.as_bytes(), data, b"\r\n"], stall)
            .await
    } else {
        stream.write_all(&[data], stall).await
    }
}

/// `{len:x}\r\n`: the line that starts a chunk.
pub fn chunk_size_line(len: usize) -> String {
    format!("{len:x}\r\n")
}

/// The end of a chunked body (no trailers).
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

pub use crate::fields::is_hop_by_hop;

/// Whether the comma-separated `value` lists `token` (case-insensitive).
pub fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// The header names that `Connection` fields list (besides `close` and
/// `keep-alive`), which are hop-by-hop too. Collected once per head.
#[derive(Debug, Default)]
pub struct ConnectionList<'a> {
    names: Vec<&'a [u8]>,
}

impl<'a> ConnectionList<'a> {
    /// The list of every `Connection` field in `headers`.
    pub fn of(headers: &[httparse::Header<'a>]) -> ConnectionList<'a> {
        let mut names = Vec::new();
        for h in headers {
            if h.name.eq_ignore_ascii_case("connection") {
                for token in h.value.split(|b| *b == b',') {
                    let token = token.trim_ascii();
                    if !token.is_empty()
                        && !token.eq_ignore_ascii_case(b"close")
                        && !token.eq_ignore_ascii_case(b"keep-alive")
                    {
                        names.push(token);
                    }
                }
            }
        }
        ConnectionList { names }
    }

    /// Whether `name` is listed.
    pub fn contains(&self, name: &str) -> bool {
        self.names
            .iter()
            .any(|listed| listed.eq_ignore_ascii_case(name.as_bytes()))
    }
}

/// Parses a `Content-Length` value list (`"5"`, or `"5, 5"`): every entry
/// a number, all equal (RFC 9110 §8.6).
pub fn content_length(values: &[&[u8]]) -> Result<Option<u64>, &'static str> {
    let mut length = None;
    for value in values {
        for part in value.split(|b| *b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                return Err("invalid Content-Length");
            }
            let n: u64 = std::str::from_utf8(part)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or("invalid Content-Length")?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting Content-Length values");
            }
            length = Some(n);
        }
    }
    Ok(length)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(framing: Framing, input: &[&[u8]]) -> io::Result<(Vec<u8>, Framing)> {
        let mut framing = framing;
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in input {
            buf.extend_from_slice(piece);
            while let Some(data) = framing.decode(&mut buf)? {
                out.extend_from_slice(&data);
            }
        }
        Ok((out, framing))
    }

    #[test]
    fn chunked_bodies_decode_across_any_split() {
        let body = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
        for split in 0..body.len() {
            let (out, framing) =
                decode_all(Framing::CHUNKED, &[&body[..split], &body[split..]]).unwrap();
            assert_eq!(out, b"Wikipedia in\r\n\r\nchunks.", "split at {split}");
            assert!(framing.is_done());
        }
    }

    #[test]
    fn chunked_bodies_leave_what_follows_in_the_buffer() {
        let mut framing = Framing::CHUNKED;
        let mut buf = BytesMut::from(&b"1\r\na\r\n0\r\n\r\nGET / HTTP/1.1\r\n"[..]);
        assert_eq!(framing.decode(&mut buf).unwrap().unwrap(), "a");
        assert_eq!(framing.decode(&mut buf).unwrap(), None);
        assert!(framing.is_done());
        assert_eq!(&buf[..], b"GET / HTTP/1.1\r\n");
    }

    #[test]
    fn malformed_chunks_are_errors() {
        for bad in [
            &b"zz\r\n"[..],
            b"-1\r\n",
            b"1\r\nab\r\n",
            b"ffffffffffffffffff\r\n",
            b"\r\n",
        ] {
            assert!(decode_all(Framing::CHUNKED, &[bad]).is_err(), "{bad:?}");
        }
        let long = vec![b'1'; MAX_CHUNK_LINE + 2];
        assert!(decode_all(Framing::CHUNKED, &[&long]).is_err());
    }

    #[test]
    fn length_bodies_stop_at_their_length() {
        let (out, framing) = decode_all(Framing::Length(5), &[b"abc", b"defg"]).unwrap();
        assert_eq!(out, b"abcde");
        assert!(framing.is_done());
        let mut short = Framing::Length(5);
        assert!(short.at_eof().is_err());
        let mut until_close = Framing::UntilClose;
        assert!(until_close.at_eof().is_ok() && until_close.is_done());
    }

    #[test]
    fn content_length_lists_must_agree() {
        assert_eq!(content_length(&[b"5"]), Ok(Some(5)));
        assert_eq!(content_length(&[b"5, 5", b"5"]), Ok(Some(5)));
        assert_eq!(content_length(&[]), Ok(None));
        assert!(content_length(&[b"5", b"6"]).is_err());
        assert!(content_length(&[b"+5"]).is_err());
        assert!(content_length(&[b""]).is_err());
        assert!(content_length(&[b"99999999999999999999"]).is_err());
    }

    #[test]
    fn hop_by_hop_names_are_matched_without_case() {
        assert!(is_hop_by_hop("Connection") && is_hop_by_hop("TRANSFER-ENCODING"));
        assert!(!is_hop_by_hop("content-length"));
        assert!(has_token(b"keep-alive, Close", b"close"));
        assert!(!has_token(b"closed", b"close"));
    }
}
