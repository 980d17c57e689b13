//! What a strategy is told: the eligible backends at each call
//! ([`BackendView`]), the configured backends once ([`BackendInfo`]), the
//! request being balanced ([`RequestView`]) and how each attempt ended
//! ([`Outcome`]). These mirror the records of `wit/0.2.0/strategy.wit`;
//! a 0.1.0 module sees only the backend numbers.

use std::net::{IpAddr, Ipv4Addr};

use http::Method;

/// One eligible backend as a strategy sees it at selection time (the WIT
/// record `backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BackendView {
    /// Stable identity: the backend's position in the configured list.
    pub id: u32,
    /// Configured weight, 1 when not set.
    pub weight: u32,
    /// Requests now in flight to this backend through this balancer (the
    /// 0.1.0 contract calls it `active-connections`; it counts requests).
    pub in_flight: u32,
    /// Smoothed response latency in microseconds; 0 until known.
    pub latency_micros: u32,
}

/// A configured backend as described once, in `configure` (the WIT record
/// `backend-info`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendInfo {
    /// The id [`BackendView::id`] carries.
    pub id: u32,
    /// `host:port` as configured.
    pub address: String,
    /// Configured weight, 1 when not set.
    pub weight: u32,
    /// Operator-given labels, sorted by key.
    pub labels: Vec<(String, String)>,
}

/// The request being balanced (the WIT record `request`), borrowed from
/// the request head for the length of one `select` call.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// The method.
    pub method: &'a Method,
    /// Path and query, e.g. `/cart?id=7`.
    pub path: &'a str,
    /// The `Host` header; `""` when absent.
    pub authority: &'a str,
    /// The connecting client's address.
    pub client: IpAddr,
    /// XXH3-64 (seed 0) of the value the config's `hash_key` names; `None`
    /// when it is not set or the request lacks the value.
    pub hash_key: Option<u64>,
    /// The request headers the config's `strategy_headers` names, names
    /// lowercase, in request order.
    pub headers: &'a [(&'a str, &'a str)],
    /// 0 for the first try, n for the n-th retry.
    pub attempt: u32,
    /// A fresh random number for this call.
    pub random: u64,
    /// Unique per request in this process; the request's outcomes carry it.
    pub id: u64,
}

impl RequestView<'static> {
    /// A `GET /` from 127.0.0.1 with no key and no headers: what the
    /// `strategy test` bench and unit tests start from.
    pub const fn plain(id: u64, random: u64) -> RequestView<'static> {
        RequestView {
            method: &Method::GET,
            path: "/",
            authority: "",
            client: IpAddr::V4(Ipv4Addr::LOCALHOST),
            hash_key: None,
            headers: &[],
            attempt: 0,
            random,
            id,
        }
    }
}

/// Why an attempt got no response (the WIT enum `failure`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The connection to the backend could not be established.
    Connect,
    /// The backend did not answer within `request_timeout`.
    Timeout,
    /// The connection failed while sending or receiving.
    Io,
}

impl Failure {
    /// The label used in metrics (`lb_upstream_errors_total{kind}`).
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Connect => "connect",
            Failure::Timeout => "timeout",
            Failure::Io => "io",
        }
    }
}

/// How one attempt on a backend ended (the WIT record `outcome`): a
/// response head arrived (`status`), or it failed (`failure`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The backend tried.
    pub backend_id: u32,
    /// The response status; `None` when there was no response.
    pub status: Option<u16>,
    /// Why there was no response; `None` when there was one.
    pub failure: Option<Failure>,
    /// From sending the request to the response head, or to the failure.
    pub latency_micros: u32,
    /// As in [`RequestView::attempt`].
    pub attempt: u32,
    /// As in [`RequestView::id`].
    pub request_id: u64,
}
