//! Strategies through the whole proxy: weighted and least-connections
//! distributions, a custom module from a path, and the sandbox holding
//! against every kind of misbehaving module.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::StatusCode;
use rust_load_balancer::balancer::FaultKind;
use rust_load_balancer::config::StrategySource;
use rust_load_balancer::Config;
use support::{config_for, dist, start_proxy, Http, TestBackend};

async fn backends(n: usize) -> Vec<TestBackend> {
    let mut all = Vec::new();
    for i in 0..n {
        all.push(TestBackend::start(&format!("b{i}")).await);
    }
    all
}

fn with_strategy(backends: &[TestBackend], strategy: StrategySource) -> Config {
    let mut config = config_for(&backends.iter().collect::<Vec<_>>());
    config.strategy = strategy;
    config
}

/// Sends `requests` sequential `GET /` through a balancer on `config`,
/// checks each is answered 200 and that the strategy never faulted, and
/// returns how many each backend received.
async fn sequential_hits(config: Config, backends: &[TestBackend], requests: usize) -> Vec<usize> {
    let proxy = start_proxy(config).await;
    let http = Http::new(proxy.local_addr());
    for _ in 0..requests {
        assert_eq!(http.get("/").await.status, StatusCode::OK);
    }
    let state = proxy.state();
    let faults: u64 = FaultKind::ALL
        .iter()
        .map(|k| state.balancer().faults(*k))
        .sum();
    assert_eq!(faults, 0, "{}", state.config().strategy);
    backends.iter().map(|b| b.hits()).collect()
}

fn builtin(name: &str) -> StrategySource {
    StrategySource::Builtin(name.into())
}

#[tokio::test]
async fn weights_5_1_1_give_exactly_500_100_100() {
    let backends = backends(3).await;
    let mut config = with_strategy(&backends, builtin("weighted-round-robin"));
    for (b, w) in config.backends.iter_mut().zip([5, 1, 1]) {
        b.weight = w;
    }
    assert_eq!(
        sequential_hits(config, &backends, 700).await,
        [500, 100, 100]
    );
}

/// Sends `workers` x `each` requests, `workers` at a time.
async fn concurrent_load(http: &Http, workers: usize, each: usize) {
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let http = http.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..each {
                assert_eq!(http.get("/").await.status, StatusCode::OK);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn least_connections_sends_less_to_a_slow_backend() {
    let mut shares = Vec::new();
    for strategy in ["round-robin", "least-connections"] {
        let backends = backends(3).await;
        backends[0].state.delay_ms.store(150, Ordering::SeqCst);
        let proxy = start_proxy(with_strategy(&backends, builtin(strategy))).await;
        concurrent_load(&Http::new(proxy.local_addr()), 6, 20).await;
        let hits: Vec<usize> = backends.iter().map(|b| b.hits()).collect();
        assert_eq!(hits.iter().sum::<usize>(), 120);
        shares.push((strategy, hits[0]));
    }
    let (_, rr_slow) = shares[0];
    let (_, lc_slow) = shares[1];
    // Round robin gives the slow backend its third regardless of its speed.
    assert_eq!(rr_slow, 40, "{shares:?}");
    assert!(
        lc_slow * 2 < rr_slow,
        "least connections should clearly spare the slow backend: {shares:?}"
    );
}

#[tokio::test]
async fn least_connections_spreads_evenly_over_equal_backends() {
    let backends = backends(3).await;
    let proxy = start_proxy(with_strategy(&backends, builtin("least-connections"))).await;
    let http = Http::new(proxy.local_addr());
    // Sequential: every backend idle at each pick, so ties rotate exactly.
    for _ in 0..300 {
        assert_eq!(http.get("/").await.status, StatusCode::OK);
    }
    let hits: Vec<usize> = backends.iter().map(|b| b.hits()).collect();
    assert_eq!(hits, [100, 100, 100]);
    // Concurrent: equal backends still share the load evenly.
    concurrent_load(&http, 6, 50).await;
    for b in &backends {
        let share = b.hits() - 100;
        assert!(
            (70..=130).contains(&share),
            "uneven: {:?}",
            backends.iter().map(|b| b.hits()).collect::<Vec<_>>()
        );
    }
}

#[tokio::test]
async fn a_custom_module_from_a_path_is_used() {
    let backends = backends(3).await;
    let proxy = start_proxy(with_strategy(
        &backends,
        StrategySource::Path(dist("pick-last.wasm")),
    ))
    .await;
    let http = Http::new(proxy.local_addr());
    for _ in 0..20 {
        assert_eq!(http.get("/").await.text(), "b2");
    }
    assert_eq!(backends[2].hits(), 20);
}

/// Runs `requests` sequential requests through a balancer whose strategy is
/// `module` and checks each is answered 200 by a healthy backend, promptly.
async fn survives(
    module: &str,
    configure: impl FnOnce(&mut Config),
    requests: usize,
) -> rust_load_balancer::Proxy {
    let backends = backends(2).await;
    let mut config = with_strategy(&backends, StrategySource::Path(dist(module)));
    configure(&mut config);
    let proxy = start_proxy(config).await;
    let http = Http::new(proxy.local_addr());
    for i in 0..requests {
        let started = Instant::now();
        let answer = http.get("/").await;
        assert_eq!(answer.status, StatusCode::OK, "{module}: request {i}");
        assert!(answer.text() == "b0" || answer.text() == "b1");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{module}: request {i} took {:?}",
            started.elapsed()
        );
    }
    let served: usize = backends.iter().map(|b| b.hits()).sum();
    assert_eq!(
        served, requests,
        "{module}: every request reached a backend"
    );
    // Round robin fallback keeps the spread even.
    assert!(
        backends.iter().all(|b| b.hits() >= requests / 2 - 1),
        "{module}"
    );
    proxy
}

#[tokio::test]
async fn an_endless_loop_is_cut_off_by_the_deadline() {
    let proxy = survives("misbehave-loop.wasm", |c| c.sandbox.fuel = u64::MAX / 2, 20).await;
    let state = proxy.state();
    let b = state.balancer();
    assert!(b.faults(FaultKind::Timeout) >= 1, "{b:?}");
    assert_eq!(b.faults(FaultKind::OutOfFuel), 0);
}

#[tokio::test]
async fn an_endless_loop_is_cut_off_by_fuel() {
    let proxy = survives(
        "misbehave-loop.wasm",
        |c| {
            c.sandbox.fuel = 1_000_000;
            c.sandbox.timeout = Duration::from_secs(10);
        },
        20,
    )
    .await;
    assert!(proxy.state().balancer().faults(FaultKind::OutOfFuel) >= 1);
}

#[tokio::test]
async fn a_trapping_module_is_contained() {
    let proxy = survives("misbehave-trap.wasm", |_| {}, 20).await;
    assert!(proxy.state().balancer().faults(FaultKind::Trap) >= 1);
}

#[tokio::test]
async fn an_out_of_range_answer_is_contained() {
    let proxy = survives("misbehave-bad-index.wasm", |_| {}, 20).await;
    assert!(proxy.state().balancer().faults(FaultKind::BadIndex) >= 1);
}

#[tokio::test]
async fn unbounded_memory_growth_hits_the_cap() {
    // A generous deadline, so that on a loaded machine the cap, not the
    // clock, is what stops the module.
    let proxy = survives(
        "misbehave-memory.wasm",
        |c| c.sandbox.timeout = Duration::from_millis(500),
        20,
    )
    .await;
    assert!(proxy.state().balancer().faults(FaultKind::Memory) >= 1);
}

#[tokio::test]
async fn a_faulted_instance_is_rebuilt_for_the_next_call() {
    // Round robin that traps on every third call of an instance. Rebuilt
    // after each trap, it answers twice more, then traps again: exactly one
    // fault per three requests, and never a quarantine.
    let proxy = survives("misbehave-flaky.wasm", |_| {}, 30).await;
    assert_eq!(proxy.state().balancer().faults(FaultKind::Trap), 10);
}

#[tokio::test]
async fn a_component_without_the_selector_export_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.wasm");
    // The smallest valid component: a preamble and nothing else.
    std::fs::write(&path, b"\0asm\x0d\x00\x01\x00").unwrap();
    let mut config = Config::new("127.0.0.1:0".parse().unwrap(), &["127.0.0.1:9"]);
    config.strategy = StrategySource::Path(path.clone());
    let error = rust_load_balancer::Proxy::start(config)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains(&path.display().to_string()), "{error}");
    assert!(
        error.contains("exports no strategy selector: it exports nothing")
            && error.contains(
                "`loadbalancer:strategy/selector@0.1.0` or `loadbalancer:strategy/selector@0.2.0`"
            ),
        "{error}"
    );
}

