//! Backend selection: the [`Strategy`] trait, the wasm host that implements
//! it with a sandboxed component ([`WasmStrategy`], contracts 0.1.0 and
//! 0.2.0), the built-in modules, and the [`Balancer`] that guards every call.
//!
//! The host measures, the module decides. The host passes only eligible
//! (healthy) backends, in configured order, and never calls a module with an
//! empty list. It checks the answer: an index out of range, a trap, running
//! out of fuel or time, memory over the cap, or a failed `configure` on a
//! rebuild is a *strategy fault*. A fault is counted and logged (at most
//! once a second), the request is served by a native round robin instead,
//! and the faulted instance is rebuilt before the module's next call. A
//! module that keeps faulting is skipped for a growing back-off, so a module
//! stuck in a loop cannot add its time limit to every request.

mod builtin;
mod log;
mod native;
mod view;
mod wasm;
pub mod workload;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{SandboxLimits, StrategySource};
use crate::throttle::LogThrottle;

pub use builtin::builtin_module;
pub use log::{LogLevel, LogSink, TracingLog, MODULE_LOG_LINES_PER_SECOND};
pub use native::{LeastConnections, RoundRobin, WeightedRoundRobin};
pub use view::{BackendInfo, BackendView, Failure, Outcome, RequestView};
pub use wasm::{sandbox_clock_is_parked, LoadError, WasmStrategy, KNOWN_SELECTOR_EXPORTS};

/// What a strategy is loaded with besides its module: the sandbox limits,
/// and for 0.2.0 modules the options and backends `configure` gets and
/// where their log lines go.
#[derive(Clone)]
pub struct StrategySetup {
    /// Fuel, deadline and memory cap of every call.
    pub limits: SandboxLimits,
    /// The JSON text of `strategy_options` (`{}` when absent).
    pub options: String,
    /// The configured backends, as `configure` describes them.
    pub backends: Vec<BackendInfo>,
    /// Where the module's `logging.log` lines go (after the rate limit).
    pub log: Arc<dyn LogSink>,
}

impl StrategySetup {
    /// `limits`, no options (`{}`), no backends, lines to the balancer's log.
    pub fn new(limits: SandboxLimits) -> StrategySetup {
        StrategySetup {
            limits,
            options: "{}".into(),
            backends: Vec::new(),
            log: Arc::new(TracingLog),
        }
    }
}

impl std::fmt::Debug for StrategySetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StrategySetup")
            .field("limits", &self.limits)
            .field("options", &self.options)
            .field("backends", &self.backends)
            .finish_non_exhaustive()
    }
}

/// Loads the strategy a config names: a built-in by name, or a component
/// from disk. Compiles it, creates its first instance and, for a 0.2.0
/// module, runs `configure`, so every problem shows up here, at start-up or
/// reload, never on a request.
pub fn load(
    source: &StrategySource,
    setup: &StrategySetup,
) -> Result<Arc<dyn Strategy>, LoadError> {
    Ok(Arc::new(match source {
        StrategySource::Builtin(name) => WasmStrategy::builtin(name, setup)?,
        StrategySource::Path(path) => WasmStrategy::from_file(path, setup)?,
        StrategySource::Native(name) => return Ok(native::by_name(name)),
    }))
}

/// Which contract a strategy implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contract {
    /// Compiled into the host (the fallback, and the `native:` twins).
    Native,
    /// `loadbalancer:strategy@0.1.0`: sees backend numbers only.
    V0_1,
    /// `loadbalancer:strategy@0.2.0`: sees the request, options, labels
    /// and (as an observer) outcomes.
    V0_2,
}

impl Contract {
    /// `native`, `0.1.0` or `0.2.0`.
    pub fn as_str(self) -> &'static str {
        match self {
            Contract::Native => "native",
            Contract::V0_1 => "0.1.0",
            Contract::V0_2 => "0.2.0",
        }
    }
}

/// Picks a backend for the next request.
pub trait Strategy: Send + Sync {
    /// A short name for logs: a built-in's name or a module's path.
    fn name(&self) -> &str;

    /// The contract it implements.
    fn contract(&self) -> Contract {
        Contract::Native
    }

