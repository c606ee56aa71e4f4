//! Stage one of a connection: accept it, admit it only if the kernel
//! redirected it from the sandbox and a connection slot is free, and hand
//! it to `detect` on its own task.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use super::metrics::Denial;
use super::{redirected, LiveRelay, Redirections};
use crate::logbudget::refusals;

/// Accepts forever on `listener` (the port the kernel redirects to),
/// handling each connection on its own task. Only connections that
/// `redirections` has a kernel record for are served; any other is closed
/// at once, before its ClientHello is read, and logged with its peer. Each
/// connection is handled by the relay live when it was accepted.
pub async fn serve(listener: TcpListener, live: Arc<LiveRelay>, redirections: impl Redirections) {
    // One spare descriptor, given up when the process runs out of them
    // (EMFILE/ENFILE) so the waiting connection can be accepted and closed
    // at once: without it, connections queued in the backlog would sit there
    // unanswered (a client-side hang) until descriptors came back. Found by
    // the fd-exhaustion fault test (tests/e2e/faults.rs).
    let mut reserve = std::fs::File::open("/dev/null").ok();
    loop {
        let accepted = listener.accept().await;
        let relay = live.get();
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) if is_out_of_fds(&e) && reserve.is_some() => {
                drop(reserve.take());
                // Never wait here: with the spare given up, a blocked accept
                // would keep it given up.
                let ready = std::future::poll_fn(|cx| match listener.poll_accept(cx) {
                    std::task::Poll::Pending => std::task::Poll::Ready(None),
                    std::task::Poll::Ready(r) => std::task::Poll::Ready(Some(r)),
                })
                .await;
                if let Some(Ok((shed, peer))) = ready {
                    let _ = redirections.take(peer); // consume the kernel's record
                    const REASON: &str = "out of file descriptors";
                    relay.metrics().denied(Denial::Connection);
                    if refusals().admit(REASON, 0, "") {
                        tracing::warn!(%peer, verdict = "deny", reason = REASON, "closing connection");
                    }
                    drop(shed);
                }
                reserve = std::fs::File::open("/dev/null").ok();
                continue;
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::error!(error = %e, "accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
                reserve = reserve.or_else(|| std::fs::File::open("/dev/null").ok());
                continue;
            }
        };
        if reserve.is_none() {
            reserve = std::fs::File::open("/dev/null").ok();
        }
        let Some(origin) = redirections.take(peer) else {
            relay.metrics().denied(Denial::Connection);
            refuse_unredirected(&stream, peer);
            continue;
        };
        let permit = match relay.try_admit(origin.pid) {
            Ok(slot) => slot,
            Err(no) => {
                relay.metrics().denied(Denial::Connection);
                if refusals().admit(no.reason(), origin.pid, &origin.comm) {
                    tracing::warn!(%peer, pid = origin.pid, comm = %origin.comm, max = relay.limits.max_connections, max_per_process = relay.limits.max_connections_per_process, verdict = "deny", reason = no.reason(), "closing connection");
                }
                continue;
            }
        };
        let live = live.clone();
        tokio::spawn(async move {
            relay.handle_connection(live, stream, peer, origin).await;
            drop(permit);
        });
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

fn is_out_of_fds(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}
