use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{
        bpf_sock_addr, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{bpf_get_current_cgroup_id, bpf_get_socket_cookie},
    },
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    programs::{SockAddrContext, SockOpsContext},
    EbpfContext,
};
use aya_log_ebpf::warn;
use proxypilot_common::{
    drop_slot, is_mapped_ip4, mapped_ip4, AllowTarget, Config, DenyEvent, DenyReason, Hook, Origin,
    PeerKey, Resolver, ALLOWED_MAP_ENTRIES, ALLOW_TCP, ALLOW_UDP, DENIALS_BYTES, DNS_MAP_ENTRIES,
    INTERCEPT_PORT_ENTRIES, IPPROTO_TCP, IPPROTO_UDP, ORIGIN_MAP_ENTRIES, QUIC_PORT,
};

mod backstop;
mod dns;
mod frames;
mod refusals;

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// cgroup_sock_addr return values.
const PASS: i32 = 1;
const DENY: i32 = 0;

// Maps are pinned by name, so a restarted sidecar reuses them (and the
// records of connections already in flight) when it takes the programs over.
#[map]
static CONFIG: Array<Config> = Array::pinned(1, 0);

#[map]
static INTERCEPT_PORTS: HashMap<u16, u8> = HashMap::pinned(INTERCEPT_PORT_ENTRIES, 0);

#[map]
static ALLOWED: LpmTrie<AllowTarget, u32> = LpmTrie::pinned(ALLOWED_MAP_ENTRIES, 0);

#[map]
static SOCK_ORIGIN: LruHashMap<u64, Origin> = LruHashMap::pinned(ORIGIN_MAP_ENTRIES, 0);

#[map]
static PEER_ORIGIN: LruHashMap<PeerKey, Origin> = LruHashMap::pinned(ORIGIN_MAP_ENTRIES, 0);

#[map]
static DENIALS: RingBuf = RingBuf::pinned(DENIALS_BYTES, 0);

#[map]
static PACKET_DROPS: PerCpuArray<u64> = PerCpuArray::pinned(drop_slot::COUNT, 0);

#[map]
static DROP_REPORTED: PerCpuArray<u64> = PerCpuArray::pinned(drop_slot::COUNT, 0);

#[map]
static FRAME_GUARD: Array<u64> = Array::pinned(1, 0);

#[map]
static DNS_RESOLVER: Array<Resolver> = Array::pinned(1, 0);

#[map]
static DNS_ORIGIN: LruHashMap<u64, Origin> = LruHashMap::pinned(DNS_MAP_ENTRIES, 0);

#[map]
static DNS_PEER: LruHashMap<PeerKey, Origin> = LruHashMap::pinned(DNS_MAP_ENTRIES, 0);

/// A destination as the address hooks see it, normalised to 16 bytes.
#[derive(Clone, Copy)]
struct Dest {
    addr: [u32; 4],
    port: u16,
}

/// What the policy says about one connect or send.
enum Verdict {
    Pass,
    Redirect(Dest),
    /// A UDP datagram or connect to port 53, sent to the resolver instead;
    /// recorded in `DNS_ORIGIN` (TCP to port 53 is a plain `Redirect`).
    RedirectDns(Dest),
    Deny(DenyReason),
}

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    on_address::<false>(&ctx, Hook::Connect4, true)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    on_address::<true>(&ctx, Hook::Connect6, true)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    on_address::<false>(&ctx, Hook::Sendmsg4, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    on_address::<true>(&ctx, Hook::Sendmsg6, false)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
    dns::restore_source::<false>(&ctx);
    // recvmsg programs must return 1.
    PASS
}

#[cgroup_sock_addr(recvmsg6)]
pub fn recvmsg6(ctx: SockAddrContext) -> i32 {
    dns::restore_source::<true>(&ctx);
    PASS
}

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    show_original_peer::<false>(&ctx);
    // getpeername programs must return 1; 0 fails verification.
    PASS
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    show_original_peer::<true>(&ctx);
    PASS
}

#[sock_ops]
pub fn origin_rekey(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => rekey_by_peer(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => forget(&ctx),
        _ => {}
    }
    1
}

const fn family<const V6: bool>() -> u16 {
    if V6 {
        AF_INET6
    } else {
        AF_INET
    }
}

fn config() -> Option<&'static Config> {
    CONFIG.get(0)
}

fn is_exempt(config: &Config) -> bool {
    // SAFETY: a helper with no arguments.
    config.exempt_cgroup_id != 0
        && unsafe { bpf_get_current_cgroup_id() } == config.exempt_cgroup_id
}