    /// Picks one of `backends` (never empty) for `request`: its position in
    /// the slice, or `None` to refuse the request. Implementations may
    /// return an index out of range; [`Balancer`] checks.
    fn select(
        &self,
        request: &RequestView<'_>,
        backends: &[BackendView],
    ) -> Result<Option<usize>, StrategyError>;

    /// Whether it wants [`Strategy::observe`] calls (a 0.2.0 module that
    /// exports the `observer` interface).
    fn observes(&self) -> bool {
        false
    }

    /// Learns how an attempt ended.
    fn observe(&self, _outcome: &Outcome) -> Result<(), StrategyError> {
        Ok(())
    }

    /// The configured backends changed: `configure` the live instance again
    /// (fresh instances are configured with this list from now on).
    fn configure(&self, _backends: &[BackendInfo]) -> Result<(), StrategyError> {
        Ok(())
    }
}

/// Why a strategy call failed. Every variant is a *fault*: the request is
/// still served, by the fallback.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StrategyError {
    /// The module trapped (a panic, `unreachable`, a bad memory access, ...).
    #[error("trapped: {0}")]
    Trap(String),
    /// The call used up its fuel budget.
    #[error("ran out of fuel")]
    OutOfFuel,
    /// The call ran past its wall-clock deadline.
    #[error("exceeded its time limit")]
    Timeout,
    /// The module tried to grow its memory past the cap.
    #[error("exceeded its memory limit")]
    Memory,
    /// The module answered a position outside the list it was given.
    #[error("answered index {index} for a list of {len} backends")]
    BadIndex {
        /// The answer.
        index: u64,
        /// The list's length.
        len: usize,
    },
    /// A fresh instance could not be created.
    #[error("could not be instantiated: {0}")]
    Instantiate(String),
    /// A fresh instance's `configure` (or the live one's, after the
    /// backends changed) answered an error.
    #[error("configure failed: {0}")]
    Configure(String),
}

/// The kinds of strategy fault, as counted and labelled in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// [`StrategyError::Trap`]
    Trap,
    /// [`StrategyError::OutOfFuel`]
    OutOfFuel,
    /// [`StrategyError::Timeout`]
    Timeout,
    /// [`StrategyError::Memory`]
    Memory,
    /// [`StrategyError::BadIndex`]
    BadIndex,
    /// [`StrategyError::Instantiate`]
    Instantiate,
    /// [`StrategyError::Configure`]
    Configure,
}

impl FaultKind {
    /// Every kind, in a fixed order.
    pub const ALL: [FaultKind; 7] = [
        FaultKind::Trap,
        FaultKind::OutOfFuel,
        FaultKind::Timeout,
        FaultKind::Memory,
        FaultKind::BadIndex,
        FaultKind::Instantiate,
        FaultKind::Configure,
    ];

    /// The label used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::Trap => "trap",
            FaultKind::OutOfFuel => "out_of_fuel",
            FaultKind::Timeout => "timeout",
            FaultKind::Memory => "memory",
            FaultKind::BadIndex => "bad_index",
            FaultKind::Instantiate => "instantiate",
            FaultKind::Configure => "configure",
        }
    }
}

impl StrategyError {
    /// This fault's kind.
    pub fn kind(&self) -> FaultKind {
        match self {
            StrategyError::Trap(_) => FaultKind::Trap,
            StrategyError::OutOfFuel => FaultKind::OutOfFuel,
            StrategyError::Timeout => FaultKind::Timeout,
            StrategyError::Memory => FaultKind::Memory,
            StrategyError::BadIndex { .. } => FaultKind::BadIndex,
            StrategyError::Instantiate(_) => FaultKind::Instantiate,
            StrategyError::Configure(_) => FaultKind::Configure,
        }
    }
}

/// What the balancer decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send it to the backend at this position of the eligible list.
    Backend(usize),
    /// The strategy refused the request (answered `none`).
    Refused,
    /// There was no eligible backend; the strategy was not called.
    NoneEligible,
}

/// Consecutive faults after which a module is skipped for a while.
const QUARANTINE_AFTER: u32 = 3;
/// First and longest time a faulting module is skipped; the time doubles
/// with each further consecutive fault.
const QUARANTINE_MIN: Duration = Duration::from_millis(100);
const QUARANTINE_MAX: Duration = Duration::from_secs(10);
/// At most one fault log line per this interval; the rest are counted.
const FAULT_LOG_INTERVAL: Duration = Duration::from_secs(1);

