//! The HTTP/1.1 proxy and the config generations it serves, swapped
//! atomically on reload.
//!
//! Serving is split over `worker_threads` threads, each with its own
//! single-threaded event loop that accepts client connections and serves
//! them start to end, backend connections included: nothing on the request
//! path crosses to another thread except the strategy call.
//!
//! One request, start to end (`downstream.rs` -> `forward.rs` ->
//! `upstream.rs`): the request head is read and checked, then rewritten for
//! the backend as bytes (`headers.rs`) -> the current [`State`] gives a pool
//! snapshot of eligible backends -> strategy `select` ->
//! [`ConnectionGuard`](crate::server::ConnectionGuard) raises the backend's
//! active count -> the head (and body, streamed) go out over a pooled
//! keep-alive connection of this thread -> the response head is rewritten
//! for the client and written with what of the body already arrived, the
//! rest streams -> the request is counted and timed, the guard released. A
//! failed connect marks the backend (passive health) and the request is
//! retried elsewhere when that is safe.

mod downstream;
mod error;
mod forward;
mod headers;
mod http1;
mod upstream;

use std::cell::RefCell;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{oneshot, watch, Notify};
use tokio::task::AbortHandle;

pub use error::{describe as describe_error, ProxyError};
pub use headers::{
    parse_request, parse_response, HeadError, ParsedResponse, RequestHead, ResponseHead,
};
pub use http1::Framing;

use crate::balancer::{self, BackendView, Balancer, Decision, LoadError};
use crate::config::{Config, ConfigError, DEFAULT_LISTEN_BACKLOG};
use crate::health;
use crate::metrics::{admin, Metrics};
use crate::server::{Backend, Pool};
use crate::throttle::LogThrottle;

/// One config generation: everything a request needs. A reload builds a new
/// one and swaps it in; requests in flight keep the one they started with.
#[derive(Debug)]
pub struct State {
    config: Config,
    pool: Pool,
    balancer: Balancer,
}

