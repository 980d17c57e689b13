//! Fuzzes the head parsers and rewriters on hostile bytes: a request head
//! as a client might send it, and the same bytes as a backend's response,
//! then what follows as a body in every framing. Whatever is accepted must
//! come out as a well-formed head for the next hop with no hop-by-hop field
//! (nor any field the `Connection` header names), exactly one
//! `X-Forwarded-For` ending with the client, and unambiguous framing; a
//! head with both `Content-Length` and `Transfer-Encoding` must be refused.
//! No input may panic.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use rust_load_balancer::proxy::{parse_request, parse_response, Framing, ParsedResponse};

/// Written out here rather than taken from the crate: the oracle must not
/// share the list it checks.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
    "transfer-encoding",
];

const CLIENT: &str = "192.0.2.7";

fn field_names(head: &[u8], request: bool) -> Vec<(String, Vec<u8>)> {
    let mut fields = [httparse::EMPTY_HEADER; 128];
    let parsed = if request {
        let mut r = httparse::Request::new(&mut fields);
        r.parse(head).map(|s| s.is_complete()).map(|c| (c, r.headers.len()))
    } else {
        let mut r = httparse::Response::new(&mut fields);
        r.parse(head).map(|s| s.is_complete()).map(|c| (c, r.headers.len()))
    };
    let Ok((true, count)) = parsed else {
        panic!("the rewritten head does not parse: {:?}", String::from_utf8_lossy(head));
    };
    fields[..count]
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
        .collect()
}

fn connection_listed(input: &[u8]) -> Vec<String> {
    let mut fields = [httparse::EMPTY_HEADER; 128];
    let mut r = httparse::Request::new(&mut fields);
    if r.parse(input).is_err() {
        return Vec::new();
    }
    r.headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| String::from_utf8_lossy(h.value).split(',').map(|t| t.trim().to_ascii_lowercase()).collect::<Vec<_>>())
        .filter(|t| !t.is_empty() && t != "close" && t != "keep-alive")
        .collect()
}

fn check_body(framing: Framing, rest: &[u8]) {
    // Every split of the rest into two reads decodes to the same data.
    let whole = decode(framing, &[rest]);
    for split in [0, 1, rest.len() / 2, rest.len().saturating_sub(1)] {
        let split = split.min(rest.len());
        let parts = decode(framing, &[&rest[..split], &rest[split..]]);
        assert_eq!(whole, parts, "split at {split}");
    }
}

fn decode(mut framing: Framing, pieces: &[&[u8]]) -> Option<Vec<u8>> {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in pieces {
        buf.extend_from_slice(piece);
        loop {
            match framing.decode(&mut buf) {
                Ok(Some(data)) => out.extend_from_slice(&data),
                Ok(None) => break,
                Err(_) => return None,
            }
        }
    }
    assert!(out.len() <= pieces.iter().map(|p| p.len()).sum::<usize>());
    Some(out)
}

fuzz_target!(|data: &[u8]| {
    let tls = data.len() % 2 == 1;
    if let Ok(Some((len, head))) = parse_request(data, CLIENT, tls) {
        assert!(len <= data.len());
        let input = &data[..len];
        let mut out = head.request_line().to_vec();
        if !head.has_host {
            out.extend_from_slice(b"host: backend:80\r\n");
        }
        out.extend_from_slice(head.fields());
        let fields = field_names(&out, true);
        // The fields this hop writes itself (framing, X-Forwarded-*) and
        // Host stay whatever the client's Connection names.
        let own = ["host", "content-length", "transfer-encoding", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"];
        for (name, value) in &fields {
            // A WebSocket handshake keeps exactly these two, as this hop
            // writes them.
            let upgrade_field = head.upgrade
                && ((name == "connection" && value == b"upgrade")
                    || (name == "upgrade" && value == b"websocket"));
            assert!(
                !HOP_BY_HOP.contains(&name.as_str()) || name == "transfer-encoding" || upgrade_field,
                "{name} survived"
            );
            assert!(
                own.contains(&name.as_str())
                    || upgrade_field
                    || !connection_listed(input).contains(name),
                "{name} named by Connection survived"
            );
        }
        assert_eq!(fields.iter().filter(|(n, _)| n == "host").count(), 1, "exactly one Host");
        let xff: Vec<_> = fields.iter().filter(|(n, _)| n == "x-forwarded-for").collect();
        assert_eq!(xff.len(), 1);
        assert!(xff[0].1.ends_with(CLIENT.as_bytes()));
        let cl = fields.iter().filter(|(n, _)| n == "content-length").count();
        let te = fields.iter().filter(|(n, _)| n == "transfer-encoding").count();
        assert!(cl + te <= 1, "ambiguous framing forwarded");
        let input_fields = field_names(input, true);
        assert!(
            !(input_fields.iter().any(|(n, _)| n == "content-length")
                && input_fields.iter().any(|(n, _)| n == "transfer-encoding")),
            "a head with both Content-Length and Transfer-Encoding was accepted"
        );
        check_body(head.framing, &data[len..]);
    }
    if let Ok(ParsedResponse::Final(len, head)) =
        parse_response(data, data.first() == Some(&b'H'), tls)
    {
        assert!(len <= data.len());
        let mut out = head.head.clone();
        out.extend_from_slice(b"\r\n");
        for (name, _) in field_names(&out, false) {
            assert!(
                !HOP_BY_HOP.contains(&name.as_str()) || (head.upgraded && name == "upgrade"),
                "{name} survived"
            );
            assert!(name != "content-length", "framing fields are the proxy's to write");
        }
        check_body(head.framing, &data[len..]);
    }
});
