//! The wasm host: compiles a strategy component once, keeps one sandboxed
//! instance hot, and calls it under fuel, deadline and memory caps.
//!
//! Which contract a module implements is told by its export's name
//! (`loadbalancer:strategy/selector@0.1.0` or `@0.2.0`); each version has its
//! own file (`v0_1.rs`, `v0_2.rs`) with its bindings and calls, behind the
//! one [`Strategy`] trait.
//!
//! One instance sits behind a short lock, so the module sees calls in request
//! order and a round robin stays exact. After any trap wasmtime poisons the
//! whole `Store`, so a faulted instance is dropped and the next call builds a
//! fresh one from the pre-linked component (tens of microseconds), which a
//! 0.2.0 module then gets `configure`d again.

mod clock;
mod exports;
mod v0_1;
mod v0_2;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use wasmtime::component::{Component, InstancePre, Linker};
use wasmtime::{Config as EngineConfig, Engine, ResourceLimiter, Store, Trap, UpdateDeadline};

use super::log::ModuleLog;
use super::{
    BackendInfo, BackendView, Contract, Outcome, RequestView, Strategy, StrategyError,
    StrategySetup,
};
use crate::config::SandboxLimits;

/// The selector exports the host knows, oldest first; a module must have one.
pub const KNOWN_SELECTOR_EXPORTS: [&str; 2] = [v0_1::SELECTOR_EXPORT, v0_2::SELECTOR_EXPORT];

/// How often the sandbox clock ticks; a call's deadline is counted in ticks.
const EPOCH_TICK: Duration = clock::TICK;

pub use clock::is_parked as sandbox_clock_is_parked;

/// Most table elements an instance may grow to; strategies need a handful.
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// The process-wide engine: fuel and epoch interruption on, and the
/// sandbox clock (see `clock`), a thread that advances the epoch every
/// [`EPOCH_TICK`] while strategy code runs, for as long as the engine lives.
pub(crate) fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut config = EngineConfig::new();
        config.consume_fuel(true);
        config.epoch_interruption(true);
        let engine = Engine::new(&config).expect("the sandbox engine config is valid");
        clock::start(&engine);
        engine
    })
}

/// Why a strategy module could not be loaded. Each message names the module.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("strategy module {}: cannot read it: {source}", path.display())]
    Read {
        /// The module's path.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The bytes are a core wasm module, not a component.
    #[error("strategy module {}: this is a core WebAssembly module, not a component; wrap it with `wasm-tools component new`", path.display())]
    CoreModule {
        /// The module's path.
        path: PathBuf,
    },
    /// The bytes are not WebAssembly at all, or do not compile.
    #[error("strategy module {}: not a valid WebAssembly component: {message}", path.display())]
    Invalid {
        /// The module's path.
        path: PathBuf,
        /// What the compiler said.
        message: String,
    },
    /// The component does not export a selector interface the host knows,
    /// or exports one whose functions do not match it.
    #[error("strategy module {}: {message}", path.display())]
    MissingExport {
        /// The module's path.
        path: PathBuf,
        /// What it exports and what the host expected.
        message: String,
    },
    /// A 0.2.0 module's `configure` refused the options or backends.
    #[error("strategy module {}: configure refused the config: {message}", path.display())]
    Configure {
        /// The module's path.
        path: PathBuf,
        /// The module's own message.
        message: String,
    },
    /// The first instance could not be created (e.g. its memory exceeds the cap).
    #[error("strategy module {}: cannot be instantiated: {message}", path.display())]
    Instantiate {
        /// The module's path.
        path: PathBuf,
        /// Details.
        message: String,
    },
}

/// What a store carries: the memory cap and whether a call hit it, the
/// deadline's CPU-time bookkeeping, and the module's log.
pub(super) struct Guest {
    limiter: MemoryCap,
    log: Arc<ModuleLog>,
    /// The thread's CPU time when the current call's deadline first
    /// expired; `None` until it does.
    expired_at_cpu: Option<Duration>,
    /// How many times the current call's deadline was extended.
    extensions: u32,
}

/// Most times one call's deadline is extended for a thread that was not
/// running: a bound on how long a call can hold the strategy on a machine
/// so overloaded that the calling thread barely runs.
const MAX_EXTENSIONS: u32 = 100;

/// CPU time the calling thread has used.
fn thread_cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        t.tv_sec.max(0) as u64,
        t.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

