//! Configuration: file -> raw types -> validated [`Config`].
//!
//! ```text
//!  config.json / .yaml ──serde──▶ RawConfig ──validate()──▶ Config ──▶ runtime
//!   (unknown keys rejected)        (as written)              (typed, checked)
//! ```
//!
//! The original format (`listen_address`, `backend_servers` as `"host:port"`
//! strings, `health_check_interval`, `health_check_timeout`) keeps working
//! unchanged; every key added since has a default. Only a validated [`Config`]
//! reaches the runtime, and every error names the file and the field.

mod raw;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use raw::{RawBackend, RawConfig};

/// Default `health_check_interval`, in seconds.
pub const DEFAULT_HEALTH_CHECK_INTERVAL: f64 = 10.0;
/// Default `health_check_timeout`, in seconds.
pub const DEFAULT_HEALTH_CHECK_TIMEOUT: f64 = 2.0;
/// Default `connect_timeout`, in seconds: long enough for a loaded LAN peer,
/// short enough that a dead backend costs a client little.
pub const DEFAULT_CONNECT_TIMEOUT: f64 = 3.0;
/// Default fuel (roughly, wasm instructions) one `select` call may burn.
pub const DEFAULT_STRATEGY_FUEL: u64 = 100_000_000;
/// Default wall-clock limit of one `select` call, in seconds.
pub const DEFAULT_STRATEGY_TIMEOUT: f64 = 0.02;
/// Default cap on a strategy instance's linear memory, in MiB.
pub const DEFAULT_STRATEGY_MEMORY_MIB: u64 = 16;
/// Largest accepted backend weight.
pub const MAX_WEIGHT: u64 = 1_000_000;
/// Default `unhealthy_threshold`: consecutive failures that eject a backend.
pub const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 3;
/// Default `healthy_threshold`: consecutive successes that restore a backend.
pub const DEFAULT_HEALTHY_THRESHOLD: u32 = 2;
/// Default `max_retries`: further backends tried after a failed attempt.
pub const DEFAULT_MAX_RETRIES: u32 = 2;

/// Default `shutdown_timeout`, in seconds.
pub const DEFAULT_SHUTDOWN_TIMEOUT: f64 = 30.0;
/// Default `client_header_timeout`, in seconds.
pub const DEFAULT_CLIENT_HEADER_TIMEOUT: f64 = 10.0;
/// Default `request_timeout`, in seconds (as nginx's `proxy_read_timeout`).
pub const DEFAULT_REQUEST_TIMEOUT: f64 = 60.0;
/// Default `max_request_header_kib`.
pub const DEFAULT_MAX_REQUEST_HEADER_KIB: u32 = 64;
/// Default `max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;
/// Default `client_keepalive_timeout`, in seconds (as nginx's
/// `keepalive_timeout`).
pub const DEFAULT_CLIENT_KEEPALIVE_TIMEOUT: f64 = 75.0;
/// Default `listen_backlog` (as tokio's and HAProxy's).
pub const DEFAULT_LISTEN_BACKLOG: u32 = 1024;
/// Default `upstream_keepalive`: idle connections kept per backend and
/// worker thread.
pub const DEFAULT_UPSTREAM_KEEPALIVE: u32 = 128;
/// Default `upstream_idle_timeout`, in seconds.
pub const DEFAULT_UPSTREAM_IDLE_TIMEOUT: f64 = 60.0;
/// Default `outlier_consecutive_5xx`: consecutive 5xx answers that eject a
/// backend (as Envoy's `consecutive_5xx`).
pub const DEFAULT_OUTLIER_CONSECUTIVE_5XX: u32 = 5;
/// Default `outlier_base_ejection_time`, in seconds (as Envoy's).
pub const DEFAULT_OUTLIER_BASE_EJECTION_TIME: f64 = 30.0;
/// Default `outlier_max_ejection_percent`.
pub const DEFAULT_OUTLIER_MAX_EJECTION_PERCENT: u32 = 50;
/// Default `tunnel_idle_timeout`, in seconds: an hour, as a WebSocket
/// connection may be quiet for long between messages.
pub const DEFAULT_TUNNEL_IDLE_TIMEOUT: f64 = 3600.0;
/// Default `dns_refresh`, in seconds: how often backend names are
/// resolved again (sooner if the records' TTL asks).
pub const DEFAULT_DNS_REFRESH: f64 = 5.0;
/// Shortest `dns_refresh`, in seconds: a DNS server is not asked more often
/// than this, whatever the records' TTL.
pub const MIN_DNS_REFRESH: f64 = 1.0;
/// Most worker threads accepted.
pub const MAX_WORKER_THREADS: u32 = 256;

/// Most header names `strategy_headers` may list.
pub const MAX_STRATEGY_HEADERS: usize = 32;

/// The names of the strategies built into the binary.
pub const BUILTIN_STRATEGIES: [&str; 5] = [
    "round-robin",
    "least-connections",
    "weighted-round-robin",
    "consistent-hash",
    "peak-ewma",
];

/// Host-compiled twins of the built-ins, for measuring the sandbox's cost.
pub const NATIVE_STRATEGIES: [&str; 3] = [
    "native:round-robin",
    "native:least-connections",
    "native:weighted-round-robin",
];

