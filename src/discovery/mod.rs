//! DNS discovery of backends, as NGINX's `resolve` parameter behaves: a
//! backend whose host is a name stands for every address (A and AAAA) the
//! name resolves to, each a backend with the entry's weight, labels and TLS
//! settings, resolved again in the background every `dns_refresh` seconds
//! (sooner if the records' TTL is shorter).
//!
//! ```text
//!  Config.backends ──expand(addresses)──▶ [Expanded] ──Registry──▶ Pool
//!   (as written:           ▲               IP entries as they are,
//!    IPs and names)        │               a name: one per address
//!                    Discovery::resolve
//!           (last known addresses, kept on failure)
//! ```
//!
//! The config stays as written (`/config`, reloads); the expansion happens
//! each time a generation is built. What a lookup says is handled as NGINX
//! does: an answer with addresses replaces the name's set; an answer that
//! the name has none (NXDOMAIN, or no A/AAAA records) empties it; a failed
//! lookup (timeout, server failure) keeps the last known set and is logged
//! once per failure streak. A lookup never runs on the request path.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_resolver::config::LookupIpStrategy;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::TokioResolver;
use rustc_hash::FxHashMap;

use crate::config::{BackendConfig, Config, MIN_DNS_REFRESH};

/// How long one name's lookup may take, all retries included, before it
/// counts as failed (the last known addresses stay).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// The resolved addresses of every backend name, sorted and without
/// duplicates: what a generation's pool is expanded from.
pub type Addresses = BTreeMap<String, Vec<IpAddr>>;

/// One concrete backend of a generation: a configured IP entry as it is, or
/// one address of a named entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expanded {
    /// The backend, its address an `IP:port` for a discovered one.
    pub config: BackendConfig,
    /// Its entry's position in `backend_servers`.
    pub entry: usize,
    /// The name it was found through; `None` for a configured address.
    pub source: Option<Arc<str>>,
}

/// The host of a validated `host:port` address if it is a name (not an IP
/// address), with its port.
pub fn name_of(address: &str) -> Option<(&str, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    let port = port.parse().ok()?;
    if host.starts_with('[') || host.parse::<IpAddr>().is_ok() {
        return None;
    }
    Some((host, port))
}

/// The distinct names among `backends`, in configured order.
pub fn names(backends: &[BackendConfig]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for (name, _) in backends.iter().filter_map(|b| name_of(&b.address)) {
        if !names.iter().any(|n| n == name) {
            names.push(name.to_string());
        }
    }
    names
}

/// The concrete backends of `backends`, in configured order: an IP entry as
/// it is; a name entry replaced by one entry per address in `addresses`
/// (sorted; none while the name has no known address). An address that
/// comes up twice (a name resolving to a configured IP, two names sharing
/// one) is a backend once, at its first place.
pub fn expand(backends: &[BackendConfig], addresses: &Addresses) -> Vec<Expanded> {
    let mut out: Vec<Expanded> = Vec::with_capacity(backends.len());
    let push = |out: &mut Vec<Expanded>, expanded: Expanded| {
        if !out
            .iter()
            .any(|e| e.config.address == expanded.config.address)
        {
            out.push(expanded);
        }
    };
    // Configured addresses first, so that one also found through a name
    // keeps its configured id.
    for (entry, backend) in backends.iter().enumerate() {
        if name_of(&backend.address).is_none() {
            let expanded = Expanded {
                config: backend.clone(),
                entry,
                source: None,
            };
            push(&mut out, expanded);
        }
    }
    for (entry, backend) in backends.iter().enumerate() {
        let Some((name, port)) = name_of(&backend.address) else {
            continue;
        };
        let source: Arc<str> = Arc::from(name);
        for ip in addresses.get(name).into_iter().flatten() {
            let expanded = Expanded {
                config: BackendConfig {
                    address: SocketAddr::new(*ip, port).to_string(),
                    ..backend.clone()
                },
                entry,
                source: Some(Arc::clone(&source)),
            };
            push(&mut out, expanded);
        }
    }
    // Back in configured order: a name's addresses where the name stands.
    out.sort_by_key(|e| e.entry);
    out
}

