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

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::thread::Thread;
use std::time::Duration;

use wasmtime::{Engine, EngineWeak};

/// How often the clock ticks while it runs; a call's deadline is counted in
/// ticks.
pub const TICK: Duration = Duration::from_millis(1);

/// Ticks without a call before the clock parks (100 ms).
const PARK_AFTER: u32 = 100;

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
    while let Some(engine) = weak.upgrade() {
        engine.increment_epoch();
        drop(engine);
        std::thread::sleep(TICK);
        let now = totals();
        if now != last || now.0 != now.1 {
            // A call started since the last tick, or one is running.
            last = now;
            idle = 0;
            continue;
        }
        idle += 1;
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
