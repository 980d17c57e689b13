//! Built-in strategy module: exact round robin over the eligible backends.

/// Answers positions 0, 1, 2, … modulo the list length, one per call.
///
/// N sequential calls over k backends give each exactly N/k, which is why the
/// counter is never reset: the host calls one instance in request order.
#[derive(Debug, Default)]
pub struct RoundRobin {
    // u64 so the wrap (which would skew the rotation once) never comes in practice.
    next: u64,
}

impl RoundRobin {
    pub const fn new() -> Self {
        Self { next: 0 }
    }

    /// The position to use among `len` eligible backends; none when there are none.
    pub fn pick(&mut self, len: usize) -> Option<u32> {
        if len == 0 {
            return None;
        }
        let position = self.next % len as u64;
        self.next = self.next.wrapping_add(1);
        u32::try_from(position).ok()
    }
}

#[cfg(target_arch = "wasm32")]
mod component {
    wit_bindgen::generate!({ path: "../../wit/0.1.0", world: "strategy" });

    use exports::loadbalancer::strategy::selector::{Backend, Guest};
    use std::sync::Mutex;

    // One instance serves calls one at a time; the Mutex only makes the static safe.
    static STATE: Mutex<super::RoundRobin> = Mutex::new(super::RoundRobin::new());

    struct Component;

    impl Guest for Component {
        fn select(backends: Vec<Backend>) -> Option<u32> {
            STATE.lock().unwrap().pick(backends.len())
        }
    }

    export!(Component);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_through_positions_in_order() {
        let mut rr = RoundRobin::new();
        let picks: Vec<_> = (0..7).map(|_| rr.pick(3).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn n_calls_give_each_backend_exactly_n_over_k() {
        for k in 1..=7 {
            let mut rr = RoundRobin::new();
            let mut counts = vec![0u32; k];
            for _ in 0..k * 100 {
                counts[rr.pick(k).unwrap() as usize] += 1;
            }
            assert!(counts.iter().all(|&c| c == 100), "k={k}: {counts:?}");
        }
    }

    #[test]
    fn refuses_an_empty_list() {
        assert_eq!(RoundRobin::new().pick(0), None);
    }
}
