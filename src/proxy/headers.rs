//! Header rewriting at the proxy boundary: hop-by-hop headers stay on their
//! hop (RFC 9110 §7.6.1), and the backend learns who the client was through
//! `X-Forwarded-For`, `-Proto` and `-Host`.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one connection, never the message (RFC 9110
/// §7.6.1, plus the non-standard `Keep-Alive` and `Proxy-Connection`).
const HOP_BY_HOP_COUNT: usize = 8;
const HOP_BY_HOP: [HeaderName; HOP_BY_HOP_COUNT] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including every header that `Connection`
/// names. `Transfer-Encoding` goes too: the framing of each hop is hyper's
/// business, done afresh on the other side.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names (no hashing) finds which are present; most
    // messages carry none, or only `Connection`.
    let mut present = [false; HOP_BY_HOP_COUNT + 1];
    let mut any = false;
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name) {
            present[i] = true;
            any = true;
        }
    }
    if !any {
        return;
    }
    // The names listed in Connection go too. Collected first: removing
    // Connection ends the borrow.
    if present[0] {
        let listed: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .filter(|name| hop_by_hop_index(name).is_none())
            .collect();
        for name in listed {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present[i] {
            headers.remove(name);
        }
    }
    if present[HOP_BY_HOP_COUNT] {
        headers.remove(header::TRANSFER_ENCODING);
    }
}

/// The position of `name` in [`HOP_BY_HOP`], or one past it for
/// `Transfer-Encoding`; `None` for any other header.
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    if *name == header::TRANSFER_ENCODING {
        return Some(HOP_BY_HOP_COUNT);
    }
    HOP_BY_HOP.iter().position(|h| h == name)
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Adds the forwarding headers for a request from `client` that arrived over
/// plain HTTP. `X-Forwarded-For` is appended to (earlier proxies keep their
/// entries); `-Proto` and `-Host` describe this hop and are overwritten, so a
/// client cannot claim another scheme or host. `host` is the client's `Host`
/// (or the authority of an absolute-form request target).
pub fn add_forwarded(headers: &mut HeaderMap, client: IpAddr, host: Option<&HeaderValue>) {
    add_forwarded_for(headers, &client_value(client), host);
}

/// The client's address as it goes into `X-Forwarded-For`: an IPv4-mapped
/// IPv6 address is written as IPv4. Computed once per client connection.
pub fn client_value(client: IpAddr) -> HeaderValue {
    HeaderValue::try_from(client.to_canonical().to_string())
        .expect("an IP address is a valid header value")
}

/// [`add_forwarded`] with the client's address already formatted by
/// [`client_value`].
pub fn add_forwarded_for(
    headers: &mut HeaderMap,
    client: &HeaderValue,
    host: Option<&HeaderValue>,
) {
    if !headers.contains_key(&X_FORWARDED_FOR) {
        headers.insert(X_FORWARDED_FOR.clone(), client.clone());
    } else {
        append_forwarded_for(headers, client);
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    match host {
        Some(host) => {
            headers.insert(X_FORWARDED_HOST.clone(), host.clone());
        }
        None => {
            headers.remove(&X_FORWARDED_HOST);
        }
    }
}

/// Joins the `X-Forwarded-For` fields already there into one list and
/// appends `client`.
fn append_forwarded_for(headers: &mut HeaderMap, client: &HeaderValue) {
    let client = client.to_str().unwrap_or_default();
    // Several X-Forwarded-For fields are one comma-separated list (RFC 9110
    // §5.3): join them into one, then append this hop.
    let mut list = String::new();
    for value in headers.get_all(&X_FORWARDED_FOR) {
        if let Ok(v) = value.to_str() {
            let v = v.trim();
            if !v.is_empty() {
                list.push_str(v);
                list.push_str(", ");
            }
        }
    }
    list.push_str(client);
    if let Ok(value) = HeaderValue::try_from(list) {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    #[test]
    fn removes_standard_and_listed_hop_by_hop_headers() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret"),
            ("connection", "x-other"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic x"),
            ("x-secret", "1"),
            ("x-other", "2"),
            ("x-kept", "3"),
            ("host", "example.com"),
        ]);
        remove_hop_by_hop(&mut h);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-kept", "host"]);
    }

    #[test]
    fn appends_forwarded_for_and_overwrites_proto_and_host() {
        let mut h = map(&[
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-for", "10.0.0.2, 10.0.0.3"),
            ("x-forwarded-proto", "https"),
        ]);
        let host = HeaderValue::from_static("example.com:8080");
        add_forwarded(&mut h, "127.0.0.9".parse().unwrap(), Some(&host));
        assert_eq!(
            h.get_all("x-forwarded-for").iter().collect::<Vec<_>>(),
            vec!["10.0.0.1, 10.0.0.2, 10.0.0.3, 127.0.0.9"]
        );
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "example.com:8080");
    }

    #[test]
    fn ipv4_mapped_clients_are_written_as_ipv4() {
        let mut h = HeaderMap::new();
        add_forwarded(&mut h, "::ffff:127.0.0.1".parse().unwrap(), None);
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
        assert!(h.get("x-forwarded-host").is_none());
    }
}
