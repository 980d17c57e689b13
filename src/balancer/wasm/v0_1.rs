//! Contract 0.1.0 (`wit/0.1.0`, frozen): `select(backends) -> option<u32>`;
//! the module imports nothing and sees backend numbers only.

use wasmtime::component::Instance;
use wasmtime::Store;

// `select` as the host calls it: the argument lowered by `strategy_abi` in
// one pass (see that crate), the answer lifted by wasmtime.
use strategy_abi::{Backend as WitBackend, Select};

use super::{classify, lower_backends, Guest};
use crate::balancer::{BackendView, StrategyError};

/// The export a 0.1.0 module has.
pub(super) const SELECTOR_EXPORT: &str = "loadbalancer:strategy/selector@0.1.0";

/// The functions of one 0.1.0 instance and a reusable argument buffer.
pub(super) struct Calls {
    select: Select,
    args: Vec<WitBackend>,
}

impl Calls {
    /// Looks up `select` with the host's argument type; wasmtime checks the
    /// component's `backend` record against it here.
    pub(super) fn new(
        store: &mut Store<Guest>,
        instance: &Instance,
    ) -> Result<Calls, StrategyError> {
        let missing =
            |what: &str| StrategyError::Instantiate(format!("{what} in `{SELECTOR_EXPORT}`"));
        let interface = instance
            .get_export_index(&mut *store, None, SELECTOR_EXPORT)
            .ok_or_else(|| missing("no interface"))?;
        let func = instance
            .get_export_index(&mut *store, Some(&interface), "select")
            .and_then(|index| instance.get_func(&mut *store, index))
            .ok_or_else(|| missing("no function `select`"))?;
        let select = Select::new(&*store, func).map_err(|e| {
            StrategyError::Instantiate(format!(
                "`select` in `{SELECTOR_EXPORT}` does not have the contract's type \
                 `func(backends: list<backend>) -> option<u32>`: {e:#}"
            ))
        })?;
        Ok(Calls {
            select,
            args: Vec::new(),
        })
    }

    pub(super) fn select(
        &mut self,
        store: &mut Store<Guest>,
        backends: &[BackendView],
    ) -> Result<Option<u32>, StrategyError> {
        lower_backends(&mut self.args, backends);
        self.select
            .call(&mut *store, &self.args)
            .map_err(|e| classify(e, store))
    }
}
