//! A strategy test bench: calls a strategy over a simulated workload, with
//! no proxy and no sockets, and reports how it spread the requests, whether
//! it faulted, what it logged, and how long its calls took. Behind
//! `rust_load_balancer strategy test`.
//!
//! The simulated model (also in `strategy test --help` and the plugin
//! guide):
//!
//! - Backends 0..n at `127.0.0.1:8081`, `:8082`, ... with the given
//!   weights and labels; a 0.2.0 module is configured with them and the
//!   options before the first call.
//! - Requests are `GET /` from 127.0.0.1, one at a time. With `keys` set,
//!   request i carries the hash key XXH3-64 of `key-(i mod keys)`; without,
//!   none. `random` comes from a generator seeded with `seed`; a request's
//!   `id` is its number, from 1.
//! - Each backend shows `latency-micros` from `latencies` (default 1000,
//!   1250, 1500, ... µs) and `in-flight` from `in_flight` when given;
//!   otherwise each request stays in flight for as many calls as there are
//!   backends, so `in-flight` moves as under steady load.
//! - The attempt on the chosen backend ends with its `status` (default
//!   200) after its latency, and an observing module is told so. A backend
//!   whose status is "fail" refuses the connection: the observer is told
//!   `connect`, and the request is retried (as the proxy does, at most
//!   [`MAX_RETRIES`] times) with `attempt` raised and the tried backends
//!   left out of the list.
//! - The module's log lines are kept (under the same limit of 10 a second
//!   as in the proxy; the rest are counted).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::log::{LogLevel, LogSink};
use super::{BackendInfo, BackendView, FaultKind, Outcome, RequestView, Strategy, StrategyError};
use crate::random::SplitMix64;

/// Retries of a request whose backend refused the connection, as the
/// proxy's default `max_retries`.
pub const MAX_RETRIES: u32 = 2;

/// Faults after which a run stops: enough to see a pattern, and a module
/// that loops costs its deadline per call.
pub const MAX_FAULTS: u64 = 10;

/// How an attempt on a simulated backend ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimulatedStatus {
    /// A response with this status.
    Status(u16),
    /// The connection is refused (the `connect` failure).
    Fail,
}

/// The simulated workload (see the module docs for the model).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Each backend's weight; the number of backends is its length.
    pub weights: Vec<u32>,
    /// How many requests to simulate.
    pub requests: usize,
    /// Distinct hash keys the requests carry, round the cycle; none if 0.
    pub keys: u64,
    /// Labels per backend (sorted by key).
    pub labels: Vec<Vec<(String, String)>>,
    /// How each backend's attempts end (200 when not given).
    pub statuses: Vec<SimulatedStatus>,
    /// Each backend's `latency-micros`, also the latency observers are told.
    pub latencies: Vec<u32>,
    /// Each backend's fixed `in-flight`; simulated when empty.
    pub in_flight: Vec<u32>,
    /// Seed of the `random` values.
    pub seed: u64,
    /// How many calls to record in [`Report::trace`].
    pub trace: usize,
}

impl Workload {
    /// `requests` requests over backends of `weights`, everything else at
    /// its default: no keys or labels, every attempt 200, latencies 1000,
    /// 1250, ... µs, simulated in-flight counts, seed 1, no trace.
    pub fn new(weights: Vec<u32>, requests: usize) -> Workload {
        Workload {
            weights,
            requests,
            keys: 0,
            labels: Vec::new(),
            statuses: Vec::new(),
            latencies: Vec::new(),
            in_flight: Vec::new(),
            seed: 1,
            trace: 0,
        }
    }

    /// The simulated backends as `configure` describes them.
    pub fn backend_infos(&self) -> Vec<BackendInfo> {
        self.weights
            .iter()
            .enumerate()
            .map(|(id, &weight)| BackendInfo {
                id: id as u32,
                address: format!("127.0.0.1:{}", 8081 + id),
                weight,
                labels: self.labels.get(id).cloned().unwrap_or_default(),
            })
            .collect()
    }

