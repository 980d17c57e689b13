//! The wasm host: compiles a strategy component once, keeps one sandboxed
//! instance hot, and calls its `select` under fuel, deadline and memory caps.
//!
//! One instance sits behind a short lock, so the module sees calls in request
//! order and a round robin stays exact. After any trap wasmtime poisons the
//! whole `Store`, so a faulted instance is dropped and the next call builds a
//! fresh one from the pre-linked component (tens of microseconds).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use wasmtime::component::{Component, Instance, Linker};
use wasmtime::{Config as EngineConfig, Engine, ResourceLimiter, Store, Trap, UpdateDeadline};

use super::{BackendView, Strategy, StrategyError};
use crate::config::SandboxLimits;

mod bindings {
    wasmtime::component::bindgen!({
        path: "wit/0.1.0",
        world: "strategy",
    });
}

use bindings::StrategyPre;
// `select` as the host calls it: the argument lowered by `strategy_abi` in
// one pass (see that crate), the answer lifted by wasmtime.
use strategy_abi::{Backend as WitBackend, Select};

/// The export every strategy module must have.
pub const SELECTOR_EXPORT: &str = "loadbalancer:strategy/selector@0.1.0";

/// How often the sandbox clock ticks; a call's deadline is counted in ticks.
const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Most table elements an instance may grow to; strategies need a handful.
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// The process-wide engine: fuel and epoch interruption on, and a ticker
/// thread that advances the epoch every [`EPOCH_TICK`] for as long as the
/// engine lives.
pub(crate) fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut config = EngineConfig::new();
        config.consume_fuel(true);
        config.epoch_interruption(true);
        let engine = Engine::new(&config).expect("the sandbox engine config is valid");
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .expect("spawning the sandbox clock thread");
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
    /// The component does not export the selector interface.
    #[error("strategy module {}: does not export `{SELECTOR_EXPORT}` with the expected `select` function ({message})", path.display())]
    MissingExport {
        /// The module's path.
        path: PathBuf,
        /// Details from the linker.
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

/// What a store carries: the memory cap and whether a call hit it, and the
/// deadline's CPU-time bookkeeping.
struct Guest {
    limiter: MemoryCap,
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

/// A live instance with its store and a reusable argument buffer.
struct Live {
    store: Store<Guest>,
    select: Select,
    args: Vec<WitBackend>,
}

/// A strategy implemented by a sandboxed wasm component.
pub struct WasmStrategy {
    name: String,
    pre: StrategyPre<Guest>,
    limits: SandboxLimits,
    live: Mutex<Option<Live>>,
}

impl WasmStrategy {
    /// Loads the component at `path`: compiles it, links it with no
    /// capabilities, and instantiates it once to prove it can run.
    pub fn from_file(path: &Path, limits: SandboxLimits) -> Result<WasmStrategy, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let component = compile_cached(&bytes, path)?;
        WasmStrategy::new(path.display().to_string(), &component, path, limits)
    }

    /// Loads a built-in module by name (see [`BUILTIN_STRATEGIES`](crate::config::BUILTIN_STRATEGIES)),
    /// compiling it once per process.
    pub fn builtin(name: &str, limits: SandboxLimits) -> Result<WasmStrategy, LoadError> {
        let path = PathBuf::from(format!("<built-in {name}>"));
        let component = super::builtin::compiled(name, &path)?;
        WasmStrategy::new(name.to_string(), &component, &path, limits)
    }

    /// Wraps an already compiled component; `path` names it in errors.
    fn new(
        name: String,
        component: &Component,
        path: &Path,
        limits: SandboxLimits,
    ) -> Result<WasmStrategy, LoadError> {
        let engine = engine();
        let mut linker = Linker::<Guest>::new(engine);
        let imports: Vec<String> = component
            .component_type()
            .imports(engine)
            .map(|(name, _)| name.to_string())
            .collect();
        if !imports.is_empty() {
            // Modules get no capabilities. A toolchain that imports WASI
            // anyway still loads, but any call to an import traps.
            tracing::warn!(
                module = %name,
                imports = %imports.join(", "),
                "strategy module imports host functions; none are granted, calls to them will trap"
            );
            linker
                .define_unknown_imports_as_traps(component)
                .map_err(|e| LoadError::Invalid {
                    path: path.to_path_buf(),
                    message: format!("{e:#}"),
                })?;
        }
        let instance_pre = linker
            .instantiate_pre(component)
            .map_err(|e| LoadError::Invalid {
                path: path.to_path_buf(),
                message: format!("{e:#}"),
            })?;
        let pre = StrategyPre::new(instance_pre).map_err(|e| LoadError::MissingExport {
            path: path.to_path_buf(),
            message: format!("{e:#}"),
        })?;
        let strategy = WasmStrategy {
            name,
            pre,
            limits,
            live: Mutex::new(None),
        };
        let first = strategy.instantiate().map_err(|e| LoadError::Instantiate {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        *strategy.live.lock().unwrap_or_else(|e| e.into_inner()) = Some(first);
        Ok(strategy)
    }

    fn instantiate(&self) -> Result<Live, StrategyError> {
        let mut store = Store::new(
            engine(),
            Guest {
                limiter: MemoryCap {
                    max_bytes: self.limits.memory_bytes,
                    exceeded: false,
                },
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
            .instance_pre()
            .instantiate(&mut store)
            .map_err(|e| classify(e, &store))?;
        let select =
            selector(&mut store, &instance).map_err(|e| StrategyError::Trap(format!("{e:#}")))?;
        Ok(Live {
            store,
            select,
            args: Vec::new(),
        })
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

    fn call(
        &self,
        live: &mut Live,
        backends: &[BackendView],
    ) -> Result<Option<u32>, StrategyError> {
        live.args.clear();
        live.args.extend(backends.iter().map(|b| WitBackend {
            id: b.id,
            weight: b.weight,
            active_connections: b.active_connections,
            latency_micros: b.latency_micros,
        }));
        self.arm(&mut live.store);
        live.select
            .call(&mut live.store, &live.args)
            .map_err(|e| classify(e, &live.store))
    }
}

/// Looks up the `select` export with the host's argument type; wasmtime
/// checks the component's `backend` record against it here.
fn selector(store: &mut Store<Guest>, instance: &Instance) -> wasmtime::Result<Select> {
    let interface = instance
        .get_export_index(&mut *store, None, SELECTOR_EXPORT)
        .ok_or_else(|| wasmtime::format_err!("no export {SELECTOR_EXPORT}"))?;
    let func = instance
        .get_export_index(&mut *store, Some(&interface), "select")
        .ok_or_else(|| wasmtime::format_err!("no function select in {SELECTOR_EXPORT}"))?;
    let func = instance
        .get_func(&mut *store, func)
        .ok_or_else(|| wasmtime::format_err!("select in {SELECTOR_EXPORT} is not a function"))?;
    Select::new(&*store, func)
}

/// A duration in sandbox clock ticks, at least one.
fn deadline_ticks(timeout: Duration) -> u64 {
    (timeout.as_nanos() / EPOCH_TICK.as_nanos()).max(1) as u64
}

/// Sorts a wasmtime error into a fault kind by its typed trap code, never by
/// its message.
fn classify(error: wasmtime::Error, store: &Store<Guest>) -> StrategyError {
    if store.data().limiter.exceeded {
        return StrategyError::Memory;
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

    fn select(&self, backends: &[BackendView]) -> Result<Option<usize>, StrategyError> {
        let mut slot = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let live = match &mut *slot {
            Some(live) => live,
            None => slot.insert(self.instantiate()?),
        };
        let result = match self.call(live, backends) {
            Ok(Some(i)) if (i as usize) >= backends.len() => Err(StrategyError::BadIndex {
                index: u64::from(i),
                len: backends.len(),
            }),
            other => other,
        };
        match result {
            Ok(answer) => Ok(answer.map(|i| i as usize)),
            Err(fault) => {
                // The store is poisoned after a trap, and a module that answers
                // out of range has state it cannot be trusted with: rebuild it
                // before its next call.
                *slot = None;
                Err(fault)
            }
        }
    }
}

impl std::fmt::Debug for WasmStrategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmStrategy")
            .field("name", &self.name)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}
