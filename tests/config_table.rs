//! The README's configuration table, key by key: a file that sets every key
//! to a distinct non-default value loads into exactly those fields (so two
//! keys wired to each other's fields fail), every default is the one the
//! table documents, and every range edge the table names is accepted on the
//! inside and refused, naming the key, on the outside.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rust_load_balancer::config::{
    default_worker_threads, BackendConfig, BackendTls, CertificateFiles, ClientLimits, ConfigError,
    Format, HashKey, HealthConfig, OutlierConfig, SandboxLimits, StrategyScope, StrategySource,
    TlsListener, TlsVersion, Tuning,
};
use rust_load_balancer::Config;
use serde_json::{json, Value};

/// The rows of the README's config table: key -> default cell, in order.
fn readme_table() -> Vec<(String, String)> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let mut rows = Vec::new();
    let mut lines = readme.lines();
    lines
        .by_ref()
        .find(|l| l.trim() == "| key | type | default | meaning |")
        .expect("the config table's header");
    lines.next(); // |---|---|
    for line in lines.take_while(|l| l.starts_with('|')) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let key = cells[1].trim_matches('`').to_string();
        rows.push((key, cells[3].to_string()));
    }
    assert!(rows.len() > 20, "the table was not found whole: {rows:?}");
    rows
}

/// The keys a config file can set, as the README table names them
/// (`backend_servers[].weight` for a backend's fields).
fn keys_of(config: &Value) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for (key, value) in config.as_object().unwrap() {
        keys.insert(key.clone());
        if key == "backend_servers" {
            for backend in value.as_array().unwrap() {
                if let Some(object) = backend.as_object() {
                    for field in object.keys().filter(|k| *k != "address") {
                        keys.insert(format!("backend_servers[].{field}"));
                    }
                }
            }
        }
    }
    keys
}

fn write(dir: &Path, name: &str, config: &Value) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_string_pretty(config).unwrap()).unwrap();
    path
}

/// Every key of the table at a value no other key has and no default is.
fn every_key(workers: u32) -> Value {
    json!({
        "listen_address": "127.0.0.3:7001",
        "backend_servers": [
            "10.1.1.1:81",
            {"address": "b.example:82", "weight": 7, "labels": {"zone": "z", "version": "2.1"},
             "tls": true, "tls_server_name": "b.internal.example"},
        ],
        "strategy": "mods/mine.wasm",
        "strategy_scope": "worker",
        "strategy_options": {"table_size": 251, "nested": [1, "two"]},
        "hash_key": "cookie:sid",
        "strategy_headers": ["X-B", "x-a"],
        "health_check_interval": 1.25,
        "health_check_timeout": 0.75,
        "health_check_path": "/healthz",
        "unhealthy_threshold": 7,
        "healthy_threshold": 5,
        "max_retries": 4,
        "outlier_consecutive_5xx": 3,
        "outlier_base_ejection_time": 10.5,
        "outlier_max_ejection_percent": 34,
        "connect_timeout": 1.5,
        "strategy_fuel": 12345,
        "strategy_timeout": 0.125,
        "strategy_memory_mib": 33,
        "admin_address": "127.0.0.4:9191",
        "access_log": true,
        "shutdown_timeout": 4.5,
        "client_header_timeout": 5.5,
        "client_keepalive_timeout": 6.5,
        "request_timeout": 7.5,
        "max_request_header_kib": 99,
        "max_connections": 777,
        "worker_threads": workers,
        "listen_backlog": 555,
        "tcp_nodelay": false,
        "upstream_keepalive": 9,
        "upstream_idle_timeout": 8.5,
        "tls_listen_address": "127.0.0.5:7443",
        "tls_certificates": [{"cert": "certs/a.pem", "key": "certs/a.key"}, {"cert": "/etc/b.pem", "key": "/etc/b.key"}],
        "tls_min_version": "1.3",
        "upstream_ca_file": "certs/ca.pem",
        "tunnel_idle_timeout": 9.5,
        "dns_refresh": 2.5,
        "resolver": "127.0.0.6:5353",
    })
}