/// What one lookup of a name found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// These addresses (sorted, at least one), valid for this long.
    Found(Vec<IpAddr>, Duration),
    /// The DNS says the name has no address (NXDOMAIN, or no A and AAAA
    /// records).
    NoAddresses,
    /// No answer (timeout, server failure, a bad name): what it was.
    Failed(String),
}

/// A DNS resolver: the configured server (UDP, then TCP for a truncated
/// answer), or the system's configuration. It keeps no cache, so every
/// refresh asks the server; the records' TTL sets the next refresh instead.
#[derive(Clone)]
pub struct Resolver {
    inner: TokioResolver,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver").finish_non_exhaustive()
    }
}

impl Resolver {
    /// A resolver asking `server`, or the system's name servers (and hosts
    /// file) when `None`. Must be called inside the tokio runtime that will
    /// drive its lookups.
    pub fn new(server: Option<SocketAddr>) -> Result<Resolver, String> {
        let provider = hickory_resolver::net::runtime::TokioRuntimeProvider::default();
        let mut builder = match server {
            Some(server) => {
                let mut name_server = NameServerConfig::udp_and_tcp(server.ip());
                for connection in &mut name_server.connections {
                    connection.port = server.port();
                }
                let config = ResolverConfig::from_name_servers(vec![name_server]);
                let mut builder = TokioResolver::builder_with_config(config, provider);
                let options = builder.options_mut();
                // The named server answers for backend names; the hosts
                // file is the system's business.
                options.use_hosts_file = ResolveHosts::Never;
                options.timeout = Duration::from_secs(2);
                options.attempts = 2;
                builder
            }
            None => TokioResolver::builder(provider)
                .map_err(|e| format!("cannot read the system's DNS configuration: {e}"))?,
        };
        let options = builder.options_mut();
        options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        options.cache_size = 0;
        let inner = builder
            .build()
            .map_err(|e| format!("cannot set up the DNS resolver: {e}"))?;
        Ok(Resolver { inner })
    }

    /// Looks `name` up (A and AAAA), within `LOOKUP_TIMEOUT` (5 s).
    pub async fn lookup(&self, name: &str) -> Lookup {
        let lookup = tokio::time::timeout(LOOKUP_TIMEOUT, self.inner.lookup_ip(name)).await;
        match lookup {
            Err(_) => Lookup::Failed(format!("no answer within {LOOKUP_TIMEOUT:?}")),
            Ok(Err(error)) if error.is_no_records_found() => Lookup::NoAddresses,
            Ok(Err(error)) => Lookup::Failed(error.to_string()),
            Ok(Ok(found)) => {
                let ttl = found
                    .valid_until()
                    .saturating_duration_since(Instant::now());
                let mut ips: Vec<IpAddr> = found.iter().collect();
                ips.sort();
                ips.dedup();
                if ips.is_empty() {
                    Lookup::NoAddresses
                } else {
                    Lookup::Found(ips, ttl)
                }
            }
        }
    }
}

/// How a name's last lookup went, so each change is logged once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Resolved,
    NoAddresses,
    Failing,
}

/// What outlives a generation: the last known addresses of every name and
/// how its last lookup went, and the resolver (made again when `resolver`
/// changes).
#[derive(Debug, Default)]
pub struct Discovery {
    known: Mutex<KnownNames>,
    resolver: Mutex<Option<(Option<SocketAddr>, Resolver)>>,
}

impl Discovery {
    /// When to resolve again after the last lookups, as
    /// [`Discovery::resolve`] worked it out; `dns_refresh` before any.
    pub fn next_refresh(&self, config: &Config) -> Duration {
        let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        known
            .next
            .unwrap_or(config.dns_refresh)
            .min(config.dns_refresh)
    }
}

#[derive(Debug, Default)]
struct KnownNames {
    addresses: Addresses,
    /// When to resolve again, after the last [`Discovery::resolve`].
    next: Option<Duration>,
    status: FxHashMap<String, Status>,
}

