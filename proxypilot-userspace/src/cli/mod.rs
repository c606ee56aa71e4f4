//! Command-line front end: one module per subcommand. Each parses and
//! validates its flags, then calls the library.

pub mod detach;
pub mod doctor;
pub mod kernel_args;
pub mod keygen;
pub mod run;
pub mod seal;
pub mod seal_json;
pub mod seal_macaroon;
pub mod seal_mint;
pub mod seal_oauth;
pub mod seal_sigv4;
pub mod sidecar;
pub mod tokenizer;

use clap::{Parser, Subcommand, ValueEnum};

/// Resolves on SIGTERM (how containers are stopped) or SIGINT, so the
/// long-running commands return from `main` and flush their logs.
pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Keep real API keys out of sandboxes.
///
/// proxypilot attaches eBPF programs to a sandbox's cgroup: the sandbox's
/// HTTPS connections are redirected in the kernel to proxypilot, which
/// terminates TLS with its own CA and injects the real credentials on the
/// way out. Everything else the sandbox tries is denied unless allowed.
#[derive(Parser, Debug)]
#[command(
    name = "proxypilot",
    version,
    about,
    long_about,
    propagate_version = true
)]
pub struct Cli {
    /// Log format for diagnostics and the audit log.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "PROXYPILOT_LOG_FORMAT")]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a command in a new sandbox: dummy keys inside, real keys injected.
    Run(run::RunArgs),
    /// Attach to a sandbox cgroup and serve its redirected connections.
    Sidecar(sidecar::SidecarArgs),
    /// Remove proxypilot's programs from a cgroup.
    Detach(detach::DetachArgs),
    /// Run a standalone tokenizer (an HTTP proxy that injects sealed secrets).
    Tokenizer(tokenizer::TokenizerArgs),
    /// Seal a token for the tokenizer (reads the token from stdin).
    Seal(seal::SealArgs),
    /// Create a tokenizer key pair.
    Keygen(keygen::KeygenArgs),
    /// Check that this host can run proxypilot, with a fix for each failure.
    Doctor,
}
