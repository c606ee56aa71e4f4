//! Stage two of a connection: read the ClientHello and decide (see
//! `policy`): intercept, pass through, or deny.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::{passthrough, LiveRelay, Relay};
use crate::kernel::origin::OriginalDestination;
use crate::policy::Verdict;
use crate::tls::hello::read_client_hello;

impl Relay {
    /// Handles one accepted connection to the end. Never panics on bad
    /// input; every decision and failure is logged with its reason.
    /// `origin` is the kernel's record of the redirect: a connection without
    /// one never gets here (see [`serve`]). `live` is where each of its
    /// requests finds the relay live when it arrives (see [`LiveRelay`]).
    pub async fn handle_connection(
        self: Arc<Self>,
        live: Arc<LiveRelay>,
        mut stream: TcpStream,
        peer: SocketAddr,
        origin: OriginalDestination,
    ) {
        let _ = stream.set_nodelay(true);
        let pid = origin.pid;
        let comm = origin.comm.as_str();
        let dst = origin.addr;
        let deadline = tokio::time::Instant::now() + self.limits.handshake_timeout;
        let hello = match tokio::time::timeout_at(deadline, read_client_hello(&mut stream)).await {
            Err(_) => {
                tracing::warn!(%peer, pid, comm, %dst, verdict = "deny", reason = "no complete TLS ClientHello within the handshake timeout", "closing connection");
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(%peer, pid, comm, %dst, verdict = "deny", reason = %e, "closing connection");
                return;
            }
            Ok(Ok(h)) => h,
        };
        let sni = hello.sni.clone();
        match self.policy.decide(sni.as_deref(), dst) {
            Verdict::Deny { reason } => {
                self.metrics.denied(super::metrics::Denial::Sni);
                tracing::warn!(%peer, pid, comm, %dst, ?sni, verdict = "deny", %reason, "closing connection");
            }
            Verdict::PassThrough { dial, reason, .. } => {
                tracing::info!(%peer, pid, comm, %dst, ?sni, verdict = "pass-through", %reason, "relaying bytes unchanged");
                match passthrough::pass_through(
                    stream,
                    &hello,
                    &dial,
                    &self.policy,
                    self.pass_through_dns.as_deref(),
                    self.limits.connect_timeout,
                )
                .await
                {
                    Ok((up, down)) => {
                        self.metrics.passed_through(Some((up, down)));
                        tracing::debug!(%peer, ?sni, up, down, "pass-through finished")
                    }
                    Err(e) => {
                        self.metrics.passed_through(None);
                        tracing::warn!(%peer, ?sni, error = %e, "pass-through failed")
                    }
                }
            }
            Verdict::Intercept { host, secret_name } => {
                tracing::info!(%peer, pid, comm, %dst, sni = %host, verdict = "intercept", reason = "host has a sealed secret", secret = %secret_name, "terminating TLS");
                self.handshake(live, stream, hello.raw, host, secret_name, origin, deadline)
                    .await;
            }
        }
    }
}
