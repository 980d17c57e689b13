//! The plugin author's kit through the real binary: every `strategy test`
//! flag against real modules, errors that name the cause (a mismatched
//! export, a call to an ungranted import), and `strategy new`'s output
//! (building it needs the wasm toolchains: `.ci/strategy-new.sh`).

mod support;

use std::process::{Command, Output};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_rust_load_balancer");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("the binary runs")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `strategy test MODULE ARGS --json`, which must succeed.
fn report(module: &str, args: &[&str]) -> Value {
    let mut all = vec!["strategy", "test", module, "--json"];
    all.extend_from_slice(args);
    let output = run(&all);
    assert!(
        output.status.success(),
        "{module} {args:?}: {}",
        text(&output)
    );
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("not one JSON object ({e}): {}", text(&output)))
}

fn picks(report: &Value) -> Vec<u64> {
    let picks = report["picks"].as_object().unwrap();
    (0..picks.len())
        .map(|id| picks[&id.to_string()].as_u64().unwrap())
        .collect()
}

fn probe() -> String {
    support::dist("probe.wasm").display().to_string()
}

#[test]
fn json_has_calls_picks_faults_call_times_and_the_log() {
    let r = report("round-robin", &["--backends", "3", "--requests", "30"]);
    assert_eq!(r["contract"], "0.1.0");
    assert_eq!(r["calls"], 30);
    assert_eq!(picks(&r), [10, 10, 10]);
    let faults = r["faults"].as_object().unwrap();
    assert!(faults.contains_key("trap") && faults.contains_key("configure"));
    assert!(faults.values().all(|n| n == 0));
    let (p50, p99, max) = (
        r["call_ns"]["p50"].as_u64().unwrap(),
        r["call_ns"]["p99"].as_u64().unwrap(),
        r["call_ns"]["max"].as_u64().unwrap(),
    );
    assert!(0 < p50 && p50 <= p99 && p99 <= max, "{p50} {p99} {max}");
    assert_eq!(r["log"], serde_json::json!([]));
}

#[test]
fn keys_1_lands_on_one_backend_and_keys_cycle() {
    let r = report(
        "consistent-hash",
        &["--backends", "5", "--requests", "200", "--keys", "1"],
    );
    let p = picks(&r);
    assert_eq!(p.iter().filter(|&&n| n > 0).count(), 1, "{p:?}");
    assert_eq!(p.iter().sum::<u64>(), 200);
    let r = report(
        "consistent-hash",
        &[
            "--backends",
            "5",
            "--requests",
            "300",
            "--keys",
            "3",
            "--trace",
            "6",
        ],
    );
    assert!(picks(&r).iter().filter(|&&n| n > 0).count() <= 3);
    // Request i carries key (i mod 3): requests 1 and 4 agree, as do their picks.
    let trace = r["trace"].as_array().unwrap();
    assert_eq!(trace.len(), 6);
    assert_eq!(trace[0]["hash_key"], trace[3]["hash_key"]);
    assert_ne!(trace[0]["hash_key"], trace[1]["hash_key"]);
    assert_eq!(trace[0]["pick"], trace[3]["pick"]);
    assert_eq!(
        trace[0]["hash_key"],
        serde_json::json!(xxhash_rust::xxh3::xxh3_64(b"key-0"))
    );
}

#[test]
fn status_fail_is_told_to_an_observer_which_steers_away() {
    // The probe's avoid-failing: round robin over backends whose latest
    // outcome was fine. Backend 0 refuses connections: the first request
    // tries it, is told `connect`, retries on 1; from then on 0 is avoided.
    let r = report(
        &probe(),
        &[
            "--backends",
            "3",
            "--requests",
            "60",
            "--status",
            "fail,200,200",
            "--options",
            r#"{"pick": "avoid-failing", "log_configure": false}"#,
        ],
    );
    let p = picks(&r);
    assert_eq!(p[0], 1, "{p:?}");
    assert_eq!(p[1] + p[2], 60);
    assert_eq!(r["retries"], 1);
    // peak-ewma avoids a backend answering 500.
    let r = report(
        "peak-ewma",
        &[
            "--backends",
            "3",
            "--requests",
            "300",
            "--status",
            "500,200,200",
        ],
    );
    let p = picks(&r);
    assert!(
        p[0] <= 3,
        "peak-ewma sent {} of 300 to the 500 backend: {p:?}",
        p[0]
    );
}

