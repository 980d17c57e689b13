//! The config file as written: serde types that reject unknown keys.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

/// Every key a config file may have. Optional keys are `None` when absent;
/// their defaults are applied, and all values checked, in `validate`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub listen_address: String,
    pub backend_servers: Vec<RawBackend>,
    pub health_check_interval: Option<f64>,
    pub health_check_timeout: Option<f64>,
    pub health_check_path: Option<String>,
    pub healthy_threshold: Option<u32>,
    pub unhealthy_threshold: Option<u32>,
    pub max_retries: Option<u32>,
    pub connect_timeout: Option<f64>,
    pub strategy: Option<String>,
    pub strategy_fuel: Option<u64>,
    pub strategy_timeout: Option<f64>,
    pub strategy_memory_mib: Option<u64>,
    pub admin_address: Option<String>,
    pub access_log: Option<bool>,
    pub shutdown_timeout: Option<f64>,
    pub client_header_timeout: Option<f64>,
    pub request_timeout: Option<f64>,
    pub max_request_header_kib: Option<u32>,
    pub max_connections: Option<u32>,
    pub client_keepalive_timeout: Option<f64>,
    pub worker_threads: Option<u32>,
    pub listen_backlog: Option<u32>,
    pub tcp_nodelay: Option<bool>,
    pub upstream_keepalive: Option<u32>,
    pub upstream_idle_timeout: Option<f64>,
    pub hash_key: Option<String>,
    pub strategy_headers: Option<Vec<String>>,
    pub strategy_options: Option<serde_json::Value>,
    pub tls_listen_address: Option<String>,
    pub tls_certificates: Option<Vec<RawCertificate>>,
    pub tls_min_version: Option<String>,
    pub upstream_ca_file: Option<String>,
    pub tunnel_idle_timeout: Option<f64>,
    pub outlier_consecutive_5xx: Option<u32>,
    pub outlier_base_ejection_time: Option<f64>,
    pub outlier_max_ejection_percent: Option<u32>,
    pub strategy_scope: Option<String>,
    pub dns_refresh: Option<f64>,
    pub resolver: Option<String>,
}

/// One of `tls_certificates`: a certificate chain and its key, PEM files.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCertificate {
    pub cert: String,
    pub key: String,
}

/// A backend: `"host:port"`, or `{"address": "host:port", "weight": 3,
/// "labels": {"zone": "b"}, "tls": true, "tls_server_name": "b.internal"}`.
#[derive(Debug)]
pub(super) enum RawBackend {
    Address(String),
    Object {
        address: String,
        weight: Option<i64>,
        labels: Option<BTreeMap<String, String>>,
        tls: Option<bool>,
        tls_server_name: Option<String>,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackendObject {
    address: String,
    weight: Option<i64>,
    labels: Option<BTreeMap<String, String>>,
    tls: Option<bool>,
    tls_server_name: Option<String>,
}

// Written by hand rather than `#[serde(untagged)]`, whose only error is "data
// did not match any variant": an operator deserves to hear which key is wrong.
impl<'de> Deserialize<'de> for RawBackend {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BackendVisitor;

        impl<'de> Visitor<'de> for BackendVisitor {
            type Value = RawBackend;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a \"host:port\" string or an object {\"address\": \"host:port\", \"weight\": N, \"labels\": {...}, \"tls\": true}")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawBackend, E> {
                Ok(RawBackend::Address(v.to_string()))
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawBackend, A::Error> {
                let RawBackendObject {
                    address,
                    weight,
                    labels,
                    tls,
                    tls_server_name,
                } = RawBackendObject::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RawBackend::Object {
                    address,
                    weight,
                    labels,
                    tls,
                    tls_server_name,
                })
            }
        }

        deserializer.deserialize_any(BackendVisitor)
    }
}
