//! The running sidecar: listeners bound, programs attached, relay and info
//! server serving. Shared by `proxypilot sidecar` and `proxypilot run`.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::Arc,
};

use anyhow::{Context, Result};
use ipnet::IpNet;
use tokio::{net::TcpListener, task::JoinHandle};

use crate::{
    dns::{self, BoundResolver, KernelSenders, NameAllowList, Resolver, Upstreams},
    info::{self, InfoState},
    kernel::{
        cgroup, denials::Denial, AllowRule, Attachment, KernelPolicy, OriginalDestination, UnixPath,
    },
    policy::{AllowedNet, HostPattern},
    relay::{self, Forward, Redirections},
    settings::RelaySettings,
    tls::ca::CertAuthority,
};

/// What the kernel programs enforce, as `sidecar` and `run` were asked
/// (`cli::kernel_args` parses it from flags).
#[derive(Clone, Debug)]
pub struct KernelOptions {
    /// Where the relay listens for redirected connections (port 0: any).
    pub listen: Vec<SocketAddr>,
    /// TCP destination ports whose connections are redirected.
    pub intercept_ports: Vec<u16>,
    /// Destinations the sandbox may reach directly.
    pub allow_cidrs: Vec<AllowRule>,
    /// Upstream DNS servers proxypilot's resolver asks (empty: the
    /// config file's `dns`, else the host's resolv.conf).
    pub dns: Vec<IpAddr>,
    /// Names the sandbox may resolve besides the intercepted and allowed hosts.
    pub allow_dns: Vec<HostPattern>,
    /// Unix socket paths the sandbox may connect or send to.
    pub allow_unix: Vec<UnixPath>,
}

