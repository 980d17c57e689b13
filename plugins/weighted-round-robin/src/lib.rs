//! Built-in strategy module: smooth weighted round robin, nginx's algorithm.

/// Smooth weighted round robin, as nginx does it (`ngx_http_upstream_get_peer`
/// in src/http/ngx_http_upstream_round_robin.c; credit to the nginx authors).
///
/// On each pick every eligible backend's `current` grows by its weight, the
/// largest `current` wins (the first on ties) and pays back the total weight.
/// Over every sum(weights) calls each backend is picked exactly its weight,
/// and the picks are interleaved: weights 5, 1, 1 give a a b a c a a.
///
/// `current` is kept per backend id, not per position, so a backend that
/// leaves the eligible set (unhealthy) keeps its credit and resumes where it
/// was when it rejoins, as nginx keeps it for a peer that is down.
#[derive(Debug, Default)]
pub struct SmoothWeighted {
    // Indexed by id. Ids are positions in the configured list, so this is as
    // long as that list, and grows only when a higher id first appears.
    current: Vec<i64>,
}

impl SmoothWeighted {
    pub const fn new() -> Self {
        Self {
            current: Vec::new(),
        }
    }

    /// The position of the chosen entry of `backends` (`(id, weight)` in list
    /// order); none for an empty list. A weight of 0 counts as 1.
    pub fn pick<I>(&mut self, backends: I) -> Option<u32>
    where
        I: IntoIterator<Item = (u32, u32)>,
    {
        let mut total = 0i64;
        let mut best: Option<(usize, usize, i64)> = None; // (position, id, current)
        for (position, (id, weight)) in backends.into_iter().enumerate() {
            let weight = i64::from(weight.max(1));
            let id = id as usize;
            if id >= self.current.len() {
                self.current.resize(id + 1, 0);
            }
            self.current[id] += weight;
            total += weight;
            if best.is_none_or(|(_, _, max)| self.current[id] > max) {
                best = Some((position, id, self.current[id]));
            }
        }
        let (position, id, _) = best?;
        self.current[id] -= total;
        u32::try_from(position).ok()
    }
}

#[cfg(target_arch = "wasm32")]
mod component {
    wit_bindgen::generate!({ path: "../../wit/0.1.0", world: "strategy" });

    use exports::loadbalancer::strategy::selector::{Backend, Guest};
    use std::sync::Mutex;

    // One instance serves calls one at a time; the Mutex only makes the static safe.
    static STATE: Mutex<super::SmoothWeighted> = Mutex::new(super::SmoothWeighted::new());

    struct Component;

    impl Guest for Component {
        fn select(backends: Vec<Backend>) -> Option<u32> {
            let backends = backends.iter().map(|b| (b.id, b.weight));
            STATE.lock().unwrap().pick(backends)
        }
    }

    export!(Component);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Backends with ids 0.. and the given weights.
    fn pool(weights: &[u32]) -> Vec<(u32, u32)> {
        (0..).zip(weights.iter().copied()).collect()
    }

    fn picks(wrr: &mut SmoothWeighted, backends: &[(u32, u32)], n: usize) -> Vec<u32> {
        (0..n)
            .map(|_| wrr.pick(backends.iter().copied()).unwrap())
            .collect()
    }

    #[test]
    fn gives_the_nginx_sequence_for_5_1_1() {
        let mut wrr = SmoothWeighted::new();
        let backends = pool(&[5, 1, 1]);
        // a a b a c a a, and again: the state is back to zero after a cycle.
        let cycle = [0, 0, 1, 0, 2, 0, 0];
        assert_eq!(picks(&mut wrr, &backends, 7), cycle);
        assert_eq!(picks(&mut wrr, &backends, 7), cycle);
    }

    #[test]
    fn every_cycle_gives_each_backend_exactly_its_weight() {
        for weights in [
            &[1, 1, 1][..],
            &[3, 2, 1, 7],
            &[10, 1],
            &[4],
            &[2, 3, 5, 7, 11],
        ] {
            let mut wrr = SmoothWeighted::new();
            let backends = pool(weights);
            let cycle: u32 = weights.iter().sum();
            for _ in 0..5 {
                let mut counts = vec![0u32; weights.len()];
                for p in picks(&mut wrr, &backends, cycle as usize) {
                    counts[p as usize] += 1;
                }
                assert_eq!(counts, weights, "weights {weights:?}");
            }
        }
    }

    #[test]
    fn weight_zero_counts_as_one() {
        let mut wrr = SmoothWeighted::new();
        assert_eq!(picks(&mut wrr, &pool(&[0, 0, 2]), 4), [2, 0, 1, 2]);
    }

    #[test]
    fn a_backend_keeps_its_state_while_it_is_away() {
        let (a, b, c) = ((0, 5), (1, 1), (2, 1));
        let mut wrr = SmoothWeighted::new();
        assert_eq!(picks(&mut wrr, &[a, b, c], 2), [0, 0]);
        // b is unhealthy: c moves to position 1 but keeps its own state, and
        // b's credit is frozen, not lost or handed to c.
        assert_eq!(picks(&mut wrr, &[a, c], 2), [1, 0]);
        // b rejoins with its credit: it is picked soon, and from here on every
        // cycle of 7 is exact again (the state repeats).
        let cycle = [0, 1, 0, 0, 0, 2, 0];
        assert_eq!(picks(&mut wrr, &[a, b, c], 7), cycle);
        assert_eq!(picks(&mut wrr, &[a, b, c], 7), cycle);
    }

    #[test]
    fn answers_positions_not_ids() {
        let mut wrr = SmoothWeighted::new();
        assert_eq!(picks(&mut wrr, &[(7, 1), (3, 2)], 3), [1, 0, 1]);
    }

    #[test]
    fn refuses_an_empty_list() {
        assert_eq!(SmoothWeighted::new().pick([]), None);
    }
}
