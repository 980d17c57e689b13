//! Config generations: a [`State`] is everything a request needs from one
//! config (the config itself, its backend pool, its strategy), built
//! completely before it serves; [`Generations`] holds the current one,
//! swaps in a new one on reload, and keeps what outlives a generation (the
//! backend registry, the metrics, the health checker's handle, the last
//! known addresses of backend names).
//!
//! A generation's pool is the config's backends with each name expanded to
//! the addresses it resolves to (see [`crate::discovery`]). While a config
//! has names, a background task resolves them again every `dns_refresh`;
//! when the set of addresses changes it builds a new generation from the
//! same config and installs it the way a reload does (one at a time with
//! reloads), so requests in flight finish on the addresses they had.
//!
//! Used by the proxy, the admin API and (through the backends it is given)
//! the health checker, so none of them reaches into another's internals.
//! Every attempt's [`Outcome`] is recorded here, in one place
//! ([`State::record`]): it feeds passive health, latency, metrics and, for
//! 0.2.0 observers, the strategy.

use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::task::AbortHandle;

use crate::balancer::{
    self, BackendView, Balancer, Contract, Decision, LoadError, LogLevel, LogSink, Outcome,
    RequestView, StrategySetup, TracingLog,
};
use crate::config::{Config, ConfigError, StrategyScope};
use crate::discovery::{self, Addresses, Discovery};
use crate::health;
use crate::metrics::Metrics;
use crate::server::{Backend, Ejection, Registry};
use crate::throttle::LogThrottle;
use crate::transport::tls::{self, TlsError};
use crate::transport::{TlsAcceptor, TlsConnector, TlsTarget};

pub use crate::server::Pool;

