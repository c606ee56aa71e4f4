//! Socket-level refusals, so that what the packet backstop would drop
//! silently fails with a clear `EPERM` instead:
//!
//! * `sock_create`: inet sockets other than TCP and UDP (raw, ping,
//!   UDP-Lite, SCTP, MPTCP...). It runs for AF_INET/AF_INET6 only; other
//!   families (AF_UNIX, AF_PACKET, AF_NETLINK) never reach it.
//! * `setsockopt`: the options that change where a packet goes or what
//!   headers it carries.

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    macros::{cgroup_sock, cgroup_sockopt},
    programs::{SockContext, SockoptContext},
};
use proxypilot_common::{DenyReason, Hook, IPPROTO_TCP, IPPROTO_UDP};

use super::{config, is_exempt, origin_of, report, Dest, AF_INET, AF_INET6};

/// cgroup_sock and cgroup_sockopt return values: 0 fails the call with EPERM.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;

const SOL_IP: i32 = 0;
const SOL_SOCKET: i32 = 1;
const SOL_IPV6: i32 = 41;
const SOL_PACKET: i32 = 263;
/// Every AF_XDP option: without XDP_UMEM_REG an XDP socket cannot send.
const SOL_XDP: i32 = 283;

/// Refused `(level, optname)` pairs, and why:
/// * IP_OPTIONS: source routes (LSRR/SSRR) send the packet to the first hop
///   they name, not to the address connect/sendmsg checked.
/// * IPV6_RTHDR, IPV6_2292PKTOPTIONS (which can carry one): the same for
///   IPv6 routing headers. IPV6_HOPOPTS, IPV6_DSTOPTS, IPV6_RTHDRDSTOPTS:
///   extension headers the backstop drops anyway; refusing them says so.
/// * IP_HDRINCL/IPV6_HDRINCL: a caller-written IP header (raw sockets).
/// * IP_TRANSPARENT/IPV6_TRANSPARENT: foreign local addresses, for proxies.
/// * SO_BINDTODEVICE, SO_BINDTOIFINDEX, IP_UNICAST_IF, IPV6_UNICAST_IF: the
///   same address through another interface can be another host (a VPN
///   bypass). SO_MARK selects policy-routing tables. IP_XFRM_POLICY and
///   IPV6_XFRM_POLICY can tunnel packets to another address.
///
/// * PACKET_QDISC_BYPASS: AF_PACKET frames that skip tc, and with it the
///   interface guard (programs/frames.rs). All of SOL_XDP, below.
///
/// IP_FREEBIND and SO_DONTROUTE stay allowed: they change the local address
/// or skip the gateway, never the peer the packet is addressed to.
const REFUSED: [(i32, i32); 18] = [
    (SOL_IP, 3),      // IP_HDRINCL
    (SOL_IP, 4),      // IP_OPTIONS
    (SOL_IP, 17),     // IP_XFRM_POLICY
    (SOL_IP, 19),     // IP_TRANSPARENT
    (SOL_IP, 50),     // IP_UNICAST_IF
    (SOL_SOCKET, 25), // SO_BINDTODEVICE
    (SOL_SOCKET, 36), // SO_MARK
    (SOL_SOCKET, 62), // SO_BINDTOIFINDEX
    (SOL_IPV6, 6),    // IPV6_2292PKTOPTIONS
    (SOL_IPV6, 35),   // IPV6_XFRM_POLICY
    (SOL_IPV6, 36),   // IPV6_HDRINCL
    (SOL_IPV6, 54),   // IPV6_HOPOPTS
    (SOL_IPV6, 55),   // IPV6_RTHDRDSTOPTS
    (SOL_IPV6, 57),   // IPV6_RTHDR
    (SOL_IPV6, 59),   // IPV6_DSTOPTS
    (SOL_IPV6, 75),   // IPV6_TRANSPARENT
    (SOL_IPV6, 76),   // IPV6_UNICAST_IF
    (SOL_PACKET, 20), // PACKET_QDISC_BYPASS
];

#[cgroup_sock(sock_create)]
pub fn sock_create(ctx: SockContext) -> i32 {
    let Some(config) = config() else {
        return REFUSE;
    };
    if is_exempt(config) {
        return ALLOW;
    }
    let sock = ctx.sock;
    // SAFETY: fields readable by every cgroup_sock program.
    let (family, kind, protocol) = unsafe {
        (
            read_volatile(addr_of!((*sock).family)),
            read_volatile(addr_of!((*sock).type_)),
            read_volatile(addr_of!((*sock).protocol)),
        )
    };
    let inet = family == u32::from(AF_INET) || family == u32::from(AF_INET6);
    let plain = (kind == SOCK_STREAM && protocol == IPPROTO_TCP)
        || (kind == SOCK_DGRAM && protocol == IPPROTO_UDP);
    if inet && !plain {
        let nowhere = Dest {
            addr: [0; 4],
            port: 0,
        };
        report(
            &origin_of(nowhere, family as u16),
            protocol,
            Hook::SockCreate,
            DenyReason::Protocol,
            kind,
        );
        return REFUSE;
    }
    ALLOW
}

#[cgroup_sockopt(setsockopt)]
pub fn setsockopt(ctx: SockoptContext) -> i32 {
    let opt = ctx.sockopt;
    // SAFETY: fields readable by every cgroup_sockopt program.
    let (level, optname) = unsafe {
        (
            read_volatile(addr_of!((*opt).level)),
            read_volatile(addr_of!((*opt).optname)),
        )
    };
    // 0 tells the kernel to use the caller's buffer as given. Without it,
    // an option longer than a page fails with EFAULT on older kernels.
    // SAFETY: optlen is writable in setsockopt programs.
    unsafe { write_volatile(addr_of_mut!((*opt).optlen), 0) };
    let Some(config) = config() else {
        return REFUSE;
    };
    if is_exempt(config) {
        return ALLOW;
    }
    let mut refused = level == SOL_XDP;
    for (l, o) in REFUSED {
        refused |= l == level && o == optname;
    }
    if refused {
        let nowhere = Dest {
            addr: [0; 4],
            port: 0,
        };
        report(
            &origin_of(nowhere, 0),
            0,
            Hook::Setsockopt,
            DenyReason::Sockopt,
            ((level as u32) << 16) | (optname as u32 & 0xffff),
        );
        return REFUSE;
    }
    ALLOW
}
