//! The running sidecar: listeners bound, programs attached, relay and info
//! server serving. Shared by `proxypilot sidecar` and `proxypilot run`.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result};
use ipnet::IpNet;
use tokio::{net::TcpListener, task::JoinHandle};

use crate::{
    dns::{self, BoundResolver, KernelSenders, NameAllowList, Resolver, Upstreams},
    info::{self, InfoState, Published},
    kernel::{
        cgroup, denials::Denial, AllowRule, Attachment, DnsResolver, KernelPolicy,
        OriginalDestination, UnixPath,
    },
    policy::{AllowedNet, HostPattern},
    relay::{self, LiveRelay, Redirections, Relay},
    settings::{FileKernelRules, RelaySettings},
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

    /// These options plus the config file's `allow-cidr` and `allow-unix`.
    pub fn with_file(&self, file: &FileKernelRules) -> KernelOptions {
        let mut out = self.clone();
        for r in &file.allow_cidrs {
            if !out.allow_cidrs.contains(r) {
                out.allow_cidrs.push(*r);
            }
        }
        for p in &file.allow_unix {
            if !out.allow_unix.contains(p) {
                out.allow_unix.push(p.clone());
            }
        }
        out
    }

    /// The TCP rules, as the relay's pass-through checks them (TLS is TCP).
    fn allowed_nets(&self) -> Vec<AllowedNet> {
        self.allow_cidrs
            .iter()
            .filter(|r| r.tcp)
            .map(|r| AllowedNet {
                net: r.net,
                port: r.port,
            })
            .collect()
    }
}

/// A sidecar serving one sandbox cgroup. Dropping it stops serving but
/// leaves the programs attached (fail closed); [`Sidecar::detach`] removes
/// them.
pub struct Sidecar {
    pub attachment: Arc<Attachment>,
    pub listen: Vec<SocketAddr>,
    pub info_addr: SocketAddr,
    live: Arc<LiveRelay>,
    info: Arc<InfoState>,
    /// The sandbox's DNS: which names it answers follows reloads.
    resolver: Arc<Resolver>,
    /// Where the resolver listens (the kernel sends port 53 there).
    resolver_addrs: DnsResolver,
    /// The servers it asks, which pass-through resolves through too.
    upstreams: Arc<Upstreams>,
    /// The kernel options from flags (a reload adds the file's rules anew).
    kernel_flags: KernelOptions,
    /// The settings in force, to tell a reload what it may not change.
    settings: Mutex<RelaySettings>,
    tasks: Vec<JoinHandle<()>>,
}