/// Why a generation could not be built from a config.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The strategy module could not be loaded, or its `configure` refused
    /// the config.
    #[error(transparent)]
    Strategy(#[from] LoadError),
    /// A backend address could not be used.
    #[error("backend address: {0}")]
    Backend(String),
    /// A certificate, key or CA file could not be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Why a reload was rejected; the old config keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The balancer was started from a config value, not a file.
    #[error("no config file to reload: the balancer was started without one")]
    NoFile,
    /// The new config file is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The new config could not be put in place (its module, say).
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// One config generation: everything a request needs. A reload builds a new
/// one and swaps it in; requests in flight keep the one they started with.
#[derive(Debug)]
pub struct State {
    config: Config,
    pool: Pool,
    balancer: Balancer,
    /// Whether the strategy reads the request (0.2.0): only then are the
    /// hash key and the named headers worked out per request.
    sees_requests: bool,
    /// The TLS listener's certificates, loaded from this config's files.
    tls_acceptor: Option<Arc<rustls::ServerConfig>>,
    /// How to speak TLS to each backend, by position in the pool; empty
    /// when none wants TLS.
    upstream_tls: Vec<Option<TlsTarget>>,
    /// The addresses of the config's backend names this generation was
    /// built with.
    addresses: Addresses,
    /// Throttles the warning that an outlier stays in because too many
    /// backends are ejected.
    outlier_log: LogThrottle,
}

/// What [`State::pick`] decided.
#[derive(Debug)]
pub enum Pick<'a> {
    /// Send the request to this backend.
    Backend(&'a Arc<Backend>),
    /// The strategy answered `none`.
    Refused,
    /// No backend is eligible; the strategy was not asked.
    NoneEligible,
}

impl State {
    /// Builds a generation from `config`: the pool from `registry` (a
    /// backend that stays keeps its stats), then the strategy module,
    /// compiled now (never per request) and, for 0.2.0, configured with the
    /// options and backends.
    ///
    /// A backend name contributes no backend here (see [`State::build_with`]
    /// for the addresses a name resolves to).
    pub fn build(
        config: Config,
        registry: &Registry,
        metrics: &Arc<Metrics>,
    ) -> Result<State, BuildError> {
        State::build_with(config, registry, metrics, Addresses::new())
    }

    /// As [`State::build`], each backend name standing for its `addresses`
    /// (none for a name missing there).
    pub fn build_with(
        config: Config,
        registry: &Registry,
        metrics: &Arc<Metrics>,
        addresses: Addresses,
    ) -> Result<State, BuildError> {
        let expanded = discovery::expand(&config.backends, &addresses);
        let pool = registry
            .expanded_pool(config.backends.len(), &expanded)
            .map_err(|e| BuildError::Backend(e.to_string()))?;
        // Certificates first: a bad file is reported before a large module
        // is compiled.
        let tls_acceptor = match &config.tls {
            Some(listener) => Some(tls::server_config(listener)?),
            None => None,
        };
        let upstream_tls = upstream_tls(&config, &expanded)?;
        let setup = StrategySetup {
            options: config.strategy_options_json(),
            backends: pool.infos(),
            log: Arc::new(MetricsLog(Arc::clone(metrics))),
            ..StrategySetup::new(config.sandbox)
        };
        let strategy = balancer::load(&config.strategy, &setup)?;
        let sees_requests = strategy.contract() == Contract::V0_2;
        if !sees_requests {
            let unused: Vec<&str> = [
                ("hash_key", config.hash_key.is_some()),
                ("strategy_headers", !config.strategy_headers.is_empty()),
                (
                    "strategy_options",
                    config.strategy_options != serde_json::json!({}),
                ),
            ]
            .iter()
            .filter(|(_, set)| *set)
            .map(|(key, _)| *key)
            .collect();
            if !unused.is_empty() {
                tracing::warn!(
                    "{} set, but strategy {} implements contract {}, which sees no request and takes no options: ignored",
                    unused.join(", "),
                    strategy.name(),
                    strategy.contract().as_str()
                );
            }
        }
        // With strategy_scope "worker", one more instance per further
        // worker (the compiled module is shared; each has its own store).
        let mut instances = vec![strategy];
        if config.strategy_scope == StrategyScope::Worker {
            for _ in 1..config.tuning.worker_threads {
                instances.push(balancer::load(&config.strategy, &setup)?);
            }
        }
        let fault_metrics = Arc::clone(metrics);
        let balancer = Balancer::per_worker(instances)
            .on_fault(Box::new(move |kind| fault_metrics.record_fault(kind)));
        Ok(State {
            config,
            pool,
            balancer,
            sees_requests,
            tls_acceptor,
            upstream_tls,
            addresses,
            outlier_log: LogThrottle::new(Duration::from_secs(1)),
        })
    }

    /// The TLS listener's certificates and settings, if it is on.
    pub fn tls_acceptor(&self) -> Option<TlsAcceptor> {
        self.tls_acceptor
            .as_ref()
            .map(|c| TlsAcceptor::from(Arc::clone(c)))
    }

    /// How to speak TLS to `backend`, if it wants TLS.
    pub fn upstream_tls(&self, backend: &Backend) -> Option<&TlsTarget> {
        if self.upstream_tls.is_empty() {
            return None;
        }
        self.upstream_tls
            .get(self.pool.position(backend.id())?)?
            .as_ref()
    }

    /// Each backend with how to speak TLS to it, for the health checker.
    fn checked_backends(&self) -> Vec<(Arc<Backend>, Option<TlsTarget>)> {
        self.pool
            .backends()
            .iter()
            .map(|b| (Arc::clone(b), self.upstream_tls(b).cloned()))
            .collect()
    }

    /// The configuration this generation was built from.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The backends and their live stats.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The strategy and its fault counters.
    pub fn balancer(&self) -> &Balancer {
        &self.balancer
    }

    /// Whether the strategy reads the request beyond its backend list (the
    /// caller may skip working out the hash key and headers if not).
    pub fn sees_requests(&self) -> bool {
        self.sees_requests
    }

    /// Asks the strategy for an eligible backend not in `exclude`.
    pub fn pick(&self, metrics: &Metrics, request: &RequestView<'_>, exclude: &[u32]) -> Pick<'_> {
        thread_local! {
            // One buffer per worker thread: no allocation per request once
            // it has grown to the number of backends.
            static ELIGIBLE: RefCell<Vec<BackendView>> = const { RefCell::new(Vec::new()) };
        }
        ELIGIBLE.with(|buf| {
            let mut buf = buf.borrow_mut();
            self.pool.eligible(exclude, &mut buf);
            let started = std::time::Instant::now();
            let decision = self.balancer.select(request, &buf);
            if decision != Decision::NoneEligible {
                metrics.record_select(started.elapsed());
            }
            match decision {
                Decision::Backend(i) => Pick::Backend(
                    self.pool
                        .get(buf[i].id)
                        .expect("eligible ids come from the pool"),
                ),
                Decision::Refused => Pick::Refused,
                Decision::NoneEligible => Pick::NoneEligible,
            }
        })
    }

    /// Records how one attempt on `backend` ended: a response counts toward
    /// its health and latency, a failure toward its unhealthy threshold
    /// (passive checking) and `lb_upstream_errors_total` (and
    /// `lb_retries_total` if the request is `retried` elsewhere); an
    /// observing strategy is told either way.
    pub fn record(&self, metrics: &Metrics, backend: &Backend, outcome: &Outcome, retried: bool) {
        let health = &self.config.health;
        match outcome.failure {
            None => {
                backend.record_latency(Duration::from_micros(u64::from(outcome.latency_micros)));
                backend.observe_health(true, health.healthy_threshold, health.unhealthy_threshold);
                if let Some(status) = outcome.status {
                    self.detect_outlier(metrics, backend, status);
                }
            }
            Some(failure) => {
                if backend.observe_health(
                    false,
                    health.healthy_threshold,
                    health.unhealthy_threshold,
                ) == Some(false)
                {
                    tracing::warn!(
                        backend = backend.address(),
                        "backend {} is unhealthy after {} consecutive failed requests (last: {})",
                        backend.address(),
                        health.unhealthy_threshold,
                        failure.as_str()
                    );
                }
                metrics.record_upstream_error(backend.address(), failure.as_str(), retried);
            }
        }
        self.balancer.observe(outcome);
    }
}

impl State {
    /// Outlier detection on one answer's status: a backend that reaches
    /// `outlier_consecutive_5xx` in a row is ejected, unless that would
    /// take out more than `outlier_max_ejection_percent` of the backends.
    fn detect_outlier(&self, metrics: &Metrics, backend: &Backend, status: u16) {
        let outlier = self.config.health.outlier;
        let may_eject = || {
            let backends = self.pool.backends();
            let allowed = backends.len() * outlier.max_ejection_percent as usize / 100;
            let out = backends.iter().filter(|b| b.is_ejected()).count();
            out < allowed
        };
        match backend.observe_status(
            status,
            outlier.consecutive_5xx,
            outlier.base_ejection_time,
            may_eject,
        ) {
            Ejection::None => {}
            Ejection::Ejected(time) => {
                metrics.record_ejection(backend.address());
                tracing::warn!(
                    backend = backend.address(),
                    "backend {} ejected for {time:?} after {} consecutive 5xx answers (last: {status})",
                    backend.address(),
                    outlier.consecutive_5xx
                );
            }
            Ejection::Capped => {
                if let Some(suppressed) = self.outlier_log.allow() {
                    tracing::warn!(
                        backend = backend.address(),
                        suppressed,
                        "backend {} answered {} consecutive 5xx but stays in: outlier_max_ejection_percent ({} %) of the backends are ejected already",
                        backend.address(),
                        outlier.consecutive_5xx,
                        outlier.max_ejection_percent
                    );
                }
            }
        }
    }
}

/// The balancer's log for a module's lines, counting the ones its rate
/// limit drops in `lb_strategy_log_dropped_total`.
struct MetricsLog(Arc<Metrics>);

impl LogSink for MetricsLog {
    fn line(&self, module: &str, level: LogLevel, message: &str) {
        TracingLog.line(module, level, message);
    }

    fn dropped(&self, _module: &str) {
        self.0.record_log_dropped();
    }
}

/// The current generation and what outlives it: the backend registry, the
/// metrics, the config file, and the health checker of the generation in
/// service.
pub struct Generations {
    current: ArcSwap<State>,
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
    config_path: Option<PathBuf>,
    /// One reload at a time.
    reload_lock: tokio::sync::Mutex<()>,
    /// The health checker of the current generation.
    checker: Mutex<Option<AbortHandle>>,
    /// The last known addresses of backend names, and the resolver.
    discovery: Arc<Discovery>,
    /// The task resolving the current generation's backend names again.
    resolving: Mutex<Option<AbortHandle>>,
    /// Throttles the "no healthy backend" warning, which would otherwise
    /// come once per request during an outage.
    outage_log: LogThrottle,
    /// When the first generation was built.
    started: std::time::Instant,
    /// Reloads that put a new generation in service.
    reloads: std::sync::atomic::AtomicU64,
}

impl Generations {
    /// Builds the first generation from `config`; `config_path` is the file
    /// a reload reads again. Nothing runs until [`Generations::install`].
    pub fn new(
        config: Config,
        config_path: Option<PathBuf>,
    ) -> Result<(Generations, Arc<State>), BuildError> {
        let metrics = Arc::new(Metrics::new());
        let registry = Arc::new(Registry::new());
        let discovery = Arc::new(Discovery::new());
        // A name that does not resolve now is warned about (by discovery)
        // and has no backend until it does.
        let addresses = discovery.resolve_now(&config);
        let state = Arc::new(State::build_with(config, &registry, &metrics, addresses)?);
        let generations = Generations {
            current: ArcSwap::new(Arc::clone(&state)),
            metrics,
            registry,
            config_path,
            reload_lock: tokio::sync::Mutex::new(()),
            checker: Mutex::new(None),
            discovery,
            resolving: Mutex::new(None),
            outage_log: LogThrottle::new(Duration::from_secs(1)),
            started: std::time::Instant::now(),
            reloads: std::sync::atomic::AtomicU64::new(0),
        };
        Ok((generations, state))
    }

    /// Time since the first generation was built (the process's start,
    /// near enough).
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Reloads that succeeded since the start.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The generation in service.
    pub fn current(&self) -> Arc<State> {
        self.current.load_full()
    }

    /// The generation in service, without taking a reference count: for a
    /// quick look at a setting.
    pub fn peek(&self) -> arc_swap::Guard<Arc<State>> {
        self.current.load()
    }

    /// The metrics, kept across generations.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Logs (at most once a second) that no backend is eligible.
    pub fn log_outage(&self) {
        if let Some(suppressed) = self.outage_log.allow() {
            tracing::warn!(suppressed, "no healthy backend: answering 503");
        }
    }

    /// Puts `state` in service and restarts health checking for its
    /// backends and, if its config has backend names, their resolution.
    /// Must be called inside a tokio runtime.
    pub fn install(self: &Arc<Self>, state: Arc<State>) {
        let checker = tokio::spawn(health::run(
            state.checked_backends(),
            state.config().health.clone(),
        ))
        .abort_handle();
        let resolving = (!discovery::names(&state.config().backends).is_empty()).then(|| {
            tokio::spawn(resolve_again(Arc::downgrade(self), Arc::clone(&state))).abort_handle()
        });
        self.registry.commit(state.pool());
        self.current.store(state);
        let previous = self
            .checker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(checker);
        if let Some(previous) = previous {
            previous.abort();
        }
        let previous = std::mem::replace(
            &mut *self.resolving.lock().unwrap_or_else(|e| e.into_inner()),
            resolving,
        );
        if let Some(previous) = previous {
            previous.abort();
        }
    }

    /// Stops the health checks and the resolution of backend names (at
    /// shutdown).
    pub fn stop_health_checks(&self) {
        for task in [&self.checker, &self.resolving] {
            if let Some(task) = task.lock().unwrap_or_else(|e| e.into_inner()).take() {
                task.abort();
            }
        }
    }

    /// Builds a generation from the config in service with backend names
    /// standing for `addresses` and installs it, unless a reload came
    /// first or the addresses are the ones in service. One at a time with
    /// reloads.
    async fn rediscover(self: &Arc<Self>, addresses: Addresses) -> Result<(), BuildError> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let old = self.current();
        if old.addresses == addresses {
            return Ok(());
        }
        let registry = Arc::clone(&self.registry);
        let metrics = Arc::clone(&self.metrics);
        let config = old.config().clone();
        let new = tokio::task::spawn_blocking(move || {
            State::build_with(config, &registry, &metrics, addresses)
        })
        .await
        .expect("building a generation does not panic")?;
        let describe = |state: &State| -> Vec<String> {
            state
                .pool()
                .backends()
                .iter()
                .filter(|b| b.source().is_some())
                .map(|b| format!("{} ({})", b.address(), b.id()))
                .collect()
        };
        let (before, after) = (describe(&old), describe(&new));
        let joined: Vec<&String> = after.iter().filter(|a| !before.contains(a)).collect();
        let left: Vec<&String> = before.iter().filter(|a| !after.contains(a)).collect();
        tracing::info!(
            "backend names resolved to a new set: {} backend{} now; joined: {joined:?}; left (they finish what they have): {left:?}",
            new.pool().backends().len(),
            if new.pool().backends().len() == 1 { "" } else { "s" },
        );
        self.install(Arc::new(new));
        Ok(())
    }

    /// Re-reads the config file, builds the new generation completely
    /// (module compiled and configured, pool built) and only then swaps it
    /// in. On any error the old generation keeps serving. Returns the new
    /// config's summary.
    pub async fn reload(self: &Arc<Self>) -> Result<String, ReloadError> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let result = self.try_reload().await;
        self.metrics.record_reload(result.is_ok());
        if result.is_ok() {
            self.reloads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        match &result {
            Ok(summary) => tracing::info!("config reloaded: {summary}"),
            Err(error) => {
                tracing::error!("config reload rejected, keeping the old config: {error}")
            }
        }
        result
    }

    async fn try_reload(self: &Arc<Self>) -> Result<String, ReloadError> {
        let path = self.config_path.clone().ok_or(ReloadError::NoFile)?;
        let old = self.current();
        // Loading reads a file and may compile a large module for seconds:
        // keep it off the threads that serve requests.
        let config = tokio::task::spawn_blocking(move || -> Result<Config, ReloadError> {
            Ok(keep_start_only_settings(Config::load(&path)?, old.config()))
        })
        .await
        .expect("the reload task does not panic")?;
        // Names as they resolve now (the last known addresses of a name
        // whose lookup fails).
        let (addresses, _) = self.discovery.resolve(&config).await;
        let registry = Arc::clone(&self.registry);
        let metrics = Arc::clone(&self.metrics);
        let new = tokio::task::spawn_blocking(move || {
            State::build_with(config, &registry, &metrics, addresses)
        })
        .await
        .expect("the reload task does not panic")?;
        let summary = new.config.summary();
        self.install(Arc::new(new));
        Ok(summary)
    }
}

/// Resolves the backend names of `state`'s config again every
/// `dns_refresh` (sooner if the records' TTL asks) and, when their
/// addresses change, puts a generation with the new ones in service (which
/// ends this task and starts the next). Ends when the balancer has gone.
async fn resolve_again(generations: Weak<Generations>, state: Arc<State>) {
    let config = state.config().clone();
    drop(state);
    let mut wait = match generations.upgrade() {
        Some(generations) => generations.discovery.next_refresh(&config),
        None => return,
    };
    loop {
        tokio::time::sleep(wait).await;
        let Some(generations) = generations.upgrade() else {
            return;
        };
        let (addresses, next) = generations.discovery.resolve(&config).await;
        wait = next;
        if addresses != generations.peek().addresses {
            if let Err(error) = generations.rediscover(addresses).await {
                tracing::error!(
                    "backend names resolved to new addresses, but the new pool could not be put in place: {error}"
                );
            }
        }
    }
}

impl std::fmt::Debug for Generations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generations")
            .field("config_path", &self.config_path)
            .finish_non_exhaustive()
    }
}

