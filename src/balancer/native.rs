//! Native strategies: the round robin that serves requests when a module
//! faults, and the baseline that benchmarks compare modules against.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{BackendView, Strategy, StrategyError};

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

    fn select(&self, backends: &[BackendView]) -> Result<Option<usize>, StrategyError> {
        Ok(Some(self.pick(backends.len())))
    }
}