impl KernelOptions {
    /// The policy for these options, exempting this process's own cgroup.
    /// `listeners` are the addresses actually bound (ports resolved).
    pub fn policy(
        &self,
        listeners: &[SocketAddr],
        extra_allowed: &[AllowRule],
    ) -> Result<KernelPolicy> {
        let own_cgroup = cgroup::cgroup_of("self")?;
        let mut policy = KernelPolicy {
            intercept_ports: self.intercept_ports.clone(),
            listen_v4: None,
            listen_v6: None,
            allowed: self.allow_cidrs.clone(),
            exempt_cgroup_id: cgroup::cgroup_id(&own_cgroup)?,
            allowed_unix: self.allow_unix.clone(),
            resolver: Default::default(),
        };
        // DNS goes to proxypilot's resolver, never to the --dns servers
        // directly: they are not on the sandbox's allow list.
        policy.allowed.extend_from_slice(extra_allowed);
        policy.set_listeners(listeners)?;
        Ok(policy)
    }
}

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
        kernel: &KernelOptions,
        settings: &RelaySettings,
        embedded: Option<Arc<dyn Forward>>,
        on_denial: impl FnMut(Denial) + Send + 'static,
    ) -> Result<Sidecar> {
        let ca = settings.load_ca()?;
        // TLS is TCP: only the TCP rules matter to the relay.
        let allow_nets: Vec<AllowedNet> = kernel
            .allow_cidrs
            .iter()
            .filter(|r| r.tcp)
            .map(|r| AllowedNet {
                net: r.net,
                port: r.port,
            })
            .collect();
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
        let dns_sockets = BoundResolver::bind().await?;
        let mut policy = kernel.policy(&listen, &[info_rule])?;
        policy.resolver = dns_sockets.addrs();
        // Checked against everything the sandbox may dial (the info port
        // and DNS included), and bound, before anything is attached.
        let metrics_listener = match settings.metrics_listen {
            None => None,
            Some(addr) => {
                relay::metrics::check_unreachable(addr, &policy.allowed)
                    .map_err(anyhow::Error::msg)?;
                Some(TcpListener::bind(addr).await.with_context(|| {
                    format!("listening on {addr} for Prometheus (--metrics-listen)")
                })?)
            }
        };
        let sandbox_cgroup_id = cgroup::cgroup_id(cgroup)?;
        let attachment = Arc::new(Attachment::attach(cgroup, &policy)?);
        let metrics = relay.metrics().clone();
        let mut on_denial = on_denial;
        let unix_metrics = metrics.clone();
        spawn_kernel_watchers(
            &attachment,
            move |d| {
                metrics.denied(relay::metrics::Denial::Kernel);
                on_denial(d)
            },
            move || unix_metrics.denied(relay::metrics::Denial::Unix),
        );

        let resolver = Arc::new(Resolver::new(
            dns_names(kernel, settings),
            dns_upstreams(kernel, settings),
            Arc::new(KernelSenders(attachment.clone())),
        ));

        let allowed: Vec<String> = policy.allowed.iter().map(ToString::to_string).collect();
        let state = Arc::new(InfoState {
            ca_pem: ca.ca_pem().to_string(),
            policy: relay.summary(&allowed),
            stats: Some(relay.clone()),
            kernel: Some(attachment.clone()),
            dns: Some(resolver.stats()),
        });
        let mut tasks = vec![
            tokio::spawn(info::serve(info_listener, state)),
            crate::logbudget::refusals().spawn_summaries(),
            crate::memory::spawn_trimmer(),
        ];
        tasks.extend(dns_sockets.serve(resolver));
        if let Some(l) = metrics_listener {
            tracing::info!(addr = %l.local_addr()?, "serving Prometheus metrics on /metrics");
            tasks.push(tokio::spawn(relay::metrics::serve(l, relay.clone())));
        }
        let redirections = SandboxRedirections {
            attachment: attachment.clone(),
            cgroup: cgroup.into(),
            cgroup_id: sandbox_cgroup_id,
        };
        for listener in listeners {
            tasks.push(tokio::spawn(relay::serve(
                listener,
                relay.clone(),
                redirections.clone(),
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

/// The names the sandbox may resolve: the intercepted hosts, the `--allow`
/// hosts and patterns, and the `--allow-dns` names (flags and file).
fn dns_names(kernel: &KernelOptions, settings: &RelaySettings) -> NameAllowList {
    let intercepted = settings
        .intercepted_hosts()
        .into_iter()
        .filter_map(|h| HostPattern::parse(&h).ok());
    NameAllowList::new(
        intercepted
            .chain(settings.allow.iter().cloned())
            .chain(kernel.allow_dns.iter().cloned())
            .chain(settings.allow_dns.iter().cloned()),
    )
}

/// The servers the resolver asks: `--dns`, else the file's `dns`, else the
/// host's resolv.conf.
fn dns_upstreams(kernel: &KernelOptions, settings: &RelaySettings) -> Upstreams {
    let servers = if !kernel.dns.is_empty() {
        kernel.dns.clone()
    } else if !settings.dns.is_empty() {
        settings.dns.clone()
    } else {
        dns::upstream::resolv_conf_nameservers(
            &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        )
    };
    if servers.is_empty() {
        tracing::warn!("no upstream DNS server (no --dns, and none in /etc/resolv.conf): the sandbox's lookups of allowed names will fail with SERVFAIL");
    } else {
        tracing::info!(upstreams = ?servers, "the sandbox's DNS is answered by proxypilot");
    }
    Upstreams::new(&servers)
}

/// The kernel's records of connections redirected from the sandbox cgroup,
/// the only connections the relay serves.
#[derive(Clone)]
struct SandboxRedirections {
    attachment: Arc<Attachment>,
    cgroup: Arc<Path>,
    cgroup_id: u64,
}

impl Redirections for SandboxRedirections {
    /// A record counts only if its connect() came from the sandbox cgroup
    /// or one below it. The programs run nowhere else, so this holds by
    /// construction; checking it keeps holding if maps are ever shared.
    fn take(&self, peer: SocketAddr) -> Option<OriginalDestination> {
        let origin = self.attachment.original_destination(peer)?;
        if origin.cgroup_id == self.cgroup_id || is_descendant(&self.cgroup, origin.cgroup_id) {
            return Some(origin);
        }
        tracing::warn!(%peer, pid = origin.pid, cgroup_id = origin.cgroup_id, sandbox = %self.cgroup.display(), "a redirect record from outside the sandbox cgroup; ignoring it");
        None
    }
}

/// Whether a cgroup below `root` has the id `id`. Walks the tree (children
/// are rare and few; the walk is capped), only when the id is not the
/// sandbox's own.
fn is_descendant(root: &Path, id: u64) -> bool {
    use std::os::unix::fs::MetadataExt;
    let mut todo = vec![root.to_path_buf()];
    let mut seen = 0;
    while let Some(dir) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if !meta.is_dir() {
                continue;
            }
            if meta.ino() == id {
                return true;
            }
            seen += 1;
            if seen > 10_000 {
                return false;
            }
            todo.push(e.path());
        }
    }
    false
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
    on_unix_denial: impl Fn() + Send + 'static,
) {
    if let Some(ring) = attachment.take_denials() {
        tokio::spawn(async move {
            if let Err(e) = crate::kernel::denials::watch(ring, on_denial).await {
                tracing::warn!(error = %e, "stopped reading kernel denials");
            }
        });
    }
    if let Some(ring) = attachment.take_unix_denials() {
        tokio::spawn(async move {
            let report = move |d: crate::kernel::unix::UnixDenial| {
                on_unix_denial();
                if d.is_name_service_probe() {
                    tracing::debug!(target: "denied", "{d}");
                } else if crate::logbudget::refusals().admit(d.hook, d.pid, &d.comm) {
                    tracing::warn!(target: "denied", "{d}");
                }
            };
            if let Err(e) = crate::kernel::unix::watch(ring, report).await {
                tracing::warn!(error = %e, "stopped reading unix socket denials");
            }
        });
    }
    if let Some(logger) = attachment.take_logger() {
        tokio::spawn(async move {
            let _ = crate::kernel::denials::forward_logs(logger).await;
        });
    }
}
