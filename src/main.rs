//! The `rust_load_balancer` command: parse arguments, load and validate the
//! config, run until SIGINT/SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use rust_load_balancer::{balancer, Config, Proxy};
use tracing_subscriber::EnvFilter;

/// How long in-flight requests may take to finish after a stop signal.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// An HTTP load balancer whose backend-selection strategies are WebAssembly
/// components.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Config file (JSON, or YAML if it ends in .yaml/.yml).
    #[arg(short, long, default_value = "config.json", value_name = "PATH")]
    config: PathBuf,

    /// Validate the config (and load its strategy module), print a one-line
    /// summary, and exit: 0 if valid, 1 if not.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    let config = match Config::load(&args.config) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };

    if args.check {
        return match balancer::load(&config.strategy, config.sandbox) {
            Ok(_) => {
                println!("{}: ok: {}", args.config.display(), config.summary());
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: {error}");
                ExitCode::FAILURE
            }
        };
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(config))
}

async fn run(config: Config) -> ExitCode {
    let summary = config.summary();
    let proxy = match Proxy::start(config).await {
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
    wait_for_stop_signal().await;
    tracing::info!(
        "stopping: no new connections; waiting up to {SHUTDOWN_TIMEOUT:?} for requests in flight"
    );
    proxy.shutdown(SHUTDOWN_TIMEOUT).await;
    ExitCode::SUCCESS
}

async fn wait_for_stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
