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
    let mut tested = 0;
    for (name, algorithm, strategy) in shipped() {
        if algorithm != Algorithm::LeastConnections {
            continue;
        }
        tested += 1;
        let mut list = views(&[1, 1, 1, 1]);
        let load = |list: &mut Vec<BackendView>, loads: [u32; 4]| {
            for (b, load) in list.iter_mut().zip(loads) {
                b.in_flight = load;
            }
        };
        // A fresh instance: the tied backends take turns, in list order,
        // starting with the first of them.
        load(&mut list, [3, 1, 5, 1]);
        let picks: Vec<usize> = (0..8).map(|_| pick(&*strategy, &list)).collect();
        assert_eq!(picks, [1, 3, 1, 3, 1, 3, 1, 3], "{name}: ties rotate");
        // A single minimum wins every time.
        load(&mut list, [4, 2, 9, 3]);
        for _ in 0..5 {
            assert_eq!(pick(&*strategy, &list), 1, "{name}");
        }
        // Ties again, wherever the rotation stands: each pick is the other
        // tied backend than the one before.
        load(&mut list, [3, 1, 5, 1]);
        let picks: Vec<usize> = (0..7).map(|_| pick(&*strategy, &list)).collect();
        assert!(picks.iter().all(|&p| p == 1 || p == 3), "{name}: {picks:?}");
        assert!(
            picks.windows(2).all(|w| w[0] != w[1]),
            "{name}: ties must alternate: {picks:?}"
        );
        // Three tied (ids 0, 1 and 3 at 0): a cycle through all three, in
        // list order, repeating.
        load(&mut list, [0, 0, 2, 0]);
        let picks: Vec<usize> = (0..9).map(|_| pick(&*strategy, &list)).collect();
        let start = [0, 1, 3].iter().position(|&p| p == picks[0]);
        let start = start.unwrap_or_else(|| panic!("{name}: {picks:?}"));
        let want: Vec<usize> = (0..9).map(|i| [0, 1, 3][(start + i) % 3]).collect();
        assert_eq!(picks, want, "{name}: three ties cycle in list order");
    }
    assert_eq!(tested, 2, "the module and its native twin");
}

// ---------------------------------------------------------------------------
// Contract 0.2.0: the conformance table every shipped 0.2.0 module passes.

use rust_load_balancer::balancer::{BackendInfo, Failure, LoadError, Outcome};

/// How many backends the 0.2.0 modules are configured with; lists are
/// ordered subsets of them, as the host sends.
const CONFIGURED: u32 = 200;

fn infos(n: u32) -> Vec<BackendInfo> {
    (0..n)
        .map(|id| BackendInfo {
            id,
            address: format!("10.0.{}.{}:8080", id / 250, id % 250 + 1),
            weight: 1 + id % 4,
            labels: vec![("zone".into(), ["a", "b", "c"][id as usize % 3].into())],
        })
        .collect()
}

fn setup_v0_2(options: &str, backends: Vec<BackendInfo>) -> StrategySetup {
    StrategySetup {
        options: options.into(),
        backends,
        ..StrategySetup::new(SandboxLimits::default())
    }
}

/// Every 0.2.0 module the project ships, configured with `CONFIGURED`
/// backends and default options.
fn shipped_v0_2() -> Vec<(&'static str, Arc<dyn Strategy>)> {
    let setup = setup_v0_2("{}", infos(CONFIGURED));
    ["consistent-hash", "peak-ewma"]
        .into_iter()
        .map(|name| {
            let strategy: Arc<dyn Strategy> = Arc::new(
                WasmStrategy::builtin(name, &setup).unwrap_or_else(|e| panic!("{name}: {e}")),
            );
            (name, strategy)
        })
        .collect()
}

/// A cheap deterministic generator (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A non-empty ordered subset of the configured backends.
    fn list(&mut self) -> Vec<BackendView> {
        let keep = 1 + self.next() % 100; // per cent kept
        let mut list = Vec::new();
        for id in 0..CONFIGURED {
            if self.next() % 100 < keep {
                list.push(BackendView {
                    id,
                    weight: 1 + id % 4,
                    in_flight: (self.next() % 8) as u32,
                    latency_micros: (self.next() % 20_000) as u32,
                });
            }
        }
        if list.is_empty() {
            list.push(BackendView {
                id: (self.next() % u64::from(CONFIGURED)) as u32,
                weight: 1,
                ..Default::default()
            });
        }
        list
    }
}

