//! The HTTP/1.1 proxy: accepts clients (hyper server), asks the balancer for
//! a backend, forwards over a pooled keep-alive client, and streams both
//! bodies.
//!
//! One request, start to end:
//! accept -> [`handle`] -> pool snapshot of eligible backends -> strategy
//! `select` -> [`ConnectionGuard`](crate::server::ConnectionGuard) raises the
//! backend's active count -> pooled client forwards -> response streams back
//! -> guard drops when the body ends. A failed connect marks the backend
//! (passive health) and the request is retried elsewhere when that is safe.

mod body;
mod error;
mod headers;

use std::cell::RefCell;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{HeaderValue, HOST};
use http::{Method, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use body::{BodySlot, RequestBody, ResponseBody};
pub use error::{describe as describe_error, ProxyError};
pub use headers::{add_forwarded, remove_hop_by_hop};

use crate::balancer::{self, BackendView, Balancer, Decision, LoadError};
use crate::config::Config;
use crate::health;
use crate::server::{Backend, Pool};
use crate::throttle::LogThrottle;

/// How long an idle pooled connection to a backend is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle connections kept per backend.
const POOL_MAX_IDLE_PER_HOST: usize = 256;

/// The upstream client: hyper-util's pooled client, keep-alive per backend.
pub type UpstreamClient = Client<HttpConnector, RequestBody>;

/// Everything a request needs, shared by all connections.
#[derive(Debug)]
pub struct State {
    config: Config,
    pool: Pool,
    balancer: Balancer,
    client: UpstreamClient,
    /// Throttles the "no healthy backend" warning, which would otherwise
    /// come once per request during an outage.
    outage_log: LogThrottle,
}

impl State {
    /// Builds the pool, loads the strategy module (compiling it now, never
    /// per request) and the upstream client.
    pub fn new(config: Config) -> Result<State, StartError> {
        let strategy = balancer::load(&config.strategy, config.sandbox)?;
        let pool = Pool::new(&config.backends).map_err(|e| StartError::Backend(e.to_string()))?;
        Ok(State {
            balancer: Balancer::new(strategy),
            client: upstream_client(&config),
            outage_log: LogThrottle::new(Duration::from_secs(1)),
            pool,
            config,
        })
    }

    /// The configuration this state was built from.
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
    fn pick(&self, exclude: &[u32]) -> Result<&Arc<Backend>, ProxyError> {
        thread_local! {
            // One buffer per worker thread: no allocation per request once
            // it has grown to the number of backends.
            static ELIGIBLE: RefCell<Vec<BackendView>> = const { RefCell::new(Vec::new()) };
        }
        ELIGIBLE.with(|buf| {
            let mut buf = buf.borrow_mut();
            self.pool.eligible(exclude, &mut buf);
            match self.balancer.select(&buf) {
                Decision::Backend(i) => Ok(self
                    .pool
                    .get(buf[i].id)
                    .expect("eligible ids come from the pool")),
                Decision::Refused => Err(ProxyError::Refused),
                Decision::NoneEligible => {
                    if let Some(suppressed) = self.outage_log.allow() {
                        tracing::warn!(suppressed, "no healthy backend: answering 503");
                    }
                    Err(ProxyError::NoHealthyBackend)
                }
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

fn upstream_client(config: &Config) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(config.connect_timeout));
    connector.set_nodelay(true);
    connector.enforce_http(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
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
    /// The listen address could not be bound.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// Methods whose requests may be sent twice without changing the outcome
/// (RFC 9110 §9.2.2).
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Serves one client request: picks a backend, forwards, retries when safe.
pub async fn handle(
    state: Arc<State>,
    client: SocketAddr,
    request: Request<Incoming>,
) -> Response<ResponseBody> {
    match forward(&state, client, request).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn forward(
    state: &State,
    client: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<ResponseBody>, ProxyError> {
    let (mut parts, body) = request.into_parts();
    let host = parts.headers.get(HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    remove_hop_by_hop(&mut parts.headers);
    add_forwarded(&mut parts.headers, client.ip(), host.as_ref());
    let path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    let body = BodySlot::new(body);
    let retry_after_send = is_idempotent(&parts.method) && body.is_empty();
    let max_retries = state.config.health.max_retries as usize;
    let mut tried: Vec<u32> = Vec::new();

    loop {
        let backend = match state.pick(&tried) {
            Ok(backend) => backend,
            // Every other backend is out: the answer is the failure of the
            // attempt already made, not an outage.
            Err(ProxyError::NoHealthyBackend) if !tried.is_empty() => {
                return Err(ProxyError::Upstream)
            }
            Err(error) => return Err(error),
        };
        let Some(attempt_body) = body.body() else {
            return Err(ProxyError::Upstream);
        };
        let uri = Uri::builder()
            .scheme("http")
            .authority(backend.authority().clone())
            .path_and_query(path_and_query.clone())
            .build()
            .map_err(|_| ProxyError::BadRequest)?;
        let mut upstream = Request::new(attempt_body);
        *upstream.method_mut() = parts.method.clone();
        *upstream.uri_mut() = uri;
        *upstream.version_mut() = Version::HTTP_11;
        *upstream.headers_mut() = parts.headers.clone();

        let guard = backend.track();
        let sent = Instant::now();
        match state.client.request(upstream).await {
            Ok(response) => {
                backend.record_latency(sent.elapsed());
                let health = &state.config.health;
                backend.observe_health(true, health.healthy_threshold, health.unhealthy_threshold);
                let (mut parts, body) = response.into_parts();
                remove_hop_by_hop(&mut parts.headers);
                return Ok(Response::from_parts(
                    parts,
                    ResponseBody::upstream(body, guard),
                ));
            }
            Err(error) => {
                drop(guard);
                let connect_failed = error.is_connect();
                let reason = error::describe(&error);
                state.passive_failure(backend, &reason);
                tried.push(backend.id());
                let may_retry = connect_failed || retry_after_send;
                if may_retry && tried.len() <= max_retries {
                    tracing::debug!(
                        backend = backend.address(),
                        "retrying on another backend after: {reason}"
                    );
                    continue;
                }
                tracing::warn!(
                    backend = backend.address(),
                    method = %parts.method,
                    path = %path_and_query,
                    "upstream request failed: {reason}"
                );
                return Err(ProxyError::Upstream);
            }
        }
    }
}

/// A running balancer: its listener, accept loop and health checker.
#[derive(Debug)]
pub struct Proxy {
    local_addr: SocketAddr,
    state: Arc<State>,
    shutdown: watch::Sender<Option<Duration>>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Loads the strategy, binds `config.listen_address` and starts serving
    /// and health checking. Must be called inside a tokio runtime.
    pub async fn start(config: Config) -> Result<Proxy, StartError> {
        let address = config.listen_address;
        let state = Arc::new(State::new(config)?);
        let listener = TcpListener::bind(address)
            .await
            .map_err(|source| StartError::Bind { address, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| StartError::Bind { address, source })?;
        let (shutdown, signal) = watch::channel(None);
        let task = tokio::spawn(serve(listener, Arc::clone(&state), signal));
        Ok(Proxy {
            local_addr,
            state,
            shutdown,
            task,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The shared state: pool, balancer, config.
    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// Stops accepting, lets requests in flight finish for up to `timeout`,
    /// then returns.
    pub async fn shutdown(self, timeout: Duration) {
        let _ = self.shutdown.send(Some(timeout));
        let _ = self.task.await;
    }
}

async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    mut shutdown: watch::Receiver<Option<Duration>>,
) {
    let graceful = GracefulShutdown::new();
    let checker = tokio::spawn(health::run(Arc::clone(&state)));
    let timeout = loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => serve_connection(stream, peer, &state, &graceful),
                Err(error) => {
                    // Out of descriptors or a connection reset before accept:
                    // back off briefly instead of spinning, keep serving.
                    tracing::warn!("accept failed: {error}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            changed = shutdown.changed() => {
                break match changed {
                    Ok(()) => shutdown.borrow().unwrap_or_default(),
                    Err(_) => Duration::ZERO,
                };
            }
        }
    };
    drop(listener);
    checker.abort();
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(timeout) => tracing::warn!("shutdown timeout ({timeout:?}) reached; closing remaining connections"),
    }
}

fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    state: &Arc<State>,
    graceful: &GracefulShutdown,
) {
    let _ = stream.set_nodelay(true);
    let state = Arc::clone(state);
    let service = service_fn(move |request| {
        let state = Arc::clone(&state);
        async move { Ok::<_, Infallible>(handle(state, peer, request).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    let connection = graceful.watch(connection);
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%peer, "client connection ended: {error}");
        }
    });
}
