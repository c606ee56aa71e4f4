//! The relay's per-connection decision: intercept, pass through, or deny.
//!
//! Pure: SNI and original destination in, verdict out. The kernel has
//! already let the connection reach us; this decides what happens to it.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use ipnet::IpNet;
use serde::Serialize;

/// What the relay does with one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Terminate TLS and relay through the tokenizer with `secret`.
    Intercept { host: String, secret: String },
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

/// The relay's policy tables.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Intercepted host → the secret's name (never the secret itself).
    pub intercept: BTreeMap<String, String>,
    pub allow: Vec<HostPattern>,
    /// Destinations the kernel lets through; here they only matter for
    /// ClientHellos without SNI.
    pub allow_cidrs: Vec<IpNet>,
}

impl Policy {
    /// Decides one connection. `sni` must be normalised (as `tls::hello`
    /// returns it); `original` is `None` when the kernel had no record.
    pub fn decide(&self, sni: Option<&str>, original: Option<SocketAddr>) -> Verdict {
        let port = original.map_or(443, |o| o.port());
        let Some(host) = sni else {
            return match original {
                Some(o) if self.allow_cidrs.iter().any(|n| n.contains(&o.ip())) => {
                    Verdict::PassThrough {
                        host: None,
                        dial: Dial::Addr(o),
                        reason: format!("no SNI, but {} is in an allowed CIDR", o.ip()),
                    }
                }
                Some(o) => Verdict::Deny {
                    reason: format!(
                        "no SNI in the ClientHello and {} is not in an allowed CIDR",
                        o.ip()
                    ),
                },
                None => Verdict::Deny {
                    reason: "no SNI in the ClientHello and the original destination is unknown"
                        .into(),
                },
            };
        };
        if let Some(secret) = self.intercept.get(host) {
            return Verdict::Intercept {
                host: host.to_string(),
                secret: secret.clone(),
            };
        }
        if let Some(p) = self.allow.iter().find(|p| p.matches(host)) {
            return Verdict::PassThrough {
                host: Some(host.to_string()),
                dial: Dial::Host {
                    host: host.to_string(),
                    port,
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

    /// The policy as `/policy` shows it: names only, no secrets.
    pub fn summary(&self, extra_allowed: &[String]) -> PolicySummary {
        PolicySummary {
            intercepted_hosts: self.intercept.keys().cloned().collect(),
            pass_through_hosts: self.allow.iter().map(|p| p.to_string()).collect(),
            allowed_destinations: extra_allowed.to_vec(),
        }
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
            allow_cidrs: vec!["198.51.100.0/24".parse().unwrap()],
        }
    }

    #[test]
    fn verdict_table() {
        let p = policy();
        let o = |s: &str| Some(s.parse::<SocketAddr>().unwrap());
        let pass = |h: &str, port| Verdict::PassThrough {
            host: Some(h.into()),
            dial: Dial::Host {
                host: h.into(),
                port,
            },
            reason: String::new(),
        };
        let cases: Vec<(Option<&str>, Option<SocketAddr>, Verdict)> = vec![
            (
                Some("api.example.com"),
                o("203.0.113.10:443"),
                Verdict::Intercept {
                    host: "api.example.com".into(),
                    secret: "EXAMPLE_SEALED".into(),
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
            (Some("pypi.org"), None, pass("pypi.org", 443)),
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
            (
                None,
                o("203.0.113.10:443"),
                Verdict::Deny {
                    reason: String::new(),
                },
            ),
            (
                None,
                None,
                Verdict::Deny {
                    reason: String::new(),
                },
            ),
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
        let Verdict::Deny { reason } = policy().decide(Some("evil.test"), None) else {
            panic!()
        };
        assert!(
            reason.contains("--target") && reason.contains("--allow"),
            "{reason}"
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
