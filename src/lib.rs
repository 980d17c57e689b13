//! An HTTP load balancer whose backend-selection strategies are sandboxed
//! WebAssembly components.
//!
//! The native host ([`proxy`]) accepts clients, forwards requests over pooled
//! keep-alive connections and streams responses back; the [`server`] pool
//! tracks live per-backend stats and [`health`] checks them. The one decision
//! it delegates, *which* backend, goes to a strategy module through
//! [`balancer`], which runs it in wasmtime with fuel, time and memory caps
//! and falls back to native round robin on any fault. [`config`] turns a
//! JSON or YAML file into a validated [`Config`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use rust_load_balancer::{Config, Proxy};
//! let config = Config::load(std::path::Path::new("config.json"))?;
//! let proxy = Proxy::start(config).await?;
//! println!("listening on {}", proxy.local_addr());
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod balancer;
pub mod config;
pub mod describe;
pub mod discovery;
pub mod fields;
pub mod generation;
pub mod handover;
pub mod health;
pub mod limits;
pub mod metrics;
pub mod proxy;
pub mod random;
pub mod scaffold;
pub mod server;
pub mod throttle;
pub mod transport;

pub use config::Config;
pub use generation::ReloadError;
pub use proxy::{Proxy, StartError};