impl Discovery {
    /// Nothing known yet.
    pub fn new() -> Discovery {
        Discovery::default()
    }

    /// The last known addresses of the names of `config`.
    pub fn known(&self, config: &Config) -> Addresses {
        let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        names(&config.backends)
            .into_iter()
            .filter_map(|n| Some((n.clone(), known.addresses.get(&n)?.clone())))
            .collect()
    }

    /// Resolves every name of `config` (concurrently) and returns their
    /// addresses (the last known ones for a name whose lookup failed) and
    /// when to look again: `dns_refresh`, or sooner if a record's TTL asks,
    /// but never sooner than [`MIN_DNS_REFRESH`]. Must run inside the
    /// runtime the resolver was made in (see [`Discovery::resolve_now`]).
    pub async fn resolve(&self, config: &Config) -> (Addresses, Duration) {
        let names = names(&config.backends);
        let mut next = config.dns_refresh;
        if names.is_empty() {
            return (Addresses::new(), next);
        }
        let resolver = match self.resolver(config.resolver) {
            Ok(resolver) => resolver,
            Err(error) => {
                for name in &names {
                    self.note(name, Lookup::Failed(error.clone()));
                }
                return (self.known(config), next);
            }
        };
        let mut lookups = tokio::task::JoinSet::new();
        for name in names {
            let resolver = resolver.clone();
            lookups.spawn(async move {
                let found = resolver.lookup(&name).await;
                (name, found)
            });
        }
        while let Some(joined) = lookups.join_next().await {
            let Ok((name, found)) = joined else { continue };
            if let Lookup::Found(_, ttl) = &found {
                next = next.min(*ttl);
            }
            self.note(&name, found);
        }
        let next = next.max(Duration::from_secs_f64(MIN_DNS_REFRESH));
        self.known.lock().unwrap_or_else(|e| e.into_inner()).next = Some(next);
        (self.known(config), next)
    }

    /// [`Discovery::resolve`] from code that is not async (the first
    /// generation, built before anything runs): on a thread of its own with
    /// a runtime and resolver of its own, so it works whatever runtime (if
    /// any) the caller is in. Blocks for at most the lookup timeout.
    pub fn resolve_now(&self, config: &Config) -> Addresses {
        if names(&config.backends).is_empty() {
            return Addresses::new();
        }
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime,
                        Err(error) => {
                            tracing::warn!("cannot resolve backend names now: {error}");
                            return self.known(config);
                        }
                    };
                    let scratch = Discovery {
                        known: Mutex::new(std::mem::take(
                            &mut *self.known.lock().unwrap_or_else(|e| e.into_inner()),
                        )),
                        resolver: Mutex::new(None),
                    };
                    let (addresses, _) = runtime.block_on(scratch.resolve(config));
                    *self.known.lock().unwrap_or_else(|e| e.into_inner()) = scratch
                        .known
                        .into_inner()
                        .unwrap_or_else(|e| e.into_inner());
                    addresses
                })
                .join()
                .unwrap_or_default()
        })
    }

    /// The resolver for `server`, made on first use (in the caller's
    /// runtime) and again when the setting changes.
    fn resolver(&self, server: Option<SocketAddr>) -> Result<Resolver, String> {
        let mut cached = self.resolver.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((for_server, resolver)) = cached.as_ref() {
            if *for_server == server {
                return Ok(resolver.clone());
            }
        }
        let resolver = Resolver::new(server)?;
        *cached = Some((server, resolver.clone()));
        Ok(resolver)
    }

    /// Records what a lookup of `name` found, logging each change of how
    /// its lookups go once.
    fn note(&self, name: &str, found: Lookup) {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        let before = known.status.get(name).copied();
        let status = match found {
            Lookup::Found(ips, _) => {
                if before != Some(Status::Resolved) && before.is_some() {
                    tracing::info!(name, "backend name {name} resolves again: {}", list(&ips));
                }
                known.addresses.insert(name.to_string(), ips);
                Status::Resolved
            }
            Lookup::NoAddresses => {
                if before != Some(Status::NoAddresses) {
                    tracing::warn!(
                        name,
                        "backend name {name} has no address (NXDOMAIN or no A/AAAA records): no backend for it until it resolves"
                    );
                }
                known.addresses.insert(name.to_string(), Vec::new());
                Status::NoAddresses
            }
            Lookup::Failed(why) => {
                if before != Some(Status::Failing) {
                    let kept = known.addresses.get(name).map_or(0, Vec::len);
                    tracing::warn!(
                        name,
                        "cannot resolve backend name {name}: {why}; keeping its {kept} last known address{}",
                        if kept == 1 { "" } else { "es" }
                    );
                }
                Status::Failing
            }
        };
        known.status.insert(name.to_string(), status);
    }
}

