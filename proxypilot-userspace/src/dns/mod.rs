//! proxypilot's DNS resolver: the sandbox's only DNS server.
//!
//! The kernel programs send every UDP and TCP packet the sandbox addresses
//! to port 53, whatever the address, to this resolver's loopback listeners
//! (and make the answers look as if they came from the server the sandbox
//! asked), so the sandbox's resolv.conf keeps working unchanged and no DNS
//! packet of the sandbox reaches any other server.
//!
//! * A name the sandbox may reach (an intercepted host, an `--allow` host
//!   or pattern, an `--allow-dns` name) is resolved by asking the upstream
//!   servers (`--dns`, else the host's resolv.conf) from proxypilot's own
//!   cgroup, with a query built from the question alone. Only names whose
//!   labels are letters, digits, `-` and `_` can be allowed (a label holding
//!   a dot is not two labels).
//! * Any other name is answered NXDOMAIN at once, and nothing is asked
//!   upstream: a name that carries data never leaves the machine. NXDOMAIN
//!   rather than REFUSED because stub resolvers try every other server
//!   (all of them this one) on REFUSED and report a temporary failure, so
//!   clients retry; NXDOMAIN fails the lookup at once and for good. It
//!   carries no SOA, so nothing caches it (RFC 2308).
//! * A datagram that is not one well-formed query (one question, opcode
//!   QUERY, no answer or authority records, names within
//!   [`message::MAX_NAME_LEN`] and labels within [`message::MAX_LABEL_LEN`])
//!   is dropped and counted.
//! * Caps ([`limits`]): the sandbox's query rate (REFUSED past it, nothing
//!   asked), queries in flight upstream (SERVFAIL past it), TCP connections.
//!
//! Every query gets an audit line (target `audit`, message `dns`) with the
//! name, type, decision, rcode, answer count and, when the kernel recorded
//! it, the pid and process; rate-limited queries are only counted.
//! `/stats` shows the counters and the most recent refused names.

pub mod limits;
pub mod message;
pub mod names;
pub mod serve;
pub mod stats;
pub mod upstream;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    sync::Arc,
};

use anyhow::{Context, Result};
use tokio::{
    net::{TcpListener, UdpSocket},
    task::JoinHandle,
};

pub use names::NameAllowList;
pub use serve::{Resolver, Senders};
pub use stats::{DnsStats, DnsStatsView};
pub use upstream::Upstreams;

use crate::kernel::{Attachment, DnsResolver, OriginalDestination};

/// The resolver's sockets, bound before the programs are attached (their
/// addresses go into the kernel policy).
pub struct BoundResolver {
    v4: (UdpSocket, TcpListener),
    v6: Option<(UdpSocket, TcpListener)>,
}

impl BoundResolver {
    /// Binds UDP and TCP on one port of 127.0.0.1, and of ::1 when IPv6
    /// is available.
    pub async fn bind() -> Result<BoundResolver> {
        let v4 = bind_pair(Ipv4Addr::LOCALHOST.into())
            .await
            .context("binding proxypilot's DNS resolver on 127.0.0.1")?;
        let v6 = match bind_pair(Ipv6Addr::LOCALHOST.into()).await {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "no DNS resolver on ::1; the sandbox's IPv6 DNS will be refused");
                None
            }
        };
        Ok(BoundResolver { v4, v6 })
    }

    /// Where the kernel sends the sandbox's DNS.
    pub fn addrs(&self) -> DnsResolver {
        let port = |p: &(UdpSocket, TcpListener)| p.0.local_addr().map(|a| a.port()).unwrap_or(0);
        DnsResolver {
            v4: Some(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port(&self.v4))),
            v6: self
                .v6
                .as_ref()
                .map(|p| SocketAddrV6::new(Ipv6Addr::LOCALHOST, port(p), 0, 0)),
        }
    }

    /// Starts serving with `resolver`.
    pub fn serve(self, resolver: Arc<Resolver>) -> Vec<JoinHandle<()>> {
        let mut tasks = Vec::new();
        for (udp, tcp) in std::iter::once(self.v4).chain(self.v6) {
            tasks.push(serve::serve_udp(udp, resolver.clone()));
            tasks.push(serve::serve_tcp(tcp, resolver.clone()));
        }
        tasks
    }
}

/// UDP and TCP on the same free port of `ip`.
async fn bind_pair(ip: IpAddr) -> Result<(UdpSocket, TcpListener)> {
    let mut last = None;
    for _ in 0..16 {
        let udp = UdpSocket::bind(SocketAddr::new(ip, 0)).await?;
        let port = udp.local_addr()?.port();
        match TcpListener::bind(SocketAddr::new(ip, port)).await {
            Ok(tcp) => return Ok((udp, tcp)),
            // Taken for TCP: try another port.
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("tried at least once")).context("no port free for both UDP and TCP")
}

/// The kernel's records of who sent a query.
pub struct KernelSenders(pub Arc<Attachment>);

impl Senders for KernelSenders {
    fn udp(&self, peer: SocketAddr) -> Option<OriginalDestination> {
        self.0.dns_sender(peer)
    }

    fn tcp(&self, peer: SocketAddr) -> Option<OriginalDestination> {
        self.0.original_destination(peer)
    }
}
