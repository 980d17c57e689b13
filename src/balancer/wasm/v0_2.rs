//! Contract 0.2.0 (`wit/0.2.0`): `configure(options, backends)` on every
//! fresh instance, `select(request, backends)`, an optional `observer`
//! export with `observe(outcome)`, and the `logging` import.
//!
//! Per call the host lowers the request record (two short strings, a few
//! numbers, the named headers) and the backend list, both in one pass
//! (`strategy_abi`), borrowing from the request: a call allocates nothing
//! on the host.

use std::net::IpAddr;

use wasmtime::component::{HasSelf, Instance, Linker, TypedFunc};
use wasmtime::Store;

use strategy_abi::{Backend as WitBackend, IpAddress, Method, Request, SelectWithRequest};

use super::{classify, lower_backends, Guest};
use crate::balancer::log::LogLevel;
use crate::balancer::{BackendInfo, BackendView, Failure, Outcome, RequestView, StrategyError};

mod bindings {
    wasmtime::component::bindgen!({
        path: "wit/0.2.0",
        world: "observing-strategy",
    });
}

use bindings::loadbalancer::strategy::{logging, types};

/// The export every 0.2.0 module has.
pub(super) const SELECTOR_EXPORT: &str = "loadbalancer:strategy/selector@0.2.0";
/// The optional export of an observing 0.2.0 module.
pub(super) const OBSERVER_EXPORT: &str = "loadbalancer:strategy/observer@0.2.0";
/// The imports a 0.2.0 module is granted.
pub(super) const IMPORTS: [&str; 2] = [
    "loadbalancer:strategy/types@0.2.0",
    "loadbalancer:strategy/logging@0.2.0",
];

/// Defines the contract's imports: `types` (no functions) and `logging`.
pub(super) fn add_to_linker(linker: &mut Linker<Guest>) -> wasmtime::Result<()> {
    bindings::ObservingStrategy::add_to_linker::<Guest, HasSelf<Guest>>(linker, |guest| guest)
}

impl types::Host for Guest {}

impl logging::Host for Guest {
    fn log(&mut self, level: logging::Level, message: String) {
        let level = match level {
            logging::Level::Debug => LogLevel::Debug,
            logging::Level::Info => LogLevel::Info,
            logging::Level::Warn => LogLevel::Warn,
            logging::Level::Error => LogLevel::Error,
        };
        self.log.log(level, &message);
    }
}

/// `backend-info` as `configure` lowers it, borrowing from the host's list
/// (no copy of the addresses and labels per configure).
#[derive(wasmtime::component::ComponentType, wasmtime::component::Lower)]
#[component(record)]
struct BackendInfoRef<'a> {
    id: u32,
    address: &'a str,
    weight: u32,
    labels: &'a [(String, String)],
}

type ConfigureFunc<'a> = TypedFunc<(&'a str, &'a [BackendInfoRef<'a>]), (Result<(), String>,)>;
type ObserveFunc = TypedFunc<(types::Outcome,), ()>;

/// The functions of one 0.2.0 instance, and the request record and
/// argument buffer reused from call to call.
pub(super) struct Calls {
    configure: wasmtime::component::Func,
    select: SelectWithRequest,
    observe: Option<ObserveFunc>,
    args: Vec<WitBackend>,
}

