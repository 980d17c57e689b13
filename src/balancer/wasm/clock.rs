//! The sandbox clock: a thread that advances the engine's epoch every
//! [`TICK`] while strategy code may be running, and sleeps while none is.
//!
//! A call's wall-clock deadline is counted in epoch ticks, so the clock must
//! tick for as long as a call runs. It need not tick otherwise: an idle
//! balancer would wake a thousand times a second for nothing. So each call
//! is counted on its thread's own cache line (no line shared between the
//! workers on the request path) as it starts and ends, and the clock,
//! seeing no call start or run for [`PARK_AFTER`] ticks, parks itself. A
//! call that starts while it is parked wakes it (the flag is only read on
//! the request path, written once per park); the order of the two atomic
//! steps on each side (mark, then look) means that either the call sees the
//! clock parked and wakes it, or the clock sees the call and does not park.
//!
//! Under load calls are short (about a microsecond) and rarely running at
//! the instant the clock looks. While it finds none running, the clock
//! sleeps a few ticks at a time ([`coarse step`](set_timeout)) and
//! advances the epoch by as many, so that the epoch still follows the wall
//! clock; once it sees a call running it ticks every [`TICK`] again. A
//! busy balancer so wakes it about 200 times a second instead of 1,000,
//! and a call's deadline may come up to a step early: the first expiry only
//! starts the CPU-time check that decides (see the deadline callback in
//! `wasm/mod.rs`), so a fast call is never stopped for it.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::thread::Thread;
use std::time::Duration;

use wasmtime::{Engine, EngineWeak};

/// How often the clock ticks while it runs; a call's deadline is counted in
/// ticks.
pub const TICK: Duration = Duration::from_millis(1);

/// Ticks without a call before the clock parks (100 ms).
const PARK_AFTER: u32 = 100;

/// The most ticks the clock sleeps at a time while no call is seen running.
const MAX_STEP: u32 = 5;

/// The ticks the clock sleeps at a time while no call is seen running:
/// see [`set_timeout`].
static COARSE_STEP: AtomicU32 = AtomicU32::new(1);

/// Sets the coarse step for strategies with deadline `timeout`, the one
/// most recently loaded: a quarter of it, from one tick to [`MAX_STEP`]
/// (5 ms for the default 20 ms; 1 ms, no coarsening, below 8 ms).
pub fn set_timeout(timeout: Duration) {
    COARSE_STEP.store(coarse_step(timeout), Ordering::Relaxed);
}

fn coarse_step(timeout: Duration) -> u32 {
    let quarter = timeout.as_nanos() / 4 / TICK.as_nanos();
    u32::try_from(quarter)
        .unwrap_or(MAX_STEP)
        .clamp(1, MAX_STEP)
}

/// Threads are spread over this many counters (by worker index); threads
/// sharing one stay correct, only no longer alone on their cache line.
const SLOTS: usize = 8;

#[repr(align(128))]
struct Slot {
    started: AtomicU64,
    finished: AtomicU64,
}

static SLOTS_IN_USE: [Slot; SLOTS] = [const {
    Slot {
        started: AtomicU64::new(0),
        finished: AtomicU64::new(0),
    }
}; SLOTS];

static PARKED: AtomicBool = AtomicBool::new(false);
static CLOCK: OnceLock<Thread> = OnceLock::new();

/// Starts the clock thread for `engine`; it runs as long as the engine does.
pub fn start(engine: &Engine) {
    let weak = engine.weak();
    let thread = std::thread::Builder::new()
        .name("wasm-epoch".into())
        .spawn(move || run(weak))
        .expect("spawning the sandbox clock thread");
    let _ = CLOCK.set(thread.thread().clone());
}

fn run(weak: EngineWeak) {
    let mut last = (0, 0);
    let mut idle = 0;
    // Ticks slept since the epoch was last advanced.
    let mut slept = 1;
    while let Some(engine) = weak.upgrade() {
        for _ in 0..slept {
            engine.increment_epoch();
        }
        drop(engine);
        let now = totals();
        // Fine ticks while a call runs, coarse ones while none is seen.
        slept = if now.0 != now.1 {
            1
        } else {
            COARSE_STEP.load(Ordering::Relaxed)
        };
        std::thread::sleep(TICK * slept);
        let now = totals();
        if now != last || now.0 != now.1 {
            // A call started since the last tick, or one is running.
            last = now;
            idle = 0;
            continue;
        }
        idle += slept;
        if idle < PARK_AFTER {
            continue;
        }
        PARKED.store(true, Ordering::SeqCst);
        if totals() != last {
            // A call started as the flag went up: keep ticking.
            PARKED.store(false, Ordering::SeqCst);
            continue;
        }
        while PARKED.load(Ordering::SeqCst) {
            std::thread::park();
        }
        // Woken by a call: tick finely from the start.
        slept = 1;
        idle = 0;
    }
}

/// Calls started and finished, over all slots.
fn totals() -> (u64, u64) {
    SLOTS_IN_USE.iter().fold((0, 0), |(s, f), slot| {
        (
            s + slot.started.load(Ordering::SeqCst),
            f + slot.finished.load(Ordering::SeqCst),
        )
    })
}

/// Whether the clock is parked (no call for a while).
pub fn is_parked() -> bool {
    PARKED.load(Ordering::SeqCst)
}

/// Marks strategy code as running on this thread until dropped; the clock
/// ticks meanwhile.
pub struct Running(&'static Slot);

impl Running {
    /// Marks the start of a call, waking the clock if it is parked.
    pub fn start() -> Running {
        let slot = &SLOTS_IN_USE[crate::balancer::worker() % SLOTS];
        slot.started.fetch_add(1, Ordering::SeqCst);
        if PARKED.load(Ordering::SeqCst) && PARKED.swap(false, Ordering::SeqCst) {
            if let Some(clock) = CLOCK.get() {
                clock.unpark();
            }
        }
        Running(slot)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.finished.fetch_add(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_coarse_step_is_a_quarter_of_the_deadline_within_one_to_five_ticks() {
        let ms = Duration::from_millis;
        assert_eq!(coarse_step(ms(20)), 5);
        assert_eq!(coarse_step(ms(12)), 3);
        assert_eq!(coarse_step(ms(7)), 1);
        assert_eq!(coarse_step(ms(1)), 1);
        assert_eq!(coarse_step(Duration::from_secs(3600)), 5);
    }
}