/// A validated configuration: what the runtime is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where the balancer accepts client connections.
    pub listen_address: SocketAddr,
    /// The backends, in configured order (a backend's id is its position).
    pub backends: Vec<BackendConfig>,
    /// Which strategy module picks backends.
    pub strategy: StrategySource,
    /// Limits applied to every `select` call of the strategy module.
    pub sandbox: SandboxLimits,
    /// One strategy instance for the process, or one per worker.
    pub strategy_scope: StrategyScope,
    /// Health checking and retry settings.
    pub health: HealthConfig,
    /// How long connecting to a backend may take before it counts as failed.
    pub connect_timeout: Duration,
    /// Where the admin API and `/metrics` listen; off when `None`.
    pub admin_address: Option<SocketAddr>,
    /// Whether to log one line per request.
    pub access_log: bool,
    /// How long requests in flight may take to finish after a stop signal.
    pub shutdown_timeout: Duration,
    /// Limits on what clients may do.
    pub clients: ClientLimits,
    /// Threads, sockets and pools.
    pub tuning: Tuning,
    /// The request value whose hash a 0.2.0 strategy gets as `hash-key`.
    pub hash_key: Option<HashKey>,
    /// Request headers a 0.2.0 strategy sees, lowercase.
    pub strategy_headers: Vec<String>,
    /// `strategy_options`, passed to a 0.2.0 strategy's `configure` as JSON
    /// text (an empty object when absent).
    pub strategy_options: serde_json::Value,
    /// The TLS listener (`tls_listen_address` and its certificates); off
    /// when `None`.
    pub tls: Option<TlsListener>,
    /// `upstream_ca_file`: the PEM bundle TLS backends are verified against
    /// instead of the built-in roots.
    pub upstream_ca_file: Option<PathBuf>,
    /// How long an upgraded connection (a WebSocket tunnel) may carry no
    /// bytes either way before it is closed.
    pub tunnel_idle_timeout: Duration,
    /// `dns_refresh`: how often backend names are resolved again (sooner
    /// when the records' TTL is shorter, never under [`MIN_DNS_REFRESH`]).
    pub dns_refresh: Duration,
    /// `resolver`: the DNS server (`IP:port`) that resolves backend names;
    /// `None`: the system's configuration (`/etc/resolv.conf`).
    pub resolver: Option<SocketAddr>,
}

/// `strategy_scope`: how many instances of the strategy module serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StrategyScope {
    /// `"process"` (the default): one instance, called by every worker in
    /// turn; round robin is exact over all requests.
    #[default]
    Process,
    /// `"worker"`: one instance per worker thread, no lock shared between
    /// workers; round robin is exact per worker.
    Worker,
}

impl StrategyScope {
    /// As written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            StrategyScope::Process => "process",
            StrategyScope::Worker => "worker",
        }
    }
}

/// Where and how the balancer terminates TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsListener {
    /// `tls_listen_address`.
    pub address: SocketAddr,
    /// `tls_certificates`, in configured order: the first is served when no
    /// other matches the client's SNI (or it sent none).
    pub certificates: Vec<CertificateFiles>,
    /// `tls_min_version`.
    pub min_version: TlsVersion,
}

/// A certificate chain and its private key, PEM files (paths resolved
/// against the config file's folder).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFiles {
    /// The chain, leaf first (`fullchain.pem`).
    pub cert: PathBuf,
    /// The leaf's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// The oldest TLS version a client may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3 (the default).
    Tls12,
    /// TLS 1.3 only.
    Tls13,
}

impl TlsVersion {
    /// As written in the config: `"1.2"` or `"1.3"`.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsVersion::Tls12 => "1.2",
            TlsVersion::Tls13 => "1.3",
        }
    }
}

/// Which request value `hash_key` names: its XXH3-64 is the request's
/// `hash-key` for a 0.2.0 strategy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// `client_ip`: the client's address as text, e.g. `127.0.0.1`.
    ClientIp,
    /// `header:NAME`: the first such header's value, trimmed (name lowercase).
    Header(String),
    /// `cookie:NAME`: that cookie's value.
    Cookie(String),
    /// `query:NAME`: that query parameter's raw (undecoded) value.
    Query(String),
    /// `path`: the path without the query.
    Path,
    /// `uri`: path and query.
    Uri,
}

impl fmt::Display for HashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HashKey::ClientIp => f.write_str("client_ip"),
            HashKey::Header(name) => write!(f, "header:{name}"),
            HashKey::Cookie(name) => write!(f, "cookie:{name}"),
            HashKey::Query(name) => write!(f, "query:{name}"),
            HashKey::Path => f.write_str("path"),
            HashKey::Uri => f.write_str("uri"),
        }
    }
}

impl HashKey {
    /// Parses a `hash_key` value; the error says what is accepted.
    fn parse(value: &str) -> Result<HashKey, String> {
        let expected = "expected client_ip, header:NAME, cookie:NAME, query:NAME, path or uri";
        let value = value.trim();
        let named = |kind: &str, name: &str| -> Result<String, String> {
            if name.is_empty() {
                return Err(format!("{value:?} names no {kind} ({expected})"));
            }
            Ok(name.to_string())
        };
        Ok(match value.split_once(':') {
            None if value == "client_ip" => HashKey::ClientIp,
            None if value == "path" => HashKey::Path,
            None if value == "uri" => HashKey::Uri,
            Some(("header", name)) => {
                let name = named("header", name)?.to_ascii_lowercase();
                check_header_name(&name)?;
                HashKey::Header(name)
            }
            Some(("cookie", name)) => {
                let name = named("cookie", name)?;
                if !crate::fields::is_token(&name) {
                    return Err(format!("{name:?} is not a valid cookie name"));
                }
                HashKey::Cookie(name)
            }
            Some(("query", name)) => HashKey::Query(named("query parameter", name)?),
            _ => return Err(format!("unknown hash key {value:?}: {expected}")),
        })
    }
}

/// A header name a strategy may be shown: a valid field name that is not
/// hop-by-hop (those are removed before the strategy is asked).
fn check_header_name(name: &str) -> Result<(), String> {
    if !crate::fields::is_token(name) {
        return Err(format!("{name:?} is not a valid header name"));
    }
    if crate::fields::is_hop_by_hop(name) {
        return Err(format!(
            "{name:?} is a hop-by-hop header, removed before a strategy is asked; it is never seen"
        ));
    }
    Ok(())
}

/// How the proxy uses threads, sockets and upstream connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// Threads that accept and serve client connections, each with its own
    /// event loop and upstream pool.
    pub worker_threads: usize,
    /// The listen socket's accept queue length.
    pub listen_backlog: u32,
    /// Whether `TCP_NODELAY` is set on client and backend connections.
    pub tcp_nodelay: bool,
    /// Idle keep-alive connections kept per backend and worker thread.
    pub upstream_keepalive: usize,
    /// How long an idle upstream connection is kept.
    pub upstream_idle_timeout: Duration,
}

