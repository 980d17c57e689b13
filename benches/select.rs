//! The cost of one `select` call: each built-in wasm module beside a native
//! Rust implementation of the same algorithm, at 4, 16, 256 and 1024
//! backends. Run with `cargo bench --bench select`; the README has the table.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use rust_load_balancer::balancer::{
    BackendView, LeastConnections, RequestView, RoundRobin, Strategy, StrategySetup, WasmStrategy,
    WeightedRoundRobin,
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

criterion_group! {
    name = benches;
    // Short runs: 4 x 3 x 2 cases must stay a few minutes on 2 cores.
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = bench_select
}
criterion_main!(benches);
