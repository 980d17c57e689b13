//! A strategy test bench: calls a strategy over a simulated workload, with
//! no proxy and no sockets, and reports how it spread the requests, whether
//! it faulted, and how long its calls took. Behind `rust_load_balancer
//! strategy test`.

use std::time::{Duration, Instant};

use super::{BackendView, FaultKind, RequestView, Strategy};

/// The simulated workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Each backend's weight; the number of backends is its length.
    pub weights: Vec<u32>,
    /// How many sequential `select` calls to make.
    pub requests: usize,
}

/// What a run of [`run`] observed.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Picks per backend, by position.
    pub picks: Vec<u64>,
    /// Calls answered `none`.
    pub refused: u64,
    /// Faults by kind, in [`FaultKind::ALL`] order.
    pub faults: Vec<(FaultKind, u64)>,
    /// The first fault's message, if any.
    pub first_fault: Option<String>,
    /// Median call time.
    pub median: Duration,
    /// 99th percentile call time.
    pub p99: Duration,
    /// Calls made: fewer than requested if the run stopped at
    /// [`MAX_FAULTS`].
    pub calls: usize,
}

/// Faults after which a run stops: enough to see a pattern, and a module
/// that loops costs its deadline per call.
pub const MAX_FAULTS: u64 = 10;

impl Report {
    /// Total faults of every kind.
    pub fn total_faults(&self) -> u64 {
        self.faults.iter().map(|(_, n)| n).sum()
    }
}

/// Calls `strategy` `workload.requests` times, each with a `GET /` from
/// 127.0.0.1 without a hash key, a fresh seeded `random` and the call's
/// number as its id. The simulated backends have distinct latencies (1 ms,
/// 1.25 ms, ...) and each request stays in flight for as many calls as there
/// are backends, so `in-flight` moves the way it does under steady load.
pub fn run(strategy: &dyn Strategy, workload: &Workload) -> Report {
    let n = workload.weights.len();
    let mut backends: Vec<BackendView> = workload
        .weights
        .iter()
        .enumerate()
        .map(|(id, &weight)| BackendView {
            id: id as u32,
            weight,
            in_flight: 0,
            latency_micros: 1000 + 250 * id as u32,
        })
        .collect();
    let mut in_flight: std::collections::VecDeque<usize> = Default::default();
    let mut report = Report {
        picks: vec![0; n],
        faults: FaultKind::ALL.iter().map(|k| (*k, 0)).collect(),
        ..Report::default()
    };
    let mut times = Vec::with_capacity(workload.requests);
    let mut random = crate::random::SplitMix64::new(0x5eed);
    for _ in 0..workload.requests {
        if report.total_faults() >= MAX_FAULTS {
            break;
        }
        report.calls += 1;
        if in_flight.len() >= n.max(1) {
            if let Some(done) = in_flight.pop_front() {
                backends[done].in_flight -= 1;
            }
        }
        let request = RequestView::plain(report.calls as u64, random.next_u64());
        let started = Instant::now();
        let answer = strategy.select(&request, &backends);
        times.push(started.elapsed());
        match answer {
            Ok(Some(i)) if i < n => {
                report.picks[i] += 1;
                backends[i].in_flight += 1;
                in_flight.push_back(i);
            }
            Ok(Some(i)) => {
                let fault = super::StrategyError::BadIndex {
                    index: i as u64,
                    len: n,
                };
                count_fault(&mut report, &fault);
            }
            Ok(None) => report.refused += 1,
            Err(fault) => count_fault(&mut report, &fault),
        }
    }
    times.sort_unstable();
    if !times.is_empty() {
        report.median = times[times.len() / 2];
        report.p99 = times[(times.len() * 99 / 100).min(times.len() - 1)];
    }
    report
}

fn count_fault(report: &mut Report, fault: &super::StrategyError) {
    if let Some(entry) = report.faults.iter_mut().find(|(k, _)| *k == fault.kind()) {
        entry.1 += 1;
    }
    report.first_fault.get_or_insert_with(|| fault.to_string());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::{LeastConnections, RoundRobin};

    #[test]
    fn round_robin_spreads_exactly() {
        let report = run(
            &RoundRobin::default(),
            &Workload {
                weights: vec![1; 4],
                requests: 400,
            },
        );
        assert_eq!(report.picks, [100; 4]);
        assert_eq!(report.total_faults(), 0);
        assert!(report.median <= report.p99);
    }

    #[test]
    fn in_flight_requests_steer_least_connections() {
        // With each request in flight for n calls, least connections never
        // lets one backend hold two while another holds none.
        let report = run(
            &LeastConnections::default(),
            &Workload {
                weights: vec![1; 3],
                requests: 300,
            },
        );
        assert_eq!(report.picks, [100; 3]);
    }
}
