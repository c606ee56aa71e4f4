//! Reports of what the kernel denied (connects, sends, sockets, socket
//! options, and the packet backstop's drops), read from the ring buffer so
//! users (and agents) learn why something failed. Dropped packets are
//! reported at most ten times a second per CPU and direction; every one is
//! counted ([`super::Attachment::packet_drops`]).

use std::fmt;

use aya::maps::{MapData, RingBuf};
use proxypilot_common::{DenyEvent, DenyReason, Hook, IPPROTO_TCP, IPPROTO_UDP};
use tokio::io::unix::AsyncFd;

use super::origin::OriginalDestination;

/// One denied connect, send, socket, socket option or packet.
#[derive(Clone, Debug)]
pub struct Denial {
    /// The destination the sandbox asked for, and who asked.
    pub origin: OriginalDestination,
    /// "tcp", "udp", another protocol's name, or "protocol N".
    pub protocol: String,
    /// Which hook saw it.
    pub hook: Hook,
    pub reason: DenyReason,
    /// Hook specific, as in [`DenyEvent::detail`].
    pub detail: u32,
}

/// A ring buffer record with a code this build does not know: the eBPF
/// object and proxypilot were built from different sources.
#[derive(Debug, thiserror::Error)]
#[error(
    "a denial report with an unknown {field} code {code} (is the eBPF object from another build?)"
)]
pub struct UnknownCode {
    pub field: &'static str,
    pub code: u32,
}

impl TryFrom<&DenyEvent> for Denial {
    type Error = UnknownCode;

    fn try_from(e: &DenyEvent) -> Result<Self, UnknownCode> {
        let hook = Hook::try_from(e.hook).map_err(|code| UnknownCode {
            field: "hook",
            code,
        })?;
        let reason = DenyReason::try_from(e.reason).map_err(|code| UnknownCode {
            field: "reason",
            code,
        })?;
        Ok(Denial {
            origin: OriginalDestination::from(&e.origin),
            protocol: protocol_name(e.protocol),
            hook,
            reason,
            detail: e.detail,
        })
    }
}

impl Denial {
    /// A refused UDP connect(), which sends nothing: glibc's getaddrinfo
    /// makes one to each address it resolves (to pick a source address,
    /// RFC 6724), so these are expected and not worth a warning. Datagrams
    /// actually sent are `Sendmsg*` denials.
    pub fn is_address_probe(&self) -> bool {
        matches!(self.hook, Hook::Connect4 | Hook::Connect6) && self.protocol == "udp"
    }

    /// Why, as a short phrase.
    pub fn why(&self) -> &'static str {
        match (self.hook, self.reason) {
            (Hook::SockCreate, _) => socket_kind(self.detail),
            (Hook::Setsockopt, _) => sockopt_name(self.detail),
            (_, DenyReason::NotAllowed) => "not on the allow list",
            (_, DenyReason::Quic) => "UDP 443 (QUIC) is always denied so clients use TCP",
            (_, DenyReason::NoListener) => {
                "intercepted port, but the proxy has no listener for this address family"
            }
            (_, DenyReason::Protocol) => "only TCP and UDP are handled",
            (_, DenyReason::MapFull) => "the connection could not be recorded",
            (_, DenyReason::DirectToProxy) => {
                "the proxy's listener is only reachable through a redirect"
            }
            (_, DenyReason::Sockopt) => "a socket option that changes routing is refused",
            (_, DenyReason::IpOptions) => {
                "IP options and IPv6 extension headers (source routes among them) are refused"
            }
            (_, DenyReason::Fragment) => "IP fragments are refused",
            (_, DenyReason::Malformed) => "not a readable IPv4 or IPv6 packet",
            (_, DenyReason::FrameSocket) => {
                "frames from packet sockets (AF_PACKET) are refused: they pass below every IP hook"
            }
            (_, DenyReason::NoResolver) => {
                "DNS goes only to proxypilot's resolver, which has no listener for this address family"
            }
        }
    }
}

