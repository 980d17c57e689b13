//! Fuzzes the request-head rewriting: arbitrary header lines (including
//! `Connection` lists naming anything) and client addresses. Hop-by-hop
//! headers must never survive, and `X-Forwarded-For` must end with the
//! client; no input may panic.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use http::header::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use rust_load_balancer::proxy::{add_forwarded, remove_hop_by_hop};

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

fuzz_target!(|data: &[u8]| {
    if data.len() < 17 {
        return;
    }
    let (addr, rest) = data.split_at(17);
    let client = if addr[0] & 1 == 0 {
        IpAddr::V4(Ipv4Addr::new(addr[1], addr[2], addr[3], addr[4]))
    } else {
        IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&addr[1..17]).unwrap()))
    };
    let mut headers = HeaderMap::new();
    let mut named_by_connection = Vec::new();
    for line in rest.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        if name == http::header::CONNECTION {
            if let Ok(v) = value.to_str() {
                named_by_connection.extend(
                    v.split(',')
                        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok()),
                );
            }
        }
        headers.append(name, value);
    }
    let host = headers.get(http::header::HOST).cloned();

    remove_hop_by_hop(&mut headers);
    for name in HOP_BY_HOP {
        assert!(!headers.contains_key(name), "{name} survived");
    }
    for name in &named_by_connection {
        assert!(!headers.contains_key(name), "{name} named by Connection survived");
    }

    add_forwarded(&mut headers, client, host.as_ref());
    let forwarded = headers["x-forwarded-for"].to_str().unwrap();
    assert!(forwarded.ends_with(&client.to_canonical().to_string()), "{forwarded}");
    assert_eq!(headers["x-forwarded-proto"], "http");
});
