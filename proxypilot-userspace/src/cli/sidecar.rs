//! `proxypilot sidecar`: attach to a sandbox cgroup and serve redirected
//! connections until stopped.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc};

use anyhow::{Context, Result};
use clap::Args;
use tokio::net::TcpListener;

use super::kernel_args::{CgroupArg, KernelArgs};
use crate::kernel::{self, Attachment};

#[derive(Args, Debug)]
pub struct SidecarArgs {
    #[command(flatten)]
    pub cgroup: CgroupArg,

    #[command(flatten)]
    pub kernel: KernelArgs,

    /// Write this file once the programs are attached and the listeners are
    /// up; a sandbox container can wait for it before starting work.
    #[arg(long, value_name = "PATH")]
    pub ready_file: Option<PathBuf>,
}

pub async fn run(args: SidecarArgs) -> Result<ExitCode> {
    let listeners = bind_all(&args.kernel.listen).await?;
    let bound: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr()).collect::<Result<_, _>>()?;
    let policy = args.kernel.policy(&bound, &[])?;
    let attachment = Arc::new(Attachment::attach(&args.cgroup.cgroup, &policy)?);
    spawn_kernel_watchers(&attachment, |denial| {
        tracing::warn!(target: "denied", "{denial}");
    });

    for listener in listeners {
        let attachment = attachment.clone();
        tokio::spawn(async move { accept_and_log(listener, attachment).await });
    }
    if let Some(path) = &args.ready_file {
        std::fs::write(path, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing ready file {}", path.display()))?;
    }
    tracing::info!(listen = ?bound, "proxypilot sidecar ready");

    wait_for_shutdown().await;
    tracing::info!(
        "stopping; the programs stay attached so the sandbox stays closed \
         (`proxypilot detach --cgroup {}` removes them)",
        args.cgroup.cgroup.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Binds every listen address. An IPv6 address that cannot be bound (IPv6
/// disabled) is skipped with a warning: IPv6 intercepts then fail closed.
pub async fn bind_all(addrs: &[SocketAddr]) -> Result<Vec<TcpListener>> {
    let mut out = Vec::new();
    for addr in addrs {
        match TcpListener::bind(addr).await {
            Ok(l) => out.push(l),
            Err(e) if addr.is_ipv6() && e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
                tracing::warn!(%addr, "IPv6 is not available; intercepted IPv6 connects will be refused");
            }
            Err(e) => {
                return Err(e).with_context(|| format!("listening on {addr} (is another proxypilot running?)"))
            }
        }
    }
    anyhow::ensure!(!out.is_empty(), "no listener could be bound");
    Ok(out)
}

/// Logs kernel denials through `on_denial` and forwards eBPF log records.
pub fn spawn_kernel_watchers(attachment: &Attachment, on_denial: impl FnMut(kernel::denials::Denial) + Send + 'static) {
    if let Some(ring) = attachment.take_denials() {
        tokio::spawn(async move {
            if let Err(e) = kernel::denials::watch(ring, on_denial).await {
                tracing::warn!(error = %e, "stopped reading kernel denials");
            }
        });
    }
    if let Some(logger) = attachment.take_logger() {
        tokio::spawn(async move {
            let _ = kernel::denials::forward_logs(logger).await;
        });
    }
}

/// Until the TLS relay is wired in: log each redirected connection's
/// original destination and close it.
async fn accept_and_log(listener: TcpListener, attachment: Arc<Attachment>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let origin = attachment.original_destination(peer);
                match origin {
                    Some(o) => tracing::info!(%peer, dst = %o.addr, pid = o.pid, comm = %o.comm, "redirected connection"),
                    None => tracing::warn!(%peer, "connection without a recorded destination; closing"),
                }
                drop(stream);
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn wait_for_shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