fn list(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(address: &str, weight: u32) -> BackendConfig {
        BackendConfig {
            weight,
            ..BackendConfig::new(address)
        }
    }

    #[test]
    fn names_are_told_from_addresses() {
        assert_eq!(name_of("svc.test:80"), Some(("svc.test", 80)));
        assert_eq!(name_of("localhost:8080"), Some(("localhost", 8080)));
        assert_eq!(name_of("127.0.0.1:80"), None);
        assert_eq!(name_of("[::1]:80"), None);
        let backends = [
            backend("a.test:80", 1),
            backend("10.0.0.1:80", 1),
            backend("a.test:81", 1),
            backend("b.test:80", 1),
        ];
        assert_eq!(names(&backends), ["a.test", "b.test"]);
    }

    #[test]
    fn a_name_stands_for_each_of_its_addresses_in_its_place() {
        let backends = [
            backend("10.0.0.1:80", 1),
            backend("svc.test:8080", 3),
            backend("[::1]:80", 1),
            backend("none.test:80", 1),
        ];
        let mut addresses = Addresses::new();
        addresses.insert(
            "svc.test".into(),
            vec!["10.0.0.3".parse().unwrap(), "fd00::2".parse().unwrap()],
        );
        addresses.insert("none.test".into(), Vec::new());
        let expanded = expand(&backends, &addresses);
        let got: Vec<(&str, usize, u32, Option<&str>)> = expanded
            .iter()
            .map(|e| {
                (
                    e.config.address.as_str(),
                    e.entry,
                    e.config.weight,
                    e.source.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("10.0.0.1:80", 0, 1, None),
                ("10.0.0.3:8080", 1, 3, Some("svc.test")),
                ("[fd00::2]:8080", 1, 3, Some("svc.test")),
                ("[::1]:80", 2, 1, None),
            ]
        );
    }

    #[test]
    fn an_address_found_twice_is_one_backend_and_a_configured_one_wins() {
        let backends = [
            backend("a.test:80", 1),
            backend("10.0.0.1:80", 5),
            backend("b.test:80", 2),
        ];
        let mut addresses = Addresses::new();
        addresses.insert(
            "a.test".into(),
            vec!["10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()],
        );
        addresses.insert("b.test".into(), vec!["10.0.0.2".parse().unwrap()]);
        let expanded = expand(&backends, &addresses);
        let got: Vec<(&str, Option<&str>)> = expanded
            .iter()
            .map(|e| (e.config.address.as_str(), e.source.as_deref()))
            .collect();
        assert_eq!(
            got,
            [("10.0.0.2:80", Some("a.test")), ("10.0.0.1:80", None)]
        );
    }

    #[test]
    fn a_failed_lookup_keeps_the_last_known_addresses() {
        let discovery = Discovery::new();
        let mut config = Config::new("127.0.0.1:0".parse().unwrap(), &["svc.test:80"]);
        config.dns_refresh = Duration::from_secs(5);
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        discovery.note("svc.test", Lookup::Found(vec![ip], Duration::from_secs(1)));
        discovery.note("svc.test", Lookup::Failed("timeout".into()));
        assert_eq!(discovery.known(&config)["svc.test"], [ip]);
        discovery.note("svc.test", Lookup::NoAddresses);
        assert!(discovery.known(&config)["svc.test"].is_empty());
    }
}
