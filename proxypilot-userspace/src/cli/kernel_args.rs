//! Flags shared by every command that attaches the kernel programs.

use std::{net::SocketAddr, path::PathBuf};

use clap::Args;

use crate::{
    kernel::{AllowRule, UnixPath},
    policy::HostPattern,
    sidecar::KernelOptions,
};

/// `--allow-dns NAME`: an exact name or `*.suffix`.
pub fn parse_dns_name(s: &str) -> Result<HostPattern, String> {
    HostPattern::parse(s)
}

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

    /// Upstream DNS server proxypilot's resolver asks (repeatable)
    /// [default: the nameservers of /etc/resolv.conf]. The sandbox's DNS,
    /// to any address, is answered by that resolver; all other UDP is
    /// denied, and UDP 443 (QUIC) always is.
    #[arg(long = "dns", value_name = "ADDR")]
    pub dns: Vec<std::net::IpAddr>,

    /// Name the sandbox may resolve besides the intercepted and --allow
    /// hosts: exact, or *.suffix (repeatable). Other names get NXDOMAIN.
    #[arg(long = "allow-dns", value_name = "NAME", value_parser = parse_dns_name)]
    pub allow_dns: Vec<HostPattern>,

    /// Unix socket path the sandbox may connect or send to (repeatable).
    /// Every other unix socket outside the sandbox, and every abstract
    /// name, is refused (Linux 6.7+). Fly's /.fly/api is never allowed.
    #[arg(long = "allow-unix", value_name = "PATH")]
    pub allow_unix: Vec<UnixPath>,
}

impl KernelArgs {
    /// The parsed flags, as the sidecar takes them.
    pub fn options(&self) -> KernelOptions {
        KernelOptions {
            listen: self.listen.clone(),
            intercept_ports: self.intercept_ports.clone(),
            allow_cidrs: self.allow_cidrs.clone(),
            dns: self.dns.clone(),
            allow_dns: self.allow_dns.clone(),
            allow_unix: self.allow_unix.clone(),
        }
    }
}

#[derive(Args, Clone, Debug)]
pub struct CgroupArg {
    /// The sandbox's cgroup v2 directory, e.g. /sys/fs/cgroup/sandbox. The
    /// programs apply to it and to every cgroup below it.
    #[arg(long, value_name = "PATH")]
    pub cgroup: PathBuf,
}
