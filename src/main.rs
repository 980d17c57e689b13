//! The `rust_load_balancer` command: parse arguments, load and validate the
//! config, run until SIGINT/SIGTERM, reload on SIGHUP.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use rust_load_balancer::{balancer, Config, Proxy};
use tracing_subscriber::EnvFilter;

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

    /// Log format on stderr: human-readable text, or one JSON object per
    /// line for log shippers.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
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