    fn latency(&self, id: usize) -> u32 {
        self.latencies
            .get(id)
            .copied()
            .unwrap_or(1000 + 250 * id as u32)
    }

    fn status(&self, id: usize) -> SimulatedStatus {
        self.statuses
            .get(id)
            .copied()
            .unwrap_or(SimulatedStatus::Status(200))
    }
}

/// One recorded call: what the module was given and what it answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceEntry {
    /// The request's id.
    pub request: u64,
    /// The attempt (0 first, then retries).
    pub attempt: u32,
    /// The request's hash key.
    pub hash_key: Option<u64>,
    /// The `random` value.
    pub random: u64,
    /// The list it chose from.
    pub backends: Vec<BackendView>,
    /// The backend id it chose (`None`: refused or faulted).
    pub picked: Option<u32>,
    /// The fault, if the call faulted.
    pub fault: Option<String>,
}

/// A line the module logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// Its level.
    pub level: LogLevel,
    /// Its text.
    pub message: String,
}

/// What a run of [`run`] observed.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Picks per backend, by id (every attempt's pick).
    pub picks: Vec<u64>,
    /// Calls answered `none`.
    pub refused: u64,
    /// Attempts retried because the chosen backend refused the connection.
    pub retries: u64,
    /// Faults by kind, in [`FaultKind::ALL`] order.
    pub faults: Vec<(FaultKind, u64)>,
    /// The first fault's message, if any.
    pub first_fault: Option<String>,
    /// Call times of `select`, sorted.
    pub call_times: Vec<Duration>,
    /// `select` calls made: fewer than needed if the run stopped at
    /// [`MAX_FAULTS`].
    pub calls: usize,
    /// Requests simulated.
    pub requests: usize,
    /// The module's log lines, in order.
    pub log: Vec<LogLine>,
    /// Log lines dropped by the rate limit.
    pub log_dropped: u64,
    /// The first calls, as asked for by [`Workload::trace`].
    pub trace: Vec<TraceEntry>,
}

impl Report {
    /// Total faults of every kind.
    pub fn total_faults(&self) -> u64 {
        self.faults.iter().map(|(_, n)| n).sum()
    }

