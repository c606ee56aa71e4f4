//! The packet backstop: `cgroup_skb` programs that apply the connect and
//! sendmsg allowlist to every IP packet a sandbox socket sends or receives,
//! whatever made it (raw and ping sockets, other protocols, sticky or
//! per-message IP options). The socket hooks give the clear `EPERM`; these
//! catch what they cannot see.
//!
//! Both directions check the *peer*: the destination of an egress packet,
//! the source of an ingress one. A packet passes only when the peer is the
//! proxy's listener (TCP), proxypilot's DNS resolver (programs/dns.rs), or an
//! `ALLOWED` address and port with the bit of its transport. With a resolver,
//! any other port-53 peer is dropped. Anything that is not plain TCP or UDP over IPv4 without
//! options or IPv6 without extension headers is dropped.

use aya_ebpf::{
    helpers::generated::{bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_skb_cgroup_id},
    macros::cgroup_skb,
    programs::SkBuffContext,
    EbpfContext,
};
use proxypilot_common::{
    drop_slot, mapped_ip4, Config, DenyReason, Hook, Origin, ALLOW_TCP, DROP_REPORT_INTERVAL_NS,
    IPPROTO_TCP, IPPROTO_UDP,
};

use super::{
    allowed, config, decide_udp, dns, listener_for, report, Dest, Verdict, AF_INET, AF_INET6,
    DROP_REPORTED, PACKET_DROPS,
};

/// cgroup_skb return values.
const PASS: i32 = 1;
const DROP: i32 = 0;

/// `skb->protocol` values (the EtherType, network order in the low 16 bits).
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

/// IPv4 flags/fragment-offset bits that mark a fragment (MF and the offset).
const IP_FRAGMENT_BITS: u16 = 0x3fff;

#[cgroup_skb(egress)]
pub fn packet_egress(ctx: SkBuffContext) -> i32 {
    on_packet::<true>(&ctx)
}

#[cgroup_skb(ingress)]
pub fn packet_ingress(ctx: SkBuffContext) -> i32 {
    on_packet::<false>(&ctx)
}

/// The peer of one packet and its transport, as read from its headers.
struct Packet {
    peer: Dest,
    /// The sandbox socket's end: the source on egress, the destination on
    /// ingress.
    local: Dest,
    family: u16,
    transport: u32,
}

/// `EGRESS` is a const parameter so each direction reads its header fields
/// at constant offsets.
#[inline(always)]
fn on_packet<const EGRESS: bool>(ctx: &SkBuffContext) -> i32 {
    let Some(config) = config() else {
        return DROP;
    };
    // SAFETY: a cgroup_skb ctx.
    let cgroup_id = unsafe { bpf_skb_cgroup_id(ctx.as_ptr().cast()) };
    if config.exempt_cgroup_id != 0 && cgroup_id == config.exempt_cgroup_id {
        return PASS;
    }
    let (packet, verdict) = match read_packet::<EGRESS>(ctx) {
        Ok(p) => {
            let v = decide(config, &p);
            if EGRESS && p.transport == IPPROTO_UDP && matches!(v, Verdict::Pass) {
                // SAFETY: a cgroup_skb ctx.
                let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
                dns::note_sender(cookie, p.local);
            }
            (p, v)
        }
        Err((p, reason)) => (p, Verdict::Deny(reason)),
    };
    match verdict {
        Verdict::Deny(reason) => {
            count_and_maybe_report::<EGRESS>(ctx, &packet, cgroup_id, reason);
            DROP
        }
        _ => PASS,
    }
}

fn decide(config: &Config, p: &Packet) -> Verdict {
    if p.transport == IPPROTO_TCP || p.transport == IPPROTO_UDP {
        match dns::decide_packet(&p.peer) {
            dns::DNS_PASS => return Verdict::Pass,
            dns::DNS_DENY => return Verdict::Deny(DenyReason::NotAllowed),
            _ => {}
        }
    }
    match p.transport {
        IPPROTO_TCP if is_listener(config, &p.peer) || allowed(p.peer, ALLOW_TCP) => Verdict::Pass,
        IPPROTO_TCP => Verdict::Deny(DenyReason::NotAllowed),
        IPPROTO_UDP => decide_udp(IPPROTO_UDP, p.peer),
        _ => Verdict::Deny(DenyReason::Protocol),
    }
}

/// True for the proxy's listener of the peer's family. A listener bound to
/// the unspecified address is reached through loopback.
fn is_listener(config: &Config, peer: &Dest) -> bool {
    let Some(l) = listener_for(config, &peer.addr) else {
        return false;
    };
    let unspecified4 = mapped_ip4(0);
    let loopback = if l.addr == unspecified4 {
        mapped_ip4(u32::from_be(0x7f00_0001))
    } else if l.addr == [0; 4] {
        [0, 0, 0, u32::from_be(1)]
    } else {
        l.addr
    };
    l.port == peer.port && (peer.addr == l.addr || peer.addr == loopback)
}