impl State {
    /// Builds a generation from `config`: loads the strategy module
    /// (compiling it now, never per request), builds the pool, keeping the
    /// stats of backends that were in `previous`.
    fn new(
        config: Config,
        previous: Option<&State>,
        metrics: &Arc<Metrics>,
    ) -> Result<State, StartError> {
        let strategy = balancer::load(&config.strategy, config.sandbox)?;
        let pool = Pool::with_previous(&config.backends, previous.map(|p| &p.pool))
            .map_err(|e| StartError::Backend(e.to_string()))?;
        let metrics = Arc::clone(metrics);
        let balancer =
            Balancer::new(strategy).on_fault(Box::new(move |kind| metrics.record_fault(kind)));
        Ok(State {
            balancer,
            pool,
            config,
        })
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

    /// Asks the strategy for a healthy backend not in `exclude`.
    fn pick(&self, metrics: &Metrics, exclude: &[u32]) -> Result<&Arc<Backend>, ProxyError> {
        thread_local! {
            // One buffer per worker thread: no allocation per request once
            // it has grown to the number of backends.
            static ELIGIBLE: RefCell<Vec<BackendView>> = const { RefCell::new(Vec::new()) };
        }
        ELIGIBLE.with(|buf| {
            let mut buf = buf.borrow_mut();
            self.pool.eligible(exclude, &mut buf);
            let started = Instant::now();
            let decision = self.balancer.select(&buf);
            if decision != Decision::NoneEligible {
                metrics.record_select(started.elapsed());
            }
            match decision {
                Decision::Backend(i) => Ok(self
                    .pool
                    .get(buf[i].id)
                    .expect("eligible ids come from the pool")),
                Decision::Refused => Err(ProxyError::Refused),
                Decision::NoneEligible => Err(ProxyError::NoHealthyBackend),
            }
        })
    }

    /// Records a failed attempt on `backend` toward its health threshold.
    fn passive_failure(&self, backend: &Backend, error: &dyn std::fmt::Display) {
        let health = &self.config.health;
        if backend.observe_health(false, health.healthy_threshold, health.unhealthy_threshold)
            == Some(false)
        {
            tracing::warn!(
                backend = backend.address(),
                "backend {} is unhealthy: {error}",
                backend.address()
            );
        }
    }
}

/// Why the balancer could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The strategy module could not be loaded.
    #[error(transparent)]
    Strategy(#[from] LoadError),
    /// A backend address could not be used.
    #[error("backend address: {0}")]
    Backend(String),
    /// A worker thread could not be started.
    #[error("cannot start a worker thread: {0}")]
    Thread(std::io::Error),
    /// A listen address could not be bound.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
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
    Start(#[from] StartError),
}

/// What is shared by every connection and survives reloads.
pub(crate) struct Shared {
    pub(crate) state: ArcSwap<State>,
    pub(crate) metrics: Arc<Metrics>,
    config_path: Option<PathBuf>,
    /// One reload at a time.
    reload_lock: tokio::sync::Mutex<()>,
    /// The health checker of the current generation.
    checker: Mutex<Option<AbortHandle>>,
    /// Throttles the "no healthy backend" warning, which would otherwise
    /// come once per request during an outage.
    outage_log: LogThrottle,
    /// Client connections open now.
    open_connections: AtomicUsize,
    /// Throttles the "max_connections reached" warning.
    busy_log: LogThrottle,
}

impl Shared {
    fn log_outage(&self) {
        if let Some(suppressed) = self.outage_log.allow() {
            tracing::warn!(suppressed, "no healthy backend: answering 503");
        }
    }

    /// Puts `state` in service and restarts health checking for it.
    fn install(&self, state: Arc<State>) {
        let checker = tokio::spawn(health::run(Arc::clone(&state))).abort_handle();
        self.state.store(state);
        let previous = self
            .checker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(checker);
        if let Some(previous) = previous {
            previous.abort();
        }
    }

    /// Re-reads the config file, builds the new generation completely
    /// (module compiled, pool built) and only then swaps it in. On any error
    /// the old generation keeps serving.
    pub(crate) async fn reload(&self) -> Result<String, ReloadError> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let result = self.try_reload().await;
        self.metrics.record_reload(result.is_ok());
        match &result {
            Ok(summary) => tracing::info!("config reloaded: {summary}"),
            Err(error) => {
                tracing::error!("config reload rejected, keeping the old config: {error}")
            }
        }
        result
    }

    async fn try_reload(&self) -> Result<String, ReloadError> {
        let path = self.config_path.clone().ok_or(ReloadError::NoFile)?;
        let old = self.state.load_full();
        let metrics = Arc::clone(&self.metrics);
        // Loading reads a file and may compile a large module for seconds:
        // keep it off the threads that serve requests.
        let new = tokio::task::spawn_blocking(move || -> Result<State, ReloadError> {
            let mut config = Config::load(&path)?;
            // Listeners stay where they are until a restart.
            if config.listen_address != old.config.listen_address {
                tracing::warn!(
                    "listen_address changed to {}: this needs a restart; still listening on {}",
                    config.listen_address,
                    old.config.listen_address
                );
                config.listen_address = old.config.listen_address;
            }
            if config.admin_address != old.config.admin_address {
                tracing::warn!(
                    "admin_address changed: this needs a restart; the admin listener stays on {:?}",
                    old.config.admin_address
                );
                config.admin_address = old.config.admin_address;
            }
            let (old_tuning, new_tuning) = (old.config.tuning, &mut config.tuning);
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
            Ok(State::new(config, Some(&old), &metrics)?)
        })
        .await
        .expect("the reload task does not panic")?;
        let summary = new.config.summary();
        self.install(Arc::new(new));
        Ok(summary)
    }
}

/// A running balancer: its listener, worker threads and health checker.
pub struct Proxy {
    local_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    shutdown: watch::Sender<Option<Duration>>,
    /// Each worker drops its sender when it has finished.
    workers: Vec<oneshot::Receiver<()>>,
}

impl Proxy {
    /// Loads the strategy, binds `config.listen_address` (and the admin
    /// address, if set) and starts `worker_threads` serving threads, the
    /// health checker and the admin API. A reload needs a file: see
    /// [`Proxy::start_from_file`]. Must be called inside a tokio runtime,
    /// which runs the health checks and the admin API; client traffic is
    /// served by the workers' own event loops.
    pub async fn start(config: Config) -> Result<Proxy, StartError> {
        Proxy::start_with(config, None).await
    }

    /// As [`Proxy::start`], remembering `path` so that [`Proxy::reload`]
    /// (SIGHUP, `POST /reload`) can read it again.
    pub async fn start_from_file(config: Config, path: PathBuf) -> Result<Proxy, StartError> {
        Proxy::start_with(config, Some(path)).await
    }

    async fn start_with(config: Config, config_path: Option<PathBuf>) -> Result<Proxy, StartError> {
        let metrics = Arc::new(Metrics::new());
        let address = config.listen_address;
        let admin_address = config.admin_address;
        let tuning = config.tuning;
        let state = State::new(config, None, &metrics)?;
        let listeners = bind_per_worker(address, tuning.listen_backlog, tuning.worker_threads)?;
        let local_addr = listeners[0]
            .local_addr()
            .map_err(|source| StartError::Bind { address, source })?;
        let admin_listener = match admin_address {
            Some(address) => Some(bind(address, DEFAULT_LISTEN_BACKLOG)?),
            None => None,
        };
        let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());

