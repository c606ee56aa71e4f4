//! A connection's context: what every request on one intercepted
//! connection shares, built once at the handshake (stage three) and read by
//! the HTTP stage and the upgrades it hands streams to.

use std::sync::{Arc, Mutex};

use tokio::task::JoinHandle;

use super::Relay;
use crate::audit::ConnectionInfo;

/// What every request on one intercepted connection shares.
pub(crate) struct ConnCtx {
    /// The relay that accepted the connection: its timeouts and HTTP
    /// settings hold for the connection's life.
    pub relay: Arc<Relay>,
    /// Where each request finds the relay live when it arrives: its
    /// permits, credential, limits and tokenizer apply to that request.
    pub live: Arc<super::LiveRelay>,
    pub sni: String,
    pub secret_name: String,
    /// The port the client dialled (443 unless another port is intercepted).
    pub port: u16,
    /// Requests whose bodies are not finished yet (idle watchdog).
    pub active: Arc<super::body::InFlight>,
    /// The connection's part of every request's audit line.
    pub audit: Arc<ConnectionInfo>,
    /// Upgraded (WebSocket) streams; the connection lasts until they end.
    pub streams: Streams,
    /// Response bodies in flight, cut when the client stops reading them.
    pub stalls: super::stall::Stalls,
}

/// The spliced (upgraded) streams of one connection: the connection (and
/// its slot under `--max-connections`) lasts until they end.
#[derive(Default)]
pub(crate) struct Streams(Mutex<Vec<JoinHandle<()>>>);

impl Streams {
    pub(crate) fn add(&self, stream: JoinHandle<()>) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(stream);
    }

    /// Waits for every stream started so far.
    pub(crate) async fn wait(&self) {
        let handles = std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()));
        for h in handles {
            let _ = h.await;
        }
    }
}