#[test]
fn every_key_of_the_table_reaches_its_own_field() {
    // A worker count that is neither the default here nor another key's value.
    let workers = [3, 6, 11]
        .into_iter()
        .find(|&n| n as usize != default_worker_threads())
        .unwrap();
    let file = every_key(workers);
    let table: BTreeSet<String> = readme_table().into_iter().map(|(k, _)| k).collect();
    assert_eq!(
        keys_of(&file),
        table,
        "the test sets exactly the keys the README table lists"
    );

    let dir = tempfile::tempdir().unwrap();
    let expected = Config {
        listen_address: "127.0.0.3:7001".parse().unwrap(),
        backends: vec![
            BackendConfig::new("10.1.1.1:81"),
            BackendConfig {
                address: "b.example:82".into(),
                weight: 7,
                labels: BTreeMap::from([
                    ("version".to_string(), "2.1".to_string()),
                    ("zone".to_string(), "z".to_string()),
                ]),
                tls: Some(BackendTls {
                    server_name: "b.internal.example".into(),
                }),
            },
        ],
        // Relative to the config file's folder.
        strategy: StrategySource::Path(dir.path().join("mods/mine.wasm")),
        strategy_scope: StrategyScope::Worker,
        sandbox: SandboxLimits {
            fuel: 12345,
            timeout: Duration::from_millis(125),
            memory_bytes: 33 << 20,
        },
        health: HealthConfig {
            interval: Duration::from_millis(1250),
            timeout: Duration::from_millis(750),
            path: Some("/healthz".into()),
            healthy_threshold: 5,
            unhealthy_threshold: 7,
            max_retries: 4,
            outlier: OutlierConfig {
                consecutive_5xx: 3,
                base_ejection_time: Duration::from_millis(10500),
                max_ejection_percent: 34,
            },
        },
        connect_timeout: Duration::from_millis(1500),
        admin_address: Some("127.0.0.4:9191".parse().unwrap()),
        access_log: true,
        shutdown_timeout: Duration::from_millis(4500),
        clients: ClientLimits {
            header_timeout: Duration::from_millis(5500),
            keepalive_timeout: Duration::from_millis(6500),
            request_timeout: Duration::from_millis(7500),
            max_header_bytes: 99 << 10,
            max_connections: 777,
        },
        tuning: Tuning {
            worker_threads: workers as usize,
            listen_backlog: 555,
            tcp_nodelay: false,
            upstream_keepalive: 9,
            upstream_idle_timeout: Duration::from_millis(8500),
        },
        hash_key: Some(HashKey::Cookie("sid".into())),
        // Lowercase, in the order written.
        strategy_headers: vec!["x-b".into(), "x-a".into()],
        strategy_options: json!({"table_size": 251, "nested": [1, "two"]}),
        tls: Some(TlsListener {
            address: "127.0.0.5:7443".parse().unwrap(),
            certificates: vec![
                CertificateFiles {
                    cert: dir.path().join("certs/a.pem"),
                    key: dir.path().join("certs/a.key"),
                },
                CertificateFiles {
                    cert: "/etc/b.pem".into(),
                    key: "/etc/b.key".into(),
                },
            ],
            min_version: TlsVersion::Tls13,
        }),
        upstream_ca_file: Some(dir.path().join("certs/ca.pem")),
        tunnel_idle_timeout: Duration::from_millis(9500),
        dns_refresh: Duration::from_millis(2500),
        resolver: Some("127.0.0.6:5353".parse().unwrap()),
    };

    // The same keys in JSON and in YAML (JSON text is YAML too).
    for name in ["lb.json", "lb.yaml"] {
        let path = write(dir.path(), name, &file);
        let config = Config::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        // Field by field first, for a readable failure, then the whole.
        assert_eq!(config.listen_address, expected.listen_address, "{name}");
        assert_eq!(config.backends, expected.backends, "{name}");
        assert_eq!(config.strategy, expected.strategy, "{name}");
        assert_eq!(config.sandbox, expected.sandbox, "{name}");
        assert_eq!(config.health, expected.health, "{name}");
        assert_eq!(config.connect_timeout, expected.connect_timeout, "{name}");
        assert_eq!(config.admin_address, expected.admin_address, "{name}");
        assert_eq!(config.access_log, expected.access_log, "{name}");
        assert_eq!(config.shutdown_timeout, expected.shutdown_timeout, "{name}");
        assert_eq!(config.clients, expected.clients, "{name}");
        assert_eq!(config.tuning, expected.tuning, "{name}");
        assert_eq!(config.hash_key, expected.hash_key, "{name}");
        assert_eq!(config.strategy_headers, expected.strategy_headers, "{name}");
        assert_eq!(config.strategy_options, expected.strategy_options, "{name}");
        assert_eq!(config, expected, "{name}");
        assert_eq!(
            config.strategy_options_json(),
            r#"{"nested":[1,"two"],"table_size":251}"#
        );

        // The effective config (`GET /config`) has one entry per top-level
        // key of the table, each with the value the file gave it.
        let effective = config.to_json();
        let top: BTreeSet<String> = table
            .iter()
            .filter(|k| !k.contains("[]"))
            .cloned()
            .collect();
        let shown: BTreeSet<String> = effective.as_object().unwrap().keys().cloned().collect();
        assert_eq!(shown, top, "{name}: /config shows every key");
        for (key, value) in file.as_object().unwrap() {
            let shown = &effective[key];
            match key.as_str() {
                "backend_servers" => {
                    assert_eq!(
                        shown[0],
                        json!({"address": "10.1.1.1:81", "weight": 1, "labels": {}})
                    );
                    assert_eq!(shown[1], value[1], "{name}");
                }
                "strategy" => assert_eq!(
                    shown.as_str().unwrap(),
                    dir.path().join("mods/mine.wasm").to_str().unwrap()
                ),
                "strategy_headers" => assert_eq!(shown, &json!(["x-b", "x-a"])),
                "tls_certificates" => assert_eq!(
                    shown,
                    &json!([
                        {"cert": dir.path().join("certs/a.pem"), "key": dir.path().join("certs/a.key")},
                        {"cert": "/etc/b.pem", "key": "/etc/b.key"},
                    ])
                ),
                "upstream_ca_file" => assert_eq!(shown, &json!(dir.path().join("certs/ca.pem"))),
                _ => assert_eq!(shown, value, "{name}: {key} in the effective config"),
            }
        }
        // And it reads back as the same config.
        let again = Config::parse(&effective.to_string(), Format::Json, &path).unwrap();
        assert_eq!(again, config, "{name}");
    }
}

