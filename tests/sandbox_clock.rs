//! The sandbox clock ticks only while strategy code may run: it parks
//! after a tenth of a second without a call, and a call wakes it, so a call
//! made after a quiet spell is still held to its deadline. Its own test
//! binary, so that no other test's calls keep the clock awake.

mod support;

use std::time::{Duration, Instant};

use rust_load_balancer::balancer::{
    sandbox_clock_is_parked, BackendView, RequestView, Strategy, StrategyError, StrategySetup,
    WasmStrategy,
};
use rust_load_balancer::config::SandboxLimits;

fn backends() -> Vec<BackendView> {
    (0..3)
        .map(|id| BackendView {
            id,
            weight: 1,
            in_flight: 0,
            latency_micros: 0,
        })
        .collect()
}

/// Waits (at most 5 s) for the clock to park; says whether it did.
fn parks() -> bool {
    let waited = Instant::now();
    while waited.elapsed() < Duration::from_secs(5) {
        if sandbox_clock_is_parked() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

#[test]
fn the_clock_parks_when_idle_and_a_call_after_a_pause_still_meets_its_deadline() {
    let round_robin =
        WasmStrategy::builtin("round-robin", &StrategySetup::new(SandboxLimits::default()))
            .expect("the built-in loads");
    let looping = WasmStrategy::from_file(
        &support::dist("misbehave-loop.wasm"),
        &StrategySetup::new(SandboxLimits {
            // Fuel enough for minutes: only the deadline can stop it.
            fuel: u64::MAX / 2,
            timeout: Duration::from_millis(20),
            ..SandboxLimits::default()
        }),
    )
    .expect("the fixture loads");
    let list = backends();
    let request = RequestView::plain(1, 0);
    assert_eq!(round_robin.select(&request, &list), Ok(Some(0)));
    assert!(
        parks(),
        "the clock did not park within 5 s of the last call"
    );

    // A call wakes it.
    assert_eq!(round_robin.select(&request, &list), Ok(Some(1)));
    assert!(!sandbox_clock_is_parked());

    // Parked again, an endless loop is still cut off by its deadline: the
    // clock woke for it and ticked until it ended.
    assert!(parks(), "the clock did not park again");
    // On a thread of its own, so that a clock that failed to wake fails the
    // test in bounded time instead of hanging it.
    let (done, outcome) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(looping.select(&RequestView::plain(2, 0), &backends()));
    });
    let answer = outcome
        .recv_timeout(Duration::from_secs(10))
        .expect("the endless loop was not cut off within 10 s: the clock did not wake");
    assert_eq!(answer, Err(StrategyError::Timeout));
}