/// "tcp", "udp", a few other names, or "protocol N".
fn protocol_name(number: u32) -> String {
    match number {
        IPPROTO_TCP => "tcp".to_string(),
        IPPROTO_UDP => "udp".to_string(),
        1 => "icmp".to_string(),
        58 => "icmpv6".to_string(),
        132 => "sctp".to_string(),
        136 => "udplite".to_string(),
        255 => "raw".to_string(),
        262 => "mptcp".to_string(),
        other => format!("protocol {other}"),
    }
}

/// Why `sock_create` refused a socket of type `kind`.
fn socket_kind(kind: u32) -> &'static str {
    match kind {
        3 => "raw sockets are refused; only TCP and UDP sockets may be created",
        _ => "only TCP and UDP sockets may be created",
    }
}

/// The refused option, from `level << 16 | optname` (see the setsockopt
/// program for why each is refused).
fn sockopt_name(detail: u32) -> &'static str {
    match (detail >> 16, detail & 0xffff) {
        (0, 3) => "IP_HDRINCL is refused",
        (0, 4) => "IP_OPTIONS (source routes) is refused",
        (0, 17) => "IP_XFRM_POLICY is refused",
        (0, 19) => "IP_TRANSPARENT is refused",
        (0, 50) => "IP_UNICAST_IF is refused",
        (1, 25) => "SO_BINDTODEVICE is refused",
        (1, 36) => "SO_MARK is refused",
        (1, 62) => "SO_BINDTOIFINDEX is refused",
        (41, 6) => "IPV6_2292PKTOPTIONS is refused",
        (41, 35) => "IPV6_XFRM_POLICY is refused",
        (41, 36) => "IPV6_HDRINCL is refused",
        (41, 54) => "IPV6_HOPOPTS is refused",
        (41, 55) => "IPV6_RTHDRDSTOPTS is refused",
        (41, 57) => "IPV6_RTHDR (routing headers) is refused",
        (41, 59) => "IPV6_DSTOPTS is refused",
        (41, 75) => "IPV6_TRANSPARENT is refused",
        (41, 76) => "IPV6_UNICAST_IF is refused",
        _ => "a socket option that changes routing is refused",
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.origin;
        let why = self.why();
        match self.hook {
            Hook::Egress => write!(
                f,
                "{} packet to {} (socket of uid {}) dropped: {}",
                self.protocol, o.addr, o.uid, why
            ),
            Hook::Ingress => write!(
                f,
                "{} packet from {} (socket of uid {}) dropped: {}",
                self.protocol, o.addr, o.uid, why
            ),
            Hook::Frame => write!(f, "frame from a socket of uid {} dropped: {}", o.uid, why),
            Hook::SockCreate => write!(
                f,
                "{} socket from pid {} ({}): {}",
                self.protocol, o.pid, o.comm, why
            ),
            Hook::Setsockopt => write!(f, "setsockopt from pid {} ({}): {}", o.pid, o.comm, why),
            Hook::Connect4 | Hook::Connect6 | Hook::Sendmsg4 | Hook::Sendmsg6 => write!(
                f,
                "{} {} from pid {} ({}): {}",
                self.protocol, o.addr, o.pid, o.comm, why
            ),
        }
    }
}