#[test]
fn v0_2_answers_are_in_range_for_any_request_and_outcome() {
    for (name, strategy) in shipped_v0_2() {
        let balancer = Balancer::new(Arc::clone(&strategy));
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for call in 0..600u64 {
            let list = rng.list();
            let request = RequestView {
                hash_key: (call % 3 != 0).then(|| rng.next()),
                attempt: (call % 4) as u32,
                ..RequestView::plain(call, rng.next())
            };
            let i = strategy
                .select(&request, &list)
                .unwrap_or_else(|e| panic!("{name} faulted: {e}"))
                .unwrap_or_else(|| panic!("{name} refused a non-empty list"));
            assert!(i < list.len(), "{name} answered {i} for {}", list.len());
            // Every kind of outcome, for the pick just made.
            let outcome = Outcome {
                backend_id: list[i].id,
                status: [Some(200), Some(503), None][call as usize % 3],
                failure: [None, None, Some(Failure::Connect)][call as usize % 3],
                latency_micros: (rng.next() % 50_000) as u32,
                attempt: request.attempt,
                request_id: call,
            };
            strategy
                .observe(&outcome)
                .unwrap_or_else(|e| panic!("{name} faulted in observe: {e}"));
            assert_eq!(balancer.select(&request, &[]), Decision::NoneEligible);
        }
        let faults: u64 = FaultKind::ALL.iter().map(|k| balancer.faults(*k)).sum();
        assert_eq!(faults, 0, "{name}");
    }
}

#[test]
fn v0_2_modules_are_reconfigured_when_the_backends_change() {
    for (name, strategy) in shipped_v0_2() {
        // A new set, with ids the old set did not have.
        let changed: Vec<BackendInfo> = infos(CONFIGURED + 50).split_off(100);
        strategy
            .configure(&changed)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let list: Vec<BackendView> = changed
            .iter()
            .map(|b| BackendView {
                id: b.id,
                weight: b.weight,
                ..Default::default()
            })
            .collect();
        for call in 0..200 {
            let i = pick_with(&*strategy, &RequestView::plain(call, call * 7919), &list);
            assert!(i < list.len(), "{name}");
        }
    }
}

#[test]
fn v0_2_modules_refuse_options_they_do_not_know_naming_them() {
    for name in ["consistent-hash", "peak-ewma"] {
        let setup = setup_v0_2(r#"{"no_such_option": 1}"#, infos(4));
        match WasmStrategy::builtin(name, &setup) {
            Err(LoadError::Configure { message, .. }) => {
                assert!(message.contains("no_such_option"), "{name}: {message}")
            }
            other => panic!("{name}: expected a configure error, got {other:?}"),
        }
        let setup = setup_v0_2("not json", infos(4));
        assert!(
            matches!(
                WasmStrategy::builtin(name, &setup),
                Err(LoadError::Configure { .. })
            ),
            "{name} accepted options that are not JSON"
        );
    }
}

#[test]
fn a_failed_reconfigure_is_a_configure_fault_served_by_round_robin() {
    let probe =
        WasmStrategy::from_file(&support::dist("probe.wasm"), &setup_v0_2("{}", infos(3))).unwrap();
    let balancer = Balancer::new(Arc::new(probe));
    let list = views(&[1, 1, 1]);
    let request = RequestView::plain(1, 0);
    assert_eq!(balancer.select(&request, &list), Decision::Backend(0));
    // The live instance refuses the new list; the rebuild before the next
    // call is configured with it and refuses too.
    let mut refused = infos(3);
    refused[2].labels.push(("refuse".into(), "yes".into()));
    balancer.configure(&refused);
    assert_eq!(balancer.faults(FaultKind::Configure), 1);
    let picks: Vec<Decision> = (0..2).map(|_| balancer.select(&request, &list)).collect();
    assert_eq!(
        picks,
        [Decision::Backend(0), Decision::Backend(1)],
        "round robin serves"
    );
    assert_eq!(balancer.faults(FaultKind::Configure), 3);
    // A list it accepts puts the module back (after the quarantine that
    // three faults in a row start).
    balancer.configure(&infos(3));
    std::thread::sleep(std::time::Duration::from_millis(150));
    assert_eq!(balancer.select(&request, &list), Decision::Backend(0));
}

fn pick_with(strategy: &dyn Strategy, request: &RequestView<'_>, list: &[BackendView]) -> usize {
    strategy
        .select(request, list)
        .unwrap_or_else(|e| panic!("{} faulted: {e}", strategy.name()))
        .unwrap_or_else(|| panic!("{} refused a non-empty list", strategy.name()))
}

/// `n` backends configured and all eligible.
fn consistent_hash(n: u32) -> (Arc<dyn Strategy>, Vec<BackendView>) {
    let backends = infos(n);
    let list = backends
        .iter()
        .map(|b| BackendView {
            id: b.id,
            weight: b.weight,
            ..Default::default()
        })
        .collect();
    let strategy = WasmStrategy::builtin("consistent-hash", &setup_v0_2("{}", backends)).unwrap();
    (Arc::new(strategy), list)
}

fn keyed(key: u64) -> RequestView<'static> {
    RequestView {
        hash_key: Some(key),
        ..RequestView::plain(key, 0)
    }
}

