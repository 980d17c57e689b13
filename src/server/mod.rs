//! The backend registry: every backend's address, weight, labels and live
//! stats (in-flight requests, smoothed latency, health) and its state,
//! shared by the proxy, the health checker and the strategy.
//!
//! The [`Registry`] lives as long as the balancer, across reloads: it keeps
//! what is measured about each address, so a backend that stays in the
//! config keeps its health, statistics and state. Each config generation
//! gets a [`Pool`] from it: the backends in configured order, a configured
//! address's id its position in the config, an address found through DNS an
//! id above them that the registry keeps for it (the ids a strategy sees).
//!
//! Everything on the request path is a lock-free atomic; the only locks
//! guard a backend's health streak, taken once per health observation, and
//! the registry's map, taken when a generation is built.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustc_hash::FxHashMap;

use crate::balancer::{BackendInfo, BackendView};
use crate::config::BackendConfig;
use crate::discovery::Expanded;

/// Where a backend stands, as `/backends` shows it (HAProxy's runtime
/// states, named for this balancer): one value, never inferred from
/// several flags by a reader. Only an `Active` backend is eligible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendState {
    /// Receives traffic.
    Active,
    /// Set by the operator (`POST /backends/{id}/drain`): no new requests;
    /// those in flight finish.
    Draining,
    /// Failing its health checks or proxied requests.
    Unhealthy,
    /// Taken out for a while after consecutive 5xx answers (outlier
    /// detection).
    Ejected,
}

impl BackendState {
    /// The name shown in `/backends`.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Active => "active",
            BackendState::Draining => "draining",
            BackendState::Unhealthy => "unhealthy",
            BackendState::Ejected => "ejected",
        }
    }
}

/// Nanoseconds on the registry's clock (since the process's first use of
/// it), for ejection deadlines kept in atomics.
fn clock_nanos() -> u64 {
    static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    ORIGIN
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_nanos() as u64
}

/// What [`Backend::observe_status`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ejection {
    /// Nothing changed.
    None,
    /// The backend was ejected for this long.
    Ejected(Duration),
    /// The streak reached the threshold, but ejecting it would take out more
    /// than `outlier_max_ejection_percent` of the backends.
    Capped,
}

/// One backend and what the balancer knows about it right now.
#[derive(Debug)]
pub struct Backend {
    id: u32,
    address: String,
    authority: http::uri::Authority,
    weight: u32,
    labels: Vec<(String, String)>,
    /// The name it was found through (DNS discovery); `None` if configured.
    source: Option<Arc<str>>,
    stats: Arc<Stats>,
}

/// What is measured about a backend. Kept by the [`Registry`] per address
/// and shared by the old and new [`Backend`] across a config reload, so a
/// backend that stays keeps its health, state and in-flight count even if
/// its position or weight changes.
#[derive(Debug)]
struct Stats {
    /// Set by the operator: draining (1) or not (0).
    draining: AtomicU8,
    /// A weight set at run time (`PUT /backends/{id}/weight`); 0: the
    /// configured one.
    weight: AtomicU32,
    /// Until when (on [`clock_nanos`]) it is ejected; 0: not ejected.
    ejected_until: AtomicU64,
    /// Ejections so far in the current series (the next lasts twice as
    /// long, up to ten times the base).
    ejections: AtomicU32,
    /// Ejections since start, for `/backends`.
    ejections_total: AtomicU64,
    /// When its last ejection ended (on [`clock_nanos`]), so that a series
    /// of ejections ends once it has stayed in long enough.
    readmitted_at: AtomicU64,
    /// Consecutive 5xx answers.
    consecutive_5xx: AtomicU32,
    active: AtomicU32,
    latency_micros: AtomicU32,
    requests_total: AtomicU64,
    healthy: AtomicBool,
    streak: Mutex<Streak>,
}

impl Default for Stats {
    fn default() -> Stats {
        Stats {
            draining: AtomicU8::new(0),
            weight: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            ejections_total: AtomicU64::new(0),
            readmitted_at: AtomicU64::new(0),
            consecutive_5xx: AtomicU32::new(0),
            active: AtomicU32::new(0),
            latency_micros: AtomicU32::new(0),
            requests_total: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            streak: Mutex::new(Streak::default()),
        }
    }
}

/// Consecutive results of the same kind, for the health thresholds.
#[derive(Debug, Default)]
struct Streak {
    successes: u32,
    failures: u32,
}

