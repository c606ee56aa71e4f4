//! Only connections the kernel redirected from the sandbox are served.
//!
//! The relay's listener is an ordinary loopback socket: any local process
//! (another user, another container in the namespace, a second cgroup) can
//! connect to it and present an intercepted SNI. What tells a sandbox
//! connection apart is the kernel's record, written by connect4/6 and
//! re-keyed by the client's (address, port) in sock_ops. A connection
//! without one is closed before its ClientHello is read, so it gets no
//! certificate, no credential and no pass-through.
//!
//! Why a peer address is enough to identify the record:
//! - the record exists only from the sandbox socket's `connect()` until it
//!   closes (sock_ops removes it on `TCP_CLOSE`), and it is used once (the
//!   lookup deletes it);
//! - while the sandbox socket lives, it owns the 4-tuple (its address and
//!   port, the listener's address and port): no other socket can connect
//!   from the same address and port to the same listener (`EADDRNOTAVAIL`),
//!   and a bind() to a port `connect()` chose conflicts unless the sandbox
//!   socket itself opted into `SO_REUSEADDR`/`SO_REUSEPORT` — which only the
//!   sandbox can do, and a sandbox that helps an outsider this way lends it
//!   only what it could do itself (requests with the key injected, never
//!   the key);
//! - a client on another loopback address (127.0.0.2, `::1` vs. a mapped
//!   address) has another key, so it finds nothing.
//!
//! What is left: a record that outlives its socket because the kernel could
//! not arm the close callback (`bpf_sock_ops_cb_flags_set` failing), which
//! a local process could then claim by binding that port. The LRU map
//! bounds how long such a record can wait; SECURITY.md lists it.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use proxypilot_common::origin::OriginalDestination;

/// The kernel's records of redirected connections, by the client's address.
///
/// Production has one implementation (the sidecar's, over the attachment's
/// `PEER_ORIGIN` map, which also checks the record's cgroup). Tests that
/// drive the relay without a kernel implement it themselves, explicitly.
pub trait Redirections: Send + Sync + 'static {
    /// Takes (and forgets) the record of the connection accepted from
    /// `peer`; `None` when the kernel did not redirect it from the sandbox.
    fn take(&self, peer: SocketAddr) -> Option<OriginalDestination>;
}

/// Who owns the client end of an accepted loopback connection: the uid in
/// `/proc/net/tcp{,6}` of the socket connected from `peer` to `local`.
/// Only for the log line of a refused connection (never for a decision).
pub fn peer_uid(peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    let peer = unmap(peer);
    let local = unmap(local);
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .into_iter()
        .find_map(|f| {
            let table = std::fs::read_to_string(f).ok()?;
            uid_in_table(&table, peer, local)
        })
}

/// The uid of the row whose local address is `local` and remote `remote`.
fn uid_in_table(table: &str, local: SocketAddr, remote: SocketAddr) -> Option<u32> {
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (l, r, uid) = (f.get(1)?, f.get(2)?, f.get(7)?);
        (parse_proc_addr(l)? == local && parse_proc_addr(r)? == remote)
            .then(|| uid.parse().ok())
            .flatten()
    })
}

/// `0100007F:1F90` or a 32-digit IPv6 form: each 32-bit word is printed in
/// host order, the port in hex.
fn parse_proc_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| {
        u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16)
            .ok()
            .map(u32::to_ne_bytes)
    };
    let ip = match ip.len() {
        8 => IpAddr::from(word(0)?),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(unmap(SocketAddr::new(ip, port)))
}

fn unmap(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tcp_rows_parse_in_both_families() {
        // Rows as Linux prints them on a little-endian machine.
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
            0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n   \
            1: 0100007F:9C40 0100007F:1F90 01 00000000:00000000 00:00000000 00000000 65534        0 2 1 0 20 4 30 10 -1\n";
        if cfg!(target_endian = "little") {
            let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
            let local: SocketAddr = "127.0.0.1:8080".parse().unwrap();
            assert_eq!(uid_in_table(v4, peer, local), Some(65534));
            assert_eq!(uid_in_table(v4, local, peer), None);
            let v6 = "header\n   0: 00000000000000000000000001000000:9C40 00000000000000000000000001000000:1F90 01 0:0 0:0 0 1000 0 3\n   \
                1: 0000000000000000FFFF00000100007F:9C41 0000000000000000FFFF00000100007F:1F90 01 0:0 0:0 0 33 0 4\n";
            let peer6: SocketAddr = "[::1]:40000".parse().unwrap();
            let local6: SocketAddr = "[::1]:8080".parse().unwrap();
            assert_eq!(uid_in_table(v6, peer6, local6), Some(1000));
            // A dual-stack socket's mapped addresses match plain IPv4.
            let mapped: SocketAddr = "127.0.0.1:40001".parse().unwrap();
            assert_eq!(uid_in_table(v6, mapped, local), Some(33));
        }
    }

    #[test]
    fn a_live_loopback_connection_has_our_uid() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (_s, peer) = l.accept().unwrap();
        assert_eq!(peer, c.local_addr().unwrap());
        let uid = unsafe { libc::geteuid() };
        assert_eq!(peer_uid(peer, l.local_addr().unwrap()), Some(uid));
    }
}