    /// The call time at quantile `q` (0.5 for the median); zero if no call.
    pub fn call_time(&self, q: f64) -> Duration {
        if self.call_times.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.call_times.len() as f64 * q) as usize).min(self.call_times.len() - 1);
        self.call_times[i]
    }

    /// The longest call.
    pub fn max_call_time(&self) -> Duration {
        self.call_times.last().copied().unwrap_or_default()
    }

    /// The text report: picks per backend, refusals, retries, faults, the
    /// module's log, the trace, call times.
    pub fn render(&self, strategy: &dyn Strategy, workload: &Workload) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "strategy {} (contract {}): {} requests, {} calls over {} backends",
            strategy.name(),
            strategy.contract().as_str(),
            self.requests,
            self.calls,
            workload.weights.len()
        );
        if self.requests < workload.requests || self.total_faults() >= MAX_FAULTS {
            let _ = writeln!(
                out,
                "stopped after {MAX_FAULTS} faults ({} requests were asked for)",
                workload.requests
            );
        }
        for entry in &self.trace {
            let list: Vec<String> = entry
                .backends
                .iter()
                .map(|b| {
                    format!(
                        "{}(w{} f{} l{})",
                        b.id, b.weight, b.in_flight, b.latency_micros
                    )
                })
                .collect();
            let _ = writeln!(
                out,
                "trace: request {} attempt {} key {} random {:#018x} backends [{}] -> {}",
                entry.request,
                entry.attempt,
                entry
                    .hash_key
                    .map_or("none".into(), |k| format!("{k:#018x}")),
                entry.random,
                list.join(" "),
                match (&entry.picked, &entry.fault) {
                    (_, Some(fault)) => format!("fault: {fault}"),
                    (Some(id), None) => format!("backend {id}"),
                    (None, None) => "refused".into(),
                }
            );
        }
        let _ = writeln!(
            out,
            "{:>8} {:>8} {:>10} {:>8}",
            "backend", "weight", "picks", "share"
        );
        let total: u64 = self.picks.iter().sum();
        for (id, (weight, picks)) in workload.weights.iter().zip(&self.picks).enumerate() {
            let share = 100.0 * *picks as f64 / total.max(1) as f64;
            let _ = writeln!(out, "{id:>8} {weight:>8} {picks:>10} {share:>7.1}%");
        }
        if self.refused > 0 {
            let _ = writeln!(out, "refused (answered none): {}", self.refused);
        }
        if self.retries > 0 {
            let _ = writeln!(out, "retries after a refused connection: {}", self.retries);
        }
        let faults: Vec<String> = self
            .faults
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| format!("{}={n}", k.as_str()))
            .collect();
        let _ = writeln!(
            out,
            "faults: {}",
            if faults.is_empty() {
                "none".into()
            } else {
                faults.join(", ")
            }
        );
        if let Some(first) = &self.first_fault {
            let _ = writeln!(out, "first fault: {first}");
        }
        if !self.log.is_empty() || self.log_dropped > 0 {
            let _ = writeln!(
                out,
                "module log ({} lines{}):",
                self.log.len(),
                if self.log_dropped > 0 {
                    format!(
                        ", {} more dropped by the limit of 10 a second",
                        self.log_dropped
                    )
                } else {
                    String::new()
                }
            );
            for line in &self.log {
                let _ = writeln!(out, "  [{}] {}", line.level.as_str(), line.message);
            }
        }
        let _ = writeln!(
            out,
            "select time: median {:?}, p99 {:?}, max {:?}",
            self.call_time(0.5),
            self.call_time(0.99),
            self.max_call_time()
        );
        out
    }

    /// The report as one JSON object: `module`, `contract`, `requests`,
    /// `calls`, `picks` (backend id to count), `refused`, `retries`,
    /// `faults` (kind to count), `first_fault`, `call_ns` (`p50`, `p99`,
    /// `max`), `log` (`level`, `message`, in order), `log_dropped`, and
    /// `trace` when asked for.
    pub fn to_json(&self, strategy: &dyn Strategy, workload: &Workload) -> serde_json::Value {
        let picks: serde_json::Map<String, serde_json::Value> = self
            .picks
            .iter()
            .enumerate()
            .map(|(id, n)| (id.to_string(), (*n).into()))
            .collect();
        let faults: serde_json::Map<String, serde_json::Value> = self
            .faults
            .iter()
            .map(|(k, n)| (k.as_str().to_string(), (*n).into()))
            .collect();
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let trace: Vec<serde_json::Value> = self
            .trace
            .iter()
            .map(|t| {
                serde_json::json!({
                    "request": t.request,
                    "attempt": t.attempt,
                    "hash_key": t.hash_key,
                    "random": t.random,
                    "backends": t.backends.iter().map(|b| serde_json::json!({
                        "id": b.id, "weight": b.weight, "in_flight": b.in_flight,
                        "latency_micros": b.latency_micros,
                    })).collect::<Vec<_>>(),
                    "pick": t.picked,
                    "fault": t.fault,
                })
            })
            .collect();
        serde_json::json!({
            "module": strategy.name(),
            "contract": strategy.contract().as_str(),
            "backends": workload.weights.len(),
            "requests": self.requests,
            "calls": self.calls,
            "picks": picks,
            "refused": self.refused,
            "retries": self.retries,
            "faults": faults,
            "first_fault": self.first_fault,
            "call_ns": {
                "p50": nanos(self.call_time(0.5)),
                "p99": nanos(self.call_time(0.99)),
                "max": nanos(self.max_call_time()),
            },
            "log": self.log.iter().map(|l| serde_json::json!({
                "level": l.level.as_str(), "message": l.message,
            })).collect::<Vec<_>>(),
            "log_dropped": self.log_dropped,
            "trace": trace,
        })
    }

    fn fault(&mut self, fault: &StrategyError) {
        if let Some(entry) = self.faults.iter_mut().find(|(k, _)| *k == fault.kind()) {
            entry.1 += 1;
        }
        self.first_fault.get_or_insert_with(|| fault.to_string());
    }
}