impl Backend {
    /// A backend at position `id` of the configured list. It starts healthy
    /// and active, with no requests in flight and latency unknown (0).
    ///
    /// The address must already be validated (see `config`); an address that
    /// is not a valid authority is a programming error reported as `Err`.
    pub fn new(id: u32, config: &BackendConfig) -> Result<Backend, http::uri::InvalidUri> {
        Backend::with_stats(id, config, Arc::default())
    }

    fn with_stats(
        id: u32,
        config: &BackendConfig,
        stats: Arc<Stats>,
    ) -> Result<Backend, http::uri::InvalidUri> {
        Ok(Backend {
            id,
            authority: config.address.parse()?,
            address: config.address.clone(),
            weight: config.weight,
            labels: config
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            source: None,
            stats,
        })
    }

    /// Its id: its position in the configured list, or for an address found
    /// through DNS, one above them, kept for that name and address while the
    /// process runs.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The backend name it was found through; `None` for a configured
    /// address.
    pub fn source(&self) -> Option<&str> {
        self.source.as_deref()
    }

    /// `host:port` as configured.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The address as a URI authority, for building upstream request URIs.
    pub fn authority(&self) -> &http::uri::Authority {
        &self.authority
    }

    /// Its weight (at least 1): one set at run time, else the configured
    /// one.
    pub fn weight(&self) -> u32 {
        match self.stats.weight.load(Ordering::Relaxed) {
            0 => self.weight,
            set => set,
        }
    }

    /// The weight the config gives it.
    pub fn configured_weight(&self) -> u32 {
        self.weight
    }

    /// Sets its weight at run time (kept across reloads while the address
    /// stays); `None` goes back to the configured one.
    pub fn set_weight(&self, weight: Option<u32>) {
        // 0 means none set; a weight is at least 1.
        let stored = weight.map_or(0, |w| w.max(1));
        self.stats.weight.store(stored, Ordering::Relaxed);
    }

    /// Stops (`true`) or resumes (`false`) new requests to it; requests in
    /// flight are not disturbed. Kept across reloads while the address
    /// stays.
    pub fn set_draining(&self, draining: bool) {
        self.stats
            .draining
            .store(u8::from(draining), Ordering::Relaxed);
    }

    /// Whether the operator is draining it.
    pub fn is_draining(&self) -> bool {
        self.stats.draining.load(Ordering::Relaxed) != 0
    }