/// Reads the peer and transport. On error, returns what could be read
/// (for the report) and why the packet is dropped.
#[inline(always)]
fn read_packet<const EGRESS: bool>(ctx: &SkBuffContext) -> Result<Packet, (Packet, DenyReason)> {
    let mut p = Packet {
        peer: Dest {
            addr: [0; 4],
            port: 0,
        },
        local: Dest {
            addr: [0; 4],
            port: 0,
        },
        family: 0,
        transport: 0,
    };
    let ethertype = u16::from_be(ctx.skb.protocol() as u16);
    // Set when the packet is refused whatever its peer; the peer is still
    // read, for the report.
    let mut refused = None;
    let l4 = match ethertype {
        ETH_P_IP => {
            p.family = AF_INET;
            let (Ok(version_ihl), Ok(frag), Ok(transport), Ok(addr), Ok(local)) = (
                ctx.load::<u8>(0),
                ctx.load::<u16>(6),
                ctx.load::<u8>(9),
                ctx.load::<u32>(if EGRESS { 16 } else { 12 }),
                ctx.load::<u32>(if EGRESS { 12 } else { 16 }),
            ) else {
                return Err((p, DenyReason::Malformed));
            };
            p.peer.addr = mapped_ip4(addr);
            p.local.addr = mapped_ip4(local);
            p.transport = u32::from(transport);
            if version_ihl >> 4 != 4 {
                return Err((p, DenyReason::Malformed));
            }
            if version_ihl != 0x45 {
                // Only the plain 20-byte header: any option is refused,
                // source routes among them.
                refused = Some(DenyReason::IpOptions);
            } else if u16::from_be(frag) & IP_FRAGMENT_BITS != 0 {
                return Err((p, DenyReason::Fragment));
            }
            usize::from(version_ihl & 0x0f) * 4
        }
        ETH_P_IPV6 => {
            p.family = AF_INET6;
            let (Ok(next_header), Ok(addr), Ok(local)) = (
                ctx.load::<u8>(6),
                ctx.load::<[u32; 4]>(if EGRESS { 24 } else { 8 }),
                ctx.load::<[u32; 4]>(if EGRESS { 8 } else { 24 }),
            ) else {
                return Err((p, DenyReason::Malformed));
            };
            p.peer.addr = addr;
            p.local.addr = local;
            p.transport = u32::from(next_header);
            if p.transport != IPPROTO_TCP && p.transport != IPPROTO_UDP {
                // Routing, hop-by-hop, destination options and fragment
                // headers all come first: the first header must be the
                // transport. (The transport behind them is not looked for.)
                return Err((p, DenyReason::IpOptions));
            }
            40
        }
        _ => return Err((p, DenyReason::Malformed)),
    };
    if p.transport != IPPROTO_TCP && p.transport != IPPROTO_UDP {
        return Err((p, refused.unwrap_or(DenyReason::Protocol)));
    }
    // TCP and UDP both start with the source port, then the destination.
    let (Ok(port), Ok(local_port)) = (
        ctx.load::<u16>(l4 + if EGRESS { 2 } else { 0 }),
        ctx.load::<u16>(l4 + if EGRESS { 0 } else { 2 }),
    ) else {
        return Err((p, DenyReason::Malformed));
    };
    p.peer.port = u16::from_be(port);
    p.local.port = u16::from_be(local_port);
    match refused {
        Some(reason) => Err((p, reason)),
        None => Ok(p),
    }
}

/// Counts every drop; reports one per CPU and direction per
/// [`DROP_REPORT_INTERVAL_NS`], so a flood cannot flood the log.
#[inline(always)]
fn count_and_maybe_report<const EGRESS: bool>(
    ctx: &SkBuffContext,
    p: &Packet,
    cgroup_id: u64,
    reason: DenyReason,
) {
    let origin = Origin {
        addr: p.peer.addr,
        port: p.peer.port,
        family: p.family,
        tgid: 0,
        tid: 0,
        uid: ctx.get_socket_uid(),
        cgroup_id,
        comm: [0; 16],
    };
    let (slot, hook) = if EGRESS {
        (drop_slot::EGRESS, Hook::Egress)
    } else {
        (drop_slot::INGRESS, Hook::Ingress)
    };
    count_drop(slot, &origin, p.transport, hook, reason);
}

/// Counts a dropped packet in `slot` of `PACKET_DROPS`, and reports it
/// unless that slot reported one less than [`DROP_REPORT_INTERVAL_NS`] ago
/// on this CPU.
#[inline(always)]
pub(super) fn count_drop(
    slot: u32,
    origin: &Origin,
    protocol: u32,
    hook: Hook,
    reason: DenyReason,
) {
    if let Some(n) = PACKET_DROPS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot; nothing else on this CPU runs meanwhile.
        unsafe { *n += 1 };
    }
    // SAFETY: a helper with no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(last) = DROP_REPORTED.get_ptr_mut(slot) else {
        return;
    };
    // SAFETY: as above.
    unsafe {
        if *last != 0 && now.wrapping_sub(*last) < DROP_REPORT_INTERVAL_NS {
            return;
        }
        *last = now;
    }
    report(origin, protocol, hook, reason, 0);
}