thread_local! {
    /// Which of a per-worker balancer's instances this thread calls: set
    /// once by each serving thread ([`set_worker`]); 0 elsewhere.
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Tells the balancer that this thread is serving worker `index`, so that
/// a balancer with one instance per worker (`strategy_scope: "worker"`)
/// calls this worker's own instance from it.
pub fn set_worker(index: usize) {
    WORKER.with(|w| w.set(index));
}

/// The worker this thread serves (0 on threads that serve none).
pub fn worker() -> usize {
    WORKER.with(std::cell::Cell::get)
}

/// A strategy plus the guards around it: range check, fault counting and
/// rate-limited logging, the native round-robin fallback, and quarantine of
/// a module that keeps faulting.
///
/// It holds one strategy instance for the whole process (the default:
/// every worker calls the same instance, one at a time, so round robin is
/// exact over all requests) or one per worker thread (no lock shared
/// between workers; each instance sees only its worker's requests, so
/// round robin is exact per worker). A thread calls the instance of the
/// worker it serves ([`set_worker`]); `observe` reaches the instance that
/// selected, since an attempt is recorded on the thread that sent it.
pub struct Balancer {
    strategy: Arc<dyn Strategy>,
    /// Every instance, `strategy` first; one per worker, or just it.
    instances: Vec<Arc<dyn Strategy>>,
    fallback: RoundRobin,
    faults: [AtomicU64; FaultKind::ALL.len()],
    consecutive_faults: AtomicU32,
    log: LogThrottle,
    clock: Clock,
    /// Nanoseconds on `clock` before which the module is skipped.
    quarantined_until: AtomicU64,
    fault_hook: Option<FaultHook>,
}

/// Called with each fault's kind (e.g. to count it in metrics).
pub type FaultHook = Box<dyn Fn(FaultKind) + Send + Sync>;

impl Balancer {
    /// Guards `strategy`.
    pub fn new(strategy: Arc<dyn Strategy>) -> Balancer {
        Balancer::per_worker(vec![strategy])
    }

    /// Guards one instance per worker (`instances[i]` for worker `i`); at
    /// least one.
    pub fn per_worker(instances: Vec<Arc<dyn Strategy>>) -> Balancer {
        let strategy = Arc::clone(instances.first().expect("at least one instance"));
        Balancer {
            strategy,
            instances,
            fallback: RoundRobin::default(),
            faults: Default::default(),
            consecutive_faults: AtomicU32::new(0),
            log: LogThrottle::new(FAULT_LOG_INTERVAL),
            clock: Clock::Real(Instant::now()),
            quarantined_until: AtomicU64::new(0),
            fault_hook: None,
        }
    }

    /// Calls `hook` with the kind of every fault from now on.
    pub fn on_fault(mut self, hook: FaultHook) -> Balancer {
        self.fault_hook = Some(hook);
        self
    }

    /// The guarded strategy (the first instance, when there is one per
    /// worker).
    pub fn strategy(&self) -> &Arc<dyn Strategy> {
        &self.strategy
    }

    /// How many instances: 1, or one per worker.
    pub fn instances(&self) -> usize {
        self.instances.len()
    }

    /// The instance this thread calls.
    fn instance(&self) -> &Arc<dyn Strategy> {
        if self.instances.len() == 1 {
            return &self.strategy;
        }
        let worker = WORKER.with(std::cell::Cell::get);
        &self.instances[worker % self.instances.len()]
    }

    /// Faults of this kind so far.
    pub fn faults(&self, kind: FaultKind) -> u64 {
        self.faults[kind as usize].load(Ordering::Relaxed)
    }

    /// Whether the module is being skipped after repeated faults.
    fn quarantined(&self) -> bool {
        // No clock read per call unless a quarantine was set; an expired
        // one is cleared by the first call after it.
        let until = self.quarantined_until.load(Ordering::Relaxed);
        if until == 0 {
            return false;
        }
        if self.clock.nanos() < until {
            return true;
        }
        let _ =
            self.quarantined_until
                .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed);
        false
    }

    /// Picks a backend among `backends` for `request`. Never fails: a fault
    /// is counted and answered by the fallback.
    pub fn select(&self, request: &RequestView<'_>, backends: &[BackendView]) -> Decision {
        if backends.is_empty() {
            return Decision::NoneEligible;
        }
        if self.quarantined() {
            return Decision::Backend(self.fallback.pick(backends.len()));
        }
        let result = match self.instance().select(request, backends) {
            Ok(Some(i)) if i < backends.len() => Ok(Decision::Backend(i)),
            Ok(Some(i)) => Err(StrategyError::BadIndex {
                index: i as u64,
                len: backends.len(),
            }),
            Ok(None) => Ok(Decision::Refused),
            Err(e) => Err(e),
        };
        match result {
            Ok(decision) => {
                if self.consecutive_faults.load(Ordering::Relaxed) != 0 {
                    self.consecutive_faults.store(0, Ordering::Relaxed);
                }
                decision
            }
            Err(fault) => {
                self.record_fault(&fault);
                Decision::Backend(self.fallback.pick(backends.len()))
            }
        }
    }

    /// Whether [`Balancer::observe`] reaches the strategy: the caller can
    /// skip building outcomes nobody reads.
    pub fn observes(&self) -> bool {
        self.strategy.observes()
    }

    /// Tells an observing strategy how an attempt ended. A fault here is
    /// counted like any other and changes no response.
    pub fn observe(&self, outcome: &Outcome) {
        if !self.strategy.observes() || self.quarantined() {
            return;
        }
        if let Err(fault) = self.instance().observe(outcome) {
            self.record_fault(&fault);
        }
    }

    /// Tells the strategy the configured backends changed.
    pub fn configure(&self, backends: &[BackendInfo]) {
        for instance in &self.instances {
            if let Err(fault) = instance.configure(backends) {
                self.record_fault(&fault);
            }
        }
    }

    fn record_fault(&self, fault: &StrategyError) {
        self.faults[fault.kind() as usize].fetch_add(1, Ordering::Relaxed);
        if let Some(hook) = &self.fault_hook {
            hook(fault.kind());
        }
        let consecutive = self.consecutive_faults.fetch_add(1, Ordering::Relaxed) + 1;
        let mut quarantine = None;
        if consecutive >= QUARANTINE_AFTER {
            let doublings = (consecutive - QUARANTINE_AFTER).min(16);
            let pause = (QUARANTINE_MIN * 2u32.pow(doublings)).min(QUARANTINE_MAX);
            let until = self.clock.nanos() + pause.as_nanos() as u64;
            self.quarantined_until.store(until, Ordering::Relaxed);
            quarantine = Some(pause);
        }

        let Some(suppressed) = self.log.allow() else {
            return;
        };
        match quarantine {
            Some(pause) => tracing::warn!(
                module = self.strategy.name(),
                kind = fault.kind().as_str(),
                suppressed,
                "strategy fault: {fault}; {consecutive} in a row, serving by round robin for {pause:?}"
            ),
            None => tracing::warn!(
                module = self.strategy.name(),
                kind = fault.kind().as_str(),
                suppressed,
                "strategy fault: {fault}; request served by round robin, instance rebuilt"
            ),
        }
    }
}