impl Default for Tuning {
    /// Defaults: one worker per CPU, backlog 1024, `TCP_NODELAY` on, 128
    /// idle upstream connections per backend and worker, kept 60 s.
    fn default() -> Self {
        Tuning {
            worker_threads: default_worker_threads(),
            listen_backlog: DEFAULT_LISTEN_BACKLOG,
            tcp_nodelay: true,
            upstream_keepalive: DEFAULT_UPSTREAM_KEEPALIVE as usize,
            upstream_idle_timeout: Duration::from_secs_f64(DEFAULT_UPSTREAM_IDLE_TIMEOUT),
        }
    }
}

/// The number of CPUs this process may run on (at least 1).
pub fn default_worker_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Limits on client connections and requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientLimits {
    /// Time a client has to send a whole request head, counted from its
    /// first byte.
    pub header_timeout: Duration,
    /// How long a connection may wait for the first byte of its next
    /// request (after accept, or after the previous response).
    pub keepalive_timeout: Duration,
    /// Time a backend has to start answering once the request is sent.
    pub request_timeout: Duration,
    /// Largest request head (request line and headers), in bytes.
    pub max_header_bytes: usize,
    /// Most client connections open at once.
    pub max_connections: usize,
}

impl Default for ClientLimits {
    /// Defaults: 10 s for the head, 75 s idle, 60 s for the backend, 64 KiB
    /// of head, 10,000 connections.
    fn default() -> Self {
        ClientLimits {
            header_timeout: Duration::from_secs_f64(DEFAULT_CLIENT_HEADER_TIMEOUT),
            keepalive_timeout: Duration::from_secs_f64(DEFAULT_CLIENT_KEEPALIVE_TIMEOUT),
            request_timeout: Duration::from_secs_f64(DEFAULT_REQUEST_TIMEOUT),
            max_header_bytes: (DEFAULT_MAX_REQUEST_HEADER_KIB as usize) << 10,
            max_connections: DEFAULT_MAX_CONNECTIONS as usize,
        }
    }
}

/// One configured backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// `host:port` as written in the config (the host may be a name).
    pub address: String,
    /// Relative share of traffic for weighted strategies; at least 1.
    pub weight: u32,
    /// Operator-given labels (zone, version, ...), sorted by key; shown to
    /// 0.2.0 strategies in `configure`.
    pub labels: BTreeMap<String, String>,
    /// Whether the balancer speaks TLS to it, and the name it verifies.
    pub tls: Option<BackendTls>,
}

/// TLS to a backend (`"tls": true`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendTls {
    /// The name sent as SNI and checked against the backend's certificate:
    /// `tls_server_name`, by default the host part of the address (a DNS
    /// name or an IP address).
    pub server_name: String,
}

impl BackendConfig {
    /// A backend at `address` with weight 1 and no labels.
    pub fn new(address: impl Into<String>) -> BackendConfig {
        BackendConfig {
            address: address.into(),
            weight: 1,
            labels: BTreeMap::new(),
            tls: None,
        }
    }
}

/// Where the strategy module comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StrategySource {
    /// One of [`BUILTIN_STRATEGIES`], embedded in the binary.
    Builtin(String),
    /// A `.wasm` component on disk (relative paths already resolved against
    /// the config file's folder).
    Path(PathBuf),
    /// One of [`NATIVE_STRATEGIES`]: the same algorithm compiled into the
    /// host, outside the sandbox. A measuring aid (how much the wasm call
    /// costs), not a way to extend the balancer.
    Native(String),
}

impl fmt::Display for StrategySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StrategySource::Builtin(name) => f.write_str(name),
            StrategySource::Path(path) => write!(f, "{}", path.display()),
            StrategySource::Native(name) => f.write_str(name),
        }
    }
}

/// Limits of the wasm sandbox, per `select` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SandboxLimits {
    /// Fuel (about one unit per wasm instruction) per call.
    pub fuel: u64,
    /// Wall-clock deadline per call.
    pub timeout: Duration,
    /// Cap on the instance's linear memory, in bytes.
    pub memory_bytes: usize,
}

impl Default for SandboxLimits {
    /// Defaults: 100 million fuel, 20 ms, 16 MiB.
    fn default() -> Self {
        SandboxLimits {
            fuel: DEFAULT_STRATEGY_FUEL,
            timeout: Duration::from_secs_f64(DEFAULT_STRATEGY_TIMEOUT),
            memory_bytes: (DEFAULT_STRATEGY_MEMORY_MIB as usize) << 20,
        }
    }
}

/// Active and passive health checking, and retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// Time between two rounds of active checks.
    pub interval: Duration,
    /// Time one check may take.
    pub timeout: Duration,
    /// `GET` this path (expecting 2xx/3xx) instead of a bare TCP connect.
    pub path: Option<String>,
    /// Consecutive successes that bring an unhealthy backend back.
    pub healthy_threshold: u32,
    /// Consecutive failures that take a healthy backend out.
    pub unhealthy_threshold: u32,
    /// How many other backends a failed request may be retried on.
    pub max_retries: u32,
    /// Ejection of backends that answer with 5xx.
    pub outlier: OutlierConfig,
}

/// Outlier detection on responses: a backend that answers
/// `consecutive_5xx` times in a row with a 5xx is taken out for
/// `base_ejection_time`, twice as long on each ejection in a row, up to ten
/// times that, while at most `max_ejection_percent` of the backends are
/// out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierConfig {
    /// `outlier_consecutive_5xx`; 0 turns outlier detection off.
    pub consecutive_5xx: u32,
    /// `outlier_base_ejection_time`.
    pub base_ejection_time: Duration,
    /// `outlier_max_ejection_percent`, 0 to 100.
    pub max_ejection_percent: u32,
}

