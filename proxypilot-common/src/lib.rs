//! Types shared by proxypilot's kernel programs and its user space.
//!
//! Everything here is `#[repr(C)]` with explicit padding, because the same
//! bytes are written by one side and read by the other through BPF maps.
//!
//! Addresses are always 16 bytes: IPv4 is stored IPv4-mapped
//! (`::ffff:a.b.c.d`), so one map and one code path serve both families.
//! An address is held as four `u32` words whose *memory* is the address in
//! network byte order, exactly as the kernel's `user_ip6` field is.
#![no_std]

#[cfg(feature = "user")]
extern crate std;

#[cfg(feature = "user")]
pub mod origin;

/// Names of the maps in the eBPF object, so both halves agree on them.
pub mod map_names {
    /// `Array<Config>` with one slot: where the proxy listens, whom to exempt.
    pub const CONFIG: &str = "CONFIG";
    /// `HashMap<u16, u8>`: TCP destination ports that are redirected.
    pub const INTERCEPT_PORTS: &str = "INTERCEPT_PORTS";
    /// `LpmTrie<AllowTarget, u32>`: destinations that pass, value = `ALLOW_*` flags.
    pub const ALLOWED: &str = "ALLOWED";
    /// `LruHashMap<u64, Origin>`: socket cookie → original destination.
    pub const SOCK_ORIGIN: &str = "SOCK_ORIGIN";
    /// `LruHashMap<PeerKey, Origin>`: client address → original destination.
    pub const PEER_ORIGIN: &str = "PEER_ORIGIN";
    /// `RingBuf` of [`super::DenyEvent`]s.
    pub const DENIALS: &str = "DENIALS";
    /// `PerCpuArray<u64>`, one slot per [`super::drop_slot`]: packets the
    /// backstop dropped.
    pub const PACKET_DROPS: &str = "PACKET_DROPS";
    /// `PerCpuArray<u64>`, one slot per [`super::drop_slot`]: when a dropped
    /// packet was last reported (ns since boot).
    pub const DROP_REPORTED: &str = "DROP_REPORTED";
    /// `Array<u64>` with one slot: the sandbox cgroup, whose packet-socket
    /// frames (and its descendants') the interface guard drops; 0 for none.
    pub const FRAME_GUARD: &str = "FRAME_GUARD";
    /// `Array<Resolver>` with one slot: where proxypilot's DNS resolver
    /// listens. All zero: no resolver, and port 53 is decided by `ALLOWED`.
    pub const DNS_RESOLVER: &str = "DNS_RESOLVER";
    /// `LruHashMap<u64, Origin>`: socket cookie → the DNS server a sandbox
    /// UDP socket last asked (its datagrams went to the resolver instead).
    pub const DNS_ORIGIN: &str = "DNS_ORIGIN";
    /// `LruHashMap<PeerKey, Origin>`: a sandbox UDP socket's local address →
    /// who sent the query, for the resolver's audit line.
    pub const DNS_PEER: &str = "DNS_PEER";
}

/// Slots of the per-direction maps of the packet backstop.
pub mod drop_slot {
    pub const EGRESS: u32 = 0;
    pub const INGRESS: u32 = 1;
    /// Frames from packet sockets, dropped by the interface guard.
    pub const FRAMES: u32 = 2;
    pub const COUNT: u32 = 3;
}

/// A flood of dropped packets is counted in full but reported at most once
/// per this many nanoseconds per CPU and direction.
pub const DROP_REPORT_INTERVAL_NS: u64 = 100_000_000;

/// Capacity of the two origin maps. They are LRU maps, so a flood of
/// connects evicts the oldest entries instead of failing new ones.
pub const ORIGIN_MAP_ENTRIES: u32 = 65_536;
/// Capacity of each DNS record map (LRU: UDP sockets never say they closed).
pub const DNS_MAP_ENTRIES: u32 = 16_384;
/// Capacity of the allow list.
pub const ALLOWED_MAP_ENTRIES: u32 = 4_096;
/// Capacity of the intercepted-port set.
pub const INTERCEPT_PORT_ENTRIES: u32 = 64;
/// Size of the denial ring buffer in bytes (a power of two, page aligned).
pub const DENIALS_BYTES: u32 = 256 * 1024;

/// `ALLOWED` value bit: TCP to this destination passes.
pub const ALLOW_TCP: u32 = 1;
/// `ALLOWED` value bit: UDP to this destination passes.
pub const ALLOW_UDP: u32 = 2;

