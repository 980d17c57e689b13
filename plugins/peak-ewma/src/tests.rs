use super::*;
use test_alloc::allocations;

#[derive(Debug, Clone, Copy, Default)]
struct B {
    id: u32,
    in_flight: u32,
    latency_micros: u32,
}

impl Candidate for B {
    fn id(&self) -> u32 {
        self.id
    }
    fn in_flight(&self) -> u32 {
        self.in_flight
    }
    fn latency_micros(&self) -> u32 {
        self.latency_micros
    }
}

fn pool(n: u32) -> Vec<B> {
    (0..n).map(|id| B { id, ..B::default() }).collect()
}

/// xorshift64*: the host's `random`, reproducibly.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn configured(options: &str, backends: &[B]) -> PeakEwma {
    let mut p = PeakEwma::new();
    p.configure(options, backends.iter().map(|b| b.id)).unwrap();
    p
}

/// Runs `requests` one at a time (each completes before the next), the
/// outcome of request `i` on backend `id` being `outcome(i, id)` =
/// (latency, failed); returns the ids picked.
fn run(
    p: &mut PeakEwma,
    backends: &[B],
    random: &mut Random,
    requests: std::ops::Range<u32>,
    outcome: impl Fn(u32, u32) -> (u32, bool),
) -> Vec<u32> {
    requests
        .map(|i| {
            let id = backends[p.select(random.next(), backends).unwrap() as usize].id;
            let (latency, failed) = outcome(i, id);
            p.observe(id, latency, failed);
            id
        })
        .collect()
}

fn share(picks: &[u32], id: u32) -> f64 {
    picks.iter().filter(|&&p| p == id).count() as f64 / picks.len() as f64
}

#[test]
fn steers_away_from_a_slow_backend() {
    let backends = pool(4);
    let mut p = configured("{}", &backends);
    let picks = run(&mut p, &backends, &mut Random(7), 0..20_000, |_, id| {
        (if id == 2 { 50_000 } else { 2_000 }, false)
    });
    // Tried again only once its estimate decays below 2 ms: every ~3200 requests.
    assert!(share(&picks, 2) < 0.01, "{}", share(&picks, 2));
    for id in [0, 1, 3] {
        assert!(share(&picks, id) > 0.25, "{id}: {}", share(&picks, id));
    }
}