#[test]
fn consistent_hash_keys_stay_put_and_balancers_agree() {
    let (one, list) = consistent_hash(10);
    let (other, _) = consistent_hash(10);
    let keys: Vec<u64> = (0..10_000u64)
        .map(|k| k.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .collect();
    let before: Vec<u32> = keys
        .iter()
        .map(|&k| list[pick_with(&*one, &keyed(k), &list)].id)
        .collect();
    // Two instances with the same config choose the same backend for every
    // key, and a key keeps its backend from call to call.
    for (&k, &id) in keys.iter().zip(&before) {
        assert_eq!(list[pick_with(&*other, &keyed(k), &list)].id, id);
        assert_eq!(list[pick_with(&*one, &keyed(k), &list)].id, id);
    }
    // Spread by weight (1, 2, 3, 4, 1, 2, ...: 25 in all): each backend
    // within a fifth of its share.
    let total_weight: u32 = list.iter().map(|b| b.weight).sum();
    for b in &list {
        let got = before.iter().filter(|&&id| id == b.id).count() as f64;
        let want = keys.len() as f64 * f64::from(b.weight) / f64::from(total_weight);
        assert!(
            (got - want).abs() < want * 0.2,
            "backend {}: {got} keys, want about {want}",
            b.id
        );
    }
    // Backend 3 leaves the eligible list: no key of another backend moves,
    // and its keys spread over the others.
    let without: Vec<BackendView> = list.iter().copied().filter(|b| b.id != 3).collect();
    let mut moved_elsewhere = 0;
    let mut landed = std::collections::HashSet::new();
    for (&k, &id) in keys.iter().zip(&before) {
        let now = without[pick_with(&*one, &keyed(k), &without)].id;
        if id == 3 {
            landed.insert(now);
        } else if now != id {
            moved_elsewhere += 1;
        }
    }
    assert!(
        moved_elsewhere < keys.len() / 50,
        "{moved_elsewhere} keys of other backends moved"
    );
    assert!(
        landed.len() >= 5,
        "backend 3's keys went to only {landed:?}"
    );
    // Requests without a key are spread by `random`.
    let mut seen = std::collections::HashSet::new();
    for call in 0..200u64 {
        let request = RequestView::plain(call, call.wrapping_mul(0xd1b5_4a32_d192_ed03));
        seen.insert(pick_with(&*one, &request, &list));
    }
    assert_eq!(seen.len(), list.len());
}

/// Keeps the lines a module logs.
#[derive(Default)]
struct Lines(std::sync::Mutex<Vec<String>>);

impl rust_load_balancer::balancer::LogSink for Lines {
    fn line(&self, _: &str, _: rust_load_balancer::balancer::LogLevel, message: &str) {
        self.0.lock().unwrap().push(message.to_string());
    }
}

#[test]
fn the_request_record_reaches_a_module_field_for_field() {
    let lines = Arc::new(Lines::default());
    let setup = StrategySetup {
        log: lines.clone(),
        ..setup_v0_2(r#"{"log_select": true, "log_configure": false}"#, infos(3))
    };
    let probe = WasmStrategy::from_file(&support::dist("probe.wasm"), &setup).unwrap();
    let list = views(&[1, 1, 1]);
    let purge = http::Method::from_bytes(b"PURGE").unwrap();
    let headers = [
        ("x-user", "ann"),
        ("cookie", ""),
        ("x-long", "é€ 𝄞 unicode"),
    ];
    let v6: std::net::IpAddr = "2001:db8::ff00:42:8329".parse().unwrap();
    let requests = [
        RequestView {
            method: &purge,
            path: "/a/b?c=d&e",
            authority: "shop.example:8443",
            client: v6,
            hash_key: Some(u64::MAX),
            headers: &headers,
            attempt: 2,
            random: 0x0123_4567_89ab_cdef,
            id: u64::MAX - 1,
        },
        RequestView {
            method: &http::Method::DELETE,
            path: "",
            authority: "",
            hash_key: Some(0),
            ..RequestView::plain(7, 0)
        },
        RequestView::plain(8, u64::MAX),
    ];
    for request in &requests {
        pick_with(&probe, request, &list);
    }
    let logged: Vec<serde_json::Value> = lines
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(logged.len(), requests.len());
    for (request, seen) in requests.iter().zip(&logged) {
        assert_eq!(seen["method"], request.method.as_str());
        assert_eq!(seen["path"], request.path);
        assert_eq!(seen["authority"], request.authority);
        assert_eq!(seen["client"], request.client.to_string());
        assert_eq!(seen["hash_key"], serde_json::json!(request.hash_key));
        let headers: Vec<(&str, &str)> = seen["headers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| (h[0].as_str().unwrap(), h[1].as_str().unwrap()))
            .collect();
        assert_eq!(headers, request.headers);
        assert_eq!(seen["attempt"], request.attempt);
        assert_eq!(seen["random"], request.random);
        assert_eq!(seen["id"], request.id);
    }
}