/// IANA protocol numbers as the kernel reports them in `bpf_sock_addr`.
pub const IPPROTO_TCP: u32 = 6;
pub const IPPROTO_UDP: u32 = 17;

/// The DNS port: UDP and TCP to it, whatever the address, go to proxypilot's
/// resolver when one is configured.
pub const DNS_PORT: u16 = 53;

/// The port QUIC uses; UDP to it is always denied so clients fall back to TCP.
pub const QUIC_PORT: u16 = 443;

/// Where the proxy listens and which cgroup is exempt. One slot in `CONFIG`.
///
/// A zero port means "no listener for that family": intercepted connects of
/// that family are denied (fail closed), never passed through.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// IPv4 listener address as the kernel's `user_ip4` holds it.
    pub listen_ip4: u32,
    /// IPv4 listener port, host order.
    pub listen_port4: u16,
    /// IPv6 listener port, host order.
    pub listen_port6: u16,
    /// IPv6 listener address, words as in `user_ip6`.
    pub listen_ip6: [u32; 4],
    /// cgroup id (the cgroup directory's inode) of the proxy itself; its
    /// sockets are never redirected or denied.
    pub exempt_cgroup_id: u64,
}

/// Where proxypilot's DNS resolver listens, UDP and TCP on the same port.
/// One slot in `DNS_RESOLVER`. A zero port: no resolver for that family
/// (DNS of that family is denied while the other one has a resolver).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resolver {
    /// IPv4 address as the kernel's `user_ip4` holds it.
    pub ip4: u32,
    /// IPv4 port, host order.
    pub port4: u16,
    /// IPv6 port, host order.
    pub port6: u16,
    /// IPv6 address, words as in `user_ip6`.
    pub ip6: [u32; 4],
}

impl Resolver {
    /// True when DNS is redirected at all.
    #[inline(always)]
    pub const fn in_use(&self) -> bool {
        self.port4 != 0 || self.port6 != 0
    }
}

/// The destination a sandboxed socket asked for, and who asked.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    /// Original destination address (IPv4-mapped for IPv4).
    pub addr: [u32; 4],
    /// Original destination port, host order.
    pub port: u16,
    /// Address family of the socket that connected (`AF_INET` or `AF_INET6`).
    pub family: u16,
    /// Process id (thread group id) of the caller.
    pub tgid: u32,
    /// Thread id of the caller.
    pub tid: u32,
    /// Real uid of the caller.
    pub uid: u32,
    /// cgroup id of the caller.
    pub cgroup_id: u64,
    /// `comm` of the calling thread, NUL padded.
    pub comm: [u8; 16],
}

/// Key of `PEER_ORIGIN`: the client's local address as the proxy sees it in
/// `accept()`'s peer address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerKey {
    pub addr: [u32; 4],
    /// Port, host order, widened so the struct has no padding.
    pub port: u32,
}

/// The data part of an `ALLOWED` LPM trie key.
///
/// The port comes first so that a prefix of `32 + address bits` matches one
/// port, while entries with port 0 (any port) are found by a second lookup
/// with port 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllowTarget {
    /// Port in network order, or 0 for any port.
    pub port: [u8; 2],
    pub _reserved: [u8; 2],
    pub addr: [u32; 4],
}

impl AllowTarget {
    /// Bits of an `ALLOWED` key covering the port and reserved bytes.
    pub const PORT_BITS: u32 = 32;
}

/// Declares a `#[repr(u32)]` code written by the programs into
/// [`DenyEvent`] and read back with `TryFrom<u32>` (the event keeps a plain
/// `u32`, so any bytes in the ring buffer are a valid event).
macro_rules! event_code {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident = $value:literal,)* }) => {
        $(#[$meta])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant = $value,)*
        }

        impl TryFrom<u32> for $name {
            /// The value that is not a known code.
            type Error = u32;

            fn try_from(code: u32) -> Result<Self, u32> {
                match code {
                    $($value => Ok(Self::$variant),)*
                    other => Err(other),
                }
            }
        }
    };
}

event_code! {
    /// Which hook denied a connection, socket, option or packet.
    pub enum Hook {
        Connect4 = 1,
        Connect6 = 2,
        Sendmsg4 = 3,
        Sendmsg6 = 4,
        /// `cgroup/sock_create`: a socket of a kind other than TCP or UDP.
        SockCreate = 5,
        /// `cgroup/setsockopt`: an option that changes where packets go.
        Setsockopt = 6,
        /// `cgroup_skb/egress`: a packet leaving a sandbox socket.
        Egress = 7,
        /// `cgroup_skb/ingress`: a packet arriving for a sandbox socket.
        Ingress = 8,
        /// tc egress on an interface: a frame a sandbox packet socket sent.
        Frame = 9,
    }
}