impl Default for OutlierConfig {
    /// Defaults: 5 in a row, 30 s, at most 50 % of the backends.
    fn default() -> Self {
        OutlierConfig {
            consecutive_5xx: DEFAULT_OUTLIER_CONSECUTIVE_5XX,
            base_ejection_time: Duration::from_secs_f64(DEFAULT_OUTLIER_BASE_EJECTION_TIME),
            max_ejection_percent: DEFAULT_OUTLIER_MAX_EJECTION_PERCENT,
        }
    }
}

impl Default for HealthConfig {
    /// Defaults: every 10 s, 2 s timeout, TCP check, 2 up, 3 down, 2 retries.
    fn default() -> Self {
        HealthConfig {
            interval: Duration::from_secs_f64(DEFAULT_HEALTH_CHECK_INTERVAL),
            timeout: Duration::from_secs_f64(DEFAULT_HEALTH_CHECK_TIMEOUT),
            path: None,
            healthy_threshold: DEFAULT_HEALTHY_THRESHOLD,
            unhealthy_threshold: DEFAULT_UNHEALTHY_THRESHOLD,
            max_retries: DEFAULT_MAX_RETRIES,
            outlier: OutlierConfig::default(),
        }
    }
}

/// The syntax of a config file, chosen by its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `.json`, and any extension other than the YAML ones.
    Json,
    /// `.yaml` or `.yml`.
    Yaml,
}

impl Format {
    /// YAML for `.yaml`/`.yml` (any case), JSON otherwise.
    pub fn from_path(path: &Path) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some(ext) if ext.eq_ignore_ascii_case("yaml") || ext.eq_ignore_ascii_case("yml") => {
                Format::Yaml
            }
            _ => Format::Json,
        }
    }
}

/// Why a configuration could not be loaded. Each variant's message names the
/// file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not valid JSON/YAML, or has an unknown or mistyped key.
    #[error("{}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// The file parsed, but a value is not acceptable.
    #[error("{}: {field}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key, e.g. `backend_servers[1].weight`.
        field: String,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// Reads, parses and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, Format::from_path(path), path)
    }

    /// Parses and validates config `text`; `path` names the file in errors and
    /// its folder anchors a relative strategy module path.
    pub fn parse(text: &str, format: Format, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = match format {
            Format::Json => serde_json::from_str(text).map_err(|e| e.to_string()),
            Format::Yaml => serde_norway::from_str(text).map_err(|e| e.to_string()),
        }
        .map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        raw.validate(path)
    }

    /// A config with the given listen address and backends (weight 1) and
    /// every other setting at its default; the starting point for embedders
    /// and tests.
    pub fn new(listen_address: SocketAddr, backends: &[&str]) -> Config {
        Config {
            listen_address,
            backends: backends.iter().map(|a| BackendConfig::new(*a)).collect(),
            strategy: StrategySource::Builtin("round-robin".into()),
            sandbox: SandboxLimits::default(),
            strategy_scope: StrategyScope::Process,
            health: HealthConfig::default(),
            connect_timeout: Duration::from_secs_f64(DEFAULT_CONNECT_TIMEOUT),
            admin_address: None,
            access_log: false,
            shutdown_timeout: Duration::from_secs_f64(DEFAULT_SHUTDOWN_TIMEOUT),
            clients: ClientLimits::default(),
            tuning: Tuning::default(),
            hash_key: None,
            strategy_headers: Vec::new(),
            strategy_options: empty_options(),
            tls: None,
            upstream_ca_file: None,
            tunnel_idle_timeout: Duration::from_secs_f64(DEFAULT_TUNNEL_IDLE_TIMEOUT),
            dns_refresh: Duration::from_secs_f64(DEFAULT_DNS_REFRESH),
            resolver: None,
        }
    }

    /// `strategy_options` as the JSON text `configure` gets.
    pub fn strategy_options_json(&self) -> String {
        self.strategy_options.to_string()
    }

    /// The effective config in the file's own format, every default filled
    /// in: what `GET /config` on the admin API shows.
    pub fn to_json(&self) -> serde_json::Value {
        let backends: Vec<serde_json::Value> = self
            .backends
            .iter()
            .map(|b| {
                let mut backend = serde_json::json!({"address": b.address, "weight": b.weight, "labels": b.labels});
                if let Some(tls) = &b.tls {
                    backend["tls"] = true.into();
                    backend["tls_server_name"] = tls.server_name.clone().into();
                }
                backend
            })
            .collect();
        let certificates = self.tls.as_ref().map(|t| {
            t.certificates
                .iter()
                .map(|c| serde_json::json!({"cert": c.cert, "key": c.key}))
                .collect::<Vec<_>>()
        });
        serde_json::json!({
            "listen_address": self.listen_address.to_string(),
            "backend_servers": backends,
            "strategy": self.strategy.to_string(),
            "strategy_scope": self.strategy_scope.as_str(),
            "health_check_interval": self.health.interval.as_secs_f64(),
            "health_check_timeout": self.health.timeout.as_secs_f64(),
            "health_check_path": self.health.path,
            "healthy_threshold": self.health.healthy_threshold,
            "unhealthy_threshold": self.health.unhealthy_threshold,
            "max_retries": self.health.max_retries,
            "outlier_consecutive_5xx": self.health.outlier.consecutive_5xx,
            "outlier_base_ejection_time": self.health.outlier.base_ejection_time.as_secs_f64(),
            "outlier_max_ejection_percent": self.health.outlier.max_ejection_percent,
            "connect_timeout": self.connect_timeout.as_secs_f64(),
            "strategy_fuel": self.sandbox.fuel,
            "strategy_timeout": self.sandbox.timeout.as_secs_f64(),
            "strategy_memory_mib": self.sandbox.memory_bytes >> 20,
            "admin_address": self.admin_address.map(|a| a.to_string()),
            "access_log": self.access_log,
            "shutdown_timeout": self.shutdown_timeout.as_secs_f64(),
            "client_header_timeout": self.clients.header_timeout.as_secs_f64(),
            "request_timeout": self.clients.request_timeout.as_secs_f64(),
            "max_request_header_kib": self.clients.max_header_bytes >> 10,
            "max_connections": self.clients.max_connections,
            "client_keepalive_timeout": self.clients.keepalive_timeout.as_secs_f64(),
            "worker_threads": self.tuning.worker_threads,
            "listen_backlog": self.tuning.listen_backlog,
            "tcp_nodelay": self.tuning.tcp_nodelay,
            "upstream_keepalive": self.tuning.upstream_keepalive,
            "upstream_idle_timeout": self.tuning.upstream_idle_timeout.as_secs_f64(),
            "hash_key": self.hash_key.as_ref().map(|k| k.to_string()),
            "strategy_headers": self.strategy_headers,
            "strategy_options": self.strategy_options,
            "tls_listen_address": self.tls.as_ref().map(|t| t.address.to_string()),
            "tls_certificates": certificates,
            "tls_min_version": self.tls.as_ref().map_or(TlsVersion::Tls12, |t| t.min_version).as_str(),
            "upstream_ca_file": self.upstream_ca_file,
            "tunnel_idle_timeout": self.tunnel_idle_timeout.as_secs_f64(),
            "dns_refresh": self.dns_refresh.as_secs_f64(),
            "resolver": self.resolver.map(|a| a.to_string()),
        })
    }

    /// A one-line summary, as `--check` prints it.
    pub fn summary(&self) -> String {
        format!(
            "listen {}, {} backend{}, strategy {}",
            self.listen_address,
            self.backends.len(),
            if self.backends.len() == 1 { "" } else { "s" },
            self.strategy
        )
    }
}

