//! Built-in strategy module: power of two choices over peak-EWMA latency
//! times load, as Linkerd balances, learned from the outcomes `observe` gets.
//!
//! Each request draws two distinct eligible backends at random and sends to
//! the cheaper, where a backend's cost is its latency estimate × (requests in
//! flight + 1). The estimate is tower's `PeakEwma`
//! (`tower/src/load/peak_ewma.rs`, itself from Finagle's `PeakEwma`; credit
//! to both): a sample above the estimate replaces it at once (the peak),
//! a sample below pulls it down as an exponentially weighted average, and the
//! estimate decays toward zero while no sample comes, so a backend that once
//! looked slow becomes cheap again and is tried again.
//!
//! **Time is counted in requests.** A module has no clock, so "time" here is
//! a request clock: the number of `select` calls so far. The decay constant
//! is in requests, and an estimate decays only while traffic flows, which is
//! also when it matters.
//!
//! Failures count as slow: an attempt that failed (connect, timeout, io) or
//! answered 5xx is a sample of at least `failure_penalty_micros`, so a
//! backend that answers errors fast is not mistaken for a fast one.

/// Linkerd decays over 10 s; with a request clock, 1000 requests is 10 s at
/// 100 requests a second. It is long against one backend's sampling interval
/// (each of 16 backends is sampled about every 16 requests, and loses 1.6 %
/// of its estimate in between) and short enough that a backend 100 times
/// slower than the rest, or penalised for errors, is tried again after about
/// 1000 × ln(100) ≈ 4600 requests.
pub const DEFAULT_DECAY_REQUESTS: f64 = 1000.0;
/// Linkerd's default RTT for a backend with no sample yet (30 ms).
pub const DEFAULT_RTT_MICROS: f64 = 30_000.0;
/// 1 s: well above the latency of a healthy backend in most services, so a
/// failing backend costs as much as a very slow one.
pub const DEFAULT_FAILURE_PENALTY_MICROS: f64 = 1_000_000.0;

const OPTIONS: &[&str] = &[
    "decay_requests",
    "default_rtt_micros",
    "failure_penalty_micros",
];

/// The parsed `strategy_options`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    /// τ of the decay, in requests (select calls).
    pub decay_requests: f64,
    /// The estimate of a backend never observed, when the host knows no
    /// latency for it either.
    pub default_rtt_micros: f64,
    /// The least a failed or 5xx attempt counts as; 0 turns it off.
    pub failure_penalty_micros: f64,
}

impl Default for Config {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl Config {
    pub const DEFAULT: Config = Config {
        decay_requests: DEFAULT_DECAY_REQUESTS,
        default_rtt_micros: DEFAULT_RTT_MICROS,
        failure_penalty_micros: DEFAULT_FAILURE_PENALTY_MICROS,
    };

    pub fn parse(options: &str) -> Result<Config, String> {
        let options = strategy_options::parse(options, OPTIONS)?;
        // `zero_too`: 0 is allowed. (The bound is written out rather than
        // formatted: printing an f64 would bring in float formatting.)
        let number = |key: &str, default: f64, zero_too: bool| {
            let value = options.f64(key)?.unwrap_or(default);
            if value > 0.0 || (zero_too && value == 0.0) {
                Ok(value)
            } else {
                let bound = if zero_too {
                    "at least 0"
                } else {
                    "greater than 0"
                };
                Err(format!(
                    "option `{key}` must be {bound}, not {}",
                    options.text(key).unwrap_or_default()
                ))
            }
        };
        Ok(Config {
            decay_requests: number("decay_requests", DEFAULT_DECAY_REQUESTS, false)?,
            default_rtt_micros: number("default_rtt_micros", DEFAULT_RTT_MICROS, false)?,
            failure_penalty_micros: number(
                "failure_penalty_micros",
                DEFAULT_FAILURE_PENALTY_MICROS,
                true,
            )?,
        })
    }
}

/// What `select` needs to know of an eligible backend.
pub trait Candidate {
    fn id(&self) -> u32;
    fn in_flight(&self) -> u32;
    /// The host's smoothed latency, 0 until it knows one.
    fn latency_micros(&self) -> u32;
}

/// One backend's latency estimate.
#[derive(Debug, Clone, Copy, Default)]
struct Estimate {
    /// Microseconds, as of `stamp`.
    micros: f64,
    /// The request clock when `micros` was set.
    stamp: u64,
    /// Set from an outcome: the estimate is this module's own.
    observed: bool,
    /// Set to the default RTT (as the prior, decaying like any estimate).
    primed: bool,
}

/// The module's state: the request clock and one estimate per backend id.
#[derive(Debug)]
pub struct PeakEwma {
    config: Config,
    clock: u64,
    // Indexed by id; grows only when a higher id first appears.
    estimates: Vec<Estimate>,
}

impl Default for PeakEwma {
    fn default() -> Self {
        Self::new()
    }
}

impl PeakEwma {
    pub const fn new() -> Self {
        Self {
            config: Config::DEFAULT,
            clock: 0,
            estimates: Vec::new(),
        }
    }

