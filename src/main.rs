//! The `rust_load_balancer` command: parse arguments, load and validate the
//! config, run until SIGINT/SIGTERM, reload on SIGHUP, hand over to a new
//! process of the binary on SIGUSR2.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use std::sync::Arc;

use rust_load_balancer::balancer::{self, workload, StrategySetup};
use rust_load_balancer::config::{self as lbconfig, SandboxLimits, StrategySource};
use rust_load_balancer::generation::State;
use rust_load_balancer::handover::{self, Inherited, Upgrader, UPGRADE_DEADLINE};
use rust_load_balancer::limits;
use rust_load_balancer::metrics::Metrics;
use rust_load_balancer::scaffold;
use rust_load_balancer::server::Registry;
use rust_load_balancer::{Config, Proxy};
use tracing_subscriber::EnvFilter;

/// An HTTP load balancer whose backend-selection strategies are WebAssembly
/// components.
#[derive(Debug, Parser)]
#[command(version, about)]
#[command(args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,

    /// Config file (JSON, or YAML if it ends in .yaml/.yml).
    #[arg(short, long, default_value = "config.json", value_name = "PATH")]
    config: PathBuf,

    /// Validate the config (and load its strategy module), print a one-line
    /// summary, and exit: 0 if valid, 1 if not.
    #[arg(long)]
    check: bool,

    /// Log format on stderr: human-readable text, or one JSON object per
    /// line for log shippers.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Work with strategy modules without running the proxy.
    Strategy {
        #[command(subcommand)]
        action: StrategyCommand,
    },
}

#[derive(Debug, Subcommand)]
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once from the command line; boxing would buy nothing"
)]
enum StrategyCommand {
    /// List the built-in strategies.
    List,
    /// Write a new strategy project into DIR: the 0.2.0 contract, a
    /// commented starter strategy, a build.sh that builds and checks
    /// DIR/<name>.wasm, and a README with the next commands. It builds
    /// anywhere, outside any repository. DIR must be empty or absent.
    New {
        /// The folder to create (its last part names the module).
        dir: PathBuf,
        /// The starter's language.
        #[arg(long, value_enum, default_value_t = Lang::Rust)]
        lang: Lang,
    },
    /// Load a module (a .wasm path or a built-in name) in the proxy's
    /// sandbox, call it over a simulated workload, and print how it spread
    /// the requests, any faults, what it logged and its call times. Exits 1
    /// if it does not load or faults.
    #[command(long_about = TEST_ABOUT)]
    Test {
        /// A .wasm component, or a built-in name.
        module: String,
        /// Number of backends (default: the length of the lists given, or 4).
        #[arg(long)]
        backends: Option<usize>,
        /// Number of requests.
        #[arg(long, default_value_t = 1000)]
        requests: usize,
        /// Comma-separated backend weights, e.g. 5,1,1 (default all 1).
        #[arg(long, value_delimiter = ',')]
        weights: Option<Vec<u32>>,
        /// Requests carry N distinct hash keys, round the cycle (request i:
        /// XXH3-64 of "key-(i mod N)"); 0: no key.
        #[arg(long, default_value_t = 0, value_name = "N")]
        keys: u64,
        /// strategy_options passed to a 0.2.0 module's configure, as JSON.
        #[arg(long, default_value = "{}", value_name = "JSON")]
        options: String,
        /// Backend labels, e.g. 0:zone=a,1:zone=b,1:version=2.
        #[arg(long, value_delimiter = ',', value_name = "ID:K=V,...")]
        labels: Vec<String>,
        /// Per backend: the status its attempts end with (an observer is
        /// told it), or `fail` for a refused connection (retried elsewhere),
        /// e.g. 200,500,fail (default all 200).
        #[arg(long, value_delimiter = ',', value_name = "LIST")]
        status: Option<Vec<String>>,
        /// Per backend: the latency-micros it shows and its attempts take
        /// (default 1000,1250,1500,...).
        #[arg(long, value_delimiter = ',', value_name = "LIST")]
        latencies: Option<Vec<u32>>,
        /// Per backend: a fixed in-flight count it shows (default: simulated).
        #[arg(long = "in-flight", value_delimiter = ',', value_name = "LIST")]
        in_flight: Option<Vec<u32>>,
        /// Print the first N calls: the request, the list, the pick.
        #[arg(long, default_value_t = 0, value_name = "N")]
        trace: usize,
        /// Seed of the `random` values (the same seed, the same run).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print one JSON object instead of the text report.
        #[arg(long)]
        json: bool,
        /// Fuel per call.
        #[arg(long, default_value_t = lbconfig::DEFAULT_STRATEGY_FUEL)]
        fuel: u64,
        /// Deadline per call, in seconds.
        #[arg(long, default_value_t = lbconfig::DEFAULT_STRATEGY_TIMEOUT)]
        timeout: f64,
        /// Memory cap, in MiB.
        #[arg(long, default_value_t = lbconfig::DEFAULT_STRATEGY_MEMORY_MIB)]
        memory_mib: u64,
    },
}