impl RawConfig {
    fn validate(self, path: &Path) -> Result<Config, ConfigError> {
        let invalid = |field: &str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            field: field.to_string(),
            message,
        };

        let listen_address: SocketAddr = self.listen_address.trim().parse().map_err(|_| {
            invalid(
                "listen_address",
                format!(
                    "{:?} is not an IP:port address (e.g. \"127.0.0.1:8080\")",
                    self.listen_address
                ),
            )
        })?;

        if self.backend_servers.is_empty() {
            return Err(invalid(
                "backend_servers",
                "the list is empty; name at least one backend as \"host:port\"".into(),
            ));
        }
        let mut backends = Vec::with_capacity(self.backend_servers.len());
        for (i, backend) in self.backend_servers.into_iter().enumerate() {
            let (address, weight, labels, tls, tls_server_name) = match backend {
                RawBackend::Address(address) => (address, None, None, None, None),
                RawBackend::Object {
                    address,
                    weight,
                    labels,
                    tls,
                    tls_server_name,
                } => (address, weight, labels, tls, tls_server_name),
            };
            let labels = labels.unwrap_or_default();
            if let Some(key) = labels.keys().find(|k| k.trim().is_empty()) {
                return Err(invalid(
                    &format!("backend_servers[{i}].labels"),
                    format!("a label needs a name, got {key:?}"),
                ));
            }
            let address = validate_address(&address)
                .map_err(|m| invalid(&format!("backend_servers[{i}]"), m))?;
            let weight = match weight {
                None => 1,
                Some(w) if w >= 1 && w <= MAX_WEIGHT as i64 => w as u32,
                Some(w) => {
                    return Err(invalid(
                        &format!("backend_servers[{i}].weight"),
                        format!("must be a whole number from 1 to {MAX_WEIGHT}, got {w}"),
                    ))
                }
            };
            if let Some(j) = backends
                .iter()
                .position(|b: &BackendConfig| b.address == address)
            {
                return Err(invalid(
                    &format!("backend_servers[{i}]"),
                    format!("{address:?} is listed twice (also at backend_servers[{j}])"),
                ));
            }
            let tls = match (tls.unwrap_or(false), tls_server_name) {
                (false, None) => None,
                (false, Some(_)) => {
                    return Err(invalid(
                        &format!("backend_servers[{i}].tls_server_name"),
                        "applies only to a backend with \"tls\": true".into(),
                    ))
                }
                (true, name) => {
                    let name = name.unwrap_or_else(|| host_of(&address).to_string());
                    check_server_name(&name).map_err(|m| {
                        invalid(&format!("backend_servers[{i}].tls_server_name"), m)
                    })?;
                    Some(BackendTls { server_name: name })
                }
            };
            backends.push(BackendConfig {
                address,
                weight,
                labels,
                tls,
            });
        }

        let strategy = match self.strategy {
            None => StrategySource::Builtin("round-robin".into()),
            Some(s) => parse_strategy(&s, path).map_err(|m| invalid("strategy", m))?,
        };

        let seconds = |field: &str, value: Option<f64>, default: f64| {
            let v = value.unwrap_or(default);
            if v.is_finite() && v > 0.0 && v <= 86_400.0 {
                Ok(Duration::from_secs_f64(v))
            } else {
                Err(invalid(
                    field,
                    format!("must be a number of seconds above 0 and at most 86400, got {v}"),
                ))
            }
        };
        let at_least_one = |field: &str, value: Option<u32>, default: u32| match value {
            Some(0) => Err(invalid(field, "must be at least 1, got 0".into())),
            Some(v) => Ok(v),
            None => Ok(default),
        };

        let health_check_path = match self.health_check_path {
            Some(p) if !p.starts_with('/') || p.chars().any(|c| c.is_whitespace()) => {
                return Err(invalid(
                    "health_check_path",
                    format!("{p:?} must start with '/' and contain no spaces"),
                ))
            }
            other => other,
        };
        let health = HealthConfig {
            interval: seconds(
                "health_check_interval",
                self.health_check_interval,
                DEFAULT_HEALTH_CHECK_INTERVAL,
            )?,
            timeout: seconds(
                "health_check_timeout",
                self.health_check_timeout,
                DEFAULT_HEALTH_CHECK_TIMEOUT,
            )?,
            path: health_check_path,
            healthy_threshold: at_least_one(
                "healthy_threshold",
                self.healthy_threshold,
                DEFAULT_HEALTHY_THRESHOLD,
            )?,
            unhealthy_threshold: at_least_one(
                "unhealthy_threshold",
                self.unhealthy_threshold,
                DEFAULT_UNHEALTHY_THRESHOLD,
            )?,
            max_retries: self.max_retries.unwrap_or(DEFAULT_MAX_RETRIES),
            outlier: OutlierConfig {
                consecutive_5xx: self
                    .outlier_consecutive_5xx
                    .unwrap_or(DEFAULT_OUTLIER_CONSECUTIVE_5XX),
                base_ejection_time: seconds(
                    "outlier_base_ejection_time",
                    self.outlier_base_ejection_time,
                    DEFAULT_OUTLIER_BASE_EJECTION_TIME,
                )?,
                max_ejection_percent: match self.outlier_max_ejection_percent {
                    None => DEFAULT_OUTLIER_MAX_EJECTION_PERCENT,
                    Some(p) if p <= 100 => p,
                    Some(p) => {
                        return Err(invalid(
                            "outlier_max_ejection_percent",
                            format!("must be from 0 to 100, got {p}"),
                        ))
                    }
                },
            },
        };