    /// Reads the options and makes room for the configured `ids`. Estimates
    /// learned so far stay (ids are stable); priors restart from the
    /// (perhaps new) default. On an error nothing changes.
    pub fn configure(
        &mut self,
        options: &str,
        ids: impl IntoIterator<Item = u32>,
    ) -> Result<(), String> {
        let config = Config::parse(options)?;
        self.config = config;
        for id in ids {
            self.estimate(id);
        }
        for estimate in &mut self.estimates {
            estimate.primed &= estimate.observed;
        }
        Ok(())
    }

    fn estimate(&mut self, id: u32) -> &mut Estimate {
        let id = id as usize;
        if id >= self.estimates.len() {
            self.estimates.resize(id + 1, Estimate::default());
        }
        &mut self.estimates[id]
    }

    /// e^(-elapsed / τ): how much of an estimate is left after `elapsed` requests.
    fn decay(&self, since: u64) -> f64 {
        let elapsed = self.clock.saturating_sub(since) as f64;
        (-elapsed / self.config.decay_requests).exp()
    }

    /// The latency estimate of `backend` now, in microseconds.
    fn latency(&mut self, backend: &impl Candidate) -> f64 {
        let (clock, default) = (self.clock, self.config.default_rtt_micros);
        let estimate = self.estimate(backend.id());
        if !estimate.observed {
            if backend.latency_micros() > 0 {
                return f64::from(backend.latency_micros());
            }
            if !estimate.primed {
                *estimate = Estimate {
                    micros: default,
                    stamp: clock,
                    observed: false,
                    primed: true,
                };
            }
        }
        let Estimate { micros, stamp, .. } = *estimate;
        micros * self.decay(stamp)
    }

    /// The cost of sending one more request to `backend`.
    pub fn cost(&mut self, backend: &impl Candidate) -> f64 {
        self.latency(backend) * (f64::from(backend.in_flight()) + 1.0)
    }

    /// One request: the cheaper of two distinct random positions of
    /// `backends` (eligible, never empty); position 0 when there is one.
    pub fn select<B: Candidate>(&mut self, random: u64, backends: &[B]) -> Option<u32> {
        self.clock += 1;
        let (a, b) = match two_positions(random, backends.len()) {
            Some(pair) => pair,
            None => return (!backends.is_empty()).then_some(0),
        };
        let (cost_a, cost_b) = (self.cost(&backends[a]), self.cost(&backends[b]));
        let pick = if cost_b < cost_a { b } else { a };
        u32::try_from(pick).ok()
    }

    /// How an attempt on `backend_id` ended: `latency_micros` to its
    /// response or failure, `failed` for a failure or a 5xx.
    pub fn observe(&mut self, backend_id: u32, latency_micros: u32, failed: bool) {
        let mut sample = f64::from(latency_micros);
        if failed {
            sample = sample.max(self.config.failure_penalty_micros);
        }
        let clock = self.clock;
        let estimate = *self.estimate(backend_id);
        let micros = if estimate.observed {
            // tower's update, after decaying the estimate to now: a peak
            // replaces it; a lower sample is blended in with the weight of
            // the requests since the last sample (recency = 1 - decay).
            let decay = self.decay(estimate.stamp);
            let now = estimate.micros * decay;
            if sample > now {
                sample
            } else {
                now * decay + sample * (1.0 - decay)
            }
        } else {
            // The first sample replaces the prior.
            sample
        };
        *self.estimate(backend_id) = Estimate {
            micros,
            stamp: clock,
            observed: true,
            primed: true,
        };
    }
}

/// Two distinct positions below `len` from one random u64 (its low and high
/// halves, each scaled to its range without division); none when `len` < 2.
pub fn two_positions(random: u64, len: usize) -> Option<(usize, usize)> {
    if len < 2 {
        return None;
    }
    let len = len as u64;
    let a = ((random & 0xFFFF_FFFF) * len) >> 32;
    let b = ((random >> 32) * (len - 1)) >> 32;
    // b ranges over the len - 1 positions other than a.
    let b = if b >= a { b + 1 } else { b };
    Some((a as usize, b as usize))
}

#[cfg(target_arch = "wasm32")]
mod component {
    wit_bindgen::generate!({ path: "../../wit/0.2.0", world: "observing-strategy" });

    use exports::loadbalancer::strategy::observer::Guest as Observer;
    use exports::loadbalancer::strategy::selector::Guest as Selector;
    use loadbalancer::strategy::types::{Backend, BackendInfo, Outcome, Request};
    use std::sync::Mutex;

    // One instance serves calls one at a time; the Mutex only makes the static safe.
    static STATE: Mutex<super::PeakEwma> = Mutex::new(super::PeakEwma::new());

    impl super::Candidate for Backend {
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

    struct Component;

    impl Selector for Component {
        fn configure(options: String, backends: Vec<BackendInfo>) -> Result<(), String> {
            let ids = backends.iter().map(|b| b.id);
            STATE.lock().unwrap().configure(&options, ids)
        }

        fn select(request: Request, backends: Vec<Backend>) -> Option<u32> {
            STATE.lock().unwrap().select(request.random, &backends)
        }
    }

    impl Observer for Component {
        fn observe(outcome: Outcome) {
            // No status is no response: a failure, whatever `failure` says.
            let failed = outcome.failure.is_some() || outcome.status.is_none_or(|s| s >= 500);
            STATE
                .lock()
                .unwrap()
                .observe(outcome.backend_id, outcome.latency_micros, failed);
        }
    }

    export!(Component);
}

#[cfg(test)]
mod tests;
