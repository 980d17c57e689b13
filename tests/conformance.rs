//! The conformance table every shipped strategy module passes, run against
//! the real components (and the native twins, as a cross-check of the
//! algorithms): answers in range, the empty list never sent, round robin
//! exact, weights exact per cycle, least connections picks the minimum and
//! rotates ties.

mod support;

use std::sync::Arc;

use rust_load_balancer::balancer::{
    BackendView, Balancer, Decision, FaultKind, LeastConnections, RequestView, RoundRobin,
    Strategy, StrategySetup, WasmStrategy, WeightedRoundRobin,
};
use rust_load_balancer::config::SandboxLimits;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Algorithm {
    RoundRobin,
    LeastConnections,
    Weighted,
}

/// Every module the project ships, with the algorithm it claims.
fn shipped() -> Vec<(String, Algorithm, Arc<dyn Strategy>)> {
    let limits = StrategySetup::new(SandboxLimits::default());
    let mut modules: Vec<(String, Algorithm, Arc<dyn Strategy>)> = vec![
        (
            "round-robin".into(),
            Algorithm::RoundRobin,
            Arc::new(WasmStrategy::builtin("round-robin", &limits).unwrap()),
        ),
        (
            "least-connections".into(),
            Algorithm::LeastConnections,
            Arc::new(WasmStrategy::builtin("least-connections", &limits).unwrap()),
        ),
        (
            "weighted-round-robin".into(),
            Algorithm::Weighted,
            Arc::new(WasmStrategy::builtin("weighted-round-robin", &limits).unwrap()),
        ),
        (
            "native round robin".into(),
            Algorithm::RoundRobin,
            Arc::new(RoundRobin::default()),
        ),
        (
            "native least connections".into(),
            Algorithm::LeastConnections,
            Arc::new(LeastConnections::default()),
        ),
        (
            "native weighted".into(),
            Algorithm::Weighted,
            Arc::new(WeightedRoundRobin::default()),
        ),
    ];
    for (file, algorithm) in [
        ("c-round-robin.wasm", Algorithm::RoundRobin),
        ("js-weighted.wasm", Algorithm::Weighted),
    ] {
        let strategy = WasmStrategy::from_file(&support::dist(file), &limits).unwrap();
        modules.push((file.into(), algorithm, Arc::new(strategy)));
    }
    modules
}

fn views(weights: &[u32]) -> Vec<BackendView> {
    weights
        .iter()
        .enumerate()
        .map(|(id, &weight)| BackendView {
            id: id as u32,
            weight,
            ..Default::default()
        })
        .collect()
}

fn pick(strategy: &dyn Strategy, list: &[BackendView]) -> usize {
    strategy
        .select(&RequestView::plain(1, 0), list)
        .unwrap_or_else(|e| panic!("{} faulted: {e}", strategy.name()))
        .unwrap_or_else(|| panic!("{} refused a non-empty list", strategy.name()))
}

#[test]
fn answers_are_always_in_range() {
    for (name, _, strategy) in shipped() {
        // A cheap deterministic generator: lengths 1..=64, varied stats.
        let mut seed: u32 = 0x9e37_79b9;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for _ in 0..500 {
            let len = 1 + next() % 64;
            let list: Vec<BackendView> = (0..len)
                .map(|i| BackendView {
                    id: i * 3 + next() % 3,
                    weight: 1 + next() % 10,
                    in_flight: next() % 5,
                    latency_micros: next() % 10_000,
                })
                .collect();
            let i = pick(&*strategy, &list);
            assert!(i < list.len(), "{name} answered {i} for {len} backends");
        }
    }
}

#[test]
fn the_empty_list_is_never_sent() {
    for (name, _, strategy) in shipped() {
        let balancer = Balancer::new(strategy);
        assert_eq!(
            balancer.select(&RequestView::plain(1, 0), &[]),
            Decision::NoneEligible,
            "{name}"
        );
        let faults: u64 = FaultKind::ALL.iter().map(|k| balancer.faults(*k)).sum();
        assert_eq!(faults, 0, "{name}");
    }
}

#[test]
fn round_robin_is_exact() {
    for (name, algorithm, strategy) in shipped() {
        if algorithm != Algorithm::RoundRobin {
            continue;
        }
        for k in [1usize, 2, 3, 7] {
            let list = views(&vec![1; k]);
            let mut counts = vec![0; k];
            for n in 0..k * 50 {
                let i = pick(&*strategy, &list);
                counts[i] += 1;
                // Each full turn visits every backend once.
                if (n + 1) % k == 0 {
                    assert!(
                        counts.iter().all(|&c| c == (n + 1) / k),
                        "{name}: {counts:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn weights_are_exact_over_every_cycle() {
    for (name, algorithm, strategy) in shipped() {
        if algorithm != Algorithm::Weighted {
            continue;
        }
        for weights in [vec![5, 1, 1], vec![3, 1], vec![1, 2, 3, 4], vec![7]] {
            let list = views(&weights);
            let cycle: u32 = weights.iter().sum();
            for _ in 0..3 {
                let mut counts = vec![0u32; weights.len()];
                for _ in 0..cycle {
                    counts[pick(&*strategy, &list)] += 1;
                }
                assert_eq!(counts, weights, "{name}");
            }
        }
        // Smooth: nginx's interleaved order for 5, 1, 1, not a a a a a b c.
        let list = views(&[5, 1, 1]);
        let order: Vec<usize> = (0..7).map(|_| pick(&*strategy, &list)).collect();
        assert_eq!(order, [0, 0, 1, 0, 2, 0, 0], "{name}");
    }
}

#[test]
fn least_connections_picks_the_minimum_and_rotates_ties() {
    for (name, algorithm, strategy) in shipped() {
        if algorithm != Algorithm::LeastConnections {
            continue;
        }
        let mut list = views(&[1, 1, 1, 1]);
        for (b, load) in list.iter_mut().zip([4, 2, 9, 3]) {
            b.in_flight = load;
        }
        for _ in 0..5 {
            assert_eq!(pick(&*strategy, &list), 1, "{name}");
        }
        for (b, load) in list.iter_mut().zip([3, 1, 5, 1]) {
            b.in_flight = load;
        }
        let picks: Vec<usize> = (0..6).map(|_| pick(&*strategy, &list)).collect();
        let ones = picks.iter().filter(|&&p| p == 1).count();
        assert!(picks.iter().all(|&p| p == 1 || p == 3), "{name}: {picks:?}");
        assert_eq!(ones, 3, "{name}: ties must alternate: {picks:?}");
    }
}
