use std::process::ExitCode;

use clap::Parser;
use proxypilot::cli::{Cli, LogFormat};
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::{fmt, EnvFilter};

fn main() -> ExitCode {
    proxypilot::memory::bound_malloc_arenas();
    proxypilot::fdlimit::raise_to_hard();
    let cli = Cli::parse();
    // `run` shares the terminal with the command: only warnings by default.
    let quiet = matches!(cli.command, proxypilot::cli::Command::Run(_));
    let log_flush = init_tracing(cli.log_format, if quiet { "warn" } else { "info" });
    let result = run(cli);
    // Everything logged so far reaches stderr before the error line.
    drop(log_flush);
    match result {
        Ok(code) => code,
        Err(e) => {
            // The whole cause chain on one line, as ripgrep does.
            eprintln!("proxypilot: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    use proxypilot::cli::*;
    match cli.command {
        Command::Run(args) => runtime()?.block_on(run::run(args)),
        Command::Doctor => doctor::run(),
        Command::Detach(args) => detach::run(args),
        Command::Sidecar(args) => runtime()?.block_on(sidecar::run(args)),
        Command::Tokenizer(args) => runtime()?.block_on(tokenizer::run(args)),
        Command::Seal(args) => seal::run(args),
        Command::Keygen(args) => keygen::run(args),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Logs go to stderr through a writer thread, so a request's audit line
/// costs the relay's workers a channel send, not a write(2) that can block
/// on a full pipe. Lines are never dropped (`lossy(false)`): when the
/// channel is full, loggers wait. The writer thread flushes whenever it
/// has drained the channel, so the buffer only merges lines that were
/// already queued into one write(2) instead of one each. The returned
/// guard flushes on drop.
fn init_tracing(format: LogFormat, default_level: &str) -> WorkerGuard {
    let filter =
        EnvFilter::try_from_env("PROXYPILOT_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("proxypilot-log")
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stderr(),
        ));
    // `init` also bridges the `log` crate, through which eBPF log records arrive.
    use std::io::IsTerminal;
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    guard
}
