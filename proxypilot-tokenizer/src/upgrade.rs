//! Upgraded streams (WebSocket over HTTP/1.1, RFC 6455 §4): what every hop
//! that relays them shares. The relay and the standalone tokenizer are both
//! such hops: each keeps `Connection: upgrade` + `Upgrade: websocket` on the
//! upgrade request (they are hop-by-hop, so every hop sets them anew), and
//! after `101 Switching Protocols` splices its two connections both ways.
//!
//! Frames are never parsed: once upgraded, bytes pass untouched, so the
//! credential is injected into the upgrade request only.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderValue};
use http::Response;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The only protocol relayed: others (h2c, ...) keep being stripped as
/// hop-by-hop, so the upstream answers them as plain requests.
const WEBSOCKET: &str = "websocket";

/// A WebSocket upgrade request: `Connection` lists `upgrade` and `Upgrade`
/// lists `websocket` (tokens, case-insensitive). HTTP/1.1 only: HTTP/2 has
/// no Upgrade (RFC 9113 §8.2.2).
pub fn is_websocket_upgrade(version: http::Version, headers: &HeaderMap) -> bool {
    version == http::Version::HTTP_11
        && lists(headers, header::CONNECTION, "upgrade")
        && lists(headers, header::UPGRADE, WEBSOCKET)
}

fn lists(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Sets this hop's upgrade headers, after the hop-by-hop ones were removed.
/// The same pair goes on the request and on the 101 response.
pub fn set_upgrade_headers(headers: &mut HeaderMap) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static(WEBSOCKET));
}

/// After a 101 from upstream: takes the upstream's connection out of `resp`
/// (its `hyper::upgrade::on` extension), sets this hop's upgrade headers on
/// it, and returns the splice to run once `client` is upgraded too (hyper
/// hands the client's connection over after writing the 101). Run it in a
/// task of its own; `counts` fill as bytes move.
pub fn splice_after_101<B>(
    client: OnUpgrade,
    resp: &mut Response<B>,
    idle: Duration,
    counts: Arc<SpliceCounts>,
) -> impl Future<Output = SpliceEnd> + Send + 'static {
    let upstream = hyper::upgrade::on(&mut *resp);
    set_upgrade_headers(resp.headers_mut());
    async move {
        match tokio::try_join!(client, upstream) {
            Ok((client, upstream)) => splice(client, upstream, idle, &counts).await,
            Err(e) => {
                tracing::debug!(error = %e, "an upgraded connection was not handed over");
                SpliceEnd::Error
            }
        }
    }
}

/// How a spliced stream ended, for the audit line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpliceEnd {
    /// Both sides finished (a WebSocket close handshake ends this way).
    Closed,
    /// One side failed or reset the connection.
    Error,
    /// No byte moved either way for the idle timeout.
    Idle,
}

/// Bytes each way, readable while the splice runs.
#[derive(Debug, Default)]
pub struct SpliceCounts {
    /// Client → upstream.
    pub up: AtomicU64,
    /// Upstream → client.
    pub down: AtomicU64,
}

/// Copies both ways between `client` and `upstream` until both directions
/// are done, either side fails, or nothing moves for `idle`. Half-closes
/// are passed on (an end of stream from one side shuts down writing to the
/// other). Dropping both connections at the end closes them.
pub async fn splice(
    client: Upgraded,
    upstream: Upgraded,
    idle: Duration,
    counts: &SpliceCounts,
) -> SpliceEnd {
    let epoch = Instant::now();
    let last = AtomicU64::new(0);
    let mut client = Metered {
        inner: TokioIo::new(client),
        counts,
        epoch,
        last: &last,
    };
    let mut upstream = TokioIo::new(upstream);
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    tokio::pin!(copy);
    let mut tick =
        tokio::time::interval((idle / 4).clamp(Duration::from_millis(20), Duration::from_secs(5)));
    loop {
        tokio::select! {
            res = copy.as_mut() => return if res.is_ok() { SpliceEnd::Closed } else { SpliceEnd::Error },
            _ = tick.tick() => {
                let quiet = epoch.elapsed().saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
                if quiet >= idle {
                    return SpliceEnd::Idle;
                }
            }
        }
    }
}

/// The client's side of a splice: counts bytes each way and records when
/// bytes last moved (for the idle timeout).
struct Metered<'a, S> {
    inner: S,
    counts: &'a SpliceCounts,
    epoch: Instant,
    last: &'a AtomicU64,
}

impl<S> Metered<'_, S> {
    fn moved(&self, n: usize, counter: &AtomicU64) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
        self.last
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.moved(n, &self.counts.up);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            if n > 0 {
                self.moved(n, &self.counts.down);
            }
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_websocket_upgrades_only() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, Upgrade".parse().unwrap());
        h.insert("upgrade", "WebSocket".parse().unwrap());
        assert!(is_websocket_upgrade(http::Version::HTTP_11, &h));
        assert!(!is_websocket_upgrade(http::Version::HTTP_2, &h));
        h.insert("upgrade", "h2c".parse().unwrap());
        assert!(!is_websocket_upgrade(http::Version::HTTP_11, &h));
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert("connection", "keep-alive".parse().unwrap());
        assert!(!is_websocket_upgrade(http::Version::HTTP_11, &h));
    }
}