        let memory_mib = self
            .strategy_memory_mib
            .unwrap_or(DEFAULT_STRATEGY_MEMORY_MIB);
        if !(1..=4096).contains(&memory_mib) {
            return Err(invalid(
                "strategy_memory_mib",
                format!("must be from 1 to 4096, got {memory_mib}"),
            ));
        }
        let fuel = self.strategy_fuel.unwrap_or(DEFAULT_STRATEGY_FUEL);
        if fuel == 0 {
            return Err(invalid("strategy_fuel", "must be at least 1, got 0".into()));
        }
        let strategy_timeout = seconds(
            "strategy_timeout",
            self.strategy_timeout,
            DEFAULT_STRATEGY_TIMEOUT,
        )?;
        if strategy_timeout < Duration::from_millis(1) {
            return Err(invalid(
                "strategy_timeout",
                format!(
                    "must be at least 0.001 s (the sandbox clock ticks every millisecond), got {}",
                    strategy_timeout.as_secs_f64()
                ),
            ));
        }

        let admin_address = match &self.admin_address {
            None => None,
            Some(a) => Some(a.trim().parse::<SocketAddr>().map_err(|_| {
                invalid(
                    "admin_address",
                    format!("{a:?} is not an IP:port address (e.g. \"127.0.0.1:9090\")"),
                )
            })?),
        };
        if admin_address.is_some_and(|a| a == listen_address && a.port() != 0) {
            return Err(invalid(
                "admin_address",
                "must differ from listen_address".into(),
            ));
        }

        let max_header_kib = self
            .max_request_header_kib
            .unwrap_or(DEFAULT_MAX_REQUEST_HEADER_KIB);
        if !(8..=1024).contains(&max_header_kib) {
            return Err(invalid(
                "max_request_header_kib",
                format!("must be from 8 to 1024, got {max_header_kib}"),
            ));
        }

        let worker_threads = match self.worker_threads {
            None => default_worker_threads(),
            Some(n) if (1..=MAX_WORKER_THREADS).contains(&n) => n as usize,
            Some(n) => {
                return Err(invalid(
                    "worker_threads",
                    format!("must be from 1 to {MAX_WORKER_THREADS}, got {n}"),
                ))
            }
        };
        let listen_backlog = self.listen_backlog.unwrap_or(DEFAULT_LISTEN_BACKLOG);
        if !(1..=65_535).contains(&listen_backlog) {
            return Err(invalid(
                "listen_backlog",
                format!("must be from 1 to 65535, got {listen_backlog}"),
            ));
        }
        let tuning = Tuning {
            worker_threads,
            listen_backlog,
            tcp_nodelay: self.tcp_nodelay.unwrap_or(true),
            upstream_keepalive: self
                .upstream_keepalive
                .unwrap_or(DEFAULT_UPSTREAM_KEEPALIVE) as usize,
            upstream_idle_timeout: seconds(
                "upstream_idle_timeout",
                self.upstream_idle_timeout,
                DEFAULT_UPSTREAM_IDLE_TIMEOUT,
            )?,
        };

        let hash_key = match &self.hash_key {
            None => None,
            Some(value) => Some(HashKey::parse(value).map_err(|m| invalid("hash_key", m))?),
        };
        let mut strategy_headers: Vec<String> = Vec::new();
        for (i, name) in self.strategy_headers.unwrap_or_default().iter().enumerate() {
            let field = format!("strategy_headers[{i}]");
            let name = name.trim().to_ascii_lowercase();
            check_header_name(&name).map_err(|m| invalid(&field, m))?;
            if strategy_headers.contains(&name) {
                return Err(invalid(&field, format!("{name:?} is listed twice")));
            }
            strategy_headers.push(name);
        }
        if strategy_headers.len() > MAX_STRATEGY_HEADERS {
            return Err(invalid(
                "strategy_headers",
                format!(
                    "at most {MAX_STRATEGY_HEADERS} names, got {}",
                    strategy_headers.len()
                ),
            ));
        }
        let strategy_options = self.strategy_options.unwrap_or_else(empty_options);
        let strategy_scope = match self.strategy_scope.as_deref().map(str::trim) {
            None | Some("process") => StrategyScope::Process,
            Some("worker") => StrategyScope::Worker,
            Some(other) => {
                return Err(invalid(
                    "strategy_scope",
                    format!("must be \"process\" or \"worker\", got {other:?}"),
                ))
            }
        };

