//! The request as a strategy sees it ([`RequestView`]): worked out once per
//! request from its head and the config (`hash_key`, `strategy_headers`),
//! then given to `select` on every attempt with the attempt's number and a
//! fresh random value.
//!
//! Only a 0.2.0 strategy reads the hash key and headers; for others they
//! are left out, so the plain path pays for neither.

use std::cell::Cell;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use xxhash_rust::xxh3::xxh3_64;

use super::headers::RequestHead;
use crate::balancer::RequestView;
use crate::config::HashKey;
use crate::generation::State;
use crate::random::SplitMix64;

/// What is worked out once per request for the strategy.
pub(super) struct RequestFacts<'a> {
    head: &'a RequestHead,
    client: IpAddr,
    hash_key: Option<u64>,
    headers: Vec<(&'a str, &'a str)>,
    id: u64,
}

impl<'a> RequestFacts<'a> {
    /// The facts of `head`, from `client` (its address and that address
    /// as text), under `state`'s config.
    pub(super) fn new(
        state: &'a State,
        head: &'a RequestHead,
        client: IpAddr,
        client_text: &str,
    ) -> RequestFacts<'a> {
        let config = state.config();
        let (hash_key, headers) = if state.sees_requests() {
            let hash_key = config
                .hash_key
                .as_ref()
                .and_then(|key| key_value(key, head, client_text, xxh3_64));
            let mut headers = Vec::new();
            if !config.strategy_headers.is_empty() {
                for (name, value) in head.forwarded_fields() {
                    let Some(wanted) = config
                        .strategy_headers
                        .iter()
                        .find(|w| w.eq_ignore_ascii_case(name))
                    else {
                        continue;
                    };
                    if let Ok(value) = std::str::from_utf8(value) {
                        headers.push((wanted.as_str(), value));
                    }
                }
            }
            (hash_key, headers)
        } else {
            (None, Vec::new())
        };
        RequestFacts {
            head,
            client,
            hash_key,
            headers,
            id: next_request_id(),
        }
    }

    /// The request's id, unique in this process.
    pub(super) fn id(&self) -> u64 {
        self.id
    }

    /// The view for attempt `attempt` (0 for the first try).
    pub(super) fn view(&self, attempt: u32) -> RequestView<'_> {
        RequestView {
            method: &self.head.method,
            path: self.head.target(),
            authority: self.head.host(),
            client: self.client,
            hash_key: self.hash_key,
            headers: &self.headers,
            attempt,
            random: next_random(),
            id: self.id,
        }
    }
}

/// The value `key` names in the request, passed to `hash`; `None` when the
/// request lacks it.
fn key_value<T>(
    key: &HashKey,
    head: &RequestHead,
    client: &str,
    hash: impl Fn(&[u8]) -> T,
) -> Option<T> {
    let target = head.target();
    let value: &[u8] = match key {
        HashKey::ClientIp => client.as_bytes(),
        HashKey::Uri => target.as_bytes(),
        HashKey::Path => target.split('?').next().unwrap_or_default().as_bytes(),
        HashKey::Header(name) => head
            .forwarded_fields()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))?
            .1
            .trim_ascii(),
        HashKey::Cookie(name) => head
            .forwarded_fields()
            .filter(|(n, _)| n.eq_ignore_ascii_case("cookie"))
            .flat_map(|(_, value)| value.split(|b| *b == b';'))
            .find_map(|pair| {
                let pair = pair.trim_ascii();
                let eq = pair.iter().position(|b| *b == b'=')?;
                (&pair[..eq] == name.as_bytes()).then(|| pair[eq + 1..].trim_ascii())
            })?,
        HashKey::Query(name) => {
            let (_, query) = target.split_once('?')?;
            query.split('&').find_map(|pair| {
                let (n, v) = pair.split_once('=').unwrap_or((pair, ""));
                (n == name).then_some(v)
            })?
        }
        .as_bytes(),
    };
    Some(hash(value))
}