struct MemoryCap {
    max_bytes: usize,
    exceeded: bool,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Refusing makes `memory.grow` return -1; a guest that cannot cope
        // traps, and `exceeded` tells that trap apart from any other.
        if desired > self.max_bytes {
            self.exceeded = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// A live instance: its store and the calls of its contract version.
struct Live {
    store: Store<Guest>,
    calls: Calls,
}

enum Calls {
    V0_1(v0_1::Calls),
    V0_2(v0_2::Calls),
}

/// A strategy implemented by a sandboxed wasm component.
pub struct WasmStrategy {
    name: String,
    contract: Contract,
    pre: InstancePre<Guest>,
    /// Whether a 0.2.0 module exports the `observer` interface.
    observes: bool,
    limits: SandboxLimits,
    log: Arc<ModuleLog>,
    /// `strategy_options` as JSON text, for every `configure`.
    options: String,
    /// The configured backends, for the `configure` of every fresh instance.
    backends: Mutex<Arc<[BackendInfo]>>,
    live: Mutex<Option<Live>>,
}

impl WasmStrategy {
    /// Loads the component at `path`: compiles it, links it with no
    /// capabilities but the contract's own, instantiates it once to prove it
    /// can run and, for a 0.2.0 module, configures it.
    pub fn from_file(path: &Path, setup: &StrategySetup) -> Result<WasmStrategy, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let component = compile_cached(&bytes, path)?;
        WasmStrategy::new(path.display().to_string(), &component, path, setup)
    }

    /// Loads a built-in module by name (see [`BUILTIN_STRATEGIES`](crate::config::BUILTIN_STRATEGIES)),
    /// compiling it once per process.
    pub fn builtin(name: &str, setup: &StrategySetup) -> Result<WasmStrategy, LoadError> {
        let path = PathBuf::from(format!("<built-in {name}>"));
        let component = super::builtin::compiled(name, &path)?;
        WasmStrategy::new(name.to_string(), &component, &path, setup)
    }

    /// Wraps an already compiled component; `path` names it in errors.
    fn new(
        name: String,
        component: &Component,
        path: &Path,
        setup: &StrategySetup,
    ) -> Result<WasmStrategy, LoadError> {
        let engine = engine();
        let (contract, observes) = exports::contract_of(component, engine).map_err(|message| {
            LoadError::MissingExport {
                path: path.to_path_buf(),
                message,
            }
        })?;
        let invalid = |e: wasmtime::Error| LoadError::Invalid {
            path: path.to_path_buf(),
            message: format!("{e:#}"),
        };
        let mut linker = Linker::<Guest>::new(engine);
        let granted: &[&str] = match contract {
            Contract::V0_2 => {
                v0_2::add_to_linker(&mut linker).map_err(invalid)?;
                &v0_2::IMPORTS
            }
            _ => &[],
        };
        // Modules get no capabilities beyond the contract's. A toolchain
        // that imports WASI anyway still loads, but a call to such an import
        // fails, naming it.
        let ungranted =
            exports::stub_ungranted(&mut linker, component, engine, granted).map_err(invalid)?;
        if !ungranted.is_empty() {
            tracing::warn!(
                module = %name,
                imports = %ungranted.join(", "),
                "strategy module imports host functions; none are granted, calls to them will trap"
            );
        }
        let pre = linker.instantiate_pre(component).map_err(invalid)?;
        clock::set_timeout(setup.limits.timeout);
        let strategy = WasmStrategy {
            log: Arc::new(ModuleLog::new(name.clone(), Arc::clone(&setup.log))),
            name,
            contract,
            pre,
            observes,
            limits: setup.limits,
            options: setup.options.clone(),
            backends: Mutex::new(setup.backends.clone().into()),
            live: Mutex::new(None),
        };
        let first = strategy.instantiate().map_err(|e| match e {
            StrategyError::Configure(message) => LoadError::Configure {
                path: path.to_path_buf(),
                message,
            },
            StrategyError::Instantiate(message) => LoadError::MissingExport {
                path: path.to_path_buf(),
                message,
            },
            other => LoadError::Instantiate {
                path: path.to_path_buf(),
                message: other.to_string(),
            },
        })?;
        *strategy.live.lock().unwrap_or_else(|e| e.into_inner()) = Some(first);
        Ok(strategy)
    }

    /// A fresh instance, its functions looked up and (0.2.0) configured.
    /// A missing or mistyped function is [`StrategyError::Instantiate`].
    fn instantiate(&self) -> Result<Live, StrategyError> {
        let mut store = Store::new(
            engine(),
            Guest {
                limiter: MemoryCap {
                    max_bytes: self.limits.memory_bytes,
                    exceeded: false,
                },
                log: Arc::clone(&self.log),
                expired_at_cpu: None,
                extensions: 0,
            },
        );
        store.limiter(|guest| &mut guest.limiter);
        // The deadline is wall-clock, but a call on a busy machine can be
        // preempted past it without being at fault. So when it first expires
        // the call goes on, and the thread's CPU time from then on decides:
        // once the call has used a quarter of a window more, it is stopped.
        // A looping module is cut off after about two windows (a few more on
        // a machine so busy its thread gets little CPU); a fast call that was
        // merely preempted finishes as soon as it runs again.
        let window = self.limits.timeout;
        let ticks = deadline_ticks(window);
        store.epoch_deadline_callback(move |mut ctx| {
            let now = thread_cpu_time();
            let guest = ctx.data_mut();
            guest.extensions += 1;
            let first_expiry = *guest.expired_at_cpu.get_or_insert(now);
            if now.saturating_sub(first_expiry) >= window / 4 || guest.extensions > MAX_EXTENSIONS {
                Ok(UpdateDeadline::Interrupt)
            } else {
                Ok(UpdateDeadline::Continue(ticks))
            }
        });
        // Instantiation runs guest code (start functions): bound it too.
        self.arm(&mut store);
        let instance = self
            .pre
            .instantiate(&mut store)
            .map_err(|e| classify(e, &store))?;
        let calls = match self.contract {
            Contract::V0_2 => Calls::V0_2(v0_2::Calls::new(&mut store, &instance, self.observes)?),
            _ => Calls::V0_1(v0_1::Calls::new(&mut store, &instance)?),
        };
        let mut live = Live { store, calls };
        if let Calls::V0_2(calls) = &mut live.calls {
            let backends = Arc::clone(&self.backends.lock().unwrap_or_else(|e| e.into_inner()));
            self.arm(&mut live.store);
            calls.configure(&mut live.store, &self.options, &backends)?;
        }
        Ok(live)
    }

    /// Sets the per-call budget: fresh fuel, a deadline `limits.timeout` from
    /// now, and the per-call flags cleared.
    fn arm(&self, store: &mut Store<Guest>) {
        // Fuel is on for every store of this engine, so this cannot fail.
        let _ = store.set_fuel(self.limits.fuel);
        store.set_epoch_deadline(deadline_ticks(self.limits.timeout));
        let guest = store.data_mut();
        guest.limiter.exceeded = false;
        guest.expired_at_cpu = None;
        guest.extensions = 0;
    }

    /// Runs `call` on the live instance (building one first if `build`),
    /// under a fresh budget. A fault drops the instance: the store is
    /// poisoned after a trap, and a module that answered nonsense has
    /// state it cannot be trusted with.
    fn with_live<R>(
        &self,
        build: bool,
        call: impl FnOnce(&mut Store<Guest>, &mut Calls) -> Result<R, StrategyError>,
    ) -> Result<Option<R>, StrategyError> {
        let mut slot = self.live.lock().unwrap_or_else(|e| e.into_inner());
        // The sandbox clock ticks while guest code (instantiation included)
        // may run.
        let _running = clock::Running::start();
        let live = match &mut *slot {
            Some(live) => live,
            None if build => slot.insert(self.instantiate()?),
            None => return Ok(None),
        };
        self.arm(&mut live.store);
        match call(&mut live.store, &mut live.calls) {
            Ok(answer) => Ok(Some(answer)),
            Err(fault) => {
                *slot = None;
                Err(fault)
            }
        }
    }
}

/// Refills `args` with `backends` as the contract's record (the same
/// layout in both versions; see `strategy_abi`).
fn lower_backends(args: &mut Vec<strategy_abi::Backend>, backends: &[BackendView]) {
    args.clear();
    args.extend(backends.iter().map(|b| strategy_abi::Backend {
        id: b.id,
        weight: b.weight,
        in_flight: b.in_flight,
        latency_micros: b.latency_micros,
    }));
}

/// A duration in sandbox clock ticks, at least one.
fn deadline_ticks(timeout: Duration) -> u64 {
    (timeout.as_nanos() / EPOCH_TICK.as_nanos()).max(1) as u64
}

/// Sorts a wasmtime error into a fault kind by its typed trap code, never by
/// its message.
pub(super) fn classify(error: wasmtime::Error, store: &Store<Guest>) -> StrategyError {
    if store.data().limiter.exceeded {
        return StrategyError::Memory;
    }
    if let Some(import) = error.downcast_ref::<exports::UngrantedImport>() {
        return StrategyError::Trap(import.to_string());
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => StrategyError::OutOfFuel,
        Some(Trap::Interrupt) => StrategyError::Timeout,
        Some(trap) => StrategyError::Trap(trap.to_string()),
        None => StrategyError::Trap(format!("{error:#}")),
    }
}

/// Most compiled modules kept for reuse: the built-ins and a few custom ones.
const MAX_CACHED_COMPONENTS: usize = 16;

/// Compiles component bytes at most once per process: a reload of an
/// unchanged module (a large JavaScript one takes seconds to compile) or a
/// built-in used twice reuses the machine code. Keyed by the bytes' hash
/// and length, checked against the bytes themselves.
pub(super) fn compile_cached(bytes: &[u8], path: &Path) -> Result<Component, LoadError> {
    use std::collections::hash_map::DefaultHasher;
    use std::hash::{Hash, Hasher};
    type Cache = Vec<(u64, std::sync::Arc<[u8]>, Component)>;
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();

    let mut hasher = DefaultHasher::new();
    bytes.hash(&mut hasher);
    let key = hasher.finish();
    let cache = CACHE.get_or_init(Default::default);
    let lookup = |cache: &Cache| {
        cache
            .iter()
            .find(|(k, b, _)| *k == key && **b == *bytes)
            .map(|(_, _, c)| c.clone())
    };
    if let Some(component) = lookup(&cache.lock().unwrap_or_else(|e| e.into_inner())) {
        return Ok(component);
    }
    // Compile outside the lock: a slow compilation must not hold up a
    // lookup of another module.
    let component = compile(bytes, path)?;
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    if lookup(&cache).is_none() {
        if cache.len() >= MAX_CACHED_COMPONENTS {
            cache.remove(0);
        }
        cache.push((key, bytes.into(), component.clone()));
    }
    Ok(component)
}

/// Compiles component bytes, telling a core module or garbage apart from a
/// component that fails to compile.
fn compile(bytes: &[u8], path: &Path) -> Result<Component, LoadError> {
    // The preamble: magic, then a version and layer; layer 1 is a component.
    const MAGIC: &[u8] = b"\0asm";
    if bytes.len() >= 8 && bytes.starts_with(MAGIC) && bytes[6..8] == [0, 0] {
        return Err(LoadError::CoreModule {
            path: path.to_path_buf(),
        });
    }
    if !bytes.starts_with(MAGIC) {
        return Err(LoadError::Invalid {
            path: path.to_path_buf(),
            message: "the file does not start with the WebAssembly magic bytes".into(),
        });
    }
    Component::new(engine(), bytes).map_err(|e| LoadError::Invalid {
        path: path.to_path_buf(),
        message: format!("{e:#}"),
    })
}

impl Strategy for WasmStrategy {
    fn name(&self) -> &str {
        &self.name
    }