/// A README default cell as the value it documents; `None` for `required`.
fn documented(cell: &str) -> Option<Value> {
    let cell = cell.trim_matches('`');
    Some(match cell {
        "required" => return None,
        "none" | "none (off)" => Value::Null,
        "number of CPUs" => json!(default_worker_threads()),
        _ => serde_json::from_str(cell).unwrap_or_else(|_| panic!("a default cell: {cell:?}")),
    })
}

/// The validated config's field for `key`, as a JSON value in the file's
/// units (seconds, MiB, KiB), read from the typed fields, not `to_json`.
fn field(config: &Config, key: &str) -> Value {
    let secs = |d: Duration| json!(d.as_secs_f64());
    let b = &config.backends[0];
    match key {
        "backend_servers[].weight" => json!(b.weight),
        "backend_servers[].labels" if b.labels.is_empty() => Value::Null,
        "backend_servers[].labels" => json!(b.labels),
        "strategy" => json!(config.strategy.to_string()),
        "strategy_scope" => json!(config.strategy_scope.as_str()),
        "strategy_options" => config.strategy_options.clone(),
        "hash_key" => json!(config.hash_key.as_ref().map(|k| k.to_string())),
        "strategy_headers" => json!(config.strategy_headers),
        "health_check_interval" => secs(config.health.interval),
        "health_check_timeout" => secs(config.health.timeout),
        "health_check_path" => json!(config.health.path),
        "unhealthy_threshold" => json!(config.health.unhealthy_threshold),
        "healthy_threshold" => json!(config.health.healthy_threshold),
        "max_retries" => json!(config.health.max_retries),
        "outlier_consecutive_5xx" => json!(config.health.outlier.consecutive_5xx),
        "outlier_base_ejection_time" => secs(config.health.outlier.base_ejection_time),
        "outlier_max_ejection_percent" => json!(config.health.outlier.max_ejection_percent),
        "connect_timeout" => secs(config.connect_timeout),
        "strategy_fuel" => json!(config.sandbox.fuel),
        "strategy_timeout" => secs(config.sandbox.timeout),
        "strategy_memory_mib" => json!(config.sandbox.memory_bytes >> 20),
        "admin_address" => json!(config.admin_address.map(|a| a.to_string())),
        "access_log" => json!(config.access_log),
        "shutdown_timeout" => secs(config.shutdown_timeout),
        "client_header_timeout" => secs(config.clients.header_timeout),
        "client_keepalive_timeout" => secs(config.clients.keepalive_timeout),
        "request_timeout" => secs(config.clients.request_timeout),
        "max_request_header_kib" => json!(config.clients.max_header_bytes >> 10),
        "max_connections" => json!(config.clients.max_connections),
        "worker_threads" => json!(config.tuning.worker_threads),
        "listen_backlog" => json!(config.tuning.listen_backlog),
        "tcp_nodelay" => json!(config.tuning.tcp_nodelay),
        "upstream_keepalive" => json!(config.tuning.upstream_keepalive),
        "upstream_idle_timeout" => secs(config.tuning.upstream_idle_timeout),
        "backend_servers[].tls" => json!(b.tls.is_some()),
        "backend_servers[].tls_server_name" => json!(b.tls.as_ref().map(|t| &t.server_name)),
        "tls_listen_address" => json!(config.tls.as_ref().map(|t| t.address.to_string())),
        "tls_certificates" => json!(config.tls.as_ref().map(|t| t.certificates.len())),
        "tls_min_version" => json!(config
            .tls
            .as_ref()
            .map_or(TlsVersion::Tls12, |t| t.min_version)
            .as_str()),
        "upstream_ca_file" => json!(config.upstream_ca_file),
        "tunnel_idle_timeout" => secs(config.tunnel_idle_timeout),
        "dns_refresh" => secs(config.dns_refresh),
        "resolver" => json!(config.resolver.map(|a| a.to_string())),
        other => panic!("a key this test does not know: {other} (add it here)"),
    }
}

