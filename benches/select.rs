//! The cost of one `select` call: each built-in 0.1.0 wasm module beside a
//! native Rust implementation of the same algorithm, at 4, 16, 256 and 1024
//! backends; and the 0.2.0 calls: `select` with a typical request (a 20-byte
//! path, a 15-byte authority, no headers) through the built-ins and through
//! the `probe` fixture answering round robin (the contract's own cost),
//! `observe`, and consistent-hash's table build in `configure` for 1000
//! backends; and `strategy_scope`: every core's thread calling `select` at
//! once through one shared instance or one instance each. Run with
//! `cargo bench --bench select`; the README has the table.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

mod support;
use rust_load_balancer::balancer::{
    BackendInfo, BackendView, Balancer, LeastConnections, Outcome, RequestView, RoundRobin,
    Strategy, StrategySetup, WasmStrategy, WeightedRoundRobin,
};
use rust_load_balancer::config::SandboxLimits;

const SIZES: [u32; 4] = [4, 16, 256, 1024];

fn backends(n: u32) -> Vec<BackendView> {
    (0..n)
        .map(|id| BackendView {
            id,
            weight: 1 + id % 5,
            in_flight: (id * 7) % 11,
            latency_micros: 500 + id,
        })
        .collect()
}

fn bench_select(c: &mut Criterion) {
    let pairs: [(&str, Arc<dyn Strategy>); 3] = [
        ("round-robin", Arc::new(RoundRobin::default())),
        ("least-connections", Arc::new(LeastConnections::default())),
        (
            "weighted-round-robin",
            Arc::new(WeightedRoundRobin::default()),
        ),
    ];
    for (name, native) in pairs {
        let setup = StrategySetup::new(SandboxLimits::default());
        let wasm = WasmStrategy::builtin(name, &setup).expect("built-in loads");
        let request = RequestView::plain(1, 0);
        let mut group = c.benchmark_group(format!("select/{name}"));
        for n in SIZES {
            let list = backends(n);
            group.bench_with_input(BenchmarkId::new("wasm", n), &list, |b, list| {
                b.iter(|| wasm.select(&request, black_box(list)).unwrap())
            });
            group.bench_with_input(BenchmarkId::new("native", n), &list, |b, list| {
                b.iter(|| native.select(&request, black_box(list)).unwrap())
            });
        }
        group.finish();
    }
}

/// `n` configured backends as `configure` describes them.
fn infos(n: u32) -> Vec<BackendInfo> {
    (0..n)
        .map(|id| BackendInfo {
            id,
            address: format!("10.1.{}.{}:8080", id / 250, id % 250 + 1),
            weight: 1 + id % 5,
            labels: vec![("zone".into(), "b".into())],
        })
        .collect()
}

/// A 0.2.0 module configured with `n` backends and `options`.
fn v0_2(module: &str, n: u32, options: &str) -> WasmStrategy {
    let setup = StrategySetup {
        options: options.into(),
        backends: infos(n),
        ..StrategySetup::new(SandboxLimits::default())
    };
    if module.ends_with(".wasm") {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("plugins/dist")
            .join(module);
        WasmStrategy::from_file(&path, &setup).expect("module loads")
    } else {
        WasmStrategy::builtin(module, &setup).expect("built-in loads")
    }
}

fn bench_v0_2(c: &mut Criterion) {
    // A typical request: 20-byte path, 15-byte authority, no headers.
    let request = RequestView {
        path: "/api/v1/cart?item=42",
        authority: "shop.example.io",
        hash_key: Some(0x1234_5678_9abc_def0),
        ..RequestView::plain(1, 0x9e37_79b9_7f4a_7c15)
    };
    assert_eq!((request.path.len(), request.authority.len()), (20, 15));
    let cases = [
        (
            "probe.wasm",
            r#"{"pick": "round-robin", "log_configure": false}"#,
        ),
        ("consistent-hash", "{}"),
        ("peak-ewma", "{}"),
    ];
    let mut group = c.benchmark_group("select-0.2.0");
    for (module, options) in cases {
        for n in [16, 1024] {
            let strategy = v0_2(module, n, options);
            let list = backends(n);
            group.bench_with_input(BenchmarkId::new(module, n), &list, |b, list| {
                b.iter(|| {
                    strategy
                        .select(black_box(&request), black_box(list))
                        .unwrap()
                })
            });
        }
    }
    group.finish();

    let mut group = c.benchmark_group("observe-0.2.0");
    for (module, options) in [cases[0], cases[2]] {
        let strategy = v0_2(module, 16, options);
        let outcome = Outcome {
            backend_id: 3,
            status: Some(200),
            failure: None,
            latency_micros: 850,
            attempt: 0,
            request_id: 1,
        };
        group.bench_function(module, |b| {
            b.iter(|| strategy.observe(black_box(&outcome)).unwrap())
        });
    }
    group.finish();

    // The Maglev table, built in `configure` (never per request): 1000
    // backends, the default table size 65537, lowering of the list included.
    let mut group = c.benchmark_group("configure-0.2.0");
    let strategy = v0_2("consistent-hash", 1000, "{}");
    let list = infos(1000);
    group.sample_size(20);
    group.bench_function("consistent-hash/1000", |b| {
        b.iter(|| strategy.configure(black_box(&list)).unwrap())
    });
    group.finish();
}

/// `strategy_scope`: as many threads as cores each call `select` through
/// the same [`Balancer`] at once, with one instance for all (`process`)
/// or one per thread (`worker`). The time is per call as each thread sees
/// it: the wall time of `iters` calls made on every thread in parallel.
fn bench_scope(c: &mut Criterion) {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let list = backends(16);
    let mut group = c.benchmark_group(format!("scope/round-robin/16/{threads}-threads"));
    for scope in ["process", "worker"] {
        let count = if scope == "process" { 1 } else { threads };
        let setup = StrategySetup::new(SandboxLimits::default());
        let instances: Vec<Arc<dyn Strategy>> = (0..count)
            .map(|_| {
                Arc::new(WasmStrategy::builtin("round-robin", &setup).expect("loads"))
                    as Arc<dyn Strategy>
            })
            .collect();
        let balancer = Arc::new(Balancer::per_worker(instances));
        group.bench_function(scope, |b| {
            b.iter_custom(|iters| {
                support::on_every_core(threads, iters, |_, _| {
                    black_box(balancer.select(&RequestView::plain(1, 0), black_box(&list)));
                })
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // Short runs: 4 x 3 x 2 cases must stay a few minutes on 2 cores.
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = bench_select, bench_v0_2, bench_scope
}
criterion_main!(benches);
