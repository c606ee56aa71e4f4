//! Downloads the client stopped reading are cut after `--stall-timeout`.
//! While a response body sits unread, its upstream stream holds buffers
//! and a share of the shared HTTP/2 connection's window; cutting it gives
//! both back. "Stopped reading" is told apart from "the API is thinking":
//! a body whose last poll handed data out and that has not been polled
//! since is waiting on the client; one whose last poll was `Pending` is
//! waiting on the upstream, for as long as that takes (`--response-timeout`
//! bounds only the head; LLM streams pause between events).

use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::{BoxError, RelayBody};

/// One response body's state, shared with its connection's watch.
struct Watched {
    /// `None` once cut: the upstream stream is dropped then.
    body: Option<RelayBody>,
    /// When the last poll handed data to the client side, if it did.
    handed_at: Option<Instant>,
    end_stream: bool,
}

/// A connection's response bodies in flight.
#[derive(Default)]
pub struct Stalls(Mutex<Vec<Weak<Mutex<Watched>>>>);

/// A response body under a connection's watch.
pub struct StallWatched(Arc<Mutex<Watched>>);

/// Why a watched body ended early.
#[derive(Debug, thiserror::Error)]
#[error("the client stopped reading this response for longer than --stall-timeout; it was cut")]
pub struct Stalled;

impl Stalls {
    pub fn watch(&self, body: RelayBody) -> StallWatched {
        let end_stream = body.is_end_stream();
        let w = Arc::new(Mutex::new(Watched {
            body: Some(body),
            handed_at: None,
            end_stream,
        }));
        let mut list = lock(&self.0);
        list.retain(|w| w.strong_count() > 0);
        list.push(Arc::downgrade(&w));
        StallWatched(w)
    }

    /// Cuts every body that has waited on the client for `limit`; returns
    /// how many.
    pub fn cut_stalled(&self, limit: Duration) -> usize {
        let mut cut = 0;
        let mut list = lock(&self.0);
        list.retain(|weak| {
            let Some(w) = weak.upgrade() else {
                return false;
            };
            let mut w = lock(&w);
            if w.body.is_some() && w.handed_at.is_some_and(|t| t.elapsed() >= limit) {
                w.body = None;
                cut += 1;
                return false;
            }
            true
        });
        cut
    }
}

impl Body for StallWatched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut w = lock(&self.0);
        let Some(body) = w.body.as_mut() else {
            return Poll::Ready(Some(Err(Box::new(Stalled))));
        };
        let polled = Pin::new(body).poll_frame(cx);
        w.handed_at = match &polled {
            Poll::Ready(Some(Ok(_))) => Some(Instant::now()),
            _ => None,
        };
        if let Poll::Ready(None) = polled {
            w.end_stream = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let w = lock(&self.0);
        w.end_stream || w.body.as_ref().is_some_and(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        lock(&self.0)
            .body
            .as_ref()
            .map_or_else(SizeHint::default, |b| b.size_hint())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn chunks(n: usize) -> RelayBody {
        let frames = (0..n).map(|_| Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"abc"))));
        StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
    }

    #[tokio::test]
    async fn a_body_left_unread_after_data_is_cut_and_says_why() {
        let stalls = Stalls::default();
        let mut body = stalls.watch(chunks(3));
        assert!(body.frame().await.unwrap().is_ok());
        // Not read again: waiting on the client.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(stalls.cut_stalled(Duration::from_millis(10)), 1);
        let e = body.frame().await.unwrap().unwrap_err();
        assert!(e.to_string().contains("stopped reading"), "{e}");
    }

    #[tokio::test]
    async fn a_body_waiting_on_the_upstream_or_read_to_the_end_is_not_cut() {
        let stalls = Stalls::default();
        let pending = StreamBody::new(futures_util::stream::pending::<
            Result<Frame<Bytes>, BoxError>,
        >())
        .boxed_unsync();
        let mut waiting = stalls.watch(pending);
        // Polled and Pending: the upstream has not sent anything yet.
        assert!(futures_util::FutureExt::now_or_never(waiting.frame()).is_none());
        let mut done = stalls.watch(chunks(1));
        while let Some(f) = done.frame().await {
            f.unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(stalls.cut_stalled(Duration::from_millis(10)), 0);
    }
}
