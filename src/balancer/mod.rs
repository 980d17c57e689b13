//! Backend selection: the [`Strategy`] trait, the wasm host that implements
//! it with a sandboxed component ([`WasmStrategy`]), the built-in modules, and
//! the [`Balancer`] that guards every call.
//!
//! The host measures, the module decides. The host passes only eligible
//! (healthy) backends, in configured order, and never calls a module with an
//! empty list. It checks the answer: an index out of range, a trap, running
//! out of fuel or time, or memory over the cap is a *strategy fault*. A fault
//! is counted and logged (at most once a second), the request is served by a
//! native round robin instead, and the faulted instance is rebuilt before the
//! module's next call. A module that keeps faulting is skipped for a growing
//! back-off, so a module stuck in a loop cannot add its time limit to every
//! request.

mod builtin;
mod native;
mod wasm;
pub mod workload;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{SandboxLimits, StrategySource};
use crate::throttle::LogThrottle;

pub use builtin::builtin_module;
pub use native::{LeastConnections, RoundRobin, WeightedRoundRobin};
pub use wasm::{LoadError, WasmStrategy, SELECTOR_EXPORT};

/// Loads the strategy a config names: a built-in by name, or a component
/// from disk. Compiles it and creates its first instance, so every problem
/// shows up here, at start-up or reload, never on a request.
pub fn load(
    source: &StrategySource,
    limits: SandboxLimits,
) -> Result<Arc<dyn Strategy>, LoadError> {
    Ok(Arc::new(match source {
        StrategySource::Builtin(name) => WasmStrategy::builtin(name, limits)?,
        StrategySource::Path(path) => WasmStrategy::from_file(path, limits)?,
        StrategySource::Native(name) => return Ok(native::by_name(name)),
    }))
}

/// One eligible backend as a strategy sees it at selection time (the WIT
/// record `backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BackendView {
    /// Stable identity: the backend's position in the configured list.
    pub id: u32,
    /// Configured weight, 1 when not set.
    pub weight: u32,
    /// Requests now in flight to this backend through this balancer.
    pub active_connections: u32,
    /// Smoothed response latency in microseconds; 0 until known.
    pub latency_micros: u32,
}

/// Picks a backend for the next request.
pub trait Strategy: Send + Sync {
    /// A short name for logs: a built-in's name or a module's path.
    fn name(&self) -> &str;

    /// Picks one of `backends` (never empty): its position in the slice, or
    /// `None` to refuse the request. Implementations may return an index out
    /// of range; [`Balancer`] checks.
    fn select(&self, backends: &[BackendView]) -> Result<Option<usize>, StrategyError>;
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
}

impl FaultKind {
    /// Every kind, in a fixed order.
    pub const ALL: [FaultKind; 6] = [
        FaultKind::Trap,
        FaultKind::OutOfFuel,
        FaultKind::Timeout,
        FaultKind::Memory,
        FaultKind::BadIndex,
        FaultKind::Instantiate,
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

/// A strategy plus the guards around it: range check, fault counting and
/// rate-limited logging, the native round-robin fallback, and quarantine of
/// a module that keeps faulting.
pub struct Balancer {
    strategy: Arc<dyn Strategy>,
    fallback: RoundRobin,
    faults: [AtomicU64; FaultKind::ALL.len()],
    consecutive_faults: AtomicU32,
    log: LogThrottle,
    started: Instant,
    /// Nanoseconds since `started` before which the module is skipped.
    quarantined_until: AtomicU64,
    fault_hook: Option<FaultHook>,
}

/// Called with each fault's kind (e.g. to count it in metrics).
pub type FaultHook = Box<dyn Fn(FaultKind) + Send + Sync>;

impl Balancer {
    /// Guards `strategy`.
    pub fn new(strategy: Arc<dyn Strategy>) -> Balancer {
        Balancer {
            strategy,
            fallback: RoundRobin::default(),
            faults: Default::default(),
            consecutive_faults: AtomicU32::new(0),
            log: LogThrottle::new(FAULT_LOG_INTERVAL),
            started: Instant::now(),
            quarantined_until: AtomicU64::new(0),
            fault_hook: None,
        }
    }

    /// Calls `hook` with the kind of every fault from now on.
    pub fn on_fault(mut self, hook: FaultHook) -> Balancer {
        self.fault_hook = Some(hook);
        self
    }

    /// The guarded strategy.
    pub fn strategy(&self) -> &Arc<dyn Strategy> {
        &self.strategy
    }

    /// Faults of this kind so far.
    pub fn faults(&self, kind: FaultKind) -> u64 {
        self.faults[kind as usize].load(Ordering::Relaxed)
    }

    /// Picks a backend among `backends`. Never fails: a fault is counted and
    /// answered by the fallback.
    pub fn select(&self, backends: &[BackendView]) -> Decision {
        if backends.is_empty() {
            return Decision::NoneEligible;
        }
        let now = self.started.elapsed().as_nanos() as u64;
        if now < self.quarantined_until.load(Ordering::Relaxed) {
            return Decision::Backend(self.fallback.pick(backends.len()));
        }
        let result = match self.strategy.select(backends) {
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
            let until = self.started.elapsed() + pause;
            self.quarantined_until
                .store(until.as_nanos() as u64, Ordering::Relaxed);
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
        fn select(&self, _: &[BackendView]) -> Result<Option<usize>, StrategyError> {
            self.0.clone()
        }
    }

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
        assert_eq!(b.select(&[]), Decision::NoneEligible);
        assert_eq!(b.faults(FaultKind::OutOfFuel), 0);
    }

    #[test]
    fn answers_pass_through_and_none_refuses() {
        let b = Balancer::new(Arc::new(Fixed(Ok(Some(2)))));
        assert_eq!(b.select(&views(3)), Decision::Backend(2));
        let b = Balancer::new(Arc::new(Fixed(Ok(None))));
        assert_eq!(b.select(&views(3)), Decision::Refused);
    }

    #[test]
    fn out_of_range_is_a_fault_served_by_round_robin() {
        let b = Balancer::new(Arc::new(Fixed(Ok(Some(3)))));
        assert_eq!(b.select(&views(3)), Decision::Backend(0));
        assert_eq!(b.select(&views(3)), Decision::Backend(1));
        assert_eq!(b.faults(FaultKind::BadIndex), 2);
    }

    #[test]
    fn a_module_that_keeps_faulting_is_skipped_for_a_while() {
        let b = Balancer::new(Arc::new(Fixed(Err(StrategyError::Timeout))));
        for i in 0..10 {
            assert_eq!(b.select(&views(2)), Decision::Backend(i % 2));
        }
        // Three faults, then the quarantine (100 ms) serves the rest.
        assert_eq!(b.faults(FaultKind::Timeout), QUARANTINE_AFTER as u64);
    }
}
