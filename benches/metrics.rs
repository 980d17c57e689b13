//! The request path's metrics: one request's record (its counter and
//! duration histogram, `Metrics::record_request`) plus one strategy call's
//! duration (`Metrics::record_select`), from as many threads as cores at
//! once, each a worker of its own, as the proxy's workers record them. The
//! time is per request as each thread sees it: the wall time of `iters`
//! records made on every thread in parallel. Run with
//! `cargo bench --bench metrics`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use rust_load_balancer::metrics::Metrics;

mod support;

fn bench_record(c: &mut Criterion) {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let metrics = Metrics::new();
    // Every worker sends to the same three backends.
    let backends = ["127.0.0.1:8081", "127.0.0.1:8082", "127.0.0.1:8083"];
    c.bench_function(&format!("record/{threads}-threads"), |b| {
        b.iter_custom(|iters| {
            support::on_every_core(threads, iters, |_, i| {
                metrics.record_select(black_box(Duration::from_nanos(900)));
                metrics.record_request(
                    black_box(backends[(i % 3) as usize]),
                    200,
                    black_box(Duration::from_micros(600)),
                );
            })
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench_record
}
criterion_main!(benches);
