//! The command line, through the real binary: `--check` on good and bad
//! configs, `--version`, and the shipped `config.json`.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_rust_load_balancer");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("the binary runs")
}

/// Writes `text` to `name` in a fresh folder and runs `--check` on it.
fn check(name: &str, text: &str) -> (Output, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    (run(&["--check", "--config", path.to_str().unwrap()]), dir)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn assert_fails_naming(output: &Output, needles: &[&str]) {
    assert_eq!(output.status.code(), Some(1), "{}", stderr(output));
    let err = stderr(output);
    for needle in needles {
        assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
    }
    assert!(
        !err.contains("panicked"),
        "a bad config must not panic: {err}"
    );
    assert!(!err.contains("RUST_BACKTRACE"), "{err}");
}

#[test]
fn the_shipped_config_json_is_valid() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.json");
    let config = rust_load_balancer::Config::load(&shipped).expect("config.json loads");
    assert_eq!(config.listen_address, "127.0.0.1:8080".parse().unwrap());
    let output = run(&["--check", "--config", shipped.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("ok: listen 127.0.0.1:8080, 2 backends, strategy round-robin"),
        "{stdout}"
    );
}

#[test]
fn original_yaml_and_object_backend_configs_pass_check() {
    let (out, _d) = check(
        "original.json",
        r#"{ "listen_address": "127.0.0.1:8080",
             "backend_servers": ["127.0.0.1:8081", "127.0.0.1:8082"],
             "health_check_interval": 30, "health_check_timeout": 5 }"#,
    );
    assert!(out.status.success(), "{}", stderr(&out));

    let (out, _d) = check(
        "lb.yaml",
        "listen_address: 127.0.0.1:8080\nbackend_servers:\n  - 127.0.0.1:8081\n  - address: 127.0.0.1:8082\n    weight: 3\nstrategy: weighted-round-robin\n",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("strategy weighted-round-robin"));

    let (out, _d) = check(
        "objects.json",
        r#"{ "listen_address": "127.0.0.1:8080",
             "backend_servers": [{"address": "127.0.0.1:8081", "weight": 5}, {"address": "localhost:8082"}] }"#,
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn bad_configs_fail_with_a_message_naming_the_problem() {
    let (out, _d) = check(
        "typo.json",
        r#"{ "listen_address": "127.0.0.1:8080", "backend_servers": ["127.0.0.1:8081"],
             "health_check_intervall": 30 }"#,
    );
    assert_fails_naming(
        &out,
        &[
            "typo.json",
            "unknown field `health_check_intervall`",
            "line 2",
        ],
    );

    let (out, _d) = check(
        "empty.json",
        r#"{ "listen_address": "127.0.0.1:8080", "backend_servers": [] }"#,
    );
    assert_fails_naming(&out, &["empty.json", "backend_servers", "empty"]);

    let (out, _d) = check(
        "address.json",
        r#"{ "listen_address": "127.0.0.1:8080", "backend_servers": ["127.0.0.1:8081", "127.0.0.1"] }"#,
    );
    assert_fails_naming(
        &out,
        &[
            "address.json",
            "backend_servers[1]",
            "\"127.0.0.1\"",
            "missing port",
        ],
    );

    let (out, _d) = check(
        "bad.yaml",
        "listen_address: 127.0.0.1:8080\nbackend_servers:\n  - address: 127.0.0.1:1\n    weight: 0\n",
    );
    assert_fails_naming(&out, &["bad.yaml", "backend_servers[0].weight"]);

    let (out, _d) = check("syntax.yml", "listen_address: [unclosed\n");
    assert_fails_naming(&out, &["syntax.yml", "line"]);

    let missing = PathBuf::from("/nonexistent/lb/config.json");
    let out = run(&["--check", "--config", missing.to_str().unwrap()]);
    assert_fails_naming(
        &out,
        &[
            "cannot read config file /nonexistent/lb/config.json",
            "No such file",
        ],
    );
}