        let shared = Arc::new(Shared {
            state: ArcSwap::from_pointee(state),
            metrics,
            config_path,
            reload_lock: tokio::sync::Mutex::new(()),
            checker: Mutex::new(None),
            outage_log: LogThrottle::new(Duration::from_secs(1)),
            open_connections: AtomicUsize::new(0),
            busy_log: LogThrottle::new(Duration::from_secs(1)),
        });
        shared.install(shared.state.load_full());
        let (shutdown, signal) = watch::channel(None);
        if let (Some(listener), Some(address)) = (admin_listener, admin_address) {
            let listener = TcpListener::from_std(listener)
                .map_err(|source| StartError::Bind { address, source })?;
            tokio::spawn(admin::serve(listener, Arc::clone(&shared), signal.clone()));
        }
        let mut workers = Vec::with_capacity(tuning.worker_threads);
        for (id, listener) in listeners.into_iter().enumerate() {
            let (done, finished) = oneshot::channel();
            let worker = Worker {
                id,
                shared: Arc::clone(&shared),
                shutdown: signal.clone(),
            };
            std::thread::Builder::new()
                .name(format!("lb-worker-{id}"))
                .spawn(move || worker.run(listener, done))
                .map_err(StartError::Thread)?;
            workers.push(finished);
        }
        Ok(Proxy {
            local_addr,
            admin_addr,
            shared,
            shutdown,
            workers,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound admin address, if the admin listener is on.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The current config generation: pool, balancer, config.
    pub fn state(&self) -> Arc<State> {
        self.shared.state.load_full()
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Re-reads the config file and swaps the new config in, or keeps the
    /// old one and says why. Returns the new config's summary.
    pub async fn reload(&self) -> Result<String, ReloadError> {
        self.shared.reload().await
    }

    /// Stops accepting, lets requests in flight finish for up to `timeout`
    /// (keep-alive clients are told `Connection: close`), then returns.
    pub async fn shutdown(mut self, timeout: Duration) {
        let _ = self.shutdown.send(Some(timeout));
        for finished in std::mem::take(&mut self.workers) {
            // An error only means the worker has gone, which is the point.
            let _ = finished.await;
        }
        if let Some(checker) = self
            .shared
            .checker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            checker.abort();
        }
    }
}

impl Drop for Proxy {
    /// A proxy dropped without [`Proxy::shutdown`] stops its workers at once.
    fn drop(&mut self) {
        if !self.workers.is_empty() {
            let _ = self.shutdown.send(Some(Duration::ZERO));
        }
    }
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("local_addr", &self.local_addr)
            .field("admin_addr", &self.admin_addr)
            .field("workers", &self.workers.len())
            .finish_non_exhaustive()
    }
}

/// Binds a non-blocking listening socket with `SO_REUSEADDR` (so a restart
/// does not wait for old connections in `TIME_WAIT`).
fn bind(address: SocketAddr, backlog: u32) -> Result<std::net::TcpListener, StartError> {
    let socket = socket_for(address, false)?;
    listen(socket, address, backlog)
}

/// Binds one listening socket per worker on `address`, all with
/// `SO_REUSEPORT`, so that the kernel spreads new connections evenly over
/// the workers (as NGINX's `reuseport`). An exclusive bind first makes sure
/// nothing else holds the address: `SO_REUSEPORT` alone would let a second
/// balancer started on the same port share its traffic silently.
fn bind_per_worker(
    address: SocketAddr,
    backlog: u32,
    workers: usize,
) -> Result<Vec<std::net::TcpListener>, StartError> {
    if address.port() != 0 {
        let probe = socket_for(address, false)?;
        probe
            .bind(address)
            .map_err(|source| StartError::Bind { address, source })?;
    }
    let first = listen(socket_for(address, true)?, address, backlog)?;
    // With port 0 the others join the port the first one got.
    let bound = first
        .local_addr()
        .map_err(|source| StartError::Bind { address, source })?;
    let mut listeners = vec![first];
    for _ in 1..workers.max(1) {
        listeners.push(listen(socket_for(bound, true)?, bound, backlog)?);
    }
    Ok(listeners)
}

fn socket_for(address: SocketAddr, reuse_port: bool) -> Result<TcpSocket, StartError> {
    let error = |source| StartError::Bind { address, source };
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(error)?;
    socket.set_reuseaddr(true).map_err(error)?;
    if reuse_port {
        socket.set_reuseport(true).map_err(error)?;
    }
    Ok(socket)
}

fn listen(
    socket: TcpSocket,
    address: SocketAddr,
    backlog: u32,
) -> Result<std::net::TcpListener, StartError> {
    let error = |source| StartError::Bind { address, source };
    socket.bind(address).map_err(error)?;
    let listener = socket.listen(backlog).map_err(error)?;
    listener.into_std().map_err(error)
}

/// One serving thread: a single-threaded event loop that accepts client
/// connections and serves them start to end, upstream connections
/// included. Nothing on the request path crosses to another thread, except
/// the strategy call, which is one short critical section.
struct Worker {
    id: usize,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<Option<Duration>>,
}

impl Worker {
    fn run(self, listener: std::net::TcpListener, done: oneshot::Sender<()>) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(error) => {
                tracing::error!(
                    worker = self.id,
                    "cannot start a worker's event loop: {error}"
                );
                return;
            }
        };
        runtime.block_on(async move {
            match TcpListener::from_std(listener) {
                Ok(listener) => self.serve(listener).await,
                Err(error) => tracing::error!(worker = self.id, "cannot use the listener: {error}"),
            }
        });
        // Connections still open past the shutdown timeout end with the
        // runtime.
        drop(runtime);
        drop(done);
    }

