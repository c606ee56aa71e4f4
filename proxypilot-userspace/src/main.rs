use std::process::ExitCode;

use clap::Parser;
use proxypilot::cli::{Cli, LogFormat};
use proxypilot::logwriter::{self, FlushGuard};
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

/// Logs go to stderr through a writer thread (`logwriter`), so a
/// request's audit line costs the relay's workers a copy under a mutex,
/// not a write(2) that can block on a full pipe nor a thread woken per
/// line. Lines are never dropped. The returned guard flushes on drop.
fn init_tracing(format: LogFormat, default_level: &str) -> FlushGuard {
    let filter =
        EnvFilter::try_from_env("PROXYPILOT_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    let (writer, guard) = logwriter::batched(std::io::stderr());
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