    fn contract(&self) -> Contract {
        self.contract
    }

    fn select(
        &self,
        request: &RequestView<'_>,
        backends: &[BackendView],
    ) -> Result<Option<usize>, StrategyError> {
        let answer = self
            .with_live(true, |store, calls| {
                let answer = match calls {
                    Calls::V0_1(calls) => calls.select(store, backends),
                    Calls::V0_2(calls) => calls.select(store, request, backends),
                }?;
                match answer {
                    Some(i) if (i as usize) >= backends.len() => Err(StrategyError::BadIndex {
                        index: u64::from(i),
                        len: backends.len(),
                    }),
                    other => Ok(other.map(|i| i as usize)),
                }
            })?
            .flatten();
        Ok(answer)
    }

    fn observes(&self) -> bool {
        self.observes
    }

    fn observe(&self, outcome: &Outcome) -> Result<(), StrategyError> {
        // No live instance: the one that made the pick faulted and is gone,
        // and a fresh one would learn of a pick it never made.
        self.with_live(false, |store, calls| match calls {
            Calls::V0_2(calls) => calls.observe(store, outcome),
            Calls::V0_1(_) => Ok(()),
        })
        .map(drop)
    }

    fn configure(&self, backends: &[BackendInfo]) -> Result<(), StrategyError> {
        *self.backends.lock().unwrap_or_else(|e| e.into_inner()) = backends.to_vec().into();
        if self.contract != Contract::V0_2 {
            return Ok(());
        }
        let options = &self.options;
        self.with_live(false, |store, calls| match calls {
            Calls::V0_2(calls) => calls.configure(store, options, backends),
            Calls::V0_1(_) => Ok(()),
        })
        .map(drop)
    }
}

impl std::fmt::Debug for WasmStrategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmStrategy")
            .field("name", &self.name)
            .field("contract", &self.contract)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}
