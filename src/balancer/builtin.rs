//! The built-in strategies: components compiled from `plugins/` and embedded
//! in the binary, so `cargo run` needs nothing on disk but the config.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use wasmtime::component::Component;

use super::wasm::{compile, LoadError};

/// The bytes of the built-in module `name`, if there is one.
pub fn builtin_module(name: &str) -> Option<&'static [u8]> {
    Some(match name {
        "round-robin" => include_bytes!("../../plugins/dist/round-robin.wasm"),
        "least-connections" => include_bytes!("../../plugins/dist/least-connections.wasm"),
        "weighted-round-robin" => include_bytes!("../../plugins/dist/weighted-round-robin.wasm"),
        _ => return None,
    })
}

/// The compiled built-in `name`, compiled at most once per process: a reload
/// or a second balancer in the same process reuses the machine code.
pub(super) fn compiled(name: &str, path: &Path) -> Result<Component, LoadError> {
    static CACHE: OnceLock<Mutex<HashMap<String, Component>>> = OnceLock::new();
    let bytes = builtin_module(name).ok_or_else(|| LoadError::Invalid {
        path: path.to_path_buf(),
        message: format!("there is no built-in strategy named {name:?}"),
    })?;
    let cache = CACHE.get_or_init(Default::default);
    if let Some(component) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(name) {
        return Ok(component.clone());
    }
    // Compile outside the lock: two first uses may both compile, which is
    // cheaper than making every later lookup wait behind a compilation.
    let component = compile(bytes, path)?;
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(name.to_string(), component.clone());
    Ok(component)
}
