//! The HTTP/1.1 proxy: listeners, worker threads, client and backend
//! connections. What a request needs from the config (backends, strategy)
//! comes from the current [`generation`](crate::generation).
//!
//! Serving is split over `worker_threads` threads, each with its own
//! single-threaded event loop that accepts client connections and serves
//! them start to end, backend connections included: nothing on the request
//! path crosses to another thread except the strategy call.
//!
//! One request, start to end (`downstream.rs` -> `forward.rs` ->
//! `upstream.rs`): the request head is read and checked, then rewritten for
//! the backend as bytes (`headers.rs`) -> the current
//! [`State`] gives a pool snapshot of eligible
//! backends -> strategy `select` with the request's view (`view.rs`) ->
//! [`ConnectionGuard`](crate::server::ConnectionGuard) raises the backend's
//! active count -> the head (and body, streamed) go out over a pooled
//! keep-alive connection of this thread -> the response head is rewritten
//! for the client and written with what of the body already arrived, the
//! rest streams -> the request is counted and timed, the guard released.
//! Each attempt's outcome (a response head, or why there was none) is
//! recorded once, which feeds passive health, latency, metrics and an
//! observing strategy; a failed attempt is retried elsewhere when that is
//! safe.

mod deadline;
mod downstream;
mod error;
mod forward;
mod headers;
mod http1;
mod idle;
mod parked;
mod tunnel;
mod upstream;
mod view;

use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{oneshot, watch, Notify};

pub use error::{describe as describe_error, ProxyError};
pub use headers::{
    parse_request, parse_response, HeadError, ParsedResponse, RequestHead, ResponseHead,
};
pub use http1::Framing;

use crate::admin;
use crate::config::{Config, DEFAULT_LISTEN_BACKLOG};
use crate::generation::{BuildError, Generations, ReloadError, State};
use crate::handover::{Inherited, Role};
use crate::metrics::Metrics;
use crate::throttle::LogThrottle;
use crate::transport::Stream;