/// `strategy test --help`: the simulated model.
const TEST_ABOUT: &str = "\
Load a module (a .wasm path or a built-in name) in the proxy's sandbox (the same
fuel, deadline and memory cap), call it over a simulated workload, and print how
it spread the requests, any faults, what it logged and its call times. Exits 1 if
it does not load or faults.

The simulated model:
  - Backends 0..n at 127.0.0.1:8081, :8082, ... with --weights and --labels; a
    0.2.0 module is configured with them and --options before the first call.
  - Requests are GET / from 127.0.0.1, one at a time, ids 1, 2, ...; with
    --keys N, request i has the hash key XXH3-64 of \"key-(i mod N)\", else none;
    `random` comes from a generator seeded with --seed.
  - A backend shows --latencies as latency-micros (default 1000, 1250, ... us)
    and --in-flight as in-flight when given; otherwise each request stays in
    flight for n calls, so in-flight moves as under steady load.
  - An attempt ends with the backend's --status (default 200) after its
    latency, and an observing module is told. With `fail` the connection is
    refused: the observer is told `connect` and the request is retried (at most
    2 times, as the proxy does) with attempt raised and the tried backends left
    out of the list.
  - The module's log lines are shown, under the proxy's limit of 10 a second.";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Lang {
    Rust,
    Js,
    C,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    // First: the binary's path names the new binary only until it is
    // replaced on disk.
    let upgrader = Upgrader::at_start();
    let args = Args::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only for a person at a terminal: never in a file or a pipe, and
    // not when NO_COLOR is set (https://no-color.org).
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }

    if let Some(Command::Strategy { action }) = args.command {
        return strategy_command(action);
    }

    let config = match Config::load(&args.config) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };

    if args.check {
        // The same build as at start-up: the module compiled, instantiated
        // and (0.2.0) configured with the options and backends.
        let summary = config.summary();
        return match State::build(config, &Registry::new(), &Arc::new(Metrics::new())) {
            Ok(_) => {
                println!("{}: ok: {summary}", args.config.display());
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: {error}");
                ExitCode::FAILURE
            }
        };
    }

    // This runtime runs signals, health checks, reloads and the admin API;
    // client traffic is served by the proxy's worker threads, each with its
    // own event loop.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(config, args.config, upgrader))
}

async fn run(config: Config, path: PathBuf, upgrader: Upgrader) -> ExitCode {
    // Listening sockets handed in by an upgrading balancer or by systemd.
    let mut inherited = Inherited::from_env();
    // Signal handlers before the (possibly long) start, so that a SIGHUP or
    // SIGUSR2 sent meanwhile is not fatal; it is acted on once serving.
    let signals = match Signals::new() {
        Ok(signals) => signals,
        Err(error) => {
            eprintln!("error: cannot listen for signals: {error}");
            return ExitCode::FAILURE;
        }
    };
    let summary = config.summary();
    if let Some(limit) = limits::raise_file_limit() {
        if limit.now > limit.was {
            tracing::debug!("open-file limit raised from {} to {}", limit.was, limit.now);
        }
        if let Some(warning) = limits::shortfall(&config, limit.now) {
            tracing::warn!("{warning}");
        }
    }
    let proxy = match Proxy::start_inherited(config, path, &mut inherited).await {
        Ok(proxy) => proxy,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    for unused in inherited.close_unused() {
        tracing::warn!("inherited socket {unused} matches no listener of the config: closed");
    }
    tracing::info!(
        "listening on {}: {}",
        proxy.local_addr(),
        summary
            .split_once(", ")
            .map_or(summary.as_str(), |(_, rest)| rest)
    );
    if let (Some(address), Some(tls)) = (proxy.tls_addr(), proxy.state().config().tls.as_ref()) {
        let n = tls.certificates.len();
        tracing::info!(
            "TLS listener on https://{address} ({n} certificate{}, TLS {} and up)",
            if n == 1 { "" } else { "s" },
            tls.min_version.as_str()
        );
    }
    if inherited.is_upgrade() {
        tracing::info!(
            "serving (pid {}): taking over from the old process",
            std::process::id()
        );
        inherited.signal_ready();
    } else {
        handover::notify_systemd("READY=1");
    }
    let timeout = proxy.state().config().shutdown_timeout;
    match serve_until_stopped(&proxy, signals, &upgrader).await {
        Stop::Signal => {
            handover::notify_systemd("STOPPING=1");
            tracing::info!(
                "stopping: no new connections; waiting up to {timeout:?} for requests in flight"
            );
        }
        Stop::Upgraded(pid) => {
            // systemd follows the new process from here on (Type=notify).
            handover::notify_systemd(&format!("MAINPID={pid}"));
            tracing::info!(
                "upgrade: the new process (pid {pid}) is serving; this one stops accepting and waits up to {timeout:?} for requests in flight"
            );
        }
    }
    proxy.shutdown(timeout).await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// The signals the balancer answers.
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
    upgrade: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
            hangup: signal(SignalKind::hangup())?,
            upgrade: signal(SignalKind::user_defined2())?,
        })
    }
}