/// Where the balancer reads the time: the real clock, or one a test moves.
#[derive(Debug)]
enum Clock {
    /// Nanoseconds since this instant.
    Real(Instant),
    /// Nanoseconds as set (tests).
    #[cfg(test)]
    Manual(Arc<AtomicU64>),
}

impl Clock {
    fn nanos(&self) -> u64 {
        match self {
            Clock::Real(origin) => origin.elapsed().as_nanos() as u64,
            #[cfg(test)]
            Clock::Manual(now) => now.load(Ordering::Relaxed),
        }
    }
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer")
            .field("strategy", &self.strategy.name())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers a fixed result, or faults.
    struct Fixed(Result<Option<usize>, StrategyError>);

    impl Strategy for Fixed {
        fn name(&self) -> &str {
            "fixed"
        }
        fn select(
            &self,
            _: &RequestView<'_>,
            _: &[BackendView],
        ) -> Result<Option<usize>, StrategyError> {
            self.0.clone()
        }
    }

    const REQUEST: RequestView<'static> = RequestView::plain(1, 0);

    fn views(n: u32) -> Vec<BackendView> {
        (0..n)
            .map(|id| BackendView {
                id,
                weight: 1,
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn empty_list_never_reaches_the_strategy() {
        let b = Balancer::new(Arc::new(Fixed(Err(StrategyError::OutOfFuel))));
        assert_eq!(b.select(&REQUEST, &[]), Decision::NoneEligible);
        assert_eq!(b.faults(FaultKind::OutOfFuel), 0);
    }

    #[test]
    fn answers_pass_through_and_none_refuses() {
        let b = Balancer::new(Arc::new(Fixed(Ok(Some(2)))));
        assert_eq!(b.select(&REQUEST, &views(3)), Decision::Backend(2));
        let b = Balancer::new(Arc::new(Fixed(Ok(None))));
        assert_eq!(b.select(&REQUEST, &views(3)), Decision::Refused);
    }

    #[test]
    fn every_fault_kind_is_counted_under_its_label_and_served_by_round_robin() {
        // Instantiate and configure faults come from rebuilding an
        // instance: no module input causes the first after a module has
        // loaded (it is for the host failing to create an instance), so it
        // is pinned here with a double.
        let faults = [
            (StrategyError::Trap("t".into()), "trap"),
            (StrategyError::OutOfFuel, "out_of_fuel"),
            (StrategyError::Timeout, "timeout"),
            (StrategyError::Memory, "memory"),
            (StrategyError::BadIndex { index: 9, len: 2 }, "bad_index"),
            (StrategyError::Instantiate("no".into()), "instantiate"),
            (StrategyError::Configure("no".into()), "configure"),
        ];
        for (fault, label) in faults {
            let kind = fault.kind();
            let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
            let hook_seen = Arc::clone(&seen);
            let b = Balancer::new(Arc::new(Fixed(Err(fault))))
                .on_fault(Box::new(move |k| hook_seen.lock().unwrap().push(k)));
            assert_eq!(
                b.select(&REQUEST, &views(2)),
                Decision::Backend(0),
                "{label}"
            );
            assert_eq!(kind.as_str(), label);
            assert_eq!(b.faults(kind), 1, "{label}");
            assert_eq!(*seen.lock().unwrap(), [kind], "{label}");
        }
    }

    #[test]
    fn out_of_range_is_a_fault_served_by_round_robin() {
        let b = Balancer::new(Arc::new(Fixed(Ok(Some(3)))));
        assert_eq!(b.select(&REQUEST, &views(3)), Decision::Backend(0));
        assert_eq!(b.select(&REQUEST, &views(3)), Decision::Backend(1));
        assert_eq!(b.faults(FaultKind::BadIndex), 2);
    }

    #[test]
    fn a_module_that_keeps_faulting_is_skipped_for_a_growing_while() {
        let now = Arc::new(AtomicU64::new(0));
        let b = Balancer {
            clock: Clock::Manual(Arc::clone(&now)),
            ..Balancer::new(Arc::new(Fixed(Err(StrategyError::Timeout))))
        };
        let at = |ms: u64| now.store(ms * 1_000_000, Ordering::Relaxed);
        let faults = || b.faults(FaultKind::Timeout);
        // Faults 1 and 2 are served by round robin; the 3rd starts the
        // quarantine: 100 ms in which the module is not called at all.
        for i in 0..10 {
            assert_eq!(b.select(&REQUEST, &views(2)), Decision::Backend(i % 2));
        }
        assert_eq!(faults(), QUARANTINE_AFTER as u64);
        at(99);
        b.select(&REQUEST, &views(2));
        assert_eq!(faults(), 3, "still skipped at 99 ms");
        // Each further fault in a row doubles the pause: 200 ms, 400 ms,
        // ... up to 10 s, where it stays.
        let mut t = 100;
        for pause in [200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000] {
            at(t);
            b.select(&REQUEST, &views(2));
            let called = faults();
            at(t + pause - 1);
            b.select(&REQUEST, &views(2));
            assert_eq!(faults(), called, "skipped until {pause} ms after {t} ms");
            t += pause;
        }
        assert_eq!(faults(), 3 + 9);
        // A call that succeeds ends the streak.
        let ok = Balancer {
            clock: Clock::Manual(Arc::clone(&now)),
            ..Balancer::new(Arc::new(Fixed(Ok(Some(1)))))
        };
        assert_eq!(ok.select(&REQUEST, &views(2)), Decision::Backend(1));
    }
}