#[test]
fn strategy_modules_are_checked_too() {
    let (out, _d) = check(
        "nomodule.json",
        r#"{ "listen_address": "127.0.0.1:8080", "backend_servers": ["127.0.0.1:8081"],
             "strategy": "missing.wasm" }"#,
    );
    assert_fails_naming(&out, &["missing.wasm", "cannot read"]);

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("junk.wasm"), b"not wasm at all").unwrap();
    // A core module (no component layer): the magic and version 1.
    std::fs::write(dir.path().join("core.wasm"), b"\0asm\x01\0\0\0").unwrap();
    for (module, needle) in [
        ("junk.wasm", "not a valid WebAssembly component"),
        ("core.wasm", "core WebAssembly module, not a component"),
    ] {
        let path = dir.path().join(format!("{module}.json"));
        std::fs::write(
            &path,
            format!(
                r#"{{ "listen_address": "127.0.0.1:8080", "backend_servers": ["127.0.0.1:8081"], "strategy": "{module}" }}"#
            ),
        )
        .unwrap();
        let out = run(&["--check", "--config", path.to_str().unwrap()]);
        assert_fails_naming(&out, &[module, needle]);
    }

    let good = support::dist("pick-last.wasm");
    let (out, _d) = check(
        "custom.json",
        &format!(
            r#"{{ "listen_address": "127.0.0.1:8080", "backend_servers": ["127.0.0.1:8081"], "strategy": "{}" }}"#,
            good.display()
        ),
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn version_and_help() {
    let out = run(&["--version"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
    let out = run(&["--help"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--check"));
}

#[test]
fn strategy_list_names_the_built_ins() {
    let out = run(&["strategy", "list"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "round-robin\nleast-connections\nweighted-round-robin\nconsistent-hash\npeak-ewma\n"
    );
}

#[test]
fn new_keys_are_checked_naming_the_key() {
    let base = r#""listen_address": "127.0.0.1:8080", "backend_servers": ["127.0.0.1:8081"]"#;
    for (extra, needles) in [
        (
            r#""hash_key": "headers:x-user""#,
            &["hash_key", "unknown hash key \"headers:x-user\""][..],
        ),
        (
            r#""hash_key": "cookie:""#,
            &["hash_key", "names no cookie"][..],
        ),
        (
            r#""hash_key": "header:connection""#,
            &["hash_key", "hop-by-hop"][..],
        ),
        (
            r#""strategy_headers": ["x-user", "X-User"]"#,
            &["strategy_headers[1]", "listed twice"][..],
        ),
        (
            r#""strategy_headers": ["bad header"]"#,
            &["strategy_headers[0]", "not a valid header name"][..],
        ),
        (
            r#""backend_servers": [{"address": "127.0.0.1:1", "labels": {"zone": 3}}]"#,
            &["expected a string"][..],
        ),
        (
            r#""backend_servers": [{"address": "127.0.0.1:1", "labels": {"": "x"}}]"#,
            &["backend_servers[0].labels", "a label needs a name"][..],
        ),
        (
            r#""strategy": "consistent-hash", "strategy_options": {"tabel_size": 7}"#,
            &[
                "<built-in consistent-hash>",
                "configure refused",
                "tabel_size",
            ][..],
        ),
    ] {
        // A later key replaces an earlier one of the same name in the base.
        let text = if extra.starts_with(r#""backend_servers""#) {
            format!(r#"{{ "listen_address": "127.0.0.1:8080", {extra} }}"#)
        } else {
            format!("{{ {base}, {extra} }}")
        };
        let (out, _d) = check("lb.json", &text);
        assert_fails_naming(&out, needles);
    }
    let (out, _d) = check(
        "lb.yaml",
        "listen_address: 127.0.0.1:8080\nbackend_servers:\n  - address: 127.0.0.1:8081\n    labels: {zone: b}\nstrategy: consistent-hash\nhash_key: cookie:session\nstrategy_headers: [x-user]\nstrategy_options:\n  table_size: 251\n  balance_factor: 1.5\n",
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn strategy_test_runs_0_2_0_modules() {
    for module in ["consistent-hash", "peak-ewma"] {
        let out = run(&[
            "strategy",
            "test",
            module,
            "--backends",
            "3",
            "--requests",
            "300",
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{module}: {stdout}{}", stderr(&out));
        assert!(stdout.contains("faults: none"), "{module}: {stdout}");
        let picks: Vec<u64> = stdout
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|cols| cols.len() == 4 && cols[0].parse::<u32>().is_ok())
            .map(|cols| cols[2].parse().unwrap())
            .collect();
        assert_eq!(picks.len(), 3, "{stdout}");
        assert_eq!(picks.iter().sum::<u64>(), 300, "{stdout}");
        assert!(
            picks.iter().all(|&p| p > 0),
            "{module} left a backend out: {stdout}"
        );
    }
}

#[test]
fn strategy_test_prints_the_distribution_of_a_good_module() {
    let out = run(&[
        "strategy",
        "test",
        "weighted-round-robin",
        "--weights",
        "5,1,1",
        "--requests",
        "700",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", stderr(&out));
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .filter(|cols: &Vec<&str>| cols.len() == 4 && cols[0].parse::<u32>().is_ok())
        .collect();
    let picks: Vec<&str> = rows.iter().map(|r| r[2]).collect();
    assert_eq!(picks, ["500", "100", "100"], "{stdout}");
    assert!(stdout.contains("faults: none"), "{stdout}");
    assert!(stdout.contains("select time: median"), "{stdout}");

    let custom = support::dist("pick-last.wasm");
    let out = run(&[
        "strategy",
        "test",
        custom.to_str().unwrap(),
        "--backends",
        "3",
        "--requests",
        "30",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("       2        1         30   100.0%"),
        "{stdout}"
    );
}

#[test]
fn strategy_test_fails_naming_the_fault() {
    for (module, faults) in [
        ("misbehave-trap.wasm", &["trap="][..]),
        // Fuel or the clock, whichever runs out first on this machine.
        ("misbehave-loop.wasm", &["timeout=", "out_of_fuel="][..]),
        ("misbehave-bad-index.wasm", &["bad_index="][..]),
    ] {
        let path = support::dist(module);
        let out = run(&[
            "strategy",
            "test",
            path.to_str().unwrap(),
            "--requests",
            "50",
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_fails_naming(&out, &[module, "faulted"]);
        assert!(
            faults.iter().any(|f| stdout.contains(f)),
            "{module}: {stdout}"
        );
    }
    let out = run(&["strategy", "test", "/nonexistent/x.wasm"]);
    assert_fails_naming(&out, &["/nonexistent/x.wasm", "cannot read"]);
    let out = run(&[
        "strategy",
        "test",
        "round-robin",
        "--backends",
        "2",
        "--weights",
        "1,2,3",
    ]);
    assert_fails_naming(&out, &["--weights has 3 values but --backends is 2"]);
}

/// Runs the binary in `dir` (as its working directory).
fn run_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .output()
        .expect("the binary runs")
}

#[test]
fn the_config_is_config_json_in_the_working_directory_or_the_one_c_names() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing there: the default file is named in the error.
    let out = run_in(dir.path(), &["--check"]);
    assert_fails_naming(&out, &["cannot read config file config.json"]);

    std::fs::write(
        dir.path().join("config.json"),
        r#"{ "listen_address": "127.0.0.1:18080", "strategy": "least-connections",
             "backend_servers": ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"] }"#,
    )
    .unwrap();
    let out = run_in(dir.path(), &["--check"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "config.json: ok: listen 127.0.0.1:18080, 3 backends, strategy least-connections\n"
    );

    // `-c` and `--config` name another file, wherever the binary runs.
    let other = dir.path().join("other.yaml");
    std::fs::write(
        &other,
        "listen_address: 127.0.0.1:18081\nbackend_servers: [127.0.0.1:4]\n",
    )
    .unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    for flag in ["-c", "--config"] {
        let out = run_in(
            elsewhere.path(),
            &[flag, other.to_str().unwrap(), "--check"],
        );
        assert!(out.status.success(), "{flag}: {}", stderr(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!(
                "{}: ok: listen 127.0.0.1:18081, 1 backend, strategy round-robin\n",
                other.display()
            ),
            "{flag}"
        );
    }
    // `-c` wins over a config.json in the working directory.
    let out = run_in(dir.path(), &["-c", "other.yaml", "--check"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("listen 127.0.0.1:18081"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// `strategy test MODULE --requests N ARGS...`: (exit code, stdout).
fn strategy_test(module: &str, requests: &str, args: &[&str]) -> (Option<i32>, String) {
    let mut all = vec!["strategy", "test", module, "--requests", requests];
    all.extend_from_slice(args);
    let out = run(&all);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(!text.contains("panicked"), "{text}");
    (out.status.code(), text)
}

/// The fault kinds a `strategy test` report names on its `faults:` line.
fn fault_kinds(text: &str) -> Vec<String> {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("faults: "))
        .unwrap_or_else(|| panic!("no faults line: {text}"));
    if line == "none" {
        return Vec::new();
    }
    line.split([' ', ','])
        .filter(|part| !part.is_empty())
        .map(|part| {
            let (kind, count) = part.split_once('=').unwrap_or_else(|| panic!("{line}"));
            assert!(count.parse::<u64>().unwrap() > 0, "{line}");
            kind.to_string()
        })
        .collect()
}

#[test]
fn strategy_test_fuel_timeout_and_memory_flags_change_the_outcome() {
    // --fuel: round robin passes with the default fuel, runs out with 1.
    let (code, text) = strategy_test("round-robin", "20", &[]);
    assert_eq!(code, Some(0), "{text}");
    assert!(fault_kinds(&text).is_empty(), "{text}");
    let (code, text) = strategy_test("round-robin", "20", &["--fuel", "1"]);
    assert_eq!(code, Some(1), "{text}");
    assert_eq!(fault_kinds(&text), ["out_of_fuel"], "{text}");

    // --timeout: a module that loops, with the same fuel (about 80 ms of
    // looping here, far more than 0.002 s and far less than 60 s): the
    // deadline decides which limit stops it.
    let looping = support::dist("misbehave-loop.wasm");
    let looping = looping.to_str().unwrap();
    let fuel = ["--fuel", "1000000000"];
    let (code, text) = strategy_test(looping, "2", &[&fuel[..], &["--timeout", "60"]].concat());
    assert_eq!(code, Some(1), "{text}");
    assert_eq!(fault_kinds(&text), ["out_of_fuel"], "{text}");
    let (code, text) = strategy_test(looping, "2", &[&fuel[..], &["--timeout", "0.002"]].concat());
    assert_eq!(code, Some(1), "{text}");
    assert_eq!(fault_kinds(&text), ["timeout"], "{text}");

    // --memory-mib: consistent-hash's table fits in 2 MiB, not in 1.
    let (code, text) = strategy_test("consistent-hash", "20", &["--memory-mib", "2"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(fault_kinds(&text).is_empty(), "{text}");
    let (code, text) = strategy_test("consistent-hash", "20", &["--memory-mib", "1"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("<built-in consistent-hash>") && text.contains("exceeded its memory limit"),
        "{text}"
    );
    // A module that hoards memory is stopped at the cap, at any cap.
    let hoard = support::dist("misbehave-memory.wasm");
    let (code, text) = strategy_test(hoard.to_str().unwrap(), "2", &["--memory-mib", "3"]);
    assert_eq!(code, Some(1), "{text}");
    assert_eq!(fault_kinds(&text), ["memory"], "{text}");

    // Out of range values are refused, naming the flags.
    for bad in [
        ["--fuel", "0"],
        ["--timeout", "0.0005"],
        ["--memory-mib", "0"],
    ] {
        let (code, text) = strategy_test("round-robin", "2", &bad);
        assert_eq!(code, Some(1), "{bad:?}: {text}");
        assert!(
            text.contains("--timeout must be at least 0.001"),
            "{bad:?}: {text}"
        );
    }
}