/// A sink that keeps what a module logs, for the report.
#[derive(Debug, Default)]
pub struct CapturedLog {
    lines: Mutex<Vec<LogLine>>,
    dropped: Mutex<u64>,
}

impl CapturedLog {
    /// The lines so far, and how many the rate limit dropped.
    pub fn take(&self) -> (Vec<LogLine>, u64) {
        let lines = std::mem::take(&mut *self.lines.lock().unwrap_or_else(|e| e.into_inner()));
        let dropped = std::mem::take(&mut *self.dropped.lock().unwrap_or_else(|e| e.into_inner()));
        (lines, dropped)
    }
}

impl LogSink for CapturedLog {
    fn line(&self, _module: &str, level: LogLevel, message: &str) {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(LogLine {
                level,
                message: message.to_string(),
            });
    }

    fn dropped(&self, _module: &str) {
        *self.dropped.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    }
}

/// Simulates `workload.requests` requests through `strategy` (see the
/// module docs). `log`, if given, is the sink the strategy was loaded with:
/// its lines go into the report.
pub fn run(strategy: &dyn Strategy, workload: &Workload, log: Option<&Arc<CapturedLog>>) -> Report {
    let n = workload.weights.len();
    let mut backends: Vec<BackendView> = workload
        .weights
        .iter()
        .enumerate()
        .map(|(id, &weight)| BackendView {
            id: id as u32,
            weight,
            in_flight: workload.in_flight.get(id).copied().unwrap_or(0),
            latency_micros: workload.latency(id),
        })
        .collect();
    let simulate_in_flight = workload.in_flight.is_empty();
    let mut in_flight: std::collections::VecDeque<usize> = Default::default();
    let mut report = Report {
        picks: vec![0; n],
        faults: FaultKind::ALL.iter().map(|k| (*k, 0)).collect(),
        ..Report::default()
    };
    let mut random = SplitMix64::new(workload.seed);
    let keys: Vec<u64> = (0..workload.keys)
        .map(|k| xxhash_rust::xxh3::xxh3_64(format!("key-{k}").as_bytes()))
        .collect();
    let mut list = Vec::with_capacity(n);
    'requests: for number in 0..workload.requests {
        report.requests += 1;
        let id = number as u64 + 1;
        let hash_key = (!keys.is_empty()).then(|| keys[number % keys.len()]);
        if simulate_in_flight && in_flight.len() >= n.max(1) {
            if let Some(done) = in_flight.pop_front() {
                backends[done].in_flight -= 1;
            }
        }
        let mut tried: Vec<u32> = Vec::new();
        for attempt in 0..=MAX_RETRIES {
            if report.total_faults() >= MAX_FAULTS {
                break 'requests;
            }
            list.clear();
            list.extend(backends.iter().filter(|b| !tried.contains(&b.id)).copied());
            if list.is_empty() {
                break;
            }
            let request = RequestView {
                hash_key,
                attempt,
                ..RequestView::plain(id, random.next_u64())
            };
            report.calls += 1;
            let started = Instant::now();
            let answer = strategy.select(&request, &list);
            report.call_times.push(started.elapsed());
            let picked = match answer {
                Ok(Some(i)) if i < list.len() => Ok(Some(list[i].id as usize)),
                Ok(Some(i)) => Err(StrategyError::BadIndex {
                    index: i as u64,
                    len: list.len(),
                }),
                Ok(None) => Ok(None),
                Err(fault) => Err(fault),
            };
            if report.trace.len() < workload.trace {
                report.trace.push(TraceEntry {
                    request: id,
                    attempt,
                    hash_key,
                    random: request.random,
                    backends: list.clone(),
                    picked: picked.as_ref().ok().copied().flatten().map(|i| i as u32),
                    fault: picked.as_ref().err().map(|f| f.to_string()),
                });
            }
            let chosen = match picked {
                Ok(Some(chosen)) => chosen,
                Ok(None) => {
                    report.refused += 1;
                    break;
                }
                Err(fault) => {
                    report.fault(&fault);
                    break;
                }
            };
            report.picks[chosen] += 1;
            let status = workload.status(chosen);
            let outcome = Outcome {
                backend_id: chosen as u32,
                status: match status {
                    SimulatedStatus::Status(code) => Some(code),
                    SimulatedStatus::Fail => None,
                },
                failure: (status == SimulatedStatus::Fail).then_some(super::Failure::Connect),
                latency_micros: workload.latency(chosen),
                attempt,
                request_id: id,
            };
            if strategy.observes() {
                if let Err(fault) = strategy.observe(&outcome) {
                    report.fault(&fault);
                }
            }
            if status == SimulatedStatus::Fail {
                tried.push(chosen as u32);
                if attempt < MAX_RETRIES {
                    report.retries += 1;
                }
                continue;
            }
            if simulate_in_flight {
                backends[chosen].in_flight += 1;
                in_flight.push_back(chosen);
            }
            break;
        }
    }
    report.call_times.sort_unstable();
    if let Some(log) = log {
        (report.log, report.log_dropped) = log.take();
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::{LeastConnections, RoundRobin};

    #[test]
    fn round_robin_spreads_exactly() {
        let report = run(
            &RoundRobin::default(),
            &Workload::new(vec![1; 4], 400),
            None,
        );
        assert_eq!(report.picks, [100; 4]);
        assert_eq!(report.total_faults(), 0);
        assert!(report.call_time(0.5) <= report.call_time(0.99));
        assert_eq!(report.calls, 400);
    }

    #[test]
    fn in_flight_requests_steer_least_connections() {
        // With each request in flight for n calls, least connections never
        // lets one backend hold two while another holds none.
        let report = run(
            &LeastConnections::default(),
            &Workload::new(vec![1; 3], 300),
            None,
        );
        assert_eq!(report.picks, [100; 3]);
    }

    #[test]
    fn a_failing_backend_is_retried_elsewhere_with_attempt_raised() {
        let workload = Workload {
            statuses: vec![SimulatedStatus::Fail, SimulatedStatus::Status(200)],
            trace: 4,
            ..Workload::new(vec![1, 1], 4)
        };
        let report = run(&RoundRobin::default(), &workload, None);
        // Round robin's counter moves on every call: each request's first
        // call (an even one) picks position 0 of [0, 1], which fails, and
        // its retry picks from [1].
        assert_eq!(report.retries, 4);
        assert_eq!(report.calls, 8);
        assert_eq!(report.picks, [4, 4]);
        let first: Vec<(u64, u32, Option<u32>, usize)> = report
            .trace
            .iter()
            .map(|t| (t.request, t.attempt, t.picked, t.backends.len()))
            .collect();
        assert_eq!(
            first,
            [
                (1, 0, Some(0), 2),
                (1, 1, Some(1), 1),
                (2, 0, Some(0), 2),
                (2, 1, Some(1), 1)
            ]
        );
    }

    #[test]
    fn keys_cycle_and_fixed_stats_are_shown() {
        let workload = Workload {
            keys: 2,
            in_flight: vec![7, 3],
            latencies: vec![10, 20],
            trace: 3,
            ..Workload::new(vec![1, 1], 3)
        };
        let report = run(&RoundRobin::default(), &workload, None);
        let keys: Vec<Option<u64>> = report.trace.iter().map(|t| t.hash_key).collect();
        assert_eq!(keys[0], keys[2]);
        assert_ne!(keys[0], keys[1]);
        assert_eq!(keys[0], Some(xxhash_rust::xxh3::xxh3_64(b"key-0")));
        let shown = &report.trace[2].backends;
        assert_eq!((shown[0].in_flight, shown[1].in_flight), (7, 3));
        assert_eq!((shown[0].latency_micros, shown[1].latency_micros), (10, 20));
    }
}