/// Why serving ends.
enum Stop {
    /// SIGTERM or SIGINT.
    Signal,
    /// A new process (this PID) serves on this one's sockets.
    Upgraded(u32),
}

/// Reloads on SIGHUP; upgrades on SIGUSR2; returns on SIGINT or SIGTERM,
/// or when an upgrade's new process is serving. While an upgrade waits for
/// its new process, this one serves and answers signals as ever (SIGTERM
/// then kills the new process: it stops with this one).
async fn serve_until_stopped(proxy: &Proxy, mut signals: Signals, upgrader: &Upgrader) -> Stop {
    let mut upgrading = None;
    loop {
        tokio::select! {
            _ = signals.terminate.recv() => return Stop::Signal,
            _ = signals.interrupt.recv() => return Stop::Signal,
            _ = signals.hangup.recv() => {
                tracing::info!("SIGHUP: reloading the config");
                // The outcome is logged (and counted) by the reload itself.
                let _ = proxy.reload().await;
            }
            _ = signals.upgrade.recv() => {
                if upgrading.is_some() {
                    tracing::warn!("SIGUSR2: an upgrade is already under way");
                    continue;
                }
                match upgrader.binary() {
                    Ok(binary) => tracing::info!(
                        "SIGUSR2: upgrading: starting {} on this process's listening sockets",
                        binary.display()
                    ),
                    Err(error) => {
                        tracing::error!("upgrade failed: {error}; this process keeps serving");
                        continue;
                    }
                }
                upgrading = Some(Box::pin(
                    upgrader.upgrade(proxy.listening_sockets(), UPGRADE_DEADLINE),
                ));
            }
            done = async { upgrading.as_mut().expect("guarded").await }, if upgrading.is_some() => {
                upgrading = None;
                match done {
                    Ok(pid) => return Stop::Upgraded(pid),
                    Err(error) => tracing::error!("upgrade failed: {error}; this process keeps serving"),
                }
            }
        }
    }
}

