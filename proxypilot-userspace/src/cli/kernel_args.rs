//! Flags shared by every command that attaches the kernel programs.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Result;
use clap::Args;

use crate::kernel::{cgroup, AllowRule, KernelPolicy};

/// Default listener port for redirected connections.
pub const DEFAULT_LISTEN_PORT: u16 = 15443;

#[derive(Args, Clone, Debug)]
pub struct KernelArgs {
    /// Address the proxy listens on for redirected connections; at most one
    /// IPv4 and one IPv6 address. The sandbox must be able to reach it: it
    /// is in the sandbox's network namespace (loopback works when the
    /// sandbox and proxypilot share one, as containers of a Fly machine do).
    #[arg(long = "listen", value_name = "ADDR:PORT",
          default_values_t = [SocketAddr::from(([127, 0, 0, 1], DEFAULT_LISTEN_PORT)),
                              SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, DEFAULT_LISTEN_PORT))])]
    pub listen: Vec<SocketAddr>,

    /// TCP destination port whose connections are intercepted (repeatable).
    #[arg(long = "intercept-port", value_name = "PORT", default_values_t = [443u16])]
    pub intercept_ports: Vec<u16>,

    /// Destination the sandbox may reach directly over TCP, as CIDR[:PORT]
    /// (repeatable). Examples: 10.0.0.0/8, 10.1.2.3:5432, [2001:db8::/32]:443.
    #[arg(long = "allow-cidr", value_name = "CIDR[:PORT]")]
    pub allow_cidrs: Vec<AllowRule>,

    /// DNS server the sandbox may query (UDP and TCP port 53; repeatable).
    /// All other UDP is denied, and UDP 443 (QUIC) always is.
    #[arg(long = "dns", value_name = "ADDR")]
    pub dns: Vec<std::net::IpAddr>,
}

impl KernelArgs {
    /// The policy for these flags, exempting this process's own cgroup.
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
        };
        policy
            .allowed
            .extend(self.dns.iter().map(|ip| AllowRule::dns(*ip)));
        policy.allowed.extend_from_slice(extra_allowed);
        policy.set_listeners(listeners)?;
        Ok(policy)
    }
}

#[derive(Args, Clone, Debug)]
pub struct CgroupArg {
    /// The sandbox's cgroup v2 directory, e.g. /sys/fs/cgroup/sandbox. The
    /// programs apply to it and to every cgroup below it.
    #[arg(long, value_name = "PATH")]
    pub cgroup: PathBuf,
}
