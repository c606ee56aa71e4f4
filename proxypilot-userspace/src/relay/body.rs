//! Body wrappers: count bytes for the audit line, keep the request
//! "active" for the idle watchdog until both bodies are done, and cap the
//! request body (`--max-request-body`).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::errors::RelayError;
use super::metrics::Metrics;
use super::{BoxError, RelayBody};
use crate::audit::RequestAudit;

/// One connection's requests in flight and when the last one ended: the
/// connection's idle clock. Only requests move it, never HTTP/2 PINGs,
/// SETTINGS or other frames (the relay's own keep-alive PINGs, and a
/// client's, used to keep an idle connection open for good).
#[derive(Debug)]
pub struct InFlight {
    count: AtomicUsize,
    begun: AtomicU64,
    started: Instant,
    /// Milliseconds after `started` that the last request ended.
    last_end_ms: AtomicU64,
}

impl InFlight {
    pub fn new() -> Arc<InFlight> {
        Arc::new(InFlight {
            count: AtomicUsize::new(0),
            begun: AtomicU64::new(0),
            started: Instant::now(),
            last_end_ms: AtomicU64::new(0),
        })
    }

    fn begin(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
        self.begun.fetch_add(1, Ordering::SeqCst);
    }

    fn end(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.last_end_ms.fetch_max(now, Ordering::SeqCst);
        self.count.fetch_sub(1, Ordering::SeqCst);
    }

    /// How long no request has been in flight (since the connection began
    /// if none ever was); `None` while one is.
    pub fn idle_for(&self) -> Option<Duration> {
        if self.count.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_end_ms.load(Ordering::SeqCst));
        Some(self.started.elapsed().saturating_sub(last))
    }

    /// True until the first request's headers have arrived.
    pub fn none_yet(&self) -> bool {
        self.begun.load(Ordering::SeqCst) == 0
    }

    /// Since the connection began serving HTTP (after its TLS handshake).
    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }
}

/// Lives as long as any part of a request does.
#[derive(Debug)]
pub struct RequestScope {
    pub audit: RequestAudit,
    active: Arc<InFlight>,
    /// Counts the request when it is done.
    metrics: Arc<Metrics>,
}

impl RequestScope {
    pub fn new(audit: RequestAudit, active: Arc<InFlight>, metrics: Arc<Metrics>) -> Self {
        active.begin();
        RequestScope {
            audit,
            active,
            metrics,
        }
    }
}

impl Drop for RequestScope {
    fn drop(&mut self) {
        self.active.end();
        self.metrics.request_done(&self.audit);
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Direction {
    /// Request body, client → upstream.
    In,
    /// Response body, upstream → client.
    Out,
}

/// Passes frames through untouched (no buffering), counting data bytes.
pub struct Counted {
    inner: RelayBody,
    scope: Arc<RequestScope>,
    dir: Direction,
}

impl Counted {
    pub fn new(inner: RelayBody, scope: Arc<RequestScope>, dir: Direction) -> Self {
        Counted { inner, scope, dir }
    }
}

impl Body for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                let n = data.len() as u64;
                match self.dir {
                    Direction::In => self.scope.audit.add_in(n),
                    Direction::Out => self.scope.audit.add_out(n),
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Passes at most `limit` data bytes through (no buffering). The frame
/// that would go over is not passed on: the body ends with an error, so
/// the forwarder aborts the upstream request rather than send a truncated
/// body as if it were complete.
pub struct Capped {
    inner: RelayBody,
    limit: u64,
    seen: u64,
    tripped: Arc<AtomicBool>,
    scope: Arc<RequestScope>,
}

impl Capped {
    /// Also returns a flag set once the cap is hit, so the handler can tell
    /// the forwarder's failure was the cap (413) and not the tokenizer.
    pub fn new(inner: RelayBody, limit: u64, scope: Arc<RequestScope>) -> (Self, Arc<AtomicBool>) {
        let tripped = Arc::new(AtomicBool::new(false));
        let body = Capped {
            inner,
            limit,
            seen: 0,
            tripped: tripped.clone(),
            scope,
        };
        (body, tripped)
    }

    fn over(&self) -> BoxError {
        Box::new(RelayError::BodyTooLarge { limit: self.limit })
    }
}

impl Body for Capped {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.tripped.load(Ordering::SeqCst) {
            return Poll::Ready(Some(Err(self.over())));
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.seen = self.seen.saturating_add(data.len() as u64);
                if self.seen > self.limit {
                    self.tripped.store(true, Ordering::SeqCst);
                    let info = self.scope.audit.info();
                    tracing::warn!(sni = %info.conn.sni, secret = %info.conn.secret_name, path = %info.path, max_request_body = self.limit,
                        "request body went over the cap while streaming; aborting the upstream request");
                    return Poll::Ready(Some(Err(self.over())));
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        !self.tripped.load(Ordering::SeqCst) && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