/// `V6` is a const parameter so each hook gets its own copy with constant
/// field offsets: the verifier rejects context loads at computed offsets.
#[inline(always)]
fn on_address<const V6: bool>(ctx: &SockAddrContext, hook: Hook, is_connect: bool) -> i32 {
    let Some(config) = config() else {
        // Not configured yet: nothing passes (fail closed).
        return DENY;
    };
    if is_exempt(config) {
        return PASS;
    }
    let sa = ctx.sock_addr;
    let dest = read_dest::<V6>(sa);
    // SAFETY: ctx fields readable by every cgroup_sock_addr program.
    let protocol = unsafe { (*sa).protocol };
    // SAFETY: a cgroup_sock_addr ctx.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let dns = dns::decide(protocol, dest, cookie);
    let verdict = match dns.action {
        dns::NOT_DNS if is_connect => decide_connect(config, protocol, dest, cookie),
        dns::NOT_DNS => decide_udp(protocol, dest),
        dns::DNS_PASS => Verdict::Pass,
        dns::DNS_REDIRECT_TCP => Verdict::Redirect(dns.to),
        dns::DNS_REDIRECT_UDP => Verdict::RedirectDns(dns.to),
        _ => Verdict::Deny(DenyReason::try_from(dns.reason).unwrap_or(DenyReason::NotAllowed)),
    };
    match verdict {
        Verdict::Pass => PASS,
        Verdict::RedirectDns(to) => {
            let origin = origin_of(dest, family::<V6>());
            if DNS_ORIGIN.insert(&cookie, &origin, 0).is_err() {
                report(&origin, protocol, hook, DenyReason::MapFull, 0);
                return DENY;
            }
            write_dest::<V6>(sa, to);
            PASS
        }
        Verdict::Redirect(to) => {
            let origin = origin_of(dest, family::<V6>());
            if SOCK_ORIGIN.insert(&cookie, &origin, 0).is_err() {
                warn!(ctx, "proxypilot: could not record an intercepted connect");
                report(&origin, protocol, hook, DenyReason::MapFull, 0);
                return DENY;
            }
            write_dest::<V6>(sa, to);
            PASS
        }
        Verdict::Deny(reason) => {
            report(&origin_of(dest, family::<V6>()), protocol, hook, reason, 0);
            DENY
        }
    }
}

fn decide_connect(config: &Config, protocol: u32, dest: Dest, cookie: u64) -> Verdict {
    match protocol {
        IPPROTO_TCP => decide_tcp(config, dest, cookie),
        IPPROTO_UDP => decide_udp(protocol, dest),
        _ => Verdict::Deny(DenyReason::Protocol),
    }
}

fn decide_tcp(config: &Config, dest: Dest, cookie: u64) -> Verdict {
    let listener = listener_for(config, &dest.addr);
    // Already the listener: an older copy of these programs, running first
    // during a takeover, redirected it (and recorded it in the shared map).
    // A sandbox dialling the proxy's port itself is refused.
    if let Some(l) = listener {
        if l.port == dest.port && l.addr == dest.addr {
            // SAFETY: read only for presence.
            return if unsafe { SOCK_ORIGIN.get(&cookie) }.is_some() {
                Verdict::Pass
            } else {
                Verdict::Deny(DenyReason::DirectToProxy)
            };
        }
    }
    // SAFETY: the value is a plain u8 marker, read only for presence.
    if unsafe { INTERCEPT_PORTS.get(&dest.port) }.is_some() {
        return match listener {
            Some(l) => Verdict::Redirect(l),
            None => Verdict::Deny(DenyReason::NoListener),
        };
    }
    if allowed(dest, ALLOW_TCP) {
        Verdict::Pass
    } else {
        Verdict::Deny(DenyReason::NotAllowed)
    }
}

fn decide_udp(protocol: u32, dest: Dest) -> Verdict {
    if protocol != IPPROTO_UDP {
        // sendmsg only runs for datagram sockets; anything else is odd.
        return Verdict::Deny(DenyReason::Protocol);
    }
    if dest.port == QUIC_PORT {
        return Verdict::Deny(DenyReason::Quic);
    }
    if allowed(dest, ALLOW_UDP) {
        Verdict::Pass
    } else {
        Verdict::Deny(DenyReason::NotAllowed)
    }
}

/// The listener a connect to `addr` is redirected to: the IPv4 one for IPv4
/// and IPv4-mapped destinations (as `::ffff:` + listener on a v6 socket), the
/// IPv6 one otherwise.
fn listener_for(config: &Config, addr: &[u32; 4]) -> Option<Dest> {
    if is_mapped_ip4(addr) {
        (config.listen_port4 != 0).then(|| Dest {
            addr: mapped_ip4(config.listen_ip4),
            port: config.listen_port4,
        })
    } else {
        (config.listen_port6 != 0).then(|| Dest {
            addr: config.listen_ip6,
            port: config.listen_port6,
        })
    }
}

fn allowed(dest: Dest, protocol_bit: u32) -> bool {
    let full = AllowTarget::PORT_BITS + 128;
    for port in [dest.port, 0] {
        let key = Key::new(
            full,
            AllowTarget {
                port: port.to_be_bytes(),
                _reserved: [0; 2],
                addr: dest.addr,
            },
        );
        if let Some(bits) = ALLOWED.get(&key) {
            if *bits & protocol_bit != 0 {
                return true;
            }
        }
    }
    false
}

fn origin_of(dest: Dest, family: u16) -> Origin {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: a helper with no arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    Origin {
        addr: dest.addr,
        port: dest.port,
        family,
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        uid: bpf_get_current_uid_gid() as u32,
        cgroup_id,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    }
}

