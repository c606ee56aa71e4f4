//! WebSocket on intercepted connections (HTTP/1.1 Upgrade, RFC 6455 §4).
//!
//! The upgrade request is relayed like any request: same checks, same
//! credential injection, same audit. Only its `Connection: upgrade` +
//! `Upgrade: websocket` pair survives the hop-by-hop rules. On the
//! tokenizer's `101`, the client's connection and the upstream's are
//! spliced both ways until either side closes or nothing moves for
//! `--stream-idle-timeout`; the request's audit line (status 101) is
//! written when the stream ends, with the bytes each way and the duration.
//! Any other answer is relayed as a normal response.
//!
//! HTTP/2 clients: the relay does not announce extended CONNECT (RFC 8441),
//! so WebSocket clients use HTTP/1.1 (they offer no ALPN or `http/1.1`,
//! and browsers open an HTTP/1.1 connection when h2 lacks it).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::upgrade::OnUpgrade;

use super::body::RequestScope;
use super::context::ConnCtx;
use super::errors::RelayError;
use super::{Forwarder, RelayBody};
use crate::tokenizer::upgrade::{self as shared, SpliceCounts};

/// The client's side of a WebSocket upgrade request, taken before the
/// request is consumed.
pub(crate) struct ClientUpgrade(OnUpgrade);

impl ClientUpgrade {
    /// `Some` for a WebSocket upgrade request (HTTP/1.1 only).
    pub(crate) fn take<B>(req: &mut Request<B>) -> Option<Self> {
        shared::is_websocket_upgrade(req.version(), req.headers())
            .then(|| ClientUpgrade(hyper::upgrade::on(req)))
    }
}

/// The tokenizer's answer to an upgrade request, made ready for the client:
/// a 101 starts the splice; a success other than 101 from a remote
/// tokenizer means it dropped the upgrade, which the client must not take
/// for an answer; anything else passes as it is.
pub(crate) fn answer(
    ctx: &ConnCtx,
    relay: &super::Relay,
    client: ClientUpgrade,
    mut resp: Response<RelayBody>,
    scope: &Arc<RequestScope>,
) -> Result<Response<RelayBody>, RelayError> {
    let status = resp.status();
    if status != StatusCode::SWITCHING_PROTOCOLS {
        if let (Forwarder::Remote(r), true) = (&relay.forwarder, status.is_success()) {
            return Err(RelayError::UpgradeNotRelayed {
                url: r.url().to_string(),
                status: status.as_u16(),
            });
        }
        return Ok(resp);
    }
    let counts = Arc::new(SpliceCounts::default());
    let idle = relay.limits.stream_idle_timeout;
    let splice = shared::splice_after_101(client.0, &mut resp, idle, counts.clone());
    let scope = scope.clone();
    let task = tokio::spawn(async move {
        let end = splice.await;
        let (up, down) = (
            counts.up.load(Ordering::Relaxed),
            counts.down.load(Ordering::Relaxed),
        );
        scope.audit.add_in(up);
        scope.audit.add_out(down);
        let info = scope.audit.info();
        tracing::debug!(sni = %info.conn.sni, path = %info.path, ?end, bytes_in = up, bytes_out = down, "upgraded stream ended");
        if end == shared::SpliceEnd::Idle {
            tracing::info!(sni = %info.conn.sni, path = %info.path, ?idle,
                "closed an upgraded stream idle for --stream-idle-timeout");
        }
        // Dropping the scope writes the audit line.
    });
    ctx.streams.add(task);
    Ok(resp)
}
