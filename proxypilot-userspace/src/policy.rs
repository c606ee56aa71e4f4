//! The relay's per-connection decision: intercept, pass through, or deny.
//!
//! Pure: SNI and original destination in, verdict out. The kernel has
//! already let the connection reach us; this decides what happens to it.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;
use serde::Serialize;

/// What the relay does with one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Terminate TLS and relay through the tokenizer with the secret named
    /// `secret_name` (the variable it came from; never the secret itself).
    Intercept { host: String, secret_name: String },
    /// Splice bytes to the real server, unread.
    PassThrough {
        host: Option<String>,
        dial: Dial,
        reason: String,
    },
    /// Close the connection.
    Deny { reason: String },
}

/// Where a pass-through connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dial {
    /// Resolve this name ourselves and dial it; never the client's IP.
    Host { host: String, port: u16 },
    /// No SNI, but the original IP is in an allowed CIDR.
    Addr(SocketAddr),
}

/// A pass-through allow-list entry: an exact name or `*.suffix`, which
/// matches any name ending in `.suffix` (at any depth) but not `suffix`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum HostPattern {
    Exact(String),
    Suffix(String),
}

impl HostPattern {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.strip_prefix("*.") {
            Some(rest) => Ok(HostPattern::Suffix(normalize_host(rest)?)),
            None => Ok(HostPattern::Exact(normalize_host(s)?)),
        }
    }

    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => h == host,
            HostPattern::Suffix(s) => {
                host.len() > s.len() + 1
                    && host.ends_with(s.as_str())
                    && host.as_bytes()[host.len() - s.len() - 1] == b'.'
            }
        }
    }
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Suffix(s) => write!(f, "*.{s}"),
        }
    }
}

/// Lowercases a DNS name, drops one trailing dot and checks its syntax.
/// Ports, IP literals and wildcards are refused with a message saying so.
pub fn normalize_host(s: &str) -> Result<String, String> {
    let t = s.trim();
    let t = t.strip_suffix('.').unwrap_or(t).to_ascii_lowercase();
    if t.is_empty() {
        return Err("empty host name".into());
    }
    if t.contains(':') {
        return Err(format!("{s:?}: give a host name without a port or scheme"));
    }
    if t.parse::<std::net::IpAddr>().is_ok() {
        return Err(format!("{s:?} is an IP address; TLS names are DNS names (use the kernel's --allow-cidr for addresses)"));
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if t.len() > 253 || !t.split('.').all(label_ok) {
        return Err(format!("{s:?} is not a valid DNS host name"));
    }
    Ok(t)
}

/// A TCP destination `--allow-cidr` lets through: a network and one port,
/// or every port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllowedNet {
    pub net: IpNet,
    /// `None` allows every port.
    pub port: Option<u16>,
}

impl AllowedNet {
    pub fn allows(&self, dst: SocketAddr) -> bool {
        self.net.contains(&unmapped(dst.ip())) && self.port.is_none_or(|p| p == dst.port())
    }
}

impl std::fmt::Display for AllowedNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.port, self.net) {
            (None, n) => write!(f, "{n}"),
            (Some(p), IpNet::V4(n)) => write!(f, "{n}:{p}"),
            (Some(p), IpNet::V6(n)) => write!(f, "[{n}]:{p}"),
        }
    }
}

/// The relay's policy tables.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Intercepted host → the secret's name (never the secret itself).
    pub intercept: BTreeMap<String, String>,
    pub allow: Vec<HostPattern>,
    /// TCP destinations the kernel lets through (`--allow-cidr`). Here they
    /// decide ClientHellos without SNI, and which internal addresses a
    /// pass-through may dial.
    pub allow_cidrs: Vec<AllowedNet>,
}