fn report(origin: &Origin, protocol: u32, hook: Hook, reason: DenyReason, detail: u32) {
    let event = DenyEvent {
        origin: *origin,
        protocol,
        hook: hook as u32,
        reason: reason as u32,
        detail,
    };
    // A full ring only loses the report, never the verdict.
    let _ = DENIALS.output::<DenyEvent>(&event, 0);
}

/// Reads the destination of a connect or send. The context's address fields
/// are read word by word: the verifier only allows narrow, direct loads.
#[inline(always)]
fn read_dest<const V6: bool>(sa: *mut bpf_sock_addr) -> Dest {
    // SAFETY: user_ip4/user_ip6/user_port are readable in every
    // cgroup_sock_addr program of the matching family.
    unsafe {
        let port = u16::from_be(read_volatile(addr_of!((*sa).user_port)) as u16);
        let addr = if V6 {
            [
                read_volatile(addr_of!((*sa).user_ip6[0])),
                read_volatile(addr_of!((*sa).user_ip6[1])),
                read_volatile(addr_of!((*sa).user_ip6[2])),
                read_volatile(addr_of!((*sa).user_ip6[3])),
            ]
        } else {
            mapped_ip4(read_volatile(addr_of!((*sa).user_ip4)))
        };
        Dest { addr, port }
    }
}

/// Rewrites the destination (or, in getpeername, the reported peer).
/// `user_port` takes a 32-bit store and `user_ip6` one word at a time.
#[inline(always)]
fn write_dest<const V6: bool>(sa: *mut bpf_sock_addr, to: Dest) {
    // SAFETY: these fields are writable in connect, sendmsg and getpeername
    // programs of the matching family.
    unsafe {
        if V6 {
            write_volatile(addr_of_mut!((*sa).user_ip6[0]), to.addr[0]);
            write_volatile(addr_of_mut!((*sa).user_ip6[1]), to.addr[1]);
            write_volatile(addr_of_mut!((*sa).user_ip6[2]), to.addr[2]);
            write_volatile(addr_of_mut!((*sa).user_ip6[3]), to.addr[3]);
        } else {
            write_volatile(addr_of_mut!((*sa).user_ip4), to.addr[3]);
        }
        write_volatile(addr_of_mut!((*sa).user_port), u32::from(to.port.to_be()));
    }
}

#[inline(always)]
fn show_original_peer<const V6: bool>(ctx: &SockAddrContext) {
    // SAFETY: a cgroup_sock_addr ctx.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the record is copied out at once; a concurrent update can at
    // worst give a stale but well-formed peer.
    // A connected DNS socket's record is in DNS_ORIGIN.
    // SAFETY: as above.
    let origin = unsafe { SOCK_ORIGIN.get(&cookie).or_else(|| DNS_ORIGIN.get(&cookie)) };
    if let Some(origin) = origin {
        let to = Dest {
            addr: origin.addr,
            port: origin.port,
        };
        write_dest::<V6>(ctx.sock_addr, to);
    }
}

/// The client's local address as the proxy will see it as the peer of the
/// accepted socket. IPv4 and IPv4-mapped connects were sent to the IPv4
/// listener, so their key is the IPv4 source, mapped.
fn peer_key(ctx: &SockOpsContext, origin: &Origin) -> PeerKey {
    let ops = ctx.ops;
    // Every field is loaded unconditionally and the choice is made on the
    // values: loads in two branches get merged into one load at a computed
    // offset, which the verifier rejects.
    // SAFETY: fields readable by every sock_ops program.
    let (family, ip4, ip6, port) = unsafe {
        (
            read_volatile(addr_of!((*ops).family)),
            read_volatile(addr_of!((*ops).local_ip4)),
            [
                read_volatile(addr_of!((*ops).local_ip6[0])),
                read_volatile(addr_of!((*ops).local_ip6[1])),
                read_volatile(addr_of!((*ops).local_ip6[2])),
                read_volatile(addr_of!((*ops).local_ip6[3])),
            ],
            read_volatile(addr_of!((*ops).local_port)),
        )
    };
    let addr = if family == u32::from(AF_INET) || is_mapped_ip4(&origin.addr) {
        mapped_ip4(ip4)
    } else {
        ip6
    };
    PeerKey { addr, port }
}

fn rekey_by_peer(ctx: &SockOpsContext) {
    // SAFETY: a sock_ops ctx.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    let Some(origin) = (unsafe { SOCK_ORIGIN.get(&cookie) }).copied() else {
        return;
    };
    let key = peer_key(ctx, &origin);
    if PEER_ORIGIN.insert(&key, &origin, 0).is_err() {
        warn!(ctx, "proxypilot: could not re-key an intercepted connect");
    }
    // Ask for state callbacks so both records go when the socket closes.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

fn forget(ctx: &SockOpsContext) {
    // SAFETY: a sock_ops ctx.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    if let Some(origin) = (unsafe { SOCK_ORIGIN.get(&cookie) }).copied() {
        let key = peer_key(ctx, &origin);
        let _ = PEER_ORIGIN.remove(&key);
        let _ = SOCK_ORIGIN.remove(&cookie);
    }
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