        let min_version = match self.tls_min_version.as_deref().map(str::trim) {
            None | Some("1.2") => TlsVersion::Tls12,
            Some("1.3") => TlsVersion::Tls13,
            Some(other) => {
                return Err(invalid(
                    "tls_min_version",
                    format!("must be \"1.2\" or \"1.3\", got {other:?}"),
                ))
            }
        };
        let tls = match (&self.tls_listen_address, self.tls_certificates) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(invalid(
                    "tls_certificates",
                    "set, but tls_listen_address is not: certificates are only used by the TLS listener".into(),
                ))
            }
            (Some(_), None) => {
                return Err(invalid(
                    "tls_certificates",
                    "required with tls_listen_address: a list of {\"cert\": \"fullchain.pem\", \"key\": \"key.pem\"}".into(),
                ))
            }
            (Some(address), Some(certificates)) => {
                let address: SocketAddr = address.trim().parse().map_err(|_| {
                    invalid(
                        "tls_listen_address",
                        format!("{address:?} is not an IP:port address (e.g. \"0.0.0.0:443\")"),
                    )
                })?;
                if address.port() != 0
                    && (address == listen_address || Some(address) == admin_address)
                {
                    return Err(invalid(
                        "tls_listen_address",
                        "must differ from listen_address and admin_address".into(),
                    ));
                }
                if certificates.is_empty() {
                    return Err(invalid(
                        "tls_certificates",
                        "the list is empty; name at least one {\"cert\": ..., \"key\": ...}".into(),
                    ));
                }
                let certificates = certificates
                    .into_iter()
                    .map(|c| CertificateFiles {
                        cert: relative_to(path, &c.cert),
                        key: relative_to(path, &c.key),
                    })
                    .collect();
                Some(TlsListener {
                    address,
                    certificates,
                    min_version,
                })
            }
        };
        let dns_refresh = seconds("dns_refresh", self.dns_refresh, DEFAULT_DNS_REFRESH)?;
        if dns_refresh < Duration::from_secs_f64(MIN_DNS_REFRESH) {
            return Err(invalid(
                "dns_refresh",
                format!(
                    "must be at least {MIN_DNS_REFRESH} second, got {}",
                    dns_refresh.as_secs_f64()
                ),
            ));
        }
        let resolver = match &self.resolver {
            None => None,
            Some(text) => Some(text.trim().parse::<SocketAddr>().map_err(|_| {
                invalid(
                    "resolver",
                    format!("{text:?} is not an IP:port address (e.g. \"10.0.0.2:53\")"),
                )
            })?),
        };
        let upstream_ca_file = self
            .upstream_ca_file
            .as_deref()
            .map(|f| relative_to(path, f));

        Ok(Config {
            listen_address,
            backends,
            strategy,
            hash_key,
            strategy_headers,
            strategy_options,
            strategy_scope,
            sandbox: SandboxLimits {
                fuel,
                timeout: strategy_timeout,
                memory_bytes: (memory_mib as usize) << 20,
            },
            health,
            connect_timeout: seconds(
                "connect_timeout",
                self.connect_timeout,
                DEFAULT_CONNECT_TIMEOUT,
            )?,
            admin_address,
            access_log: self.access_log.unwrap_or(false),
            shutdown_timeout: seconds(
                "shutdown_timeout",
                self.shutdown_timeout,
                DEFAULT_SHUTDOWN_TIMEOUT,
            )?,
            clients: ClientLimits {
                header_timeout: seconds(
                    "client_header_timeout",
                    self.client_header_timeout,
                    DEFAULT_CLIENT_HEADER_TIMEOUT,
                )?,
                keepalive_timeout: seconds(
                    "client_keepalive_timeout",
                    self.client_keepalive_timeout,
                    DEFAULT_CLIENT_KEEPALIVE_TIMEOUT,
                )?,
                request_timeout: seconds(
                    "request_timeout",
                    self.request_timeout,
                    DEFAULT_REQUEST_TIMEOUT,
                )?,
                max_header_bytes: (max_header_kib as usize) << 10,
                max_connections: at_least_one(
                    "max_connections",
                    self.max_connections,
                    DEFAULT_MAX_CONNECTIONS,
                )? as usize,
            },
            tuning,
            tls,
            upstream_ca_file,
            tunnel_idle_timeout: seconds(
                "tunnel_idle_timeout",
                self.tunnel_idle_timeout,
                DEFAULT_TUNNEL_IDLE_TIMEOUT,
            )?,
            dns_refresh,
            resolver,
        })
    }
}

/// `file` as the config names it: relative paths are resolved against the
/// config file's folder.
fn relative_to(config_path: &Path, file: &str) -> PathBuf {
    let file = Path::new(file.trim());
    if file.is_absolute() {
        file.to_path_buf()
    } else {
        config_path
            .parent()
            .unwrap_or_else(|| Path::new(""))
            .join(file)
    }
}

/// The host part of a validated `host:port` address, without IPv6
/// brackets.
fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// Checks a TLS server name: a DNS name or an IP address.
fn check_server_name(name: &str) -> Result<(), String> {
    rustls_pki_types::ServerName::try_from(name)
        .map(drop)
        .map_err(|_| format!("{name:?} is not a DNS name or IP address"))
}

/// `strategy_options` when the config has none: `{}`.
fn empty_options() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

/// Checks a backend address: `host:port` with a non-empty host (a name, an
/// IPv4 address or a bracketed IPv6 address) and a port from 1 to 65535.
fn validate_address(address: &str) -> Result<String, String> {
    let bad = |why: &str| format!("invalid address {address:?}: {why} (expected \"host:port\")");
    let address = address.trim();
    if address.contains("://") {
        return Err(bad("give host:port without a scheme"));
    }
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| bad("missing port"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| bad("port must be a number from 1 to 65535"))?;
    if host.is_empty() {
        return Err(bad("missing host"));
    }
    let host_ok = if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        inner.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        host.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
    };
    if !host_ok {
        return Err(bad("host is not a name or IP address"));
    }
    // The authority is what the upstream client dials; make sure it parses.
    address
        .parse::<http::uri::Authority>()
        .map_err(|_| bad("not a valid authority"))?;
    Ok(format!("{host}:{port}"))
}

