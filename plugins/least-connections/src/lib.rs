//! Built-in strategy module: the backend with the fewest active connections, ties rotated.

/// Picks a least-loaded backend; among equally loaded ones it rotates.
///
/// Always taking the first of the tied would send every request of an idle
/// pool to the lowest id, so a counter spreads ties evenly instead.
#[derive(Debug, Default)]
pub struct LeastConnections {
    ties_seen: u64,
}

impl LeastConnections {
    pub const fn new() -> Self {
        Self { ties_seen: 0 }
    }

    /// The position of a least-loaded entry of `loads` (active connections per
    /// backend, in list order); none for an empty list.
    ///
    /// Two passes over a cloned iterator, so O(n) with no allocation. The
    /// first pass has no data-dependent branch (the minimum and its count are
    /// updated with selects), because a branch on each comparison mispredicts
    /// on mixed loads: at 1024 backends that was half the call's time.
    pub fn pick<I>(&mut self, loads: I) -> Option<u32>
    where
        I: Iterator<Item = u32> + Clone,
    {
        let (mut min, mut tied) = (u32::MAX, 0u32);
        for load in loads.clone() {
            let less = load < min;
            tied = if less {
                1
            } else {
                tied + u32::from(load == min)
            };
            min = min.min(load);
        }
        if tied == 0 {
            return None;
        }
        let mut skip = self.ties_seen % u64::from(tied);
        self.ties_seen = self.ties_seen.wrapping_add(1);
        for (position, load) in loads.enumerate() {
            if load == min {
                if skip == 0 {
                    return u32::try_from(position).ok();
                }
                skip -= 1;
            }
        }
        None
    }
}

#[cfg(target_arch = "wasm32")]
mod component {
    wit_bindgen::generate!({ path: "../../wit/0.1.0", world: "strategy" });

    use exports::loadbalancer::strategy::selector::{Backend, Guest};
    use std::sync::Mutex;

    // One instance serves calls one at a time; the Mutex only makes the static safe.
    static STATE: Mutex<super::LeastConnections> = Mutex::new(super::LeastConnections::new());

    struct Component;

    impl Guest for Component {
        fn select(backends: Vec<Backend>) -> Option<u32> {
            let loads = backends.iter().map(|b| b.active_connections);
            STATE.lock().unwrap().pick(loads)
        }
    }

    export!(Component);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn picks(loads: &[u32], n: usize) -> Vec<u32> {
        let mut lc = LeastConnections::new();
        (0..n)
            .map(|_| lc.pick(loads.iter().copied()).unwrap())
            .collect()
    }

    #[test]
    fn picks_the_unique_minimum() {
        assert_eq!(picks(&[4, 2, 9, 3], 3), [1, 1, 1]);
    }

    #[test]
    fn rotates_among_the_tied_minimum_only() {
        assert_eq!(picks(&[3, 1, 1, 5, 1], 6), [1, 2, 4, 1, 2, 4]);
    }

    #[test]
    fn equal_load_spreads_evenly() {
        let mut counts = [0u32; 4];
        for p in picks(&[0; 4], 400) {
            counts[p as usize] += 1;
        }
        assert_eq!(counts, [100; 4]);
    }

    #[test]
    fn handles_the_largest_load() {
        assert_eq!(picks(&[u32::MAX, u32::MAX], 2), [0, 1]);
    }

    #[test]
    fn refuses_an_empty_list() {
        assert_eq!(LeastConnections::new().pick(std::iter::empty()), None);
    }
}