/// The TLS settings of each backend of `expanded` (by position in the
/// pool), with one connector for all: trust roots from `upstream_ca_file`
/// (checked even if no backend wants TLS yet, so that a bad file is found
/// now) or the built-in ones. A backend found through a name verifies that
/// name (or its `tls_server_name`), not its address.
fn upstream_tls(
    config: &Config,
    expanded: &[discovery::Expanded],
) -> Result<Vec<Option<TlsTarget>>, TlsError> {
    if config.upstream_ca_file.is_none() && config.backends.iter().all(|b| b.tls.is_none()) {
        return Ok(Vec::new());
    }
    let connector = TlsConnector::from(tls::client_config(config.upstream_ca_file.as_deref())?);
    Ok(expanded
        .iter()
        .map(|e| {
            let name = tls::server_name(&e.config.tls.as_ref()?.server_name)?;
            Some(TlsTarget {
                connector: connector.clone(),
                name,
            })
        })
        .collect())
}

/// Listeners and worker threads stay as they are until a restart: a new
/// config that changes them gets the running values, with a warning.
fn keep_start_only_settings(mut config: Config, old: &Config) -> Config {
    if config.listen_address != old.listen_address {
        tracing::warn!(
            "listen_address changed to {}: this needs a restart; still listening on {}",
            config.listen_address,
            old.listen_address
        );
        config.listen_address = old.listen_address;
    }
    let tls_address = |c: &Config| c.tls.as_ref().map(|t| t.address);
    if tls_address(&config) != tls_address(old) {
        tracing::warn!(
            "tls_listen_address changed: this needs a restart; the TLS listener stays as it was ({:?}), with its certificates",
            tls_address(old)
        );
        config.tls.clone_from(&old.tls);
    }
    if config.admin_address != old.admin_address {
        tracing::warn!(
            "admin_address changed: this needs a restart; the admin listener stays on {:?}",
            old.admin_address
        );
        config.admin_address = old.admin_address;
    }
    let (old_tuning, new_tuning) = (old.tuning, &mut config.tuning);
    if new_tuning.worker_threads != old_tuning.worker_threads
        || new_tuning.listen_backlog != old_tuning.listen_backlog
    {
        tracing::warn!(
            "worker_threads and listen_backlog need a restart; keeping {} workers and a backlog of {}",
            old_tuning.worker_threads,
            old_tuning.listen_backlog
        );
        new_tuning.worker_threads = old_tuning.worker_threads;
        new_tuning.listen_backlog = old_tuning.listen_backlog;
    }
    config
}
