//! `proxypilot sidecar`: attach to a sandbox cgroup and serve its
//! redirected connections until stopped.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use clap::Args;

use super::kernel_args::{CgroupArg, KernelArgs};
use crate::{settings::RelayArgs, sidecar::Sidecar};

/// SIGHUP: re-reads the flags' config file and the secrets' variables and
/// files, and puts them in force, or logs why not and keeps what runs.
fn reload(sidecar: &Sidecar, args: &RelayArgs) {
    let attempt = sidecar.reload(|| args.resolve());
    match attempt {
        Ok(done) if done.ca_reissued => tracing::warn!(
            intercepted = ?done.intercepted_hosts,
            "reloaded the configuration (SIGHUP); the intercepted hosts changed, so the CA was \
             re-issued: the sandbox must trust the new /ca.pem for new connections"
        ),
        Ok(done) => tracing::info!(
            intercepted = ?done.intercepted_hosts,
            "reloaded the configuration (SIGHUP)"
        ),
        Err(e) => {
            tracing::error!("reload refused (SIGHUP); the configuration in force stays: {e:#}")
        }
    }
}

#[derive(Args, Debug)]
pub struct SidecarArgs {
    #[command(flatten)]
    pub cgroup: CgroupArg,

    #[command(flatten)]
    pub kernel: KernelArgs,

    #[command(flatten)]
    pub relay: RelayArgs,

    /// Write this file (containing proxypilot's pid) once the programs are
    /// attached and every listener is up. A sandbox container waits for it
    /// before it starts work: nothing it does before then is covered.
    #[arg(long, value_name = "PATH")]
    pub ready_file: Option<PathBuf>,

    /// Validate the flags, the config file and the secrets' variables, then
    /// exit without attaching anything (0 when all is well).
    #[arg(long)]
    pub check: bool,
}

pub async fn run(args: SidecarArgs) -> Result<ExitCode> {
    // All configuration is validated before anything binds or attaches.
    let settings = args.relay.resolve()?;
    if args.check {
        crate::kernel::cgroup::ensure_cgroup2_dir(&args.cgroup.cgroup)?;
        println!(
            "configuration is valid: {} intercepted host(s), {} pass-through pattern(s), tokenizer: {}",
            settings.targets.len(),
            settings.allow.len(),
            match &settings.tokenizer {
                crate::settings::TokenizerMode::Remote { url, .. } => url.to_string(),
                crate::settings::TokenizerMode::Embedded { .. } => "embedded".to_string(),
            }
        );
        return Ok(ExitCode::SUCCESS);
    }
    let sidecar = Sidecar::start(
        &args.cgroup.cgroup,
        &args.kernel.options(),
        &settings,
        |denial| {
            if denial.is_address_probe() {
                tracing::debug!(target: "denied", "{denial}");
            } else if crate::logbudget::refusals().admit(
                denial.why(),
                denial.origin.pid,
                &denial.origin.comm,
            ) {
                tracing::warn!(target: "denied", "{denial}");
            }
        },
    )
    .await?;
    // Before the ready file: a SIGHUP from then on reloads, never kills.
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP (reload) handler")?;
    if let Some(path) = &args.ready_file {
        std::fs::write(path, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing ready file {}", path.display()))?;
    }
    tracing::info!("proxypilot sidecar ready");

    let shutdown = super::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = hangups.recv() => reload(&sidecar, &args.relay),
        }
    }
    tracing::info!(
        "stopping; the programs stay attached so the sandbox stays closed \
         (`proxypilot detach --cgroup {}` removes them)",
        args.cgroup.cgroup.display()
    );
    drop(sidecar);
    Ok(ExitCode::SUCCESS)
}
