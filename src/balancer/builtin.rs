//! The built-in strategies: components compiled from `plugins/` and embedded
//! in the binary, so `cargo run` needs nothing on disk but the config.

use std::path::Path;

use wasmtime::component::Component;

use super::wasm::{compile_cached, LoadError};

/// The bytes of the built-in module `name`, if there is one.
pub fn builtin_module(name: &str) -> Option<&'static [u8]> {
    Some(match name {
        "round-robin" => include_bytes!("../../plugins/dist/round-robin.wasm"),
        "least-connections" => include_bytes!("../../plugins/dist/least-connections.wasm"),
        "weighted-round-robin" => include_bytes!("../../plugins/dist/weighted-round-robin.wasm"),
        "consistent-hash" => include_bytes!("../../plugins/dist/consistent-hash.wasm"),
        "peak-ewma" => include_bytes!("../../plugins/dist/peak-ewma.wasm"),
        _ => return None,
    })
}

/// The compiled built-in `name` (compiled once per process).
pub(super) fn compiled(name: &str, path: &Path) -> Result<Component, LoadError> {
    let bytes = builtin_module(name).ok_or_else(|| LoadError::Invalid {
        path: path.to_path_buf(),
        message: format!("there is no built-in strategy named {name:?}"),
    })?;
    compile_cached(bytes, path)
}
