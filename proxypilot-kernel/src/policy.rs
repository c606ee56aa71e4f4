//! The kernel policy: what the programs redirect, pass and deny, in the form
//! user space writes into the maps.

use std::{
    fmt,
    net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6},
    str::FromStr,
};

use ipnet::IpNet;
use proxypilot_common::{AllowTarget, ALLOW_TCP, ALLOW_UDP};

use super::{origin::words_from_ip, unix::UnixPath};

/// One allowed destination: a network, optionally one port, and the
/// transports that may use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AllowRule {
    pub net: IpNet,
    /// `None` allows every port.
    pub port: Option<u16>,
    pub tcp: bool,
    pub udp: bool,
}

impl AllowRule {
    /// A DNS server: TCP and UDP to port 53.
    pub fn dns(ip: IpAddr) -> Self {
        AllowRule {
            net: IpNet::from(ip),
            port: Some(53),
            tcp: true,
            udp: true,
        }
    }

    /// The LPM trie key (prefix length and data) for this rule.
    pub fn trie_key(&self) -> (u32, AllowTarget) {
        // IPv4 networks live at ::ffff:0:0/96 in the trie.
        let (addr, bits) = match self.net {
            IpNet::V4(n) => (IpAddr::V4(n.network()), 96 + u32::from(n.prefix_len())),
            IpNet::V6(n) => (IpAddr::V6(n.network()), u32::from(n.prefix_len())),
        };
        let target = AllowTarget {
            port: self.port.unwrap_or(0).to_be_bytes(),
            _reserved: [0; 2],
            addr: words_from_ip(addr),
        };
        (AllowTarget::PORT_BITS + bits, target)
    }

    /// The trie value: which transports may pass.
    pub fn flags(&self) -> u32 {
        (if self.tcp { ALLOW_TCP } else { 0 }) | (if self.udp { ALLOW_UDP } else { 0 })
    }
}

impl fmt::Display for AllowRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.port, self.net) {
            (None, net) => write!(f, "{net}"),
            (Some(p), IpNet::V4(n)) => write!(f, "{n}:{p}"),
            (Some(p), IpNet::V6(n)) => write!(f, "[{n}]:{p}"),
        }
    }
}

/// Error for a `--allow-cidr` value that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error(
    "`{input}` is not an allowed destination: {why}; write CIDR[:PORT], e.g. \
     10.0.0.0/8, 10.1.2.3:5432, 2001:db8::/32 or [2001:db8::/32]:443"
)]
pub struct AllowRuleError {
    input: String,
    why: &'static str,
}

impl FromStr for AllowRule {
    type Err = AllowRuleError;

    /// Parses `CIDR[:PORT]` for TCP. A bare address is a /32 or /128.
    /// IPv6 with a port is bracketed: `[2001:db8::/32]:443`.
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |why| AllowRuleError {
            input: input.to_string(),
            why,
        };
        let s = input.trim();
        let (net, port) = if let Some(rest) = s.strip_prefix('[') {
            let (inner, after) = rest.split_once(']').ok_or_else(|| err("missing `]`"))?;
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| err("expected `:PORT` after `]`"))?,
                ),
            };
            (inner, port)
        } else if s.matches(':').count() == 1 {
            let (net, port) = s.split_once(':').expect("one colon");
            (net, Some(port))
        } else {
            (s, None)
        };
        let net = parse_net(net).ok_or_else(|| err("not an IP address or CIDR"))?;
        let port = match port {
            None => None,
            Some(p) => match p.parse::<u16>() {
                Ok(0) | Err(_) => return Err(err("the port must be 1-65535")),
                Ok(p) => Some(p),
            },
        };
        Ok(AllowRule {
            net,
            port,
            tcp: true,
            udp: false,
        })
    }
}

fn parse_net(s: &str) -> Option<IpNet> {
    if s.contains('/') {
        s.parse::<IpNet>().ok().map(|n| n.trunc())
    } else {
        s.parse::<IpAddr>().ok().map(IpNet::from)
    }
}

