//! The open-file limit: raised at start-up as far as the process may, and
//! checked against what the config can hold open, so that a balancer
//! started under a low `ulimit -n` (common under service managers) says so
//! at once instead of failing accepts later.

use crate::config::Config;

/// Descriptors the balancer holds besides client and backend connections:
/// listeners, the event loops, the log, the module cache, health checks in
/// flight.
const RESERVED: u64 = 64;

/// The soft `RLIMIT_NOFILE` before and after raising it to the hard limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileLimit {
    /// The soft limit the process was started with.
    pub was: u64,
    /// The soft limit now.
    pub now: u64,
}

/// Raises the soft open-file limit to the hard limit. `None` if the limit
/// cannot be read or is unlimited.
pub fn raise_file_limit() -> Option<FileLimit> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let limit = getrlimit(Resource::Nofile);
    let was = limit.current?;
    let Some(hard) = limit.maximum else {
        return Some(FileLimit { was, now: was });
    };
    if hard <= was {
        return Some(FileLimit { was, now: was });
    }
    let raised = rustix::process::Rlimit {
        current: Some(hard),
        maximum: Some(hard),
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => Some(FileLimit { was, now: hard }),
        Err(_) => Some(FileLimit { was, now: was }),
    }
}

/// The descriptors `config` may need at once: every client connection
/// (`max_connections`), every idle backend connection the pools may keep
/// (`upstream_keepalive` per backend and worker), and a reserve.
pub fn descriptors_needed(config: &Config) -> u64 {
    let pools = config.tuning.upstream_keepalive as u64
        * config.backends.len() as u64
        * config.tuning.worker_threads as u64;
    config.clients.max_connections as u64 + pools + RESERVED
}

/// The warning to log when `config` may need more descriptors than `limit`.
pub fn shortfall(config: &Config, limit: u64) -> Option<String> {
    let needed = descriptors_needed(config);
    (needed > limit).then(|| {
        format!(
            "the open-file limit ({limit}) is below what max_connections ({}) and the backend pools \
             ({} idle per backend and worker) may hold, about {needed}: raise it (ulimit -n, or \
             LimitNOFILE= under systemd) or lower max_connections; past it new connections fail",
            config.clients.max_connections, config.tuning.upstream_keepalive
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_need_counts_clients_pools_and_a_reserve() {
        let mut config = Config::new(
            "127.0.0.1:0".parse().unwrap(),
            &["127.0.0.1:1", "127.0.0.1:2"],
        );
        config.clients.max_connections = 1000;
        config.tuning.upstream_keepalive = 10;
        config.tuning.worker_threads = 3;
        assert_eq!(descriptors_needed(&config), 1000 + 10 * 2 * 3 + RESERVED);
        assert!(shortfall(&config, 100_000).is_none());
        let warning = shortfall(&config, 128).unwrap();
        assert!(
            warning.contains("(128)") && warning.contains("max_connections (1000)"),
            "{warning}"
        );
    }
}