impl Policy {
    /// Decides one connection. `sni` must be normalised (as `tls::hello`
    /// returns it); `original` is where the kernel recorded the sandbox
    /// meant to connect.
    pub fn decide(&self, sni: Option<&str>, original: SocketAddr) -> Verdict {
        let Some(host) = sni else {
            return match self.allow_cidrs.iter().find(|n| n.allows(original)) {
                Some(n) => Verdict::PassThrough {
                    host: None,
                    dial: Dial::Addr(original),
                    reason: format!("no SNI, but {original} is allowed by --allow-cidr {n}"),
                },
                None => Verdict::Deny {
                    reason: format!(
                        "no SNI in the ClientHello and no --allow-cidr allows {original} (address and port)"
                    ),
                },
            };
        };
        if let Some(secret_name) = self.intercept.get(host) {
            return Verdict::Intercept {
                host: host.to_string(),
                secret_name: secret_name.clone(),
            };
        }
        if let Some(p) = self.allow.iter().find(|p| p.matches(host)) {
            return Verdict::PassThrough {
                host: Some(host.to_string()),
                dial: Dial::Host {
                    host: host.to_string(),
                    port: original.port(),
                },
                reason: format!("{host} is allowed by --allow {p}"),
            };
        }
        Verdict::Deny {
            reason: format!(
                "{host} has no secret (--target) and is not on the allow list (--allow)"
            ),
        }
    }

    /// Whether a pass-through to an `--allow` host may dial `addr`, one of
    /// the addresses its name resolved to. Internal addresses (loopback,
    /// private, link-local, ...) are refused unless `--allow-cidr` allows
    /// that address and port: an allowed name, or a wildcard, must not
    /// become a way to reach internal services. The error says why.
    pub fn check_resolved(&self, host: &str, addr: SocketAddr) -> Result<(), String> {
        let Some(range) = internal_range(addr.ip()) else {
            return Ok(());
        };
        if self.allow_cidrs.iter().any(|n| n.allows(addr)) {
            return Ok(());
        }
        let ip = unmapped(addr.ip());
        let cidr = AllowedNet {
            net: IpNet::from(ip),
            port: Some(addr.port()),
        };
        Err(format!(
            "{host} resolved to {ip}, which is {range}; pass-through does not dial internal addresses unless --allow-cidr allows them (e.g. --allow-cidr {cidr})"
        ))
    }

    /// The policy as `/policy` shows it: names only, no secrets.
    pub fn summary(&self, extra_allowed: &[String]) -> PolicySummary {
        PolicySummary {
            intercepted_hosts: self.intercept.keys().cloned().collect(),
            pass_through_hosts: self.allow.iter().map(|p| p.to_string()).collect(),
            allowed_destinations: extra_allowed.to_vec(),
        }
    }
}

/// The kind of internal address `ip` is, or `None` for a public one
/// (documentation ranges count as public: the tests' fake internet lives
/// there). IPv4-mapped, IPv4-compatible and NAT64 (64:ff9b::/96) IPv6
/// addresses are judged by the IPv4 address they carry.
pub fn internal_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => internal_v4(v4),
        IpAddr::V6(v6) => internal_v6(v6),
    }
}

fn internal_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b) {
        (0, _) => "in 0.0.0.0/8 (this host)",
        (127, _) => "loopback (127.0.0.0/8)",
        (10, _) => "private (10.0.0.0/8)",
        (172, 16..=31) => "private (172.16.0.0/12)",
        (192, 168) => "private (192.168.0.0/16)",
        (100, 64..=127) => "shared address space (CGNAT, 100.64.0.0/10)",
        (169, 254) => "link-local (169.254.0.0/16)",
        (192, 0) if c == 0 => "IETF protocol assignments (192.0.0.0/24)",
        (198, 18..=19) => "benchmarking (198.18.0.0/15)",
        (224..=239, _) => "multicast (224.0.0.0/4)",
        (240..=255, _) => "reserved or broadcast (240.0.0.0/4)",
        _ => return None,
    })
}

fn internal_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let seg = ip.segments();
    if let Some(v4) = ip.to_ipv4_mapped() {
        return internal_v4(v4);
    }
    let embedded_v4 = || {
        Ipv4Addr::new(
            (seg[6] >> 8) as u8,
            seg[6] as u8,
            (seg[7] >> 8) as u8,
            seg[7] as u8,
        )
    };
    Some(match seg {
        [0, 0, 0, 0, 0, 0, 0, 0] => "unspecified (::)",
        [0, 0, 0, 0, 0, 0, 0, 1] => "loopback (::1)",
        // IPv4-compatible (deprecated) and NAT64: they reach the IPv4 address.
        [0, 0, 0, 0, 0, 0, _, _] => {
            return internal_v4(embedded_v4()).or(Some("IPv4-compatible (::/96)"))
        }
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => return internal_v4(embedded_v4()),
        [s, ..] if s & 0xfe00 == 0xfc00 => "unique local (fc00::/7)",
        [s, ..] if s & 0xffc0 == 0xfe80 => "link-local (fe80::/10)",
        [s, ..] if s & 0xffc0 == 0xfec0 => "site-local (fec0::/10)",
        [s, ..] if s & 0xff00 == 0xff00 => "multicast (ff00::/8)",
        _ => return None,
    })
}

fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PolicySummary {
    pub intercepted_hosts: Vec<String>,
    pub pass_through_hosts: Vec<String>,
    pub allowed_destinations: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            intercept: [("api.example.com".to_string(), "EXAMPLE_SEALED".to_string())].into(),
            allow: vec![
                HostPattern::parse("pypi.org").unwrap(),
                HostPattern::parse("*.github.io").unwrap(),
            ],
            allow_cidrs: vec![
                AllowedNet {
                    net: "198.51.100.0/24".parse().unwrap(),
                    port: None,
                },
                AllowedNet {
                    net: "192.0.2.0/24".parse().unwrap(),
                    port: Some(8443),
                },
                AllowedNet {
                    net: "10.1.2.3/32".parse().unwrap(),
                    port: Some(443),
                },
            ],
        }
    }

    #[test]
    fn verdict_table() {
        let p = policy();
        let o = |s: &str| s.parse::<SocketAddr>().unwrap();
        let pass = |h: &str, port| Verdict::PassThrough {
            host: Some(h.into()),
            dial: Dial::Host {
                host: h.into(),
                port,
            },
            reason: String::new(),
        };
        let deny = || Verdict::Deny {
            reason: String::new(),
        };
        let cases: Vec<(Option<&str>, SocketAddr, Verdict)> = vec![
            (
                Some("api.example.com"),
                o("203.0.113.10:443"),
                Verdict::Intercept {
                    host: "api.example.com".into(),
                    secret_name: "EXAMPLE_SEALED".into(),
                },
            ),
            (
                Some("pypi.org"),
                o("203.0.113.11:443"),
                pass("pypi.org", 443),
            ),
            (
                Some("pypi.org"),
                o("203.0.113.11:8443"),
                pass("pypi.org", 8443),
            ),
            (
                Some("x.github.io"),
                o("203.0.113.12:443"),
                pass("x.github.io", 443),
            ),
            (
                Some("a.b.github.io"),
                o("203.0.113.12:443"),
                pass("a.b.github.io", 443),
            ),
            (
                Some("github.io"),
                o("203.0.113.12:443"),
                Verdict::Deny {
                    reason: String::new(),
                },
            ),
            (
                Some("evilgithub.io"),
                o("203.0.113.12:443"),
                Verdict::Deny {
                    reason: String::new(),
                },
            ),
            (
                Some("example.com"),
                o("203.0.113.10:443"),
                Verdict::Deny {
                    reason: String::new(),
                },
            ),
            (
                Some("sub.api.example.com"),
                o("203.0.113.10:443"),
                Verdict::Deny {
                    reason: String::new(),
                },
            ),
            (
                None,
                o("198.51.100.7:443"),
                Verdict::PassThrough {
                    host: None,
                    dial: Dial::Addr("198.51.100.7:443".parse().unwrap()),
                    reason: String::new(),
                },
            ),
            (None, o("203.0.113.10:443"), deny()),
            // No SNI: the address and the port must be allowed.
            (
                None,
                o("192.0.2.7:8443"),
                Verdict::PassThrough {
                    host: None,
                    dial: Dial::Addr(o("192.0.2.7:8443")),
                    reason: String::new(),
                },
            ),
            (None, o("192.0.2.7:443"), deny()),
            (None, o("[::ffff:192.0.2.7]:443"), deny()),
            (None, o("10.1.2.3:8443"), deny()),
        ];
        for (sni, orig, want) in cases {
            let got = p.decide(sni, orig);
            let strip = |v: Verdict| match v {
                Verdict::Deny { .. } => Verdict::Deny {
                    reason: String::new(),
                },
                Verdict::PassThrough { host, dial, .. } => Verdict::PassThrough {
                    host,
                    dial,
                    reason: String::new(),
                },
                v => v,
            };
            let reason = match &got {
                Verdict::Deny { reason } | Verdict::PassThrough { reason, .. } => reason.clone(),
                _ => "intercept".into(),
            };
            assert!(!reason.is_empty());
            assert_eq!(strip(got), want, "sni={sni:?} orig={orig:?}");
        }
    }

    #[test]
    fn deny_reason_names_the_flags() {
        let Verdict::Deny { reason } =
            policy().decide(Some("evil.test"), "203.0.113.1:443".parse().unwrap())
        else {
            panic!()
        };
        assert!(
            reason.contains("--target") && reason.contains("--allow"),
            "{reason}"
        );
    }

    #[test]
    fn no_sni_deny_reason_names_the_address_and_port() {
        let Verdict::Deny { reason } = policy().decide(None, "192.0.2.7:443".parse().unwrap())
        else {
            panic!()
        };
        assert!(
            reason.contains("192.0.2.7:443") && reason.contains("--allow-cidr"),
            "{reason}"
        );
    }

    #[test]
    fn internal_ranges_table() {
        let internal = [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "127.255.0.9",
            "10.0.0.1",
            "10.255.255.255",
            "172.16.0.1",
            "172.31.255.1",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.254",
            "169.254.169.254",
            "192.0.0.8",
            "198.18.0.1",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fe80::1",
            "febf::1",
            "fc00::1",
            "fd12:3456::1",
            "fec0::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "::10.0.0.1",
            "64:ff9b::10.0.0.1",
            "64:ff9b::7f00:1",
        ];
        for ip in internal {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(internal_range(ip).is_some(), "{ip} is internal");
        }
        let public = [
            "203.0.113.10",
            "198.51.100.1",
            "192.0.2.1",
            "8.8.8.8",
            "1.1.1.1",
            "172.15.255.255",
            "172.32.0.1",
            "100.63.255.255",
            "100.128.0.1",
            "169.253.0.1",
            "192.0.1.1",
            "198.20.0.1",
            "223.255.255.255",
            "11.0.0.1",
            "2001:db8::10",
            "2606:4700::1111",
            "::ffff:203.0.113.10",
            "64:ff9b::8.8.8.8",
            "fe00::1",
            "fbff::1",
        ];
        for ip in public {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(internal_range(ip), None, "{ip} is public");
        }
    }

    #[test]
    fn resolved_internal_addresses_need_an_allow_cidr_with_their_port() {
        let p = policy();
        let ok = |a: &str| p.check_resolved("x.github.io", a.parse().unwrap());
        assert_eq!(ok("203.0.113.10:443"), Ok(()));
        assert_eq!(ok("[2001:db8::10]:443"), Ok(()));
        // 10.1.2.3 is allowed on 443 only.
        assert_eq!(ok("10.1.2.3:443"), Ok(()));
        assert_eq!(ok("[::ffff:10.1.2.3]:443"), Ok(()));
        let err = ok("10.1.2.3:8443").unwrap_err();
        assert!(
            err.contains("x.github.io resolved to 10.1.2.3")
                && err.contains("private")
                && err.contains("--allow-cidr 10.1.2.3/32:8443"),
            "{err}"
        );
        let err = ok("127.0.0.1:443").unwrap_err();
        assert!(err.contains("loopback"), "{err}");
        let err = ok("[::1]:443").unwrap_err();
        assert!(
            err.contains("loopback") && err.contains("[::1/128]:443"),
            "{err}"
        );
        let err = ok("[::ffff:169.254.169.254]:80").unwrap_err();
        assert!(
            err.contains("169.254.169.254, which is link-local"),
            "{err}"
        );
    }

    #[test]
    fn host_normalisation() {
        assert_eq!(
            normalize_host("API.Example.COM.").unwrap(),
            "api.example.com"
        );
        for bad in [
            "",
            "a..b",
            "host:443",
            "1.2.3.4",
            "::1",
            "a b",
            "-a.com",
            "https://x",
        ] {
            assert!(normalize_host(bad).is_err(), "{bad}");
        }
        assert_eq!(
            HostPattern::parse("*.Example.com").unwrap(),
            HostPattern::Suffix("example.com".into())
        );
        assert!(HostPattern::parse("*").is_err());
        assert!(HostPattern::parse("a.*.com").is_err());
    }

    #[test]
    fn summary_has_no_secret_names_only_hosts() {
        let s = policy().summary(&["198.51.100.0/24".into()]);
        assert_eq!(s.intercepted_hosts, vec!["api.example.com"]);
        assert_eq!(s.pass_through_hosts, vec!["pypi.org", "*.github.io"]);
        assert!(!serde_json::to_string(&s).unwrap().contains("SEALED"));
    }
}