    /// Whether outlier detection has it out now. An ejection whose time is
    /// up ends here, the first time anyone asks.
    pub fn is_ejected(&self) -> bool {
        let until = self.stats.ejected_until.load(Ordering::Relaxed);
        if until == 0 {
            return false;
        }
        let now = clock_nanos();
        if now < until {
            return true;
        }
        if self
            .stats
            .ejected_until
            .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.stats.readmitted_at.store(now, Ordering::Relaxed);
            self.stats.consecutive_5xx.store(0, Ordering::Relaxed);
            tracing::info!(
                backend = self.address(),
                "backend {} readmitted after its outlier ejection",
                self.address()
            );
        }
        false
    }

    /// Ends an ejection now (`POST /backends/{id}/enable`).
    pub fn readmit(&self) {
        self.stats.ejected_until.store(0, Ordering::Relaxed);
        self.stats.consecutive_5xx.store(0, Ordering::Relaxed);
    }

    /// Ejections since start.
    pub fn ejections_total(&self) -> u64 {
        self.stats.ejections_total.load(Ordering::Relaxed)
    }

    /// Counts one answer's status towards outlier detection: `threshold`
    /// consecutive 5xx (0: off) eject the backend for `base`, doubled for
    /// each ejection in a row up to ten times `base`, unless `may_eject`
    /// says that would take out too many backends. A series ends once the
    /// backend has stayed in for ten times `base`.
    pub fn observe_status(
        &self,
        status: u16,
        threshold: u32,
        base: Duration,
        may_eject: impl FnOnce() -> bool,
    ) -> Ejection {
        if threshold == 0 {
            return Ejection::None;
        }
        if status < 500 {
            if self.stats.consecutive_5xx.load(Ordering::Relaxed) != 0 {
                self.stats.consecutive_5xx.store(0, Ordering::Relaxed);
            }
            return Ejection::None;
        }
        let streak = self.stats.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
        if streak < threshold || self.is_ejected() {
            return Ejection::None;
        }
        if !may_eject() {
            return Ejection::Capped;
        }
        let now = clock_nanos();
        let cap = base * 10;
        let readmitted = self.stats.readmitted_at.load(Ordering::Relaxed);
        if readmitted != 0 && now.saturating_sub(readmitted) >= cap.as_nanos() as u64 {
            self.stats.ejections.store(0, Ordering::Relaxed);
        }
        let previous = self.stats.ejections.fetch_add(1, Ordering::Relaxed);
        let time = base.saturating_mul(1u32 << previous.min(4)).min(cap);
        self.stats
            .ejected_until
            .store(now + time.as_nanos() as u64, Ordering::Relaxed);
        self.stats.consecutive_5xx.store(0, Ordering::Relaxed);
        self.stats.ejections_total.fetch_add(1, Ordering::Relaxed);
        Ejection::Ejected(time)
    }

    /// Operator-given labels, sorted by key.
    pub fn labels(&self) -> &[(String, String)] {
        &self.labels
    }

    /// Where it stands: the operator's drain first, then an ejection,
    /// then its health.
    pub fn state(&self) -> BackendState {
        if self.is_draining() {
            BackendState::Draining
        } else if self.is_ejected() {
            BackendState::Ejected
        } else if !self.is_healthy() {
            BackendState::Unhealthy
        } else {
            BackendState::Active
        }
    }

    /// Whether a strategy may choose it now: healthy, not drained, not
    /// ejected.
    pub fn is_eligible(&self) -> bool {
        self.is_healthy() && !self.is_draining() && !self.is_ejected()
    }

    /// Requests in flight to this backend through this balancer.
    pub fn in_flight(&self) -> u32 {
        self.stats.active.load(Ordering::Relaxed)
    }

    /// Smoothed response time in microseconds; 0 until the first response.
    pub fn latency_micros(&self) -> u32 {
        self.stats.latency_micros.load(Ordering::Relaxed)
    }

    /// Requests sent to this backend since start.
    pub fn requests_total(&self) -> u64 {
        self.stats.requests_total.load(Ordering::Relaxed)
    }

    /// Whether the backend may receive traffic.
    pub fn is_healthy(&self) -> bool {
        self.stats.healthy.load(Ordering::Relaxed)
    }

    /// How a strategy sees this backend now.
    pub fn view(&self) -> BackendView {
        BackendView {
            id: self.id,
            weight: self.weight(),
            in_flight: self.in_flight(),
            latency_micros: self.latency_micros(),
        }
    }

    /// How `configure` describes this backend to a strategy.
    pub fn info(&self) -> BackendInfo {
        BackendInfo {
            id: self.id,
            address: self.address.clone(),
            weight: self.weight(),
            labels: self.labels.clone(),
        }
    }

    /// Counts a request as in flight until the returned guard is dropped.
    pub fn track(self: &Arc<Self>) -> ConnectionGuard {
        self.stats.active.fetch_add(1, Ordering::Relaxed);
        self.stats.requests_total.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard {
            backend: Arc::clone(self),
        }
    }

    /// Folds one response time into the smoothed latency: an exponentially
    /// weighted moving average with weight 1/8 for the new sample (as TCP's
    /// SRTT), so one slow response moves it but does not dominate it.
    pub fn record_latency(&self, elapsed: Duration) {
        let sample = u32::try_from(elapsed.as_micros())
            .unwrap_or(u32::MAX)
            .max(1);
        let _ =
            self.stats
                .latency_micros
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                    Some(if old == 0 {
                        sample
                    } else {
                        let old = i64::from(old);
                        (old + (i64::from(sample) - old) / 8).clamp(1, i64::from(u32::MAX)) as u32
                    })
                });
    }

    /// Records one health observation (an active check or a proxied request)
    /// and flips the state after `unhealthy_threshold` consecutive failures
    /// or `healthy_threshold` consecutive successes. Returns the new state if
    /// it flipped, so the caller logs each change once.
    pub fn observe_health(
        &self,
        success: bool,
        healthy_threshold: u32,
        unhealthy_threshold: u32,
    ) -> Option<bool> {
        let mut streak = self.stats.streak.lock().unwrap_or_else(|e| e.into_inner());
        let healthy = self.is_healthy();
        if success {
            streak.failures = 0;
            streak.successes = streak.successes.saturating_add(1);
            if !healthy && streak.successes >= healthy_threshold {
                self.stats.healthy.store(true, Ordering::Relaxed);
                return Some(true);
            }
        } else {
            streak.successes = 0;
            streak.failures = streak.failures.saturating_add(1);
            if healthy && streak.failures >= unhealthy_threshold {
                self.stats.healthy.store(false, Ordering::Relaxed);
                return Some(false);
            }
        }
        None
    }
}

