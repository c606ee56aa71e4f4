//! Body wrappers: count bytes for the audit line and keep the request
//! "active" for the idle watchdog until both bodies are done.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::{BoxError, RelayBody};
use crate::audit::RequestAudit;

/// Lives as long as any part of a request does.
#[derive(Debug)]
pub struct RequestScope {
    pub audit: RequestAudit,
    active: Arc<AtomicUsize>,
}

impl RequestScope {
    pub fn new(audit: RequestAudit, active: Arc<AtomicUsize>) -> Self {
        active.fetch_add(1, Ordering::SeqCst);
        RequestScope { audit, active }
    }
}

impl Drop for RequestScope {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::SeqCst);
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