fn strategy_command(action: StrategyCommand) -> ExitCode {
    match action {
        StrategyCommand::List => {
            for name in lbconfig::BUILTIN_STRATEGIES {
                println!("{name}");
            }
            ExitCode::SUCCESS
        }
        StrategyCommand::New { dir, lang } => {
            let lang = match lang {
                Lang::Rust => scaffold::Lang::Rust,
                Lang::Js => scaffold::Lang::JavaScript,
                Lang::C => scaffold::Lang::C,
            };
            match scaffold::new_project(&dir, lang) {
                Ok(project) => {
                    println!("{}", project.summary());
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("error: {error}");
                    ExitCode::FAILURE
                }
            }
        }
        StrategyCommand::Test {
            module,
            backends,
            requests,
            weights,
            keys,
            options,
            labels,
            status,
            latencies,
            in_flight,
            trace,
            seed,
            json,
            fuel,
            timeout,
            memory_mib,
        } => {
            let lists = TestLists {
                backends,
                weights,
                labels,
                status,
                latencies,
                in_flight,
            };
            let mut workload = match lists.workload(requests) {
                Ok(workload) => workload,
                Err(error) => {
                    eprintln!("error: {error}");
                    return ExitCode::FAILURE;
                }
            };
            (workload.keys, workload.seed, workload.trace) = (keys, seed, trace);
            if let Err(error) = serde_json::from_str::<serde_json::Value>(&options) {
                eprintln!("error: --options is not valid JSON: {error}");
                return ExitCode::FAILURE;
            }
            if !(timeout.is_finite() && timeout >= 0.001) || fuel == 0 || memory_mib == 0 {
                eprintln!(
                    "error: --timeout must be at least 0.001, --fuel and --memory-mib at least 1"
                );
                return ExitCode::FAILURE;
            }
            let limits = SandboxLimits {
                fuel,
                timeout: std::time::Duration::from_secs_f64(timeout),
                memory_bytes: (memory_mib as usize) << 20,
            };
            let source = if lbconfig::BUILTIN_STRATEGIES.contains(&module.as_str()) {
                StrategySource::Builtin(module.clone())
            } else {
                StrategySource::Path(PathBuf::from(&module))
            };
            let log = Arc::new(workload::CapturedLog::default());
            let setup = StrategySetup {
                options,
                backends: workload.backend_infos(),
                log: log.clone(),
                ..StrategySetup::new(limits)
            };
            let strategy = match balancer::load(&source, &setup) {
                Ok(strategy) => strategy,
                Err(error) => {
                    // What it logged before it was refused (a configure
                    // explaining itself, a panic message) helps most.
                    for line in log.take().0 {
                        eprintln!("{} log [{}] {}", module, line.level.as_str(), line.message);
                    }
                    eprintln!("error: {error}");
                    return ExitCode::FAILURE;
                }
            };
            let unseen: Vec<&str> = [
                ("--keys", workload.keys > 0),
                ("--options", setup.options.trim() != "{}"),
                ("--labels", workload.labels.iter().any(|l| !l.is_empty())),
            ]
            .iter()
            .filter(|(_, given)| *given)
            .map(|(flag, _)| *flag)
            .collect();
            if !unseen.is_empty() && strategy.contract() != balancer::Contract::V0_2 {
                eprintln!(
                    "warning: {} given, but {} implements contract {}, which sees no request, options or labels",
                    unseen.join(", "),
                    strategy.name(),
                    strategy.contract().as_str()
                );
            }
            let report = workload::run(&*strategy, &workload, Some(&log));
            if json {
                println!("{}", report.to_json(&*strategy, &workload));
            } else {
                print!("{}", report.render(&*strategy, &workload));
            }
            if report.total_faults() > 0 {
                eprintln!(
                    "error: {} faulted on {} of {} calls; first: {}",
                    strategy.name(),
                    report.total_faults(),
                    report.calls,
                    report.first_fault.as_deref().unwrap_or("?")
                );
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
    }
}

/// The per-backend lists of `strategy test`, checked against each other.
struct TestLists {
    backends: Option<usize>,
    weights: Option<Vec<u32>>,
    labels: Vec<String>,
    status: Option<Vec<String>>,
    latencies: Option<Vec<u32>>,
    in_flight: Option<Vec<u32>>,
}

impl TestLists {
    fn workload(self, requests: usize) -> Result<workload::Workload, String> {
        let given = [
            ("--weights", self.weights.as_ref().map(Vec::len)),
            ("--status", self.status.as_ref().map(Vec::len)),
            ("--latencies", self.latencies.as_ref().map(Vec::len)),
            ("--in-flight", self.in_flight.as_ref().map(Vec::len)),
        ];
        let n = self
            .backends
            .or_else(|| given.iter().find_map(|(_, len)| *len))
            .unwrap_or(4);
        if n == 0 {
            return Err("--backends must be at least 1".into());
        }
        for (flag, len) in given {
            match (len, self.backends) {
                (Some(len), Some(b)) if len != b => {
                    return Err(format!("{flag} has {len} values but --backends is {b}"))
                }
                (Some(len), None) if len != n => {
                    return Err(format!("{flag} has {len} values but other lists have {n}"))
                }
                _ => {}
            }
        }
        let weights = self.weights.unwrap_or_else(|| vec![1; n]);
        if weights.contains(&0) {
            return Err("--weights: every weight must be at least 1".into());
        }
        let mut labels: Vec<Vec<(String, String)>> = vec![Vec::new(); n];
        for label in &self.labels {
            let parsed = label.split_once(':').and_then(|(id, kv)| {
                let (k, v) = kv.split_once('=')?;
                Some((id.trim().parse::<usize>().ok()?, k.trim(), v.trim()))
            });
            match parsed {
                Some((id, k, v)) if id < n && !k.is_empty() => {
                    labels[id].push((k.to_string(), v.to_string()))
                }
                Some((id, _, _)) if id >= n => {
                    return Err(format!(
                        "--labels {label:?}: there is no backend {id} (0..{n})"
                    ))
                }
                _ => {
                    return Err(format!(
                        "--labels {label:?}: expected ID:KEY=VALUE, e.g. 0:zone=a"
                    ))
                }
            }
        }
        for list in &mut labels {
            list.sort();
        }
        let statuses = self
            .status
            .unwrap_or_default()
            .iter()
            .map(|s| match s.trim() {
                "fail" => Ok(workload::SimulatedStatus::Fail),
                code => match code.parse::<u16>() {
                    Ok(code) if (100..=999).contains(&code) => {
                        Ok(workload::SimulatedStatus::Status(code))
                    }
                    _ => Err(format!(
                        "--status: {code:?} is neither a status code (100-999) nor `fail`"
                    )),
                },
            })
            .collect::<Result<_, _>>()?;
        Ok(workload::Workload {
            labels,
            statuses,
            latencies: self.latencies.unwrap_or_default(),
            in_flight: self.in_flight.unwrap_or_default(),
            ..workload::Workload::new(weights, requests)
        })
    }
}