/// Everything the kernel programs need to decide.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelPolicy {
    /// TCP destination ports redirected to the proxy (443 by default).
    pub intercept_ports: Vec<u16>,
    /// Where intercepted IPv4 (and IPv4-mapped) connects go.
    pub listen_v4: Option<SocketAddrV4>,
    /// Where intercepted IPv6 connects go.
    pub listen_v6: Option<SocketAddrV6>,
    /// Destinations that pass untouched.
    pub allowed: Vec<AllowRule>,
    /// cgroup id whose sockets are never redirected or denied (the proxy's own).
    pub exempt_cgroup_id: u64,
    /// Unix socket paths the sandbox may connect and send to; every other
    /// unix destination, abstract names included, is refused.
    pub allowed_unix: Vec<UnixPath>,
    /// Where proxypilot's DNS resolver listens (UDP and TCP, one port per
    /// family). With either set, every UDP and TCP packet to port 53 goes
    /// there, whatever address the sandbox asked; with neither, port 53 is
    /// decided by `allowed` like any other.
    pub resolver: DnsResolver,
}

/// The resolver's listeners, by family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsResolver {
    pub v4: Option<SocketAddrV4>,
    pub v6: Option<SocketAddrV6>,
}

impl KernelPolicy {
    /// Splits listener addresses by family; more than one per family is an error.
    pub fn set_listeners(&mut self, listeners: &[SocketAddr]) -> anyhow::Result<()> {
        self.listen_v4 = None;
        self.listen_v6 = None;
        for l in listeners {
            match l {
                SocketAddr::V4(a) if self.listen_v4.is_none() => self.listen_v4 = Some(*a),
                SocketAddr::V6(a) if self.listen_v6.is_none() => self.listen_v6 = Some(*a),
                other => anyhow::bail!(
                    "more than one listener for the family of {other}: the kernel redirects \
                     each family to one address"
                ),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        let r: AllowRule = "10.0.0.0/8".parse().unwrap();
        assert_eq!((r.net.to_string().as_str(), r.port), ("10.0.0.0/8", None));
        let r: AllowRule = "10.1.2.3:5432".parse().unwrap();
        assert_eq!(
            (r.net.to_string().as_str(), r.port),
            ("10.1.2.3/32", Some(5432))
        );
        let r: AllowRule = "2001:db8::/32".parse().unwrap();
        assert_eq!(
            (r.net.to_string().as_str(), r.port),
            ("2001:db8::/32", None)
        );
        let r: AllowRule = "[2001:db8::/32]:443".parse().unwrap();
        assert_eq!(
            (r.net.to_string().as_str(), r.port),
            ("2001:db8::/32", Some(443))
        );
        let r: AllowRule = "::1".parse().unwrap();
        assert_eq!((r.net.to_string().as_str(), r.port), ("::1/128", None));
        // Host bits are dropped so the trie key is the network.
        let r: AllowRule = "10.1.2.3/8".parse().unwrap();
        assert_eq!(r.net.to_string(), "10.0.0.0/8");
        assert!(r.tcp && !r.udp);
    }

    #[test]
    fn rejects_bad_values_with_a_hint() {
        for bad in [
            "",
            "example.com",
            "10.0.0.0/33",
            "1.2.3.4:0",
            "1.2.3.4:x",
            "[::1",
            "[::1]443",
        ] {
            let e = bad.parse::<AllowRule>().unwrap_err().to_string();
            assert!(e.contains("CIDR[:PORT]"), "{bad}: {e}");
        }
    }

    #[test]
    fn trie_keys_map_ipv4_under_ffff() {
        let (bits, t) = "203.0.113.0/24:443"
            .parse::<AllowRule>()
            .unwrap()
            .trie_key();
        assert_eq!(bits, 32 + 96 + 24);
        assert_eq!(t.port, 443u16.to_be_bytes());
        assert_eq!(t.addr, words_from_ip("203.0.113.0".parse().unwrap()));
        let (bits, t) = "2001:db8::/32".parse::<AllowRule>().unwrap().trie_key();
        assert_eq!((bits, t.port), (32 + 32, [0, 0]));
    }

    #[test]
    fn display_round_trips() {
        for s in ["10.0.0.0/8", "10.1.2.3/32:5432", "[2001:db8::/32]:443"] {
            let r: AllowRule = s.parse().unwrap();
            assert_eq!(r.to_string().parse::<AllowRule>().unwrap(), r);
        }
    }
}