/// An in-flight request to a backend: the backend's active count stays
/// raised until this is dropped, which the proxy does when the response body
/// has been sent (or the client went away), not when its headers arrive.
#[derive(Debug)]
pub struct ConnectionGuard {
    backend: Arc<Backend>,
}

impl ConnectionGuard {
    /// The backend this request went to.
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.backend.stats.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Every backend the balancer knows, by address, across reloads: each
/// generation's [`Pool`] is built from it.
#[derive(Debug, Default)]
pub struct Registry {
    stats: Mutex<FxHashMap<String, Arc<Stats>>>,
    ids: Mutex<DiscoveredIds>,
}

/// The ids given to addresses found through DNS, by name and address: an
/// address keeps its id while the process runs, even if it leaves and comes
/// back, and no id is given twice.
#[derive(Debug, Default)]
struct DiscoveredIds {
    by_address: FxHashMap<(Arc<str>, String), u32>,
    next: u32,
}

impl DiscoveredIds {
    /// The id of `address` found through `source`, in a config of
    /// `configured` entries: its own if it has one above the configured
    /// ids, else the next unused one.
    fn id(&mut self, source: &Arc<str>, address: &str, configured: u32) -> u32 {
        self.next = self.next.max(configured);
        let key = (Arc::clone(source), address.to_string());
        match self.by_address.get(&key) {
            // A reload that lengthened the config may have reached it.
            Some(&id) if id >= configured => id,
            _ => {
                let id = self.next;
                self.next += 1;
                self.by_address.insert(key, id);
                id
            }
        }
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// The pool for a config's backends, ids by position. A backend whose
    /// address the registry knows keeps its stats (health, state, in-flight
    /// count, latency) under its new position and weight; a new one starts
    /// afresh. The registry itself changes only when the pool goes into
    /// service ([`Registry::commit`]), so a pool that is never used (a
    /// rejected reload) leaves no trace.
    pub fn pool(&self, configs: &[BackendConfig]) -> Result<Pool, http::uri::InvalidUri> {
        let expanded: Vec<Expanded> = configs
            .iter()
            .enumerate()
            .map(|(entry, c)| Expanded {
                config: c.clone(),
                entry,
                source: None,
            })
            .collect();
        self.expanded_pool(configs.len(), &expanded)
    }

    /// The pool for a generation's concrete backends (see
    /// `discovery::expand`) from a config of `configured` entries: a
    /// configured address has its entry's position as id; an address found
    /// through a name has the id the registry gave that name and address
    /// (a new one, above every configured id, the first time). Stats as for
    /// [`Registry::pool`].
    pub fn expanded_pool(
        &self,
        configured: usize,
        expanded: &[Expanded],
    ) -> Result<Pool, http::uri::InvalidUri> {
        let known = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        let backends: Vec<Arc<Backend>> = expanded
            .iter()
            .map(|e| {
                let id = match &e.source {
                    None => e.entry as u32,
                    Some(source) => ids.id(source, &e.config.address, configured as u32),
                };
                let stats = known.get(&e.config.address).cloned().unwrap_or_default();
                let mut backend = Backend::with_stats(id, &e.config, stats)?;
                backend.source = e.source.clone();
                Ok::<_, http::uri::InvalidUri>(Arc::new(backend))
            })
            .collect::<Result<_, _>>()?;
        Ok(Pool::from_backends(backends))
    }

    /// Makes `pool` the registry's view: its addresses are the ones known
    /// from now on; an address no longer configured is forgotten (requests
    /// still in flight to it keep counting on their own copy until they
    /// finish).
    pub fn commit(&self, pool: &Pool) {
        let mut known = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        *known = pool
            .backends
            .iter()
            .map(|b| (b.address.clone(), Arc::clone(&b.stats)))
            .collect();
    }
}

/// The backends of one generation, in configured order.
#[derive(Debug)]
pub struct Pool {
    backends: Vec<Arc<Backend>>,
    /// (id, position) sorted by id, when ids are not positions (DNS
    /// discovery, or a name with no address); empty when every backend's id
    /// is its position, which [`Pool::get`] then uses directly.
    by_id: Vec<(u32, u32)>,
}

impl Pool {
    fn from_backends(backends: Vec<Arc<Backend>>) -> Pool {
        let dense = backends.iter().enumerate().all(|(i, b)| b.id as usize == i);
        let mut by_id = Vec::new();
        if !dense {
            by_id = backends
                .iter()
                .enumerate()
                .map(|(i, b)| (b.id, i as u32))
                .collect();
            by_id.sort_unstable();
        }
        Pool { backends, by_id }
    }

