//! Stage one of a connection: accept it (the loop is [`crate::accept`]'s), admit it only if the kernel
//! redirected it from the sandbox and a connection slot is free, and hand
//! it to `detect` on its own task.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

use crate::accept::{Admission, Serve};

use super::metrics::Denial;
use super::{redirected, LiveRelay, Redirections};
use crate::logbudget::refusals;

/// Accepts forever on `listener` (the port the kernel redirects to),
/// handling each connection on its own task. Only connections that
/// `redirections` has a kernel record for are served; any other is closed
/// at once, before its ClientHello is read, and logged with its peer. Each
/// connection is handled by the relay live when it was accepted.
pub async fn serve(listener: TcpListener, live: Arc<LiveRelay>, redirections: impl Redirections) {
    crate::accept::serve(listener, "relay", Admit { live, redirections }).await
}

/// The relay's admission: a kernel record, then a connection slot.
struct Admit<R> {
    live: Arc<LiveRelay>,
    redirections: R,
}

impl<R: Redirections> Admission for Admit<R> {
    fn admit(&mut self, stream: TcpStream, peer: SocketAddr) -> Option<Serve> {
        let relay = self.live.get();
        let Some(origin) = self.redirections.take(peer) else {
            relay.metrics().denied(Denial::Connection);
            refuse_unredirected(&stream, peer);
            return None;
        };
        let permit = match relay.try_admit(origin.pid) {
            Ok(slot) => slot,
            Err(no) => {
                relay.metrics().denied(Denial::Connection);
                if refusals().admit(no.reason(), origin.pid, &origin.comm) {
                    tracing::warn!(%peer, pid = origin.pid, comm = %origin.comm, max = relay.limits.max_connections, max_per_process = relay.limits.max_connections_per_process, verdict = "deny", reason = no.reason(), "closing connection");
                }
                return None;
            }
        };
        let live = self.live.clone();
        Some(Box::pin(async move {
            relay.handle_connection(live, stream, peer, origin).await;
            drop(permit);
        }))
    }

    fn shed(&mut self, peer: SocketAddr) {
        let _ = self.redirections.take(peer); // consume the kernel's record
        const REASON: &str = "out of file descriptors";
        self.live.get().metrics().denied(Denial::Connection);
        if refusals().admit(REASON, 0, "") {
            tracing::warn!(%peer, verdict = "deny", reason = REASON, "closing connection");
        }
    }
}

/// Logs a connection the kernel did not redirect from the sandbox (it is
/// closed when `stream` is dropped), with the uid that owns its client end.
fn refuse_unredirected(stream: &TcpStream, peer: SocketAddr) {
    const REASON: &str = "not redirected from the sandbox by the kernel (another local process or cgroup dialled the listener)";
    // No pid is known; all such dialers share one budget.
    if !refusals().admit(REASON, 0, "") {
        return;
    }
    let uid = stream
        .local_addr()
        .ok()
        .and_then(|local| redirected::peer_uid(peer, local));
    tracing::warn!(
        %peer,
        peer_uid = ?uid,
        verdict = "deny",
        reason = REASON,
        "closing connection"
    );
}
