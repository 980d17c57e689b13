//! Fuzzes config loading: any text, as JSON and as YAML, must give a
//! `Config` or a `ConfigError`, never a panic or a hang; a config that
//! loads must read back the same from its effective form.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use rust_load_balancer::config::{Config, Format};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for (format, path) in [(Format::Json, "fuzz.json"), (Format::Yaml, "fuzz.yaml")] {
        match Config::parse(text, format, Path::new(path)) {
            Ok(config) => {
                let _ = config.summary();
                let again = Config::parse(&config.to_json().to_string(), Format::Json, Path::new(path))
                    .expect("the effective config of a valid config is valid");
                assert_eq!(again, config);
            }
            Err(error) => {
                // Every error names the file.
                assert!(error.to_string().contains(path), "{error}");
            }
        }
    }
});
