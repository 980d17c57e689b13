//! HTTP field names the balancer treats specially, shared by the config
//! checks and the proxy: hop-by-hop fields never cross a hop, so no
//! backend and no strategy ever sees them.

/// Headers that describe one connection, never the message (RFC 9110
/// §7.6.1, plus the non-standard `Keep-Alive` and `Proxy-Connection`), and
/// `Transfer-Encoding`, which each hop sets for itself.
pub const HOP_BY_HOP: [&str; 9] = [
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

/// Whether a header named `name` stays on its hop.
pub fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// Whether `name` is a valid field name (an RFC 9110 token).
pub fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}
