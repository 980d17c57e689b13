//! A histogram that each worker records into without a lock and without
//! sharing a cache line with the other workers; the shards are summed when
//! the metrics are scraped.
//!
//! prometheus-client's own histogram takes a mutex per observation, and the
//! request path observes two (the request's duration and the strategy
//! call's) on every request, from every worker: the lock's cache line
//! moved between the cores with each request. Here a worker adds to three
//! counters of its own shard; a scrape reads them all (each counter is
//! exact; a scrape concurrent with an observation may see its count before
//! its bucket, which a later scrape corrects, as with any set of Prometheus
//! counters).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Shards per histogram: workers beyond this share one (correctly, through
/// the same atomic additions, only no longer alone on their cache line).
const SHARDS: usize = 8;

/// A histogram of durations, in seconds when encoded.
#[derive(Clone, Debug)]
pub struct ShardedHistogram {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Upper bounds in seconds, the last one `+Inf`.
    bounds: Box<[f64]>,
    /// The same bounds in nanoseconds, for the comparison per observation.
    bounds_nanos: Box<[u64]>,
    shards: Box<[Shard]>,
}

/// One worker's counts, on cache lines of its own.
#[derive(Debug)]
#[repr(align(128))]
struct Shard {
    count: AtomicU64,
    sum_nanos: AtomicU64,
    /// Observations per bucket (not cumulative).
    buckets: Box<[AtomicU64]>,
}

impl ShardedHistogram {
    /// A histogram with these upper bounds (seconds, ascending); `+Inf` is
    /// added.
    pub fn new(bounds: impl IntoIterator<Item = f64>) -> ShardedHistogram {
        let bounds: Box<[f64]> = bounds
            .into_iter()
            .chain(std::iter::once(f64::INFINITY))
            .collect();
        // v / 1e9 <= b exactly when v <= floor(b * 1e9), for whole v.
        let bounds_nanos = bounds
            .iter()
            .map(|b| (b * 1e9).floor().min(u64::MAX as f64) as u64)
            .collect();
        let shards = (0..SHARDS)
            .map(|_| Shard {
                count: AtomicU64::new(0),
                sum_nanos: AtomicU64::new(0),
                buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            })
            .collect();
        ShardedHistogram {
            inner: Arc::new(Inner {
                bounds,
                bounds_nanos,
                shards,
            }),
        }
    }

    /// Records one observation in the shard of `worker`.
    pub fn observe(&self, worker: usize, duration: Duration) {
        let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        let inner = &*self.inner;
        let shard = &inner.shards[worker % SHARDS];
        let bucket = inner
            .bounds_nanos
            .iter()
            .position(|&bound| nanos <= bound)
            .unwrap_or(inner.bounds_nanos.len() - 1);
        shard.count.fetch_add(1, Ordering::Relaxed);
        shard.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        shard.buckets[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// The sum in seconds, the count, and the count per bucket (with its
    /// upper bound), over all shards.
    fn totals(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let inner = &*self.inner;
        let mut sum_nanos: u128 = 0;
        let mut count = 0;
        let mut buckets: Vec<(f64, u64)> = inner.bounds.iter().map(|&b| (b, 0)).collect();
        for shard in inner.shards.iter() {
            count += shard.count.load(Ordering::Relaxed);
            sum_nanos += u128::from(shard.sum_nanos.load(Ordering::Relaxed));
            for (total, bucket) in buckets.iter_mut().zip(shard.buckets.iter()) {
                total.1 += bucket.load(Ordering::Relaxed);
            }
        }
        (sum_nanos as f64 / 1e9, count, buckets)
    }
}

impl TypedMetric for ShardedHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for ShardedHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.totals();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;
    use prometheus_client::metrics::histogram::Histogram;
    use prometheus_client::registry::Registry;

    /// The same observations, spread over shards, encode exactly as
    /// prometheus-client's own histogram encodes them (bucket edges
    /// included: a value equal to a bound counts in that bucket).
    #[test]
    fn encodes_as_the_plain_histogram_does() {
        let bounds = || prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 5);
        let sharded = ShardedHistogram::new(bounds());
        let plain = Histogram::new(bounds());
        let micros = [0, 50, 100, 101, 200, 799, 800, 1600, 1601, 5_000_000];
        for (worker, &us) in micros.iter().enumerate() {
            let duration = Duration::from_micros(us);
            sharded.observe(worker * 3, duration);
            plain.observe(duration.as_secs_f64());
        }
        let text = |metric: Box<dyn FnOnce(&mut Registry)>| {
            let mut registry = Registry::default();
            metric(&mut registry);
            let mut out = String::new();
            encode(&mut out, &registry).unwrap();
            out
        };
        let ours = text(Box::new(move |r| r.register("d", "h", sharded)));
        let theirs = text(Box::new(move |r| r.register("d", "h", plain)));
        // The sums agree up to the float rounding of adding seconds.
        let split = |text: &str| -> (Vec<String>, f64) {
            let (sums, rest): (Vec<&str>, Vec<&str>) =
                text.lines().partition(|l| l.starts_with("d_sum "));
            let sum = sums[0]["d_sum ".len()..].parse().unwrap();
            (rest.into_iter().map(String::from).collect(), sum)
        };
        let ((our_lines, our_sum), (their_lines, their_sum)) = (split(&ours), split(&theirs));
        assert_eq!(our_lines, their_lines);
        assert!((our_sum - 5.005251_f64).abs() < 1e-12, "{our_sum}");
        assert!((our_sum - their_sum).abs() < 1e-9, "{our_sum} {their_sum}");
        assert!(ours.contains("d_count 10"), "{ours}");
        assert!(ours.contains("d_bucket{le=\"0.0001\"} 3"), "{ours}");
    }
}