#[test]
fn steers_away_from_a_backend_answering_500() {
    let backends = pool(3);
    // Backend 1 fails fast: 1 ms to a 500, where the others take 10 ms.
    let outcome = |_, id| {
        if id == 1 {
            (1_000, true)
        } else {
            (10_000, false)
        }
    };
    let mut p = configured("{}", &backends);
    let picks = run(&mut p, &backends, &mut Random(1), 0..20_000, outcome);
    assert!(share(&picks, 1) < 0.01, "{}", share(&picks, 1));
    // Without the penalty its fast errors would draw the traffic.
    let mut p = configured(r#"{"failure_penalty_micros": 0}"#, &backends);
    let picks = run(&mut p, &backends, &mut Random(1), 0..20_000, outcome);
    assert!(share(&picks, 1) > 0.5, "{}", share(&picks, 1));
}

#[test]
fn a_backend_that_looked_slow_is_tried_again() {
    let backends = pool(3);
    // A low default, so that every backend is tried at once.
    let mut p = configured(r#"{"default_rtt_micros": 1000}"#, &backends);
    let mut random = Random(3);
    // Backend 0 is slow for the first 1000 requests, then the fastest.
    let outcome = |i, id| match id {
        0 if i < 1000 => (100_000, false),
        0 => (1_000, false),
        _ => (5_000, false),
    };
    let early = run(&mut p, &backends, &mut random, 0..1000, outcome);
    assert!(early[..3].contains(&0));
    let last = early.iter().rposition(|&id| id == 0).unwrap();
    assert!(share(&early, 0) < 0.01);
    let later = run(&mut p, &backends, &mut random, 1000..20_000, outcome);
    // Its 100 ms estimate decays below the others' 5 ms about
    // 1000 × ln(20) ≈ 3000 requests after its last sample; then it is
    // tried, found fast, and wins.
    let again = 1000 + later.iter().position(|&id| id == 0).unwrap();
    assert!((2500..3500).contains(&(again - last)), "{last} -> {again}");
    assert!(share(&later[10_000..], 0) > 0.6);
}

#[test]
fn decay_is_counted_in_requests() {
    let backends = pool(2);
    let mut p = configured(r#"{"decay_requests": 10}"#, &backends);
    p.observe(0, 100_000, false);
    // Backend 1 answers every request in 10 ms, so its samples keep it
    // there (9.05 ms when read, a request after its last sample), while
    // backend 0's 100 ms decays: e^(-t/10) × 100 ms < 9.05 ms from
    // t = 10 × ln(11.05) ≈ 24.02 requests (select calls) on: the 25th.
    let mut random = Random(9);
    let mut picks = Vec::new();
    for _ in 0..30 {
        let pick = p.select(random.next(), &backends).unwrap();
        picks.push(pick);
        if pick == 1 {
            p.observe(1, 10_000, false);
        } else {
            break;
        }
    }
    assert_eq!(picks.len(), 25, "{picks:?}");
}

#[test]
fn a_peak_replaces_the_estimate_and_a_low_sample_pulls_it_down() {
    let backends = pool(1);
    let mut p = configured(r#"{"decay_requests": 100}"#, &backends);
    p.observe(0, 1_000, false);
    p.observe(0, 9_000, false); // a peak, at once
    assert_eq!(p.cost(&backends[0]), 9_000.0);
    for _ in 0..50 {
        p.select(0, &backends);
    }
    // 50 requests later: 9 ms decayed (e^-0.5), then a 1 ms sample blended
    // in with recency 1 - e^-0.5.
    p.observe(0, 1_000, false);
    let decay = (-0.5f64).exp();
    let expected = 9_000.0 * decay * decay + 1_000.0 * (1.0 - decay);
    assert!((p.cost(&backends[0]) - expected).abs() < 1e-6);
}

#[test]
fn load_multiplies_the_estimate() {
    let mut backends = pool(2);
    let mut p = configured("{}", &backends);
    p.observe(0, 10_000, false);
    p.observe(1, 10_000, false);
    backends[0].in_flight = 3;
    let mut random = Random(5);
    for _ in 0..100 {
        assert_eq!(p.select(random.next(), &backends), Some(1));
    }
    // 2 ms × 4 in flight beats 10 ms × 1.
    p.observe(0, 2_000, false);
    let mut p = configured("{}", &backends);
    p.observe(0, 2_000, false);
    p.observe(1, 10_000, false);
    assert_eq!(p.select(random.next(), &backends), Some(0));
}

#[test]
fn a_backend_never_observed_starts_from_the_hosts_latency_or_the_default() {
    let mut backends = pool(2);
    let mut p = configured(r#"{"default_rtt_micros": 50000}"#, &backends);
    p.observe(0, 20_000, false);
    // Backend 1 unobserved: the 50 ms default loses to backend 0's 20 ms.
    assert_eq!(p.select(1, &backends), Some(0));
    // The host knows it answers in 5 ms: that is its estimate.
    backends[1].latency_micros = 5_000;
    assert_eq!(p.select(1, &backends), Some(1));
    assert_eq!(p.cost(&backends[1]), 5_000.0);
}

#[test]
fn p2c_picks_two_distinct_positions() {
    let mut random = Random(11);
    for len in 2..=33usize {
        let mut seen = vec![vec![false; len]; len];
        for _ in 0..20_000 {
            let (a, b) = two_positions(random.next(), len).unwrap();
            assert!(a < len && b < len && a != b, "{len}: {a}, {b}");
            seen[a][b] = true;
        }
        if len <= 8 {
            for (a, row) in seen.iter().enumerate() {
                for (b, &s) in row.iter().enumerate() {
                    assert_eq!(s, a != b, "{len}: pair ({a}, {b})");
                }
            }
        }
    }
    for random in [0, u64::MAX, 0xFFFF_FFFF, 0xFFFF_FFFF_0000_0000] {
        let (a, b) = two_positions(random, 2).unwrap();
        assert_ne!(a, b);
    }
    assert_eq!(two_positions(5, 1), None);
}

#[test]
fn one_backend_is_position_0() {
    let backends = pool(1);
    let mut p = configured("{}", &backends);
    assert_eq!(p.select(12345, &backends), Some(0));
    assert_eq!(p.select(12345, &[] as &[B]), None);
}

#[test]
fn select_and_observe_do_not_allocate_after_warm_up() {
    let backends = pool(16);
    let mut p = configured("{}", &backends);
    let mut random = Random(13);
    // The counter counts (so the comparison below can fail).
    let probe = allocations();
    drop(std::hint::black_box(vec![0u8; 16]));
    assert!(
        allocations() > probe,
        "the counting allocator is not installed"
    );
    let before = allocations();
    for i in 0..10_000u32 {
        let position = p
            .select(random.next(), &backends[i as usize % 3..])
            .unwrap();
        let id = backends[position as usize + i as usize % 3].id;
        p.observe(id, 1_000 + id * 100, i % 7 == 0);
    }
    assert_eq!(allocations(), before);
}

#[test]
fn bad_options_are_errors_naming_the_key() {
    let error = |options: &str| PeakEwma::new().configure(options, [0]).unwrap_err();
    assert_eq!(
        error(r#"{"decay": 5}"#),
        "unknown option `decay`; known: decay_requests, default_rtt_micros, failure_penalty_micros"
    );
    assert_eq!(
        error(r#"{"decay_requests": 0}"#),
        "option `decay_requests` must be greater than 0, not 0"
    );
    assert_eq!(
        error(r#"{"decay_requests": "10"}"#),
        "option `decay_requests` must be a number, not a string"
    );
    assert_eq!(
        error(r#"{"default_rtt_micros": -1}"#),
        "option `default_rtt_micros` must be greater than 0, not -1"
    );
    assert_eq!(
        error(r#"{"failure_penalty_micros": -0.5}"#),
        "option `failure_penalty_micros` must be at least 0, not -0.5"
    );
    assert_eq!(
        error(r#"{"failure_penalty_micros": [1]}"#),
        "option `failure_penalty_micros` must be a number, not an array"
    );
    let mut p = PeakEwma::new();
    p.configure(
        r#"{"decay_requests": 250, "default_rtt_micros": 1e4, "failure_penalty_micros": 0}"#,
        [0, 1],
    )
    .unwrap();
    assert_eq!(
        p.config,
        Config {
            decay_requests: 250.0,
            default_rtt_micros: 10_000.0,
            failure_penalty_micros: 0.0,
        }
    );
    // A refused configure keeps the options it had.
    assert!(p.configure(r#"{"decay_requests": 0}"#, [0]).is_err());
    assert_eq!(p.config.decay_requests, 250.0);
}