const MINIMAL: &str = r#"{"listen_address": "127.0.0.1:8080", "backend_servers": [{"address": "127.0.0.1:8081"}, "127.0.0.1:8082"]}"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Format::Json, Path::new("/etc/lb/edges.json"))
}

#[test]
fn every_default_is_the_documented_one() {
    let config = parse(MINIMAL).unwrap();
    let mut checked = 0;
    for (key, cell) in readme_table() {
        let Some(want) = documented(&cell) else {
            continue;
        };
        let got = field(&config, &key);
        // Numbers compare by value: 10 (the README) is 10.0 (seconds).
        let same = match (got.as_f64(), want.as_f64()) {
            (Some(a), Some(b)) => a == b,
            _ => got == want,
        };
        assert!(
            same,
            "{key}: the README says the default is {cell}, got {got}"
        );
        checked += 1;
    }
    assert_eq!(
        checked,
        readme_table().len() - 2,
        "all but the two required keys"
    );
    // The second backend, a plain string, has the same defaults.
    assert_eq!(config.backends[1], BackendConfig::new("127.0.0.1:8082"));
    // `Config::new`, the embedders' starting point, has the same defaults.
    let new = Config::new(
        "127.0.0.1:8080".parse().unwrap(),
        &["127.0.0.1:8081", "127.0.0.1:8082"],
    );
    assert_eq!(new, config);
}

/// The config with `extra` keys added (replacing any of the same name).
fn with(extra: Value) -> Result<Config, ConfigError> {
    let mut base: Value = serde_json::from_str(MINIMAL).unwrap();
    for (k, v) in extra.as_object().unwrap() {
        base[k] = v.clone();
    }
    parse(&base.to_string())
}

fn accepted(extra: Value) -> Config {
    with(extra.clone()).unwrap_or_else(|e| panic!("{extra} must be accepted: {e}"))
}

/// Refused, naming `field` (as the `Invalid` error's field and in its text)
/// and the value given.
fn refused(extra: Value, field: &str, value: &str) {
    match with(extra.clone()) {
        Err(error @ ConfigError::Invalid { .. }) => {
            let ConfigError::Invalid {
                field: named,
                message,
                ..
            } = &error
            else {
                unreachable!()
            };
            assert_eq!(named, field, "{extra}: {error}");
            let text = error.to_string();
            assert!(
                text.contains(&format!("{field}: ")) && message.contains(value),
                "{extra}: {text}"
            );
        }
        other => panic!("{extra} must be refused naming {field}, got {other:?}"),
    }
}

/// Reads one field of a validated config.
type Read<T> = fn(&Config) -> T;

fn backend_weight(weight: i64) -> Value {
    json!({"backend_servers": [{"address": "127.0.0.1:8081", "weight": weight}]})
}

