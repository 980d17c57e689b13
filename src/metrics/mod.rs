//! Metrics in the Prometheus text format, kept across config reloads
//! (served by the admin listener, [`crate::admin`]).
//!
//! Counters and histograms are updated on the request path; the per-backend
//! gauges (in-flight requests, health) are read from the live pool when
//! scraped, so they are never stale and cost nothing per request.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::registry::Registry;
use rustc_hash::FxHashMap;

use crate::balancer::FaultKind;
use crate::server::Pool;

mod sharded;
use sharded::ShardedHistogram;

/// `Content-Type` of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The label for requests the balancer answered without a backend (503).
pub const NO_BACKEND: &str = "none";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    backend: String,
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamErrorLabels {
    backend: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

type HistogramFamily = Family<BackendLabels, ShardedHistogram, fn() -> ShardedHistogram>;

/// One thread's handles to the per-request series of one [`Metrics`].
#[derive(Default)]
struct HandleCache {
    /// The [`Metrics::id`] they belong to.
    owner: u64,
    backends: FxHashMap<String, BackendHandles>,
}

struct BackendHandles {
    duration: ShardedHistogram,
    codes: Vec<(u16, Counter)>,
}

/// Every metric the balancer exports.
pub struct Metrics {
    /// Unique in the process: tells whose handles a thread has cached.
    id: u64,
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: HistogramFamily,
    active: Family<BackendLabels, Gauge>,
    healthy: Family<BackendLabels, Gauge>,
    select_duration: ShardedHistogram,
    faults: Family<KindLabels, Counter>,
    retries: Family<BackendLabels, Counter>,
    upstream_errors: Family<UpstreamErrorLabels, Counter>,
    reloads: Family<ResultLabels, Counter>,
    log_dropped: Counter,
    tunnels: Gauge,
    parked: Gauge,
    ejections: Family<BackendLabels, Counter>,
}

/// Request durations: 100 µs to about 100 s, doubling.
fn request_buckets() -> ShardedHistogram {
    ShardedHistogram::new(exponential_buckets(0.0001, 2.0, 21))
}

impl Metrics {
    /// A fresh set of metrics, every counter at zero.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "lb_requests",
            "Client requests answered, by backend and status code",
            requests.clone(),
        );
        let request_duration: HistogramFamily =
            Family::new_with_constructor(request_buckets as fn() -> ShardedHistogram);
        registry.register(
            "lb_request_duration_seconds",
            "Time from receiving a request to sending the last byte of its response, by backend",
            request_duration.clone(),
        );
        let active = Family::<BackendLabels, Gauge>::default();
        registry.register(
            "lb_backend_active_connections",
            "Requests in flight to the backend through this balancer",
            active.clone(),
        );
        let healthy = Family::<BackendLabels, Gauge>::default();
        registry.register(
            "lb_backend_healthy",
            "Whether the backend receives traffic (1) or is ejected (0)",
            healthy.clone(),
        );
        // A select call takes about a microsecond; a faulting one up to its
        // deadline. 250 ns to about 0.5 s, doubling.
        let select_duration = ShardedHistogram::new(exponential_buckets(2.5e-7, 2.0, 22));
        registry.register(
            "lb_strategy_select_duration_seconds",
            "Time the strategy took to pick a backend",
            select_duration.clone(),
        );
        let faults = Family::<KindLabels, Counter>::default();
        registry.register(
            "lb_strategy_faults",
            "Strategy module faults, by kind; each request was served by round robin",
            faults.clone(),
        );
        let retries = Family::<BackendLabels, Counter>::default();
        registry.register(
            "lb_retries",
            "Requests retried on another backend after this backend failed",
            retries.clone(),
        );
        let upstream_errors = Family::<UpstreamErrorLabels, Counter>::default();
        registry.register(
            "lb_upstream_errors",
            "Failed attempts to a backend, by kind (connect, timeout, io)",
            upstream_errors.clone(),
        );
        let reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "lb_config_reloads",
            "Config reloads, by result (success, failure)",
            reloads.clone(),
        );
        let ejections = Family::<BackendLabels, Counter>::default();
        registry.register(
            "lb_outlier_ejections",
            "Backends ejected by outlier detection (consecutive 5xx answers)",
            ejections.clone(),
        );
        let tunnels = Gauge::default();
        registry.register(
            "lb_tunnels_active",
            "Upgraded connections (WebSocket tunnels) open now",
            tunnels.clone(),
        );
        let parked = Gauge::default();
        registry.register(
            "lb_client_connections_parked",
            "Idle keep-alive client connections parked (watched without a task of their own) now",
            parked.clone(),
        );
        let log_dropped = Counter::default();
        registry.register(
            "lb_strategy_log_dropped",
            "Strategy module log lines dropped by the rate limit (10 a second per module)",
            log_dropped.clone(),
        );
        // Show every fault kind and reload result from the start, at 0, so
        // rate() and alerts work before the first one happens.
        for kind in FaultKind::ALL {
            let _ = faults.get_or_create(&KindLabels {
                kind: kind.as_str(),
            });
        }
        for result in ["success", "failure"] {
            let _ = reloads.get_or_create(&ResultLabels { result });
        }
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Metrics {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            registry,
            requests,
            request_duration,
            active,
            healthy,
            select_duration,
            faults,
            retries,
            upstream_errors,
            reloads,
            log_dropped,
            tunnels,
            parked,
            ejections,
        }
    }

    /// Counts one outlier ejection of `backend`.
    pub fn record_ejection(&self, backend: &str) {
        self.ejections
            .get_or_create(&BackendLabels {
                backend: backend.to_string(),
            })
            .inc();
    }

    /// Counts a tunnel as open until the returned guard is dropped.
    pub fn open_tunnel(&self) -> TunnelGauge {
        self.tunnels.inc();
        TunnelGauge(self.tunnels.clone())
    }

    /// The count of parked client connections.
    pub fn parked_connections(&self) -> Gauge {
        self.parked.clone()
    }

    /// Counts a strategy log line dropped by the rate limit.
    pub fn record_log_dropped(&self) {
        self.log_dropped.inc();
    }

    /// Counts one answered request and its client-observed duration.
    ///
    /// The series' handles are cached per thread (a counter or histogram
    /// handle shares its value with the family's), so the request path
    /// neither allocates label strings nor takes the family's lock once a
    /// backend and status have been seen.
    pub fn record_request(&self, backend: &str, code: u16, duration: Duration) {
        thread_local! {
            static HANDLES: RefCell<HandleCache> = RefCell::new(HandleCache::default());
        }
        HANDLES.with(|cache| {
            let mut cache = cache.borrow_mut();
            let owner = self.id;
            if cache.owner != owner {
                // Another balancer in the same process (tests).
                *cache = HandleCache {
                    owner,
                    ..HandleCache::default()
                };
            }
            if !cache.backends.contains_key(backend) {
                let histogram = self
                    .request_duration
                    .get_or_create(&BackendLabels {
                        backend: backend.to_string(),
                    })
                    .clone();
                cache.backends.insert(
                    backend.to_string(),
                    BackendHandles {
                        duration: histogram,
                        codes: Vec::new(),
                    },
                );
            }
            let handles = cache
                .backends
                .get_mut(backend)
                .expect("inserted above when missing");
            handles
                .duration
                .observe(crate::balancer::worker(), duration);
            match handles.codes.iter().find(|(c, _)| *c == code) {
                Some((_, counter)) => {
                    counter.inc();
                }
                None => {
                    let counter = self
                        .requests
                        .get_or_create(&RequestLabels {
                            backend: backend.to_string(),
                            code,
                        })
                        .clone();
                    counter.inc();
                    handles.codes.push((code, counter));
                }
            }
        });
    }

    /// Records how long a strategy call took.
    pub fn record_select(&self, duration: Duration) {
        self.select_duration
            .observe(crate::balancer::worker(), duration);
    }

    /// Counts a strategy fault.
    pub fn record_fault(&self, kind: FaultKind) {
        self.faults
            .get_or_create(&KindLabels {
                kind: kind.as_str(),
            })
            .inc();
    }

    /// Counts a failed attempt to `backend` (`kind`: `connect`, `timeout` or `io`) and,
    /// if the request was tried again elsewhere, a retry.
    pub fn record_upstream_error(&self, backend: &str, kind: &'static str, retried: bool) {
        self.upstream_errors
            .get_or_create(&UpstreamErrorLabels {
                backend: backend.to_string(),
                kind,
            })
            .inc();
        if retried {
            self.retries
                .get_or_create(&BackendLabels {
                    backend: backend.to_string(),
                })
                .inc();
        }
    }

    /// Counts a reload attempt.
    pub fn record_reload(&self, success: bool) {
        let result = if success { "success" } else { "failure" };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
    }

    /// The Prometheus text exposition, with gauges read from `pool` now.
    pub fn encode(&self, pool: &Pool) -> String {
        // Backends removed by a reload drop out of the gauges.
        self.active.clear();
        self.healthy.clear();
        for backend in pool.backends() {
            let labels = BackendLabels {
                backend: backend.address().to_string(),
            };
            self.active
                .get_or_create(&labels)
                .set(i64::from(backend.in_flight()));
            self.healthy
                .get_or_create(&labels)
                .set(i64::from(backend.is_healthy()));
        }
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry);
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// One open tunnel in `lb_tunnels_active`, while it lives.
#[derive(Debug)]
pub struct TunnelGauge(Gauge);

impl Drop for TunnelGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}