impl Calls {
    /// Looks up the selector's functions (and the observer's, if
    /// `observes`); wasmtime checks their types against the contract here.
    pub(super) fn new(
        store: &mut Store<Guest>,
        instance: &Instance,
        observes: bool,
    ) -> Result<Calls, StrategyError> {
        let func = |store: &mut Store<Guest>, interface: &str, name: &str| {
            let missing =
                || StrategyError::Instantiate(format!("no function `{name}` in `{interface}`"));
            let parent = instance
                .get_export_index(&mut *store, None, interface)
                .ok_or_else(missing)?;
            instance
                .get_export_index(&mut *store, Some(&parent), name)
                .and_then(|index| instance.get_func(&mut *store, index))
                .ok_or_else(missing)
        };
        let mistyped = |name: &str, interface: &str, signature: &str, e: wasmtime::Error| {
            StrategyError::Instantiate(format!(
                "`{name}` in `{interface}` does not have the contract's type `{signature}`: {e:#}"
            ))
        };
        let configure = func(store, SELECTOR_EXPORT, "configure")?;
        configure
            .typed::<(&str, &[BackendInfoRef<'_>]), (Result<(), String>,)>(&*store)
            .map_err(|e| {
                mistyped(
                    "configure",
                    SELECTOR_EXPORT,
                    "func(options: string, backends: list<backend-info>) -> result<_, string>",
                    e,
                )
            })?;
        let select = func(store, SELECTOR_EXPORT, "select")?;
        let select = SelectWithRequest::new(&*store, select).map_err(|e| {
            mistyped(
                "select",
                SELECTOR_EXPORT,
                "func(request: request, backends: list<backend>) -> option<u32>",
                e,
            )
        })?;
        let observe = if observes {
            Some(
                func(store, OBSERVER_EXPORT, "observe")?
                    .typed(&*store)
                    .map_err(|e| {
                        mistyped("observe", OBSERVER_EXPORT, "func(outcome: outcome)", e)
                    })?,
            )
        } else {
            None
        };
        Ok(Calls {
            configure,
            select,
            observe,
            args: Vec::new(),
        })
    }

    /// `configure(options, backends)`: the module's `Err` is
    /// [`StrategyError::Configure`] with its message.
    pub(super) fn configure(
        &mut self,
        store: &mut Store<Guest>,
        options: &str,
        backends: &[BackendInfo],
    ) -> Result<(), StrategyError> {
        let infos: Vec<BackendInfoRef<'_>> = backends
            .iter()
            .map(|b| BackendInfoRef {
                id: b.id,
                address: &b.address,
                weight: b.weight,
                labels: &b.labels,
            })
            .collect();
        // Checked in `new` with the same types; typed again per call for
        // the arguments' lifetimes (a cheap check of a cached type).
        let configure: ConfigureFunc<'_> = self
            .configure
            .typed(&*store)
            .map_err(|e| StrategyError::Instantiate(format!("`configure` changed type: {e:#}")))?;
        let (answer,) = configure
            .call(&mut *store, (options, &infos))
            .map_err(|e| classify(e, store))?;
        answer.map_err(StrategyError::Configure)
    }

    pub(super) fn select(
        &mut self,
        store: &mut Store<Guest>,
        request: &RequestView<'_>,
        backends: &[BackendView],
    ) -> Result<Option<u32>, StrategyError> {
        lower_backends(&mut self.args, backends);
        self.select
            .call(&mut *store, &record(request), &self.args)
            .map_err(|e| classify(e, store))
    }

    pub(super) fn observe(
        &mut self,
        store: &mut Store<Guest>,
        outcome: &Outcome,
    ) -> Result<(), StrategyError> {
        let Some(observe) = &self.observe else {
            return Ok(());
        };
        let outcome = types::Outcome {
            backend_id: outcome.backend_id,
            status: outcome.status,
            failure: outcome.failure.map(|f| match f {
                Failure::Connect => types::Failure::Connect,
                Failure::Timeout => types::Failure::Timeout,
                Failure::Io => types::Failure::Io,
            }),
            latency_micros: outcome.latency_micros,
            attempt: outcome.attempt,
            request_id: outcome.request_id,
        };
        observe
            .call(&mut *store, (outcome,))
            .map_err(|e| classify(e, store))
    }
}

/// The request record as `strategy_abi` lowers it, borrowing from `view`.
fn record<'a>(view: &RequestView<'a>) -> Request<'a> {
    use http::Method as M;
    Request {
        method: match *view.method {
            M::GET => Method::Get,
            M::HEAD => Method::Head,
            M::POST => Method::Post,
            M::PUT => Method::Put,
            M::DELETE => Method::Delete,
            M::CONNECT => Method::Connect,
            M::OPTIONS => Method::Options,
            M::TRACE => Method::Trace,
            M::PATCH => Method::Patch,
            ref other => Method::Other(other.as_str()),
        },
        path: view.path,
        authority: view.authority,
        client: match view.client {
            IpAddr::V4(ip) => IpAddress::V4(ip.octets()),
            IpAddr::V6(ip) => IpAddress::V6(ip.segments()),
        },
        hash_key: view.hash_key,
        headers: view.headers,
        attempt: view.attempt,
        random: view.random,
        id: view.id,
    }
}