#[tokio::test]
async fn the_c_example_spreads_sequential_requests_exactly_evenly() {
    let backends = backends(3).await;
    let config = with_strategy(&backends, StrategySource::Path(dist("c-round-robin.wasm")));
    assert_eq!(
        sequential_hits(config, &backends, 300).await,
        [100, 100, 100]
    );
}

#[tokio::test]
async fn the_javascript_example_gives_weights_3_1_exactly() {
    let backends = backends(2).await;
    let mut config = with_strategy(&backends, StrategySource::Path(dist("js-weighted.wasm")));
    config.backends[0].weight = 3;
    assert_eq!(sequential_hits(config, &backends, 400).await, [300, 100]);
}

#[tokio::test]
async fn peak_ewma_avoids_a_backend_answering_500() {
    let all = backends(3).await;
    all[0].state.status.store(500, Ordering::SeqCst);
    let proxy = start_proxy(with_strategy(&all, builtin("peak-ewma"))).await;
    let http = Http::new(proxy.local_addr());
    let mut errors = 0;
    for _ in 0..90 {
        if http.get("/").await.status != StatusCode::OK {
            errors += 1;
        }
    }
    // Each 500 is passed on as it is; after its first ones the erroring
    // backend costs the failure penalty (1 s) and loses every pairing.
    assert_eq!(errors, all[0].hits(), "a strategy never changes an answer");
    assert!(
        all[0].hits() <= 3,
        "the 500 backend got {} of 90",
        all[0].hits()
    );
    assert!(
        all[1].hits() >= 20 && all[2].hits() >= 20,
        "{:?}",
        [all[1].hits(), all[2].hits()]
    );
}

#[tokio::test]
async fn peak_ewma_sends_less_to_a_slow_backend() {
    let all = backends(2).await;
    all[0].state.delay_ms.store(100, Ordering::SeqCst);
    let proxy = start_proxy(with_strategy(&all, builtin("peak-ewma"))).await;
    let http = Http::new(proxy.local_addr());
    for _ in 0..60 {
        assert_eq!(http.get("/").await.status, StatusCode::OK);
    }
    // 100 ms against about a millisecond (a spike of the fast one on a busy
    // machine stays far below): once both are measured, the slow one is
    // chosen only when its estimate has decayed, which takes far longer.
    assert!(
        all[0].hits() <= 5,
        "the slow backend got {} of 60",
        all[0].hits()
    );
}
