//! The running sidecar: listeners bound, programs attached, relay and info
//! server serving. Shared by `proxypilot sidecar` and `proxypilot run`.

use std::{net::SocketAddr, path::Path, sync::Arc};

use anyhow::{Context, Result};
use ipnet::IpNet;
use tokio::{net::TcpListener, task::JoinHandle};

use crate::{
    cli::kernel_args::KernelArgs,
    info::{self, InfoState},
    kernel::{denials::Denial, AllowRule, Attachment},
    relay::{self, Forward},
    settings::RelaySettings,
    tls::ca::CertAuthority,
};

/// A sidecar serving one sandbox cgroup. Dropping it stops serving but
/// leaves the programs attached (fail closed); [`Sidecar::detach`] removes
/// them.
pub struct Sidecar {
    pub attachment: Arc<Attachment>,
    pub ca: Arc<CertAuthority>,
    pub listen: Vec<SocketAddr>,
    pub info_addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl Sidecar {
    /// Binds, attaches and starts serving. Everything that can fail on bad
    /// configuration fails before the programs are attached.
    pub async fn start(
        cgroup: &Path,
        kernel: &KernelArgs,
        settings: &RelaySettings,
        embedded: Option<Arc<dyn Forward>>,
        on_denial: impl FnMut(Denial) + Send + 'static,
    ) -> Result<Sidecar> {
        let ca = settings.load_ca()?;
        let allow_nets: Vec<IpNet> = kernel.allow_cidrs.iter().map(|r| r.net).collect();
        let relay = settings.build_relay(ca.clone(), allow_nets, embedded)?;

        let listeners = bind_all(&kernel.listen).await?;
        let listen: Vec<SocketAddr> = listeners
            .iter()
            .map(|l| l.local_addr())
            .collect::<Result<_, _>>()?;
        let info_listener = info::bind(settings.info_port).await.with_context(|| {
            format!(
                "listening on 127.0.0.1:{} for /ca.pem and /policy (--info-port)",
                settings.info_port
            )
        })?;
        let info_addr = info_listener.local_addr()?;
        // The info port is the one loopback destination the sandbox may reach.
        let info_rule = AllowRule {
            net: IpNet::from(info_addr.ip()),
            port: Some(info_addr.port()),
            tcp: true,
            udp: false,
        };
        let policy = kernel.policy(&listen, &[info_rule])?;
        let attachment = Arc::new(Attachment::attach(cgroup, &policy)?);
        spawn_kernel_watchers(&attachment, on_denial);

        let allowed: Vec<String> = policy.allowed.iter().map(ToString::to_string).collect();
        let state = Arc::new(InfoState {
            ca_pem: ca.ca_pem().to_string(),
            policy: relay.summary(&allowed),
            stats: Some(relay.clone()),
        });
        let mut tasks = vec![tokio::spawn(info::serve(info_listener, state))];
        for listener in listeners {
            let attachment = attachment.clone();
            tasks.push(tokio::spawn(relay::serve(
                listener,
                relay.clone(),
                move |peer| attachment.original_destination(peer),
            )));
        }
        tracing::info!(listen = ?listen, info = %info_addr, cgroup = %cgroup.display(), "proxypilot is serving the sandbox");
        Ok(Sidecar {
            attachment,
            ca,
            listen,
            info_addr,
            tasks,
        })
    }

    /// Stops serving and detaches the programs.
    pub fn detach(mut self) -> Result<()> {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        self.attachment.detach()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
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
                return Err(e).with_context(|| {
                    format!("listening on {addr} (is another proxypilot running?)")
                })
            }
        }
    }
    anyhow::ensure!(!out.is_empty(), "no listener could be bound");
    Ok(out)
}

/// Reports kernel denials through `on_denial` and forwards eBPF log records.
pub fn spawn_kernel_watchers(
    attachment: &Attachment,
    on_denial: impl FnMut(Denial) + Send + 'static,
) {
    if let Some(ring) = attachment.take_denials() {
        tokio::spawn(async move {
            if let Err(e) = crate::kernel::denials::watch(ring, on_denial).await {
                tracing::warn!(error = %e, "stopped reading kernel denials");
            }
        });
    }
    if let Some(logger) = attachment.take_logger() {
        tokio::spawn(async move {
            let _ = crate::kernel::denials::forward_logs(logger).await;
        });
    }
}
