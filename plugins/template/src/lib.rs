//! Template for a new strategy module (round robin): copy this folder to start your own.
//!
//! To make a strategy of your own:
//! 1. Copy `plugins/template/` to `plugins/<your-strategy>/`, set `name` and
//!    `description` in its Cargo.toml, and add the folder to `members` in
//!    plugins/Cargo.toml.
//! 2. Replace `Strategy` below with your algorithm. Keep it plain Rust so
//!    `cargo test` inside plugins/ tests it natively.
//! 3. Add the folder to `MODULES` in plugins/build.sh and run it: the component
//!    lands in plugins/dist/<your-strategy>.wasm. Give that path in the config.
//!
//! What the host promises (see wit/0.1.0/strategy.wit): `select` gets only the
//! eligible (healthy) backends in configured order, never an empty list in
//! normal operation; `id` is stable while the list changes, so key per-backend
//! state by it. Answer a position in the list, or none to refuse the request.
//! An out-of-range answer, a panic, an endless loop or unbounded memory is a
//! fault: the host serves that request by native round robin and starts a
//! fresh instance, so your statics are reset.

/// Your algorithm's state. Here: a counter for round robin.
#[derive(Debug, Default)]
pub struct Strategy {
    next: u64,
}

impl Strategy {
    pub const fn new() -> Self {
        Self { next: 0 }
    }

    /// Picks a position among `len` eligible backends. Pass whatever your
    /// algorithm needs from the list (weights, loads, latencies, ids) instead.
    pub fn pick(&mut self, len: usize) -> Option<u32> {
        if len == 0 {
            return None;
        }
        let position = self.next % len as u64;
        self.next = self.next.wrapping_add(1);
        u32::try_from(position).ok()
    }
}

// The glue between the WIT contract and `Strategy`; only the wasm build needs it.
#[cfg(target_arch = "wasm32")]
mod component {
    // The path is relative to this crate's Cargo.toml.
    wit_bindgen::generate!({ path: "../../wit/0.1.0", world: "strategy" });

    use exports::loadbalancer::strategy::selector::{Backend, Guest};
    use std::sync::Mutex;

    // State lives in a static: the host keeps one instance and calls it once
    // per request, in request order. The Mutex only makes the static safe.
    static STATE: Mutex<super::Strategy> = Mutex::new(super::Strategy::new());

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
    fn rotates_through_positions() {
        let mut s = Strategy::new();
        let picks: Vec<_> = (0..4).map(|_| s.pick(3).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0]);
        assert_eq!(s.pick(0), None);
    }
}