    /// A pool of the given backends, ids by position, with fresh stats.
    pub fn new(configs: &[BackendConfig]) -> Result<Pool, http::uri::InvalidUri> {
        Registry::new().pool(configs)
    }

    /// The backend with this address.
    pub fn find(&self, address: &str) -> Option<&Arc<Backend>> {
        self.backends.iter().find(|b| b.address == address)
    }

    /// All backends, eligible or not, in configured order (a name's
    /// addresses where the name stands).
    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.backends
    }

    /// The backend with this id.
    pub fn get(&self, id: u32) -> Option<&Arc<Backend>> {
        self.backends.get(self.position(id)?)
    }

    /// Where the backend with this id is in [`Pool::backends`].
    pub fn position(&self, id: u32) -> Option<usize> {
        if self.by_id.is_empty() {
            return ((id as usize) < self.backends.len()).then_some(id as usize);
        }
        let i = self.by_id.binary_search_by_key(&id, |&(id, _)| id).ok()?;
        Some(self.by_id[i].1 as usize)
    }

    /// How `configure` describes the backends to a strategy.
    pub fn infos(&self) -> Vec<BackendInfo> {
        self.backends.iter().map(|b| b.info()).collect()
    }

    /// Fills `out` with the eligible (healthy, active) backends not in
    /// `exclude`, in configured order: what a strategy may choose from.
    /// `out` is cleared first, so a caller can reuse one buffer for every
    /// request.
    pub fn eligible(&self, exclude: &[u32], out: &mut Vec<BackendView>) {
        out.clear();
        out.extend(
            self.backends
                .iter()
                .filter(|b| b.is_eligible() && !exclude.contains(&b.id))
                .map(|b| b.view()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize) -> Pool {
        let configs: Vec<_> = (0..n)
            .map(|i| BackendConfig::new(format!("127.0.0.1:{}", 1000 + i)))
            .collect();
        Pool::new(&configs).unwrap()
    }

    #[test]
    fn guard_counts_in_flight_requests() {
        let pool = pool(1);
        let b = &pool.backends()[0];
        let g1 = b.track();
        let g2 = b.track();
        assert_eq!(b.in_flight(), 2);
        drop(g1);
        assert_eq!(b.in_flight(), 1);
        drop(g2);
        assert_eq!(b.in_flight(), 0);
        assert_eq!(b.requests_total(), 2);
    }

    #[test]
    fn latency_is_smoothed() {
        let pool = pool(1);
        let b = &pool.backends()[0];
        b.record_latency(Duration::from_micros(800));
        assert_eq!(b.latency_micros(), 800);
        b.record_latency(Duration::from_micros(1600));
        assert_eq!(b.latency_micros(), 900);
    }

    #[test]
    fn health_flips_after_thresholds_and_reports_once() {
        let pool = pool(1);
        let b = &pool.backends()[0];
        assert_eq!(b.observe_health(false, 2, 3), None);
        assert_eq!(b.observe_health(false, 2, 3), None);
        assert_eq!(b.observe_health(false, 2, 3), Some(false));
        assert_eq!(b.observe_health(false, 2, 3), None);
        assert!(!b.is_healthy());
        assert_eq!(b.observe_health(true, 2, 3), None);
        assert_eq!(b.observe_health(false, 2, 3), None);
        assert_eq!(b.observe_health(true, 2, 3), None);
        assert_eq!(b.observe_health(true, 2, 3), Some(true));
        assert!(b.is_healthy());
    }

    #[test]
    fn a_reloaded_pool_keeps_the_stats_of_backends_that_stay() {
        let registry = Registry::new();
        let configs: Vec<_> = (0..3)
            .map(|i| BackendConfig::new(format!("127.0.0.1:{}", 1000 + i)))
            .collect();
        let old = registry.pool(&configs).unwrap();
        registry.commit(&old);
        let _in_flight = old.backends()[2].track();
        for _ in 0..3 {
            old.backends()[1].observe_health(false, 1, 3);
        }
        let configs = [
            BackendConfig {
                weight: 4,
                ..BackendConfig::new("127.0.0.1:1002")
            },
            BackendConfig::new("127.0.0.1:1001"),
            BackendConfig::new("127.0.0.1:2000"),
        ];
        // A pool never put in service changes nothing.
        let _rejected = registry.pool(&configs[..1]).unwrap();
        let new = registry.pool(&configs).unwrap();
        registry.commit(&new);
        assert_eq!(new.backends()[0].id(), 0);
        assert_eq!(new.backends()[0].weight(), 4);
        assert_eq!(new.backends()[0].in_flight(), 1);
        assert!(!new.backends()[1].is_healthy());
        assert!(new.backends()[2].is_healthy());
        assert_eq!(new.backends()[2].requests_total(), 0);
        // 127.0.0.1:1000 left the config: a later return starts afresh.
        old.backends()[0].observe_health(false, 1, 1);
        let back = registry
            .pool(&[BackendConfig::new("127.0.0.1:1000")])
            .unwrap();
        assert!(back.backends()[0].is_healthy());
    }

    fn found(entry: usize, address: &str, source: &str) -> Expanded {
        Expanded {
            config: BackendConfig::new(address),
            entry,
            source: Some(Arc::from(source)),
        }
    }

    #[test]
    fn discovered_addresses_get_ids_above_the_configured_ones_never_reused() {
        let registry = Registry::new();
        let configured = Expanded {
            config: BackendConfig::new("10.0.0.1:80"),
            entry: 0,
            source: None,
        };
        let ids = |pool: &Pool| -> Vec<(String, u32)> {
            pool.backends()
                .iter()
                .map(|b| (b.address().to_string(), b.id()))
                .collect()
        };
        // Config: [10.0.0.1:80, svc:80]; svc -> .2, .3.
        let pool = registry
            .expanded_pool(
                2,
                &[
                    configured.clone(),
                    found(1, "10.0.0.2:80", "svc"),
                    found(1, "10.0.0.3:80", "svc"),
                ],
            )
            .unwrap();
        let pairs = ids(&pool);
        assert_eq!(
            pairs,
            [
                ("10.0.0.1:80".into(), 0),
                ("10.0.0.2:80".into(), 2),
                ("10.0.0.3:80".into(), 3)
            ]
        );
        assert_eq!(pool.get(3).unwrap().address(), "10.0.0.3:80");
        assert_eq!(pool.get(3).unwrap().source(), Some("svc"));
        assert!(pool.get(1).is_none(), "the name's position is no backend");
        assert_eq!(pool.position(2), Some(1));
        // .2 leaves, .4 joins: new id; .2 comes back: its old id.
        let pool = registry
            .expanded_pool(
                2,
                &[
                    found(1, "10.0.0.3:80", "svc"),
                    found(1, "10.0.0.4:80", "svc"),
                ],
            )
            .unwrap();
        assert_eq!(ids(&pool)[1].1, 4);
        let pool = registry
            .expanded_pool(2, &[found(1, "10.0.0.2:80", "svc")])
            .unwrap();
        assert_eq!(ids(&pool)[0].1, 2);
        // A reload to 4 entries reaches ids 2 and 3: those move above all.
        let pool = registry
            .expanded_pool(
                4,
                &[
                    found(3, "10.0.0.2:80", "svc"),
                    found(3, "10.0.0.4:80", "svc"),
                ],
            )
            .unwrap();
        assert_eq!(
            ids(&pool).iter().map(|(_, id)| *id).collect::<Vec<_>>(),
            [5, 4]
        );
        // Empty: nothing to get.
        let empty = registry.expanded_pool(1, &[]).unwrap();
        assert!(empty.get(0).is_none());
        let mut out = Vec::new();
        empty.eligible(&[], &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn eligible_skips_unhealthy_and_excluded() {
        let pool = pool(4);
        for _ in 0..3 {
            pool.backends()[1].observe_health(false, 1, 3);
        }
        let mut out = Vec::new();
        pool.eligible(&[3], &mut out);
        let ids: Vec<u32> = out.iter().map(|v| v.id).collect();
        assert_eq!(ids, vec![0, 2]);
    }
}
