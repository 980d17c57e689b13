//! The `rust_load_balancer` command: parse arguments, load and validate the
//! config, run until SIGINT/SIGTERM, reload on SIGHUP.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use std::sync::Arc;

use rust_load_balancer::balancer::{self, workload, BackendInfo, FaultKind, StrategySetup};
use rust_load_balancer::config::{self as lbconfig, SandboxLimits, StrategySource};
use rust_load_balancer::generation::State;
use rust_load_balancer::metrics::Metrics;
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
enum StrategyCommand {
    /// List the built-in strategies.
    List,
    /// Load a module (a .wasm path or a built-in name) in the proxy's
    /// sandbox, call it over a simulated workload, and print how it spread
    /// the requests, any faults, and its call times. Exits 1 if it does not
    /// load or faults.
    Test {
        /// A .wasm component, or a built-in name.
        module: String,
        /// Number of backends (default 4, or the number of --weights).
        #[arg(long)]
        backends: Option<usize>,
        /// Number of sequential select calls.
        #[arg(long, default_value_t = 1000)]
        requests: usize,
        /// Comma-separated backend weights, e.g. 5,1,1 (default all 1).
        #[arg(long, value_delimiter = ',')]
        weights: Option<Vec<u32>>,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
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
    runtime.block_on(run(config, args.config))
}

async fn run(config: Config, path: PathBuf) -> ExitCode {
    let summary = config.summary();
    let proxy = match Proxy::start_from_file(config, path).await {
        Ok(proxy) => proxy,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        "listening on {}: {}",
        proxy.local_addr(),
        summary
            .split_once(", ")
            .map_or(summary.as_str(), |(_, rest)| rest)
    );
    if let Err(error) = serve_until_stopped(&proxy).await {
        eprintln!("error: cannot listen for signals: {error}");
        return ExitCode::FAILURE;
    }
    let timeout = proxy.state().config().shutdown_timeout;
    tracing::info!(
        "stopping: no new connections; waiting up to {timeout:?} for requests in flight"
    );
    proxy.shutdown(timeout).await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// Reloads on SIGHUP; returns on SIGINT or SIGTERM.
async fn serve_until_stopped(proxy: &Proxy) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = terminate.recv() => return Ok(()),
            _ = interrupt.recv() => return Ok(()),
            _ = hangup.recv() => {
                tracing::info!("SIGHUP: reloading the config");
                // The outcome is logged (and counted) by the reload itself.
                let _ = proxy.reload().await;
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
        StrategyCommand::Test {
            module,
            backends,
            requests,
            weights,
            fuel,
            timeout,
            memory_mib,
        } => {
            let weights = match (weights, backends) {
                (Some(w), Some(n)) if w.len() != n => {
                    eprintln!(
                        "error: --weights has {} values but --backends is {n}",
                        w.len()
                    );
                    return ExitCode::FAILURE;
                }
                (Some(w), _) if w.contains(&0) => {
                    eprintln!("error: --weights: every weight must be at least 1");
                    return ExitCode::FAILURE;
                }
                (Some(w), _) => w,
                (None, n) => vec![1; n.unwrap_or(4)],
            };
            if weights.is_empty() {
                eprintln!("error: --backends must be at least 1");
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
            // Simulated backends as a 0.2.0 module's `configure` sees them.
            let backends = weights
                .iter()
                .enumerate()
                .map(|(id, &weight)| BackendInfo {
                    id: id as u32,
                    address: format!("127.0.0.1:{}", 8081 + id),
                    weight,
                    labels: Vec::new(),
                })
                .collect();
            let setup = StrategySetup {
                backends,
                ..StrategySetup::new(limits)
            };
            let strategy = match balancer::load(&source, &setup) {
                Ok(strategy) => strategy,
                Err(error) => {
                    eprintln!("error: {error}");
                    return ExitCode::FAILURE;
                }
            };
            let workload = workload::Workload { weights, requests };
            let report = workload::run(&*strategy, &workload);
            print_report(strategy.name(), &workload, &report);
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

fn print_report(name: &str, workload: &workload::Workload, report: &workload::Report) {
    println!(
        "strategy {name}: {} calls over {} backends",
        report.calls,
        workload.weights.len()
    );
    if report.calls < workload.requests {
        println!(
            "stopped after {} faults ({} calls were asked for)",
            workload::MAX_FAULTS,
            workload.requests
        );
    }
    println!(
        "{:>8} {:>8} {:>10} {:>8}",
        "backend", "weight", "picks", "share"
    );
    for (id, (weight, picks)) in workload.weights.iter().zip(&report.picks).enumerate() {
        let share = 100.0 * *picks as f64 / report.calls.max(1) as f64;
        println!("{id:>8} {weight:>8} {picks:>10} {share:>7.1}%");
    }
    if report.refused > 0 {
        println!("refused (answered none): {}", report.refused);
    }
    let faults: Vec<String> = report
        .faults
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(k, n): &(FaultKind, u64)| format!("{}={n}", k.as_str()))
        .collect();
    println!(
        "faults: {}",
        if faults.is_empty() {
            "none".to_string()
        } else {
            faults.join(", ")
        }
    );
    println!(
        "select time: median {:?}, p99 {:?}",
        report.median, report.p99
    );
}
