//! Native strategies: the round robin that serves requests when a module
//! faults, and the baseline that benchmarks compare modules against.

use std::sync::atomic::{AtomicUsize, Ordering};

use std::sync::Arc;

use super::{BackendView, RequestView, Strategy, StrategyError};

/// The native twin named `name` (one of
/// [`NATIVE_STRATEGIES`](crate::config::NATIVE_STRATEGIES)); round robin for
/// any other name.
pub fn by_name(name: &str) -> Arc<dyn Strategy> {
    match name {
        "native:least-connections" => Arc::new(LeastConnections::default()),
        "native:weighted-round-robin" => Arc::new(WeightedRoundRobin::default()),
        _ => Arc::new(RoundRobin::default()),
    }
}

/// Exact round robin over whatever list it is given: the n-th call answers
/// `n % len`.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    /// The next position in a list of `len` (> 0) entries.
    pub fn pick(&self, len: usize) -> usize {
        debug_assert!(len > 0, "the host never selects from an empty list");
        self.next.fetch_add(1, Ordering::Relaxed) % len.max(1)
    }
}

impl Strategy for RoundRobin {
    fn name(&self) -> &str {
        "native-round-robin"
    }

    fn select(
        &self,
        _request: &RequestView<'_>,
        backends: &[BackendView],
    ) -> Result<Option<usize>, StrategyError> {
        Ok(Some(self.pick(backends.len())))
    }
}

/// Least connections, ties rotated: the native twin of the
/// `least-connections` module, for benchmarks and conformance cross-checks.
#[derive(Debug, Default)]
pub struct LeastConnections {
    ties_seen: AtomicUsize,
}

impl Strategy for LeastConnections {
    fn name(&self) -> &str {
        "native-least-connections"
    }

    fn select(
        &self,
        _request: &RequestView<'_>,
        backends: &[BackendView],
    ) -> Result<Option<usize>, StrategyError> {
        let Some(min) = backends.iter().map(|b| b.in_flight).min() else {
            return Ok(None);
        };
        let tied = backends.iter().filter(|b| b.in_flight == min).count();
        let nth = self.ties_seen.fetch_add(1, Ordering::Relaxed) % tied;
        Ok(backends
            .iter()
            .enumerate()
            .filter(|(_, b)| b.in_flight == min)
            .nth(nth)
            .map(|(i, _)| i))
    }
}

/// Smooth weighted round robin as in nginx, state keyed by backend id: the
/// native twin of the `weighted-round-robin` module.
#[derive(Debug, Default)]
pub struct WeightedRoundRobin {
    current: std::sync::Mutex<Vec<i64>>,
}

impl Strategy for WeightedRoundRobin {
    fn name(&self) -> &str {
        "native-weighted-round-robin"
    }

    fn select(
        &self,
        _request: &RequestView<'_>,
        backends: &[BackendView],
    ) -> Result<Option<usize>, StrategyError> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let mut total = 0i64;
        let mut best: Option<(usize, i64)> = None;
        for (position, b) in backends.iter().enumerate() {
            let id = b.id as usize;
            if id >= current.len() {
                current.resize(id + 1, 0);
            }
            let weight = i64::from(b.weight.max(1));
            current[id] += weight;
            total += weight;
            if best.is_none_or(|(_, c)| current[id] > c) {
                best = Some((position, current[id]));
            }
        }
        Ok(best.map(|(position, _)| {
            current[backends[position].id as usize] -= total;
            position
        }))
    }
}
