//! Shared by the criterion benches.

use std::sync::Barrier;
use std::time::{Duration, Instant};

use rust_load_balancer::balancer::set_worker;

/// Runs `call(worker, i)` for `i` in `0..iters` on `threads` threads at
/// once, each told first that it serves worker `worker`, all starting
/// together; returns the longest wall time any of them took (the time per
/// call as each thread sees it, with every core busy).
pub fn on_every_core(threads: usize, iters: u64, call: impl Fn(usize, u64) + Sync) -> Duration {
    let start = Barrier::new(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|worker| {
                let (call, start) = (&call, &start);
                s.spawn(move || {
                    set_worker(worker);
                    start.wait();
                    let began = Instant::now();
                    for i in 0..iters {
                        call(worker, i);
                    }
                    began.elapsed()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a bench thread panicked"))
            .max()
            .unwrap_or_default()
    })
}