fn parse_strategy(value: &str, config_path: &Path) -> Result<StrategySource, String> {
    let value = value.trim();
    if BUILTIN_STRATEGIES.contains(&value) {
        return Ok(StrategySource::Builtin(value.to_string()));
    }
    if NATIVE_STRATEGIES.contains(&value) {
        return Ok(StrategySource::Native(value.to_string()));
    }
    if value.ends_with(".wasm") {
        return Ok(StrategySource::Path(relative_to(config_path, value)));
    }
    Err(format!(
        "unknown strategy {value:?}: use one of {}, or a path to a .wasm component",
        BUILTIN_STRATEGIES.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_json(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Format::Json, Path::new("/etc/lb/test.json"))
    }

    #[test]
    fn original_format_loads_with_defaults_for_new_keys() {
        let c = parse_json(
            r#"{ "listen_address": "127.0.0.1:8080",
                 "backend_servers": ["127.0.0.1:8081", "127.0.0.1:8082"],
                 "health_check_interval": 30, "health_check_timeout": 5 }"#,
        )
        .unwrap();
        assert_eq!(c.listen_address, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.backends.len(), 2);
        assert_eq!(c.backends[1].address, "127.0.0.1:8082");
        assert_eq!(c.backends[1].weight, 1);
        assert_eq!(c.health.interval, Duration::from_secs(30));
        assert_eq!(c.health.timeout, Duration::from_secs(5));
        assert_eq!(c.strategy, StrategySource::Builtin("round-robin".into()));
    }

    #[test]
    fn object_backends_weights_and_fractional_seconds() {
        let c = parse_json(
            r#"{ "listen_address": "127.0.0.1:0",
                 "backend_servers": [{"address": "localhost:81", "weight": 5}, "[::1]:82"],
                 "health_check_interval": 0.5 }"#,
        )
        .unwrap();
        assert_eq!(c.backends[0].weight, 5);
        assert_eq!(c.backends[0].address, "localhost:81");
        assert_eq!(c.backends[1].address, "[::1]:82");
        assert_eq!(c.health.interval, Duration::from_millis(500));
    }

    #[test]
    fn the_effective_config_reads_back_as_the_same_config() {
        let c = parse_json(
            r#"{"listen_address": "127.0.0.1:1", "backend_servers": ["a:1", {"address": "b:2", "weight": 3}],
                "health_check_path": "/up", "admin_address": "127.0.0.1:2", "access_log": true}"#,
        )
        .unwrap();
        let again = parse_json(&c.to_json().to_string()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn yaml_has_the_same_keys() {
        let c = Config::parse(
            "listen_address: 127.0.0.1:9000\nbackend_servers:\n  - 127.0.0.1:1\n  - address: 127.0.0.1:2\n    weight: 3\nstrategy: weighted-round-robin\n",
            Format::Yaml,
            Path::new("x.yaml"),
        )
        .unwrap();
        assert_eq!(c.backends[1].weight, 3);
        assert_eq!(
            c.strategy,
            StrategySource::Builtin("weighted-round-robin".into())
        );
    }

    #[test]
    fn relative_module_path_resolves_against_config_folder() {
        let c = parse_json(
            r#"{"listen_address": "127.0.0.1:0", "backend_servers": ["a:1"], "strategy": "mods/mine.wasm"}"#,
        )
        .unwrap();
        assert_eq!(
            c.strategy,
            StrategySource::Path(PathBuf::from("/etc/lb/mods/mine.wasm"))
        );
    }

    fn error_of(text: &str) -> String {
        parse_json(text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_problem() {
        let e = error_of(
            r#"{"listen_address": "127.0.0.1:1", "backend_servers": ["a:1"], "helth": 1}"#,
        );
        assert!(
            e.contains("unknown field `helth`") && e.contains("test.json"),
            "{e}"
        );
        let e = error_of(r#"{"listen_address": "127.0.0.1:1", "backend_servers": []}"#);
        assert!(e.contains("backend_servers: the list is empty"), "{e}");
        let e =
            error_of(r#"{"listen_address": "127.0.0.1:1", "backend_servers": ["a:1", "nope"]}"#);
        assert!(
            e.contains("backend_servers[1]: invalid address \"nope\": missing port"),
            "{e}"
        );
        let e = error_of(r#"{"listen_address": "127.0.0.1:1", "backend_servers": ["a:99999"]}"#);
        assert!(e.contains("port must be a number"), "{e}");
        let e = error_of(
            r#"{"listen_address": "127.0.0.1:1", "backend_servers": [{"address": "a:1", "weight": 0}]}"#,
        );
        assert!(
            e.contains("backend_servers[0].weight: must be a whole number"),
            "{e}"
        );
        let e = error_of(
            r#"{"listen_address": "127.0.0.1:1", "backend_servers": [{"address": "a:1", "weight": -2}]}"#,
        );
        assert!(e.contains("got -2"), "{e}");
        let e = error_of(
            r#"{"listen_address": "127.0.0.1:1", "backend_servers": [{"address": "a:1", "wieght": 2}]}"#,
        );
        assert!(e.contains("unknown field `wieght`"), "{e}");
        let e = error_of(r#"{"listen_address": "nowhere", "backend_servers": ["a:1"]}"#);
        assert!(
            e.contains("listen_address: \"nowhere\" is not an IP:port"),
            "{e}"
        );
        let e = error_of(
            r#"{"listen_address": "127.0.0.1:1", "backend_servers": ["a:1"], "strategy": "random"}"#,
        );
        assert!(e.contains("strategy: unknown strategy \"random\""), "{e}");
        let e = error_of(
            r#"{"listen_address": "127.0.0.1:1", "backend_servers": ["a:1"], "health_check_timeout": 0}"#,
        );
        assert!(
            e.contains("health_check_timeout: must be a number of seconds"),
            "{e}"
        );
        let e = error_of(r#"{"listen_address": "127.0.0.1:1", "backend_servers": ["a:1", "a:1"]}"#);
        assert!(e.contains("listed twice"), "{e}");
        let e = error_of(r#"{"listen_address": "127.0.0.1:1", "backend_servers": ["http://a:1"]}"#);
        assert!(e.contains("without a scheme"), "{e}");
        let e =
            error_of("{\n\"listen_address\": \"127.0.0.1:1\",\n\"backend_servers\": [\"a:1\",]\n}");
        assert!(e.contains("line 3"), "{e}");
        let e = error_of(r#"{"backend_servers": ["a:1"]}"#);
        assert!(e.contains("missing field `listen_address`"), "{e}");
    }
}