/// Why the balancer could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The first generation could not be built (its strategy module, its
    /// backends).
    #[error(transparent)]
    Build(#[from] BuildError),
    /// A worker thread could not be started.
    #[error("cannot start a worker thread: {0}")]
    Thread(std::io::Error),
    /// A listen address could not be bound (or an inherited socket on it
    /// could not be used).
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// What is shared by every connection and survives reloads.
pub(crate) struct Shared {
    /// The config generation in service, and what outlives it.
    pub(crate) generations: Arc<Generations>,
    /// Client connections open now.
    open_connections: AtomicUsize,
    /// Throttles the "max_connections reached" warning.
    busy_log: LogThrottle,
    /// Throttles the "accept failed" warning (out of descriptors, say).
    accept_log: LogThrottle,
}

impl Shared {
    /// The generation in service.
    fn state(&self) -> Arc<State> {
        self.generations.current()
    }

    fn metrics(&self) -> &Metrics {
        self.generations.metrics()
    }
}

/// A running balancer: its listener, worker threads and health checker.
pub struct Proxy {
    local_addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
    admin_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    shutdown: watch::Sender<Option<Duration>>,
    /// Each worker drops its sender when it has finished.
    workers: Vec<oneshot::Receiver<()>>,
    /// A second descriptor of each listening socket, to hand the sockets
    /// to the new process of an upgrade; closed when shutdown begins, so
    /// that the sockets close with the workers' descriptors.
    held: Vec<(Role, std::net::TcpListener)>,
}

impl Proxy {
    /// Loads the strategy, binds `config.listen_address` (and the admin
    /// address, if set) and starts `worker_threads` serving threads, the
    /// health checker and the admin API. A reload needs a file: see
    /// [`Proxy::start_from_file`]. Must be called inside a tokio runtime,
    /// which runs the health checks and the admin API; client traffic is
    /// served by the workers' own event loops.
    pub async fn start(config: Config) -> Result<Proxy, StartError> {
        Proxy::start_with(config, None, &mut Inherited::default()).await
    }

    /// As [`Proxy::start`], remembering `path` so that [`Proxy::reload`]
    /// (SIGHUP, `POST /reload`) can read it again.
    pub async fn start_from_file(config: Config, path: PathBuf) -> Result<Proxy, StartError> {
        Proxy::start_with(config, Some(path), &mut Inherited::default()).await
    }

    /// As [`Proxy::start_from_file`], serving on the `inherited` sockets
    /// that match the config's addresses instead of binding new ones (a
    /// binary upgrade, systemd socket activation); it takes those it uses.
    pub async fn start_inherited(
        config: Config,
        path: PathBuf,
        inherited: &mut Inherited,
    ) -> Result<Proxy, StartError> {
        Proxy::start_with(config, Some(path), inherited).await
    }

    async fn start_with(
        config: Config,
        config_path: Option<PathBuf>,
        inherited: &mut Inherited,
    ) -> Result<Proxy, StartError> {
        let address = config.listen_address;
        let admin_address = config.admin_address;
        let tuning = config.tuning;
        let workers = tuning.worker_threads.max(1);
        let (generations, first) = Generations::new(config, config_path)?;
        let mut held = Vec::new();
        let listeners = listening(
            inherited,
            Role::Plain,
            address,
            tuning.listen_backlog,
            workers,
        )?;
        let local_addr = listeners[0]
            .local_addr()
            .map_err(|source| StartError::Bind { address, source })?;
        hold(&mut held, Role::Plain, &listeners, address)?;
        let mut per_worker: Vec<Vec<(std::net::TcpListener, bool)>> =
            spread(listeners, workers, false, address)?;
        // The TLS listener, if on: as many sockets, one per worker.
        let mut tls_addr = None;
        if let Some(tls) = first.config().tls.as_ref() {
            let bound = listening(
                inherited,
                Role::Tls,
                tls.address,
                tuning.listen_backlog,
                workers,
            )?;
            tls_addr = Some(bound[0].local_addr().map_err(|source| StartError::Bind {
                address: tls.address,
                source,
            })?);
            hold(&mut held, Role::Tls, &bound, tls.address)?;
            for (mine, tls) in per_worker
                .iter_mut()
                .zip(spread(bound, workers, true, tls.address)?)
            {
                mine.extend(tls);
            }
        }
        let admin_listener = match admin_address {
            Some(address) => {
                let listener = match inherited.take(Role::Admin, address).into_iter().next() {
                    Some(listener) => listener,
                    None => bind(address, DEFAULT_LISTEN_BACKLOG)?,
                };
                hold(
                    &mut held,
                    Role::Admin,
                    std::slice::from_ref(&listener),
                    address,
                )?;
                Some(listener)
            }
            None => None,
        };
        let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());

        let shared = Arc::new(Shared {
            generations: Arc::new(generations),
            open_connections: AtomicUsize::new(0),
            busy_log: LogThrottle::new(Duration::from_secs(1)),
            accept_log: LogThrottle::new(Duration::from_secs(1)),
        });
        shared.generations.install(first);
        let (shutdown, signal) = watch::channel(None);
        if let (Some(listener), Some(address)) = (admin_listener, admin_address) {
            let listener = TcpListener::from_std(listener)
                .map_err(|source| StartError::Bind { address, source })?;
            tokio::spawn(admin::serve(
                listener,
                Arc::clone(&shared.generations),
                signal.clone(),
            ));
        }
        let mut workers = Vec::with_capacity(per_worker.len());
        for (id, listeners) in per_worker.into_iter().enumerate() {
            let (done, finished) = oneshot::channel();
            let worker = Worker {
                id,
                shared: Arc::clone(&shared),
                shutdown: signal.clone(),
            };
            std::thread::Builder::new()
                .name(format!("lb-worker-{id}"))
                .spawn(move || worker.run(listeners, done))
                .map_err(StartError::Thread)?;
            workers.push(finished);
        }
        Ok(Proxy {
            local_addr,
            tls_addr,
            admin_addr,
            shared,
            shutdown,
            workers,
            held,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound TLS address, if the TLS listener is on.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// The bound admin address, if the admin listener is on.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Every listening socket (each worker's of the plain and TLS
    /// listeners, and the admin listener's), for a binary upgrade to hand
    /// over; empty once shutdown has begun.
    pub fn listening_sockets(&self) -> Vec<(Role, BorrowedFd<'_>)> {
        self.held
            .iter()
            .map(|(role, listener)| (*role, listener.as_fd()))
            .collect()
    }

    /// The current config generation: pool, balancer, config.
    pub fn state(&self) -> Arc<State> {
        self.shared.state()
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        self.shared.metrics()
    }

    /// Re-reads the config file and swaps the new config in, or keeps the
    /// old one and says why. Returns the new config's summary.
    pub async fn reload(&self) -> Result<String, ReloadError> {
        self.shared.generations.reload().await
    }

    /// Stops accepting, lets requests in flight finish for up to `timeout`
    /// (keep-alive clients are told `Connection: close`), then returns.
    pub async fn shutdown(mut self, timeout: Duration) {
        // The workers' descriptors are then the last of this process's.
        self.held.clear();
        let _ = self.shutdown.send(Some(timeout));
        for finished in std::mem::take(&mut self.workers) {
            // An error only means the worker has gone, which is the point.
            let _ = finished.await;
        }
        self.shared.generations.stop_health_checks();
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
            .field("tls_addr", &self.tls_addr)
            .field("admin_addr", &self.admin_addr)
            .field("workers", &self.workers.len())
            .finish_non_exhaustive()
    }
}

/// The listening sockets of a listener on `address`: the inherited ones
/// for it if there are any (the new process of an upgrade shares the old
/// one's sockets, and with them their accept queues), else one bound per
/// worker.
fn listening(
    inherited: &mut Inherited,
    role: Role,
    address: SocketAddr,
    backlog: u32,
    workers: usize,
) -> Result<Vec<std::net::TcpListener>, StartError> {
    let sockets = inherited.take(role, address);
    if sockets.is_empty() {
        return bind_per_worker(address, backlog, workers);
    }
    tracing::debug!(
        "{} listener on {address}: {} inherited socket(s)",
        role.as_str(),
        sockets.len()
    );
    Ok(sockets)
}

/// Keeps a second descriptor of each of `listeners` in `held`.
fn hold(
    held: &mut Vec<(Role, std::net::TcpListener)>,
    role: Role,
    listeners: &[std::net::TcpListener],
    address: SocketAddr,
) -> Result<(), StartError> {
    for listener in listeners {
        let copy = listener
            .try_clone()
            .map_err(|source| StartError::Bind { address, source })?;
        held.push((role, copy));
    }
    Ok(())
}

/// Deals `sockets` out to `workers`, each tagged `tls`: round the workers
/// when there are at least as many sockets (a worker may get several, as
/// when the old process of an upgrade had more workers), else round the
/// sockets, a worker sharing a socket through a descriptor of its own (one
/// socket from systemd served by every worker).
fn spread(
    sockets: Vec<std::net::TcpListener>,
    workers: usize,
    tls: bool,
    address: SocketAddr,
) -> Result<Vec<Vec<(std::net::TcpListener, bool)>>, StartError> {
    let mut per_worker: Vec<Vec<(std::net::TcpListener, bool)>> =
        (0..workers).map(|_| Vec::new()).collect();
    let count = sockets.len();
    if count >= workers {
        for (i, socket) in sockets.into_iter().enumerate() {
            per_worker[i % workers].push((socket, tls));
        }
    } else {
        for (i, mine) in per_worker.iter_mut().enumerate() {
            let socket = sockets[i % count]
                .try_clone()
                .map_err(|source| StartError::Bind { address, source })?;
            mine.push((socket, tls));
        }
    }
    Ok(per_worker)
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
    fn run(self, listeners: Vec<(std::net::TcpListener, bool)>, done: oneshot::Sender<()>) {
        // A per-worker strategy (strategy_scope "worker") is called through
        // this worker's own instance.
        crate::balancer::set_worker(self.id);
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
            let listeners: std::io::Result<Vec<(TcpListener, bool)>> = listeners
                .into_iter()
                .map(|(listener, tls)| Ok((TcpListener::from_std(listener)?, tls)))
                .collect();
            match listeners {
                Ok(listeners) => self.serve(listeners).await,
                Err(error) => {
                    tracing::error!(worker = self.id, "cannot use the listener: {error}")
                }
            }
        });
        // Connections still open past the shutdown timeout end with the
        // runtime.
        drop(runtime);
        drop(done);
    }

    async fn serve(mut self, listeners: Vec<(TcpListener, bool)>) {
        let connections = Arc::new(Connections::default());
        let shared = Arc::clone(&self.shared);
        let sweeper = tokio::spawn(async move {
            // Idle upstream connections past upstream_idle_timeout close,
            // and those to a backend being drained or no longer in the pool
            // (a reload, or an address gone from a name's answer).
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                // Connections idle a while are parked.
                if let Some(before) = Instant::now().checked_sub(parked::PARK_AFTER) {
                    idle::mark_long_idle(before);
                }
                parked::trim_if_many_parked();
                let state = shared.generations.peek();
                upstream::sweep(state.config().tuning.upstream_idle_timeout, |address| {
                    state.pool().find(address).is_none_or(|b| b.is_draining())
                });
            }
        });
        let mut next = 0;
        let timeout = loop {
            let (accepted, tls) = tokio::select! {
                accepted = accept(&listeners, &mut next) => accepted,
                changed = self.shutdown.changed() => {
                    let timeout = match changed {
                        Ok(()) => self.shutdown.borrow().unwrap_or_default(),
                        Err(_) => Duration::ZERO,
                    };
                    // Idle connections get their grace, busy ones answer
                    // with `Connection: close`.
                    idle::begin_drain(timeout);
                    break timeout;
                }
            };
            {
                match accepted {
                    Ok((stream, peer)) => {
                        let limit = self
                            .shared
                            .generations
                            .peek()
                            .config()
                            .clients
                            .max_connections;
                        match ConnectionSlot::take(&self.shared, limit) {
                            Some(slot) => {
                                self.serve_connection(stream, peer, tls, slot, &connections)
                            }
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
                        // Out of descriptors (EMFILE, ENFILE) most often:
                        // the waiting connection stays in the accept queue,
                        // so accepting again at once would fail again.
                        // This worker pauses (its open connections are
                        // served meanwhile, and may close and give
                        // descriptors back); one line a second at most.
                        let out_of_files = matches!(error.raw_os_error(), Some(23 | 24));
                        if let Some(suppressed) = self.shared.accept_log.allow() {
                            if out_of_files {
                                tracing::warn!(
                                    suppressed,
                                    "accept failed: {error}; pausing accepts briefly (raise the open-file limit or lower max_connections)"
                                );
                            } else {
                                tracing::warn!(suppressed, "accept failed: {error}");
                            }
                        }
                        let pause = if out_of_files { 100 } else { 10 };
                        tokio::time::sleep(Duration::from_millis(pause)).await;
                    }
                }
            }
        };
        // New connections are refused from here on (once every worker has
        // closed its listening socket), unless the new process of an
        // upgrade holds the same sockets: then it accepts them, those
        // already waiting in the accept queue included. Idle connections
        // close after a short grace (a request that arrives meanwhile is
        // answered); busy ones after their response, which says
        // `Connection: close`; tunnels when the timeout is reached.
        drop(listeners);
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
        tls: bool,
        slot: ConnectionSlot,
        connections: &Arc<Connections>,
    ) {
        if self.shared.generations.peek().config().tuning.tcp_nodelay {
            let _ = stream.set_nodelay(true);
        }
        let client = downstream::Client::new(peer.ip().to_canonical(), tls);
        let shared = Arc::clone(&self.shared);
        let held = (slot, connections.open());
        if !tls {
            // The connection's future is spawned as it is, not inside
            // another: its stream, client and guards are stored once, in
            // the task an idle connection keeps.
            tokio::spawn(downstream::serve(
                Stream::Plain(stream),
                client,
                shared,
                held,
            ));
            return;
        }
        tokio::spawn(async move {
            // Boxed: a handshake in progress holds a whole TLS session;
            // inline, it would make every connection's task that much
            // larger for its whole life.
            if let Some(stream) = Box::pin(handshake(stream, &shared, &client)).await {
                downstream::serve(stream, client, shared, held).await;
            }
        });
    }
}

/// Accepts on whichever of a worker's listening sockets has a connection
/// waiting (usually one plain and one TLS socket), starting after the one
/// that accepted last so that none starves; says whether it came over the
/// TLS listener.
async fn accept(
    listeners: &[(TcpListener, bool)],
    next: &mut usize,
) -> (std::io::Result<(TcpStream, SocketAddr)>, bool) {
    std::future::poll_fn(|cx| {
        let count = listeners.len();
        for k in 0..count {
            let i = (*next + k) % count;
            let (listener, tls) = &listeners[i];
            if let Poll::Ready(accepted) = listener.poll_accept(cx) {
                *next = (i + 1) % count;
                return Poll::Ready((accepted, *tls));
            }
        }
        Poll::Pending
    })
    .await
}

/// The server side of a TLS handshake, with the certificates of the
/// generation current now, within `client_header_timeout`. A client that
/// fails it (plain HTTP or garbage on the TLS port, a version below
/// `tls_min_version`, an oversized ClientHello) or stalls in it is cut off
/// and logged at debug; nothing of it reaches a backend.
async fn handshake(tcp: TcpStream, shared: &Shared, client: &downstream::Client) -> Option<Stream> {
    let (acceptor, timeout) = {
        let state = shared.generations.peek();
        (state.tls_acceptor()?, state.config().clients.header_timeout)
    };
    match tokio::time::timeout(timeout, Stream::accept_tls(tcp, &acceptor)).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(error)) => {
            tracing::debug!(client = client.text(), "TLS handshake failed: {error}");
            None
        }
        Err(_) => {
            tracing::debug!(
                client = client.text(),
                "TLS handshake not complete within client_header_timeout ({timeout:?}): closing"
            );
            None
        }
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

/// What counts a client connection as open, for as long as it is.
type Held = (ConnectionSlot, OpenConnection);

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