/// Registers a ring buffer's fd with the reactor for readability.
pub(super) fn readable<T: std::os::fd::AsRawFd>(inner: T) -> std::io::Result<AsyncFd<T>> {
    // SAFETY: both ring buffer types own their map fd, which stays open and
    // unchanged until they are dropped, which only the AsyncFd can do.
    unsafe { AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// Reads denials until the ring buffer fails, calling `on_denial` for each.
pub async fn watch(
    ring: RingBuf<MapData>,
    mut on_denial: impl FnMut(Denial),
) -> std::io::Result<()> {
    let mut fd = readable(ring)?;
    loop {
        let mut guard = fd.readable_mut().await?;
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            match parse_denial(&item).map(|event| Denial::try_from(&event)) {
                Some(Ok(denial)) => on_denial(denial),
                Some(Err(e)) => tracing::warn!("{e}"),
                None => {}
            }
        }
        guard.clear_ready();
    }
}

/// Parses one record from the denial ring buffer.
fn parse_denial(bytes: &[u8]) -> Option<DenyEvent> {
    if bytes.len() < std::mem::size_of::<DenyEvent>() {
        return None;
    }
    // SAFETY: DenyEvent is Pod (any bit pattern is valid) and the length was
    // checked; read_unaligned copes with the ring's 8-byte alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<DenyEvent>()) })
}

/// Forwards aya-log records from the programs to `log` (and so to tracing).
pub async fn forward_logs(
    logger: aya_log::EbpfLogger<&'static dyn log::Log>,
) -> std::io::Result<()> {
    let mut fd = readable(logger)?;
    loop {
        let mut guard = fd.readable_mut().await?;
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxypilot_common::{mapped_ip4, Origin};

    fn event(hook: Hook, reason: DenyReason, protocol: u32, detail: u32) -> DenyEvent {
        DenyEvent {
            origin: Origin {
                addr: mapped_ip4(u32::from_ne_bytes([203, 0, 113, 40])),
                port: 53,
                family: 2,
                tgid: 7,
                tid: 7,
                uid: 65534,
                cgroup_id: 1,
                comm: *b"python3\0\0\0\0\0\0\0\0\0",
            },
            protocol,
            hook: hook as u32,
            reason: reason as u32,
            detail,
        }
    }

    #[test]
    fn every_hook_reads_as_a_sentence() {
        let d = Denial::try_from(&event(Hook::Egress, DenyReason::IpOptions, 17, 0)).unwrap();
        assert_eq!(
            d.to_string(),
            "udp packet to 203.0.113.40:53 (socket of uid 65534) dropped: IP options and IPv6 \
             extension headers (source routes among them) are refused"
        );
        let d = Denial::try_from(&event(Hook::Ingress, DenyReason::NotAllowed, 6, 0)).unwrap();
        assert!(
            d.to_string().starts_with("tcp packet from 203.0.113.40:53"),
            "{d}"
        );
        let d = Denial::try_from(&event(Hook::SockCreate, DenyReason::Protocol, 136, 2)).unwrap();
        assert_eq!(
            d.to_string(),
            "udplite socket from pid 7 (python3): only TCP and UDP sockets may be created"
        );
        let d = Denial::try_from(&event(Hook::SockCreate, DenyReason::Protocol, 255, 3)).unwrap();
        assert!(d.why().starts_with("raw sockets are refused"), "{d}");
        let d = Denial::try_from(&event(
            Hook::Setsockopt,
            DenyReason::Sockopt,
            0,
            41 << 16 | 57,
        ))
        .unwrap();
        assert_eq!(
            d.to_string(),
            "setsockopt from pid 7 (python3): IPV6_RTHDR (routing headers) is refused"
        );
        let d = Denial::try_from(&event(Hook::Frame, DenyReason::FrameSocket, 0, 0)).unwrap();
        assert!(
            d.to_string()
                .starts_with("frame from a socket of uid 65534 dropped: frames"),
            "{d}"
        );
        let d = Denial::try_from(&event(Hook::Connect4, DenyReason::NotAllowed, 6, 0)).unwrap();
        assert_eq!(
            d.to_string(),
            "tcp 203.0.113.40:53 from pid 7 (python3): not on the allow list"
        );
    }

    #[test]
    fn unknown_codes_are_named_not_guessed() {
        let mut e = event(Hook::Connect4, DenyReason::NotAllowed, 6, 0);
        e.hook = 99;
        let err = Denial::try_from(&e).unwrap_err();
        assert_eq!((err.field, err.code), ("hook", 99));
        let mut e = event(Hook::Connect4, DenyReason::NotAllowed, 6, 0);
        e.reason = 0;
        let err = Denial::try_from(&e).unwrap_err();
        assert_eq!((err.field, err.code), ("reason", 0));
        assert!(err.to_string().contains("unknown reason code 0"), "{err}");
    }
}