event_code! {
    /// Why something was denied.
    pub enum DenyReason {
        /// The destination is not on the allow list.
        NotAllowed = 1,
        /// UDP to port 443 (QUIC) is always refused.
        Quic = 2,
        /// An intercepted port, but no listener of that family is configured.
        NoListener = 3,
        /// A transport other than TCP or UDP.
        Protocol = 4,
        /// The origin map could not record the connection.
        MapFull = 5,
        /// The sandbox dialled the proxy's own listener instead of a destination.
        DirectToProxy = 6,
        /// A socket option that changes a packet's route or headers.
        Sockopt = 7,
        /// An IPv4 packet with options, or an IPv6 packet with extension headers.
        IpOptions = 8,
        /// An IP fragment (the hooks see whole packets; only raw sockets make these).
        Fragment = 9,
        /// A packet the backstop could not read (not IPv4 or IPv6, or truncated).
        Malformed = 10,
        /// A frame from a socket that is not inet (AF_PACKET): below every IP hook.
        FrameSocket = 11,
        /// DNS (port 53) of a family the resolver does not listen on.
        NoResolver = 12,
    }
}

/// One denied connect, send, socket, socket option or packet, reported to
/// user space. For packets, `origin.addr`/`port` are the peer (destination on
/// egress, source on ingress), `uid` the socket's owner, and `tgid`/`comm`
/// are empty: packets are not always handled by the task that sent them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DenyEvent {
    /// Destination and caller; `addr`/`port` are what the sandbox asked for.
    pub origin: Origin,
    /// `IPPROTO_*` of the socket.
    pub protocol: u32,
    /// A [`Hook`], as `u32`.
    pub hook: u32,
    /// A [`DenyReason`], as `u32`.
    pub reason: u32,
    /// Hook specific: the socket type for [`Hook::SockCreate`], `level << 16 |
    /// optname` for [`Hook::Setsockopt`], 0 otherwise.
    pub detail: u32,
}

/// The 16 bytes of an IPv4-mapped IPv6 address, as `addr` words, for an IPv4
/// address given the way `user_ip4` holds it.
#[inline(always)]
pub const fn mapped_ip4(user_ip4: u32) -> [u32; 4] {
    [0, 0, u32::from_be(0x0000_ffff), user_ip4]
}

/// True when `addr` is an IPv4-mapped IPv6 address.
#[inline(always)]
pub const fn is_mapped_ip4(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == u32::from_be(0x0000_ffff)
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is repr(C), Copy, has no padding left implicit, and
    // any bit pattern is a valid value.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::Origin {}
    unsafe impl aya::Pod for super::PeerKey {}
    unsafe impl aya::Pod for super::AllowTarget {}
    unsafe impl aya::Pod for super::DenyEvent {}
    unsafe impl aya::Pod for super::Resolver {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<Config>(), 4 + 2 + 2 + 16 + 8);
        assert_eq!(size_of::<Origin>(), 16 + 2 + 2 + 4 + 4 + 4 + 8 + 16);
        assert_eq!(size_of::<PeerKey>(), 20);
        assert_eq!(size_of::<AllowTarget>(), 20);
        assert_eq!(size_of::<DenyEvent>(), size_of::<Origin>() + 16);
        assert_eq!(size_of::<Resolver>(), 4 + 2 + 2 + 16);
    }

    #[test]
    fn event_codes_round_trip() {
        for hook in [Hook::Connect4, Hook::Egress, Hook::Frame] {
            assert_eq!(Hook::try_from(hook as u32), Ok(hook));
        }
        for reason in [DenyReason::NotAllowed, DenyReason::NoResolver] {
            assert_eq!(DenyReason::try_from(reason as u32), Ok(reason));
        }
        assert_eq!(Hook::try_from(0), Err(0));
        assert_eq!(DenyReason::try_from(13), Err(13));
    }

    #[test]
    fn mapped_ip4_matches_std() {
        let v4 = std::net::Ipv4Addr::new(203, 0, 113, 10);
        let words = mapped_ip4(u32::from_ne_bytes(v4.octets()));
        let mut bytes = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        assert_eq!(std::net::Ipv6Addr::from(bytes), v4.to_ipv6_mapped());
        assert!(is_mapped_ip4(&words));
        assert!(!is_mapped_ip4(&[0, 0, 0, 1]));
    }
}
