use std::process::ExitCode;

use clap::Parser;
use proxypilot::cli::{Cli, LogFormat};
use tracing_subscriber::{fmt, EnvFilter};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `run` shares the terminal with the command: only warnings by default.
    let quiet = matches!(cli.command, proxypilot::cli::Command::Run(_));
    init_tracing(cli.log_format, if quiet { "warn" } else { "info" });
    match run(cli) {
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

fn init_tracing(format: LogFormat, default_level: &str) {
    let filter =
        EnvFilter::try_from_env("PROXYPILOT_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    // `init` also bridges the `log` crate, through which eBPF log records arrive.
    use std::io::IsTerminal;
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