thread_local! {
    /// This thread's generator, seeded so that threads and processes draw
    /// different sequences.
    static RANDOM: Cell<SplitMix64> = Cell::new(SplitMix64::from_entropy());
    /// This thread's next request id and the end of its block.
    static IDS: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

/// A fresh random number for a strategy call.
fn next_random() -> u64 {
    RANDOM.with(|cell| {
        let mut generator = cell.get();
        let value = generator.next_u64();
        cell.set(generator);
        value
    })
}

/// Ids handed to a thread at a time, so that threads do not contend for
/// one counter on every request.
const ID_BLOCK: u64 = 1 << 16;

/// A request id unique in this process (ids start at 1).
fn next_request_id() -> u64 {
    static NEXT_BLOCK: AtomicU64 = AtomicU64::new(1);
    IDS.with(|ids| {
        let (mut next, mut end) = ids.get();
        if next == end {
            next = NEXT_BLOCK.fetch_add(ID_BLOCK, Ordering::Relaxed);
            end = next + ID_BLOCK;
        }
        ids.set((next + 1, end));
        next
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::headers::parse_request;

    fn head(text: &str) -> RequestHead {
        parse_request(text.as_bytes(), "10.0.0.7", false)
            .unwrap()
            .unwrap()
            .1
    }

    /// The key's value as text, to check what is hashed.
    fn value(key: &HashKey, text: &str) -> Option<String> {
        key_value(key, &head(text), "10.0.0.7", |v| {
            String::from_utf8(v.to_vec()).unwrap()
        })
    }

    #[test]
    fn each_key_source_takes_the_documented_value() {
        let request = "GET /a/b?x=1&id=42&flag HTTP/1.1\r\nHost: shop\r\nX-User:  ann  \r\nX-User: bob\r\nCookie: a=1; sid=s3cr3t ; z=9\r\n\r\n";
        assert_eq!(value(&HashKey::ClientIp, request).unwrap(), "10.0.0.7");
        assert_eq!(value(&HashKey::Path, request).unwrap(), "/a/b");
        assert_eq!(
            value(&HashKey::Uri, request).unwrap(),
            "/a/b?x=1&id=42&flag"
        );
        let header = HashKey::Header("x-user".into());
        assert_eq!(value(&header, request).unwrap(), "ann");
        let host = HashKey::Header("host".into());
        assert_eq!(value(&host, request).unwrap(), "shop");
        assert_eq!(
            value(&HashKey::Cookie("sid".into()), request).unwrap(),
            "s3cr3t"
        );
        assert_eq!(value(&HashKey::Query("id".into()), request).unwrap(), "42");
        assert_eq!(value(&HashKey::Query("flag".into()), request).unwrap(), "");
        // Absent values give no key.
        assert_eq!(value(&HashKey::Query("nope".into()), request), None);
        assert_eq!(value(&HashKey::Cookie("nope".into()), request), None);
        assert_eq!(value(&HashKey::Header("x-none".into()), request), None);
        let bare = "GET / HTTP/1.1\r\nHost: h\r\n\r\n";
        assert_eq!(value(&HashKey::Query("id".into()), bare), None);
        assert_eq!(value(&HashKey::Cookie("sid".into()), bare), None);
    }

    #[test]
    fn request_ids_are_unique_across_threads() {
        let ids: Vec<u64> = (0..4)
            .map(|_| {
                std::thread::spawn(|| (0..1000).map(|_| next_request_id()).collect::<Vec<_>>())
            })
            .flat_map(|t| t.join().unwrap())
            .collect();
        let unique: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
        assert!(!ids.contains(&0));
    }

    #[test]
    fn random_values_differ_from_call_to_call() {
        let draws: std::collections::HashSet<u64> = (0..1000).map(|_| next_random()).collect();
        assert_eq!(draws.len(), 1000);
    }
}
