//! Stage three of an intercepted connection: a leaf certificate for the
//! server name, the TLS handshake, then HTTP (`http`).

use std::sync::Arc;

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::{http, LiveRelay, Relay};
use crate::kernel::origin::OriginalDestination;
use crate::tls::rewind::Rewind;

impl Relay {
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn handshake(
        self: Arc<Self>,
        live: Arc<LiveRelay>,
        stream: TcpStream,
        raw_hello: Bytes,
        host: String,
        secret_name: String,
        origin: OriginalDestination,
        deadline: tokio::time::Instant,
    ) {
        let peer = stream.peer_addr().ok();
        let key = match self.leaves.get(&host).await {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(?peer, sni = %host, error = %e, "cannot mint a leaf certificate; closing");
                return;
            }
        };
        let acceptor = TlsAcceptor::from(self.server_configs.for_leaf(&host, key));
        let tls = match tokio::time::timeout_at(
            deadline,
            acceptor.accept(Rewind::new(raw_hello, stream)),
        )
        .await
        {
            Err(_) => {
                tracing::warn!(?peer, sni = %host, "TLS handshake timed out; closing");
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(?peer, sni = %host, error = %e, "TLS handshake failed (does the client trust proxypilot's CA? see /ca.pem)");
                return;
            }
            Ok(Ok(t)) => t,
        };
        let port = origin.addr.port();
        let audit = Arc::new(crate::audit::ConnectionInfo {
            pid: Some(origin.pid),
            comm: Some(origin.comm),
            original_dst: Some(origin.addr),
            sni: host.clone(),
            secret_name: secret_name.clone(),
        });
        let ctx = Arc::new(super::context::ConnCtx {
            relay: self.clone(),
            live,
            sni: host,
            secret_name,
            port,
            active: super::body::InFlight::new(),
            audit,
            streams: Default::default(),
            stalls: Default::default(),
        });
        let (watched, headers) = super::h2_headers::HeaderWatch::new(tls);
        http::serve_http(watched, ctx, headers).await;
    }
}

/// Placeholder resolver for the shared base config; every connection
/// replaces it with a `FixedCert` for its SNI.
#[derive(Debug)]
pub(super) struct NoCert;

impl rustls::server::ResolvesServerCert for NoCert {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        None
    }
}
