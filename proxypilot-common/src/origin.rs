//! The original destination of a redirected connection, as user space sees it
//! (needs std: the `user` feature).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::string::String;

use crate::{Origin, PeerKey};

/// Where a sandboxed client meant to connect, and who it was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OriginalDestination {
    /// The address and port the client passed to connect().
    pub addr: SocketAddr,
    /// Process id (thread group id) of the caller.
    pub pid: u32,
    /// Real uid of the caller.
    pub uid: u32,
    /// cgroup id of the caller.
    pub cgroup_id: u64,
    /// The caller's `comm` (process name), as far as the kernel knows it.
    pub comm: String,
}

impl From<&Origin> for OriginalDestination {
    fn from(o: &Origin) -> Self {
        let comm_len = o.comm.iter().position(|&b| b == 0).unwrap_or(o.comm.len());
        OriginalDestination {
            addr: SocketAddr::new(ip_from_words(&o.addr), o.port),
            pid: o.tgid,
            uid: o.uid,
            cgroup_id: o.cgroup_id,
            comm: String::from_utf8_lossy(&o.comm[..comm_len]).into_owned(),
        }
    }
}

/// Turns the four network-order words the kernel uses into an address,
/// unwrapping IPv4-mapped addresses to plain IPv4.
pub fn ip_from_words(words: &[u32; 4]) -> IpAddr {
    let mut bytes = [0u8; 16];
    for (chunk, word) in bytes.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(bytes);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// The inverse of [`ip_from_words`]: IPv4 becomes IPv4-mapped.
pub fn words_from_ip(ip: IpAddr) -> [u32; 4] {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let bytes = v6.octets();
    let mut words = [0u32; 4];
    for (word, chunk) in words.iter_mut().zip(bytes.chunks_exact(4)) {
        *word = u32::from_ne_bytes(chunk.try_into().expect("4-byte chunk"));
    }
    words
}

/// The `PEER_ORIGIN` key for the peer address of an accepted socket.
pub fn peer_key(peer: SocketAddr) -> PeerKey {
    // A v4 listener reports IPv4 peers; a dual-stack one may report them
    // IPv4-mapped. Both are keyed as IPv4-mapped.
    let ip = match peer.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    PeerKey {
        addr: words_from_ip(ip),
        port: u32::from(peer.port()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip_both_families() {
        for ip in ["203.0.113.10", "2001:db8::10", "::1", "127.0.0.1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_from_words(&words_from_ip(ip)), ip);
        }
    }

    #[test]
    fn mapped_peer_keys_like_plain_ipv4() {
        let plain: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:40000".parse().unwrap();
        assert_eq!(peer_key(plain), peer_key(mapped));
        assert_eq!(
            peer_key(plain).addr,
            crate::mapped_ip4(u32::from_ne_bytes([127, 0, 0, 1]))
        );
    }

    #[test]
    fn origin_comm_stops_at_nul() {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        let o = Origin {
            addr: words_from_ip("203.0.113.10".parse().unwrap()),
            port: 443,
            family: 2,
            tgid: 7,
            tid: 8,
            uid: 1000,
            cgroup_id: 9,
            comm,
        };
        let d = OriginalDestination::from(&o);
        assert_eq!(d.addr, "203.0.113.10:443".parse().unwrap());
        assert_eq!(d.comm, "curl");
        assert_eq!(d.pid, 7);
    }
}