    async fn serve(mut self, listener: TcpListener) {
        let connections = Arc::new(Connections::default());
        let shared = Arc::clone(&self.shared);
        let sweeper = tokio::spawn(async move {
            // Idle upstream connections past upstream_idle_timeout close.
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                upstream::sweep(shared.state.load().config.tuning.upstream_idle_timeout);
            }
        });
        let timeout = loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let limit = self.shared.state.load().config.clients.max_connections;
                        match ConnectionSlot::take(&self.shared, limit) {
                            Some(slot) => self.serve_connection(stream, peer, slot, &connections),
                            // Closed at once; the connections already open
                            // are not disturbed.
                            None => {
                                drop(stream);
                                if let Some(suppressed) = self.shared.busy_log.allow() {
                                    tracing::warn!(suppressed, "max_connections ({limit}) reached: closing new connections");
                                }
                            }
                        }
                    }
                    // The connection was reset before accept.
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(error) => {
                        // Out of descriptors, say: back off briefly instead
                        // of spinning, keep serving.
                        tracing::warn!("accept failed: {error}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                changed = self.shutdown.changed() => {
                    break match changed {
                        Ok(()) => self.shutdown.borrow().unwrap_or_default(),
                        Err(_) => Duration::ZERO,
                    };
                }
            }
        };
        // New connections are refused from here on (once every worker has
        // closed its listening socket). Idle connections close
        // at once; busy ones after their response, which says
        // `Connection: close`.
        drop(listener);
        sweeper.abort();
        tokio::select! {
            () = connections.all_closed() => tracing::debug!(worker = self.id, "all connections closed"),
            () = tokio::time::sleep(timeout) => tracing::warn!(worker = self.id, "shutdown timeout ({timeout:?}) reached; closing remaining connections"),
        }
    }

    fn serve_connection(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        slot: ConnectionSlot,
        connections: &Arc<Connections>,
    ) {
        if self.shared.state.load().config.tuning.tcp_nodelay {
            let _ = stream.set_nodelay(true);
        }
        let client = peer.ip().to_canonical().to_string();
        let shared = Arc::clone(&self.shared);
        let shutdown = self.shutdown.clone();
        let open = connections.open();
        tokio::spawn(async move {
            downstream::serve(stream, client, shared, shutdown).await;
            drop(slot);
            drop(open);
        });
    }
}

/// The client connections a worker has open, so that shutdown can wait for
/// them.
#[derive(Default)]
struct Connections {
    open: AtomicUsize,
    closed: Notify,
}

impl Connections {
    fn open(self: &Arc<Self>) -> OpenConnection {
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(Arc::clone(self))
    }

    async fn all_closed(&self) {
        loop {
            let notified = self.closed.notified();
            if self.open.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

struct OpenConnection(Arc<Connections>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.closed.notify_waiters();
        }
    }
}

/// One of the `max_connections` places; given back when dropped.
struct ConnectionSlot(Arc<Shared>);

impl ConnectionSlot {
    fn take(shared: &Arc<Shared>, limit: usize) -> Option<ConnectionSlot> {
        let open = shared.open_connections.fetch_add(1, Ordering::Relaxed);
        if open >= limit {
            shared.open_connections.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(ConnectionSlot(Arc::clone(shared)))
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}
