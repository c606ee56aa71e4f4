//! Reports of connects and sends the kernel denied, read from the ring
//! buffer so users (and agents) learn why a connection failed.

use std::fmt;

use aya::maps::{MapData, RingBuf};
use proxypilot_common::{deny_reason, hook, DenyEvent, IPPROTO_TCP, IPPROTO_UDP};
use tokio::io::unix::AsyncFd;

use super::{attach::parse_denial, origin::OriginalDestination};

/// One denied connect or send.
#[derive(Clone, Debug)]
pub struct Denial {
    /// The destination the sandbox asked for, and who asked.
    pub origin: OriginalDestination,
    /// "tcp", "udp" or another protocol number.
    pub protocol: String,
    /// Why: a short phrase.
    pub reason: &'static str,
    /// Which hook saw it.
    pub hook: &'static str,
}

impl From<&DenyEvent> for Denial {
    fn from(e: &DenyEvent) -> Self {
        let protocol = match e.protocol {
            IPPROTO_TCP => "tcp".to_string(),
            IPPROTO_UDP => "udp".to_string(),
            other => format!("protocol {other}"),
        };
        let reason = match e.reason {
            deny_reason::NOT_ALLOWED => "not on the allow list",
            deny_reason::QUIC => "UDP 443 (QUIC) is always denied so clients use TCP",
            deny_reason::NO_LISTENER => {
                "intercepted port, but the proxy has no listener for this address family"
            }
            deny_reason::PROTOCOL => "only TCP and UDP are handled",
            deny_reason::MAP_FULL => "the connection could not be recorded",
            deny_reason::DIRECT_TO_PROXY => {
                "the proxy's listener is only reachable through a redirect"
            }
            _ => "denied",
        };
        let hook = match e.hook {
            hook::CONNECT4 => "connect4",
            hook::CONNECT6 => "connect6",
            hook::SENDMSG4 => "sendmsg4",
            hook::SENDMSG6 => "sendmsg6",
            _ => "unknown",
        };
        Denial {
            origin: OriginalDestination::from(&e.origin),
            protocol,
            reason,
            hook,
        }
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} from pid {} ({}): {}",
            self.protocol, self.origin.addr, self.origin.pid, self.origin.comm, self.reason
        )
    }
}

/// Registers a ring buffer's fd with the reactor for readability.
fn readable<T: std::os::fd::AsRawFd>(inner: T) -> std::io::Result<AsyncFd<T>> {
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
            if let Some(event) = parse_denial(&item) {
                on_denial(Denial::from(&event));
            }
        }
        guard.clear_ready();
    }
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