impl Sidecar {
    /// Binds, attaches and starts serving. Everything that can fail on bad
    /// configuration fails before the programs are attached.
    pub async fn start(
        cgroup: &Path,
        kernel_flags: &KernelOptions,
        settings: &RelaySettings,
        on_denial: impl FnMut(Denial) + Send + 'static,
    ) -> Result<Sidecar> {
        let kernel = kernel_flags.with_file(&settings.file_kernel);
        let ca = settings.load_ca()?;
        let upstreams = Arc::new(dns_upstreams(&kernel, settings));
        let relay = Arc::new(
            settings
                .build_relay(ca, kernel.allowed_nets())?
                .resolving_through(upstreams.clone()),
        );

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
        let dns_sockets = BoundResolver::bind().await?;
        let resolver_addrs = dns_sockets.addrs();
        let policy = sandbox_policy(&kernel, &listen, info_addr, resolver_addrs, settings)?;
        // Bound before anything is attached.
        let metrics_listener = match settings.metrics_listen {
            None => None,
            Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| {
                format!("listening on {addr} for Prometheus (--metrics-listen)")
            })?),
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
            dns_names(&kernel, settings),
            (*upstreams).clone(),
            Arc::new(KernelSenders(attachment.clone())),
        ));

        let live = LiveRelay::new(relay.clone());
        let info = InfoState::new(
            published(&relay, &policy),
            Some(live.clone()),
            Some(attachment.clone()),
            Some(resolver.stats()),
        );
        let mut tasks = vec![
            tokio::spawn(info::serve(info_listener, info.clone())),
            crate::logbudget::refusals().spawn_summaries(),
            crate::memory::spawn_trimmer(),
        ];
        tasks.extend(dns_sockets.serve(resolver.clone()));
        if let Some(l) = metrics_listener {
            tracing::info!(addr = %l.local_addr()?, "serving Prometheus metrics on /metrics");
            tasks.push(tokio::spawn(relay::metrics::serve(l, live.clone())));
        }
        let redirections = SandboxRedirections {
            attachment: attachment.clone(),
            cgroup: cgroup.into(),
            cgroup_id: sandbox_cgroup_id,
        };
        for listener in listeners {
            tasks.push(tokio::spawn(relay::serve(
                listener,
                live.clone(),
                redirections.clone(),
            )));
        }
        tracing::info!(listen = ?listen, info = %info_addr, cgroup = %cgroup.display(), "proxypilot is serving the sandbox");
        Ok(Sidecar {
            attachment,
            listen,
            info_addr,
            live,
            info,
            resolver,
            resolver_addrs,
            upstreams,
            kernel_flags: kernel_flags.clone(),
            settings: Mutex::new(settings.clone()),
            tasks,
        })
    }

    /// The CA the sandbox must trust now.
    pub fn ca(&self) -> Arc<CertAuthority> {
        self.live.get().ca().clone()
    }

    /// Puts `settings` (re-read from the flags, the config file and the
    /// secrets' variables) in force: new connections and every new request
    /// get the new targets, permits, limits and allow lists, and the kernel
    /// maps are updated in place. Connections already open stay open.
    ///
    /// All or nothing: if anything in `settings` is refused, nothing
    /// changes and the error says what to fix. The CA is re-issued (and
    /// `--ca-out` rewritten) only when the intercepted hosts change.
    /// `load` reads the configuration anew; a failure there is a refused
    /// reload too (and counted as one).
    pub fn reload(&self, load: impl FnOnce() -> Result<RelaySettings>) -> Result<ReloadSummary> {
        let result = load().and_then(|settings| self.try_reload(&settings));
        self.live.get().metrics().reloaded(result.is_ok());
        result
    }

    fn try_reload(&self, settings: &RelaySettings) -> Result<ReloadSummary> {
        let mut in_force = self.settings.lock().unwrap_or_else(|p| p.into_inner());
        needs_no_restart(&in_force, settings)?;
        let kernel = self.kernel_flags.with_file(&settings.file_kernel);
        let policy = sandbox_policy(
            &kernel,
            &self.listen,
            self.info_addr,
            self.resolver_addrs,
            settings,
        )?;
        let old = self.live.get();
        let hosts = settings.intercepted_hosts();
        let ca_reissued = old.ca().hosts() != hosts.as_slice();
        let ca = if ca_reissued {
            // Validate against a throwaway CA first: a refused reload must
            // not replace the CA on disk (or the sandbox's --ca-out copy).
            let probe = Arc::new(CertAuthority::ephemeral(&hosts)?);
            settings.build_relay(probe, kernel.allowed_nets())?;
            settings.load_ca()?
        } else {
            old.ca().clone()
        };
        let relay = settings
            .build_relay(ca, kernel.allowed_nets())?
            .resolving_through(self.upstreams.clone());
        let mut relay = relay.inheriting(&old);
        if in_force.tokenizer == settings.tokenizer {
            relay = relay.keeping_minted_tokens(&old);
        }
        let relay = Arc::new(relay);
        self.attachment
            .set_policy(&policy)
            .context("updating the kernel allowlist")?;
        self.live.replace(relay.clone());
        self.resolver.set_names(dns_names(&kernel, settings));
        self.info.publish(published(&relay, &policy));
        *in_force = settings.clone();
        Ok(ReloadSummary {
            intercepted_hosts: hosts,
            ca_reissued,
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

/// What a reload changed, for its log line.
#[derive(Debug)]
pub struct ReloadSummary {
    pub intercepted_hosts: Vec<String>,
    /// The sandbox must fetch the new CA (`/ca.pem` or `--ca-out`).
    pub ca_reissued: bool,
}

/// Refuses a reload that changes what only a restart can: listeners that
/// are bound, and the CA's home.
fn needs_no_restart(in_force: &RelaySettings, new: &RelaySettings) -> Result<()> {
    let mut changed = Vec::new();
    if in_force.info_port != new.info_port {
        changed.push("info-port");
    }
    if in_force.metrics_listen != new.metrics_listen {
        changed.push("metrics-listen");
    }
    if in_force.state_dir != new.state_dir {
        changed.push("state-dir");
    }
    if in_force.dns != new.dns {
        changed.push("dns");
    }
    anyhow::ensure!(
        changed.is_empty(),
        "{} cannot change while proxypilot runs: restore the value in force, or restart proxypilot",
        changed.join(", ")
    );
    Ok(())
}

/// The kernel policy for `kernel`, with the info port (the one loopback
/// destination the sandbox may reach) and the resolver its DNS goes to,
/// checked against the metrics address.
fn sandbox_policy(
    kernel: &KernelOptions,
    listen: &[SocketAddr],
    info_addr: SocketAddr,
    resolver: DnsResolver,
    settings: &RelaySettings,
) -> Result<KernelPolicy> {
    let info_rule = AllowRule {
        net: IpNet::from(info_addr.ip()),
        port: Some(info_addr.port()),
        tcp: true,
        udp: false,
    };
    let mut policy = kernel.policy(listen, &[info_rule])?;
    policy.resolver = resolver;
    // Checked against everything the sandbox may dial (the info port
    // included).
    if let Some(addr) = settings.metrics_listen {
        relay::metrics::check_unreachable(addr, &policy.allowed).map_err(anyhow::Error::msg)?;
    }
    Ok(policy)
}

/// What `/ca.pem` and `/policy` serve for `relay` under `policy`.
fn published(relay: &Relay, policy: &KernelPolicy) -> Published {
    let allowed: Vec<String> = policy.allowed.iter().map(ToString::to_string).collect();
    Published {
        ca_pem: relay.ca().ca_pem().to_string(),
        policy: relay.summary(&allowed),
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