#[test]
fn latencies_and_in_flight_are_what_backends_show() {
    // Fixed loads: least connections always takes backend 1.
    let r = report(
        "least-connections",
        &["--requests", "50", "--in-flight", "5,0,9"],
    );
    assert_eq!(picks(&r), [0, 50, 0]);
    // peak-ewma prefers the backend that answers fast (with two backends
    // power of two choices always compares both; with three it would draw
    // the two slow ones together a third of the time).
    let r = report(
        "peak-ewma",
        &["--requests", "300", "--latencies", "50000,800"],
    );
    let p = picks(&r);
    assert!(p[1] >= 290, "{p:?}");
    let r = report(
        &probe(),
        &[
            "--requests",
            "1",
            "--latencies",
            "7,8",
            "--in-flight",
            "1,2",
            "--trace",
            "1",
        ],
    );
    assert_eq!(
        r["trace"][0]["backends"],
        serde_json::json!([
            {"id": 0, "weight": 1, "in_flight": 1, "latency_micros": 7},
            {"id": 1, "weight": 1, "in_flight": 2, "latency_micros": 8},
        ])
    );
}

#[test]
fn options_and_labels_reach_configure_and_its_log() {
    let r = report(
        &probe(),
        &[
            "--backends",
            "2",
            "--requests",
            "1",
            "--labels",
            "0:zone=a,1:zone=b,1:canary=yes",
            "--options",
            r#"{"log_configure": true}"#,
        ],
    );
    let log = r["log"].as_array().unwrap();
    let configure: Value = serde_json::from_str(log[0]["message"].as_str().unwrap()).unwrap();
    assert_eq!(
        configure["options"],
        serde_json::json!({"log_configure": true})
    );
    assert_eq!(
        configure["backends"],
        serde_json::json!([
            {"id": 0, "address": "127.0.0.1:8081", "weight": 1, "labels": [["zone", "a"]]},
            {"id": 1, "address": "127.0.0.1:8082", "weight": 1, "labels": [["canary", "yes"], ["zone", "b"]]},
        ])
    );
    assert_eq!(log[0]["level"], "info");
    // Options a module refuses: the load fails with its message.
    let out = run(&[
        "strategy",
        "test",
        "consistent-hash",
        "--options",
        r#"{"tabel_size": 3}"#,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("configure refused the config: unknown option `tabel_size`"),
        "{}",
        text(&out)
    );
    for (args, needle) in [
        (
            &["--options", "{not json"][..],
            "--options is not valid JSON",
        ),
        (
            &["--labels", "7:zone=a", "--backends", "2"][..],
            "there is no backend 7",
        ),
        (&["--labels", "zone=a"][..], "expected ID:KEY=VALUE"),
        (
            &["--status", "200,teapot"][..],
            "\"teapot\" is neither a status code",
        ),
        (
            &["--backends", "2", "--latencies", "1,2,3"][..],
            "--latencies has 3 values but --backends is 2",
        ),
    ] {
        let mut all = vec!["strategy", "test", "round-robin"];
        all.extend_from_slice(args);
        let out = run(&all);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(text(&out).contains(needle), "{args:?}: {}", text(&out));
    }
}

#[test]
fn the_seed_decides_the_random_values() {
    let args = ["--backends", "8", "--requests", "50", "--trace", "5"];
    let draw = |seed: &str| {
        let mut all = args.to_vec();
        all.extend_from_slice(&["--seed", seed]);
        let r = report("peak-ewma", &all);
        let randoms: Vec<Value> = r["trace"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["random"].clone())
            .collect();
        (randoms, picks(&r))
    };
    assert_eq!(draw("7"), draw("7"));
    assert_ne!(draw("7").0, draw("8").0);
}

#[test]
fn the_text_report_shows_the_trace_and_the_module_log() {
    let out = run(&[
        "strategy",
        "test",
        &probe(),
        "--backends",
        "2",
        "--requests",
        "3",
        "--trace",
        "2",
        "--options",
        r#"{"log_select": true, "log_configure": false}"#,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", text(&out));
    assert!(stdout.contains("(contract 0.2.0)"), "{stdout}");
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("trace: ")).count(),
        2,
        "{stdout}"
    );
    assert!(
        stdout.contains("trace: request 1 attempt 0 key none"),
        "{stdout}"
    );
    assert!(stdout.contains("module log (3 lines):"), "{stdout}");
    assert!(stdout.contains(r#"  [info] {"event":"select""#), "{stdout}");
    // The proxy's limit applies: 10 lines in a second, the rest counted.
    let out = run(&[
        "strategy",
        "test",
        &probe(),
        "--requests",
        "1",
        "--options",
        r#"{"spam": 50, "log_configure": false}"#,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("module log (10 lines, 40 more dropped by the limit of 10 a second):"),
        "{stdout}"
    );
}

#[test]
fn a_mismatched_export_is_refused_saying_what_differs() {
    let module = support::dist("wrong-select.wasm");
    let out = run(&["strategy", "test", module.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let text = text(&out);
    for needle in [
        "wrong-select.wasm",
        "`select` in `loadbalancer:strategy/selector@0.2.0` has parameters (backends: list<record {id, weight, in-flight, latency-micros}>) but contract 0.2.0 expects (request: request, backends: list<backend>)",
        "has no function `configure`",
        "another version's WIT",
    ] {
        assert!(text.contains(needle), "lacks {needle:?}: {text}");
    }
    assert!(!text.contains("type mismatch"), "{text}");
}

#[test]
fn a_call_to_an_ungranted_import_names_it() {
    // snoop imports WASI and calls it on every select.
    let module = support::dist("snoop.wasm");
    let out = run(&[
        "strategy",
        "test",
        module.to_str().unwrap(),
        "--requests",
        "3",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let text = text(&out);
    assert!(text.contains("trap="), "{text}");
    assert!(
        text.contains("called `wasi:")
            && text.contains("an import strategy modules are not granted"),
        "{text}"
    );
}

#[test]
fn strategy_new_writes_a_standalone_project_and_refuses_a_full_folder() {
    let dir = tempfile::tempdir().unwrap();
    for lang in ["rust", "js", "c"] {
        let project = dir.path().join(format!("My {lang} Strategy"));
        let out = run(&["strategy", "new", project.to_str().unwrap(), "--lang", lang]);
        assert!(out.status.success(), "{lang}: {}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let name = format!("my-{lang}-strategy");
        assert!(stdout.contains(&format!("./{name}.wasm")), "{stdout}");
        // The contract beside it, exactly the released 0.2.0.
        let wit = std::fs::read_to_string(project.join("wit/strategy.wit")).unwrap();
        let released = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("wit/0.2.0/strategy.wit"),
        )
        .unwrap();
        assert_eq!(wit, released);
        let build = project.join("build.sh");
        use std::os::unix::fs::PermissionsExt;
        assert!(
            build.metadata().unwrap().permissions().mode() & 0o111 != 0,
            "{lang}"
        );
        let readme = std::fs::read_to_string(project.join("README.md")).unwrap();
        assert!(readme.contains("strategy test"), "{lang}: {readme}");
        // No placeholder is left behind.
        for entry in walk(&project) {
            let content = std::fs::read(&entry).unwrap();
            let content = String::from_utf8_lossy(&content);
            assert!(
                !content.contains("{{name}}") && !content.contains("{{crate_name}}"),
                "{}",
                entry.display()
            );
        }
        let again = run(&["strategy", "new", project.to_str().unwrap(), "--lang", lang]);
        assert_eq!(again.status.code(), Some(1));
        assert!(text(&again).contains("is not empty"), "{}", text(&again));
    }
    let rust = dir.path().join("My rust Strategy");
    let cargo = std::fs::read_to_string(rust.join("Cargo.toml")).unwrap();
    assert!(
        cargo.contains("name = \"my-rust-strategy\"") && cargo.contains("[workspace]"),
        "{cargo}"
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[test]
fn request_flags_given_to_a_0_1_0_module_are_named_as_unseen() {
    let out = run(&[
        "strategy",
        "test",
        "round-robin",
        "--requests",
        "9",
        "--keys",
        "3",
        "--labels",
        "0:zone=a",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out)
            .contains("warning: --keys, --labels given, but round-robin implements contract 0.1.0"),
        "{}",
        text(&out)
    );
    let out = run(&[
        "strategy",
        "test",
        "consistent-hash",
        "--requests",
        "9",
        "--keys",
        "3",
    ]);
    assert!(!text(&out).contains("warning:"), "{}", text(&out));
}