#[test]
fn every_range_edge_of_the_table_is_where_the_readme_puts_it() {
    // backend_servers[].weight: integer 1-1000000.
    for weight in [1, 1_000_000] {
        assert_eq!(
            accepted(backend_weight(weight)).backends[0].weight as i64,
            weight
        );
    }
    for weight in [0, 1_000_001, -1] {
        refused(
            backend_weight(weight),
            "backend_servers[0].weight",
            &weight.to_string(),
        );
    }

    // Integer ranges, each edge in and out: (key, lowest, highest).
    let ranges: [(&str, u64, u64, Read<u64>); 4] = [
        ("strategy_memory_mib", 1, 4096, |c| {
            (c.sandbox.memory_bytes >> 20) as u64
        }),
        ("max_request_header_kib", 8, 1024, |c| {
            (c.clients.max_header_bytes >> 10) as u64
        }),
        ("worker_threads", 1, 256, |c| c.tuning.worker_threads as u64),
        ("listen_backlog", 1, 65535, |c| {
            u64::from(c.tuning.listen_backlog)
        }),
    ];
    for (key, low, high, read) in ranges {
        for inside in [low, high] {
            assert_eq!(read(&accepted(json!({ key: inside }))), inside, "{key}");
        }
        for outside in [low - 1, high + 1] {
            refused(json!({ key: outside }), key, &outside.to_string());
        }
    }

    // "integer ≥ 1": 1 in, 0 out.
    let at_least_one: [(&str, Read<u64>); 4] = [
        ("unhealthy_threshold", |c| {
            u64::from(c.health.unhealthy_threshold)
        }),
        ("healthy_threshold", |c| {
            u64::from(c.health.healthy_threshold)
        }),
        ("strategy_fuel", |c| c.sandbox.fuel),
        ("max_connections", |c| c.clients.max_connections as u64),
    ];
    for (key, read) in at_least_one {
        assert_eq!(read(&accepted(json!({ key: 1 }))), 1, "{key}");
        refused(json!({ key: 0 }), key, "0");
    }
    // "integer ≥ 0" and a plain integer: 0 is allowed.
    assert_eq!(
        accepted(json!({"upstream_keepalive": 0}))
            .tuning
            .upstream_keepalive,
        0
    );
    assert_eq!(accepted(json!({"max_retries": 0})).health.max_retries, 0);

    // Seconds: above 0 and at most 86400, fractions allowed.
    let seconds: [(&str, Read<Duration>); 9] = [
        ("health_check_interval", |c| c.health.interval),
        ("health_check_timeout", |c| c.health.timeout),
        ("connect_timeout", |c| c.connect_timeout),
        ("shutdown_timeout", |c| c.shutdown_timeout),
        ("client_header_timeout", |c| c.clients.header_timeout),
        ("client_keepalive_timeout", |c| c.clients.keepalive_timeout),
        ("request_timeout", |c| c.clients.request_timeout),
        ("upstream_idle_timeout", |c| c.tuning.upstream_idle_timeout),
        ("strategy_timeout", |c| c.sandbox.timeout),
    ];
    for (key, read) in seconds {
        assert_eq!(
            read(&accepted(json!({ key: 86400 }))),
            Duration::from_secs(86400),
            "{key}"
        );
        assert_eq!(
            read(&accepted(json!({ key: 0.25 }))),
            Duration::from_millis(250),
            "{key}"
        );
        for outside in ["0", "-1", "86400.5"] {
            let value: f64 = outside.parse().unwrap();
            refused(json!({ key: value }), key, outside);
        }
    }
    // The other seconds go below strategy_timeout's floor of 0.001.
    assert_eq!(
        accepted(json!({"connect_timeout": 0.0005})).connect_timeout,
        Duration::from_micros(500)
    );
    assert_eq!(
        accepted(json!({"strategy_timeout": 0.001})).sandbox.timeout,
        Duration::from_millis(1)
    );
    refused(
        json!({"strategy_timeout": 0.0009}),
        "strategy_timeout",
        "0.0009",
    );

    // strategy_headers: at most 32.
    let names = |n: usize| -> Value { (0..n).map(|i| format!("x-h{i}")).collect() };
    assert_eq!(
        accepted(json!({"strategy_headers": names(32)}))
            .strategy_headers
            .len(),
        32
    );
    refused(
        json!({"strategy_headers": names(33)}),
        "strategy_headers",
        "33",
    );

    // health_check_path: a string starting with `/`.
    assert_eq!(
        accepted(json!({"health_check_path": "/"}))
            .health
            .path
            .as_deref(),
        Some("/")
    );
    // dns_refresh: seconds from 1 (a DNS server is not asked more often)
    // to 86400.
    for inside in [1.0, 86400.0] {
        assert_eq!(
            accepted(json!({ "dns_refresh": inside })).dns_refresh,
            Duration::from_secs_f64(inside)
        );
    }
    for outside in ["0.5", "0", "86400.5"] {
        let value: f64 = outside.parse().unwrap();
        refused(json!({ "dns_refresh": value }), "dns_refresh", outside);
    }
    // resolver: an IP:port address.
    assert_eq!(
        accepted(json!({"resolver": "[fd00::53]:53"})).resolver,
        Some("[fd00::53]:53".parse().unwrap())
    );
    refused(
        json!({"resolver": "dns.example:53"}),
        "resolver",
        "\"dns.example:53\"",
    );

    refused(
        json!({"health_check_path": "up"}),
        "health_check_path",
        "\"up\"",
    );
}
