//! When a failed upstream request may be sent again.
//!
//! A request the upstream certainly did not process may be retried, whatever
//! its method (RFC 9113 §8.7: "requests that have not been processed have
//! not failed"): a stream above the last-stream-id of the peer's GOAWAY, a
//! stream the peer reset with REFUSED_STREAM, or a request hyper never
//! wrote. Whether it *can* be is a matter of its body: an empty one can
//! always be sent again; any other only while no byte of it has been taken
//! (it streams from the sandbox and is not kept). A request whose body was
//! sent is never retried: it ends in a 502 that says so.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::body::{BoxError, ProxyBody};

/// How the upstream told us it did not process a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unprocessed {
    /// The stream was above the last-stream-id of the peer's GOAWAY, or was
    /// opened after it.
    GoAway,
    /// RST_STREAM with REFUSED_STREAM.
    Refused,
    /// The connection closed before the request was written.
    NotSent,
}

impl std::fmt::Display for Unprocessed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Unprocessed::GoAway => "closed the connection (HTTP/2 GOAWAY) before this request",
            Unprocessed::Refused => "refused the request's stream (HTTP/2 REFUSED_STREAM)",
            Unprocessed::NotSent => "closed the connection before the request was sent",
        })
    }
}

/// Whether `e`, an error hyper returned for a sent request, says the
/// upstream did not process it. h2 reports a remote GOAWAY error only to
/// streams above its last-stream-id (and to streams opened after it);
/// streams below it that the connection's end cuts get an I/O error.
pub fn classify(e: &hyper::Error) -> Option<Unprocessed> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            if h2.is_go_away() && h2.is_remote() {
                return Some(Unprocessed::GoAway);
            }
            if h2.is_reset() && h2.is_remote() && h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
                return Some(Unprocessed::Refused);
            }
            return None;
        }
        cur = err.source();
    }
    None
}

/// A request body that can be taken back for a retry as long as none of it
/// was sent.
pub struct Replay {
    /// None for a body that is empty (sent again as an empty one).
    shared: Option<Arc<Mutex<Shared>>>,
}

struct Shared {
    body: Option<ProxyBody>,
    /// A frame of the body was handed to hyper: it cannot be sent again.
    started: bool,
}

fn lock(m: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Replay {
    pub fn new(body: ProxyBody) -> Replay {
        if body.is_end_stream() {
            return Replay { shared: None };
        }
        Replay {
            shared: Some(Arc::new(Mutex::new(Shared {
                body: Some(body),
                started: false,
            }))),
        }
    }

    /// The body for the first attempt.
    pub fn first_body(&self) -> ProxyBody {
        match &self.shared {
            None => ProxyBody::default(),
            Some(s) => Tracked(s.clone()).boxed_unsync(),
        }
    }

    /// The body again, for the retry, if none of it was sent; the first
    /// attempt's body reads as ended from then on.
    pub fn take_unsent(&self) -> Option<ProxyBody> {
        match &self.shared {
            None => Some(ProxyBody::default()),
            Some(s) => {
                let mut s = lock(s);
                if s.started {
                    None
                } else {
                    s.body.take()
                }
            }
        }
    }

    /// Whether some of the body was handed to hyper.
    pub fn started(&self) -> bool {
        self.shared.as_ref().is_some_and(|s| lock(s).started)
    }
}

/// The first attempt's body: the shared one, marked started on its first
/// frame.
struct Tracked(Arc<Mutex<Shared>>);

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut s = lock(&self.0);
        let Some(body) = s.body.as_mut() else {
            return Poll::Ready(None);
        };
        let r = Pin::new(body).poll_frame(cx);
        if let Poll::Ready(Some(_)) = r {
            s.started = true;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        lock(&self.0)
            .body
            .as_ref()
            .is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        lock(&self.0)
            .body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};

    fn full(s: &'static str) -> ProxyBody {
        Full::new(Bytes::from_static(s.as_bytes()))
            .map_err(|e| match e {})
            .boxed_unsync()
    }

    #[tokio::test]
    async fn a_body_not_yet_read_is_taken_back_whole() {
        let r = Replay::new(full("hello"));
        let first = r.first_body();
        assert_eq!(first.size_hint().exact(), Some(5));
        drop(first);
        let again = r.take_unsent().expect("nothing was sent");
        assert_eq!(&again.collect().await.unwrap().to_bytes()[..], b"hello");
    }

    #[tokio::test]
    async fn a_body_partly_sent_is_never_sent_again() {
        let r = Replay::new(full("hello"));
        let mut first = r.first_body();
        first.frame().await.unwrap().unwrap();
        assert!(r.started());
        assert!(r.take_unsent().is_none());
    }

    #[tokio::test]
    async fn a_body_still_waiting_for_its_first_byte_can_be_retried() {
        let (_tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let stream = tokio_stream_from(rx);
        let r = Replay::new(StreamBody::new(stream).boxed_unsync());
        let mut first = r.first_body();
        // Pending: the sandbox has not sent any of it yet.
        assert!(futures_util::FutureExt::now_or_never(first.frame()).is_none());
        drop(first);
        assert!(r.take_unsent().is_some());
    }

    #[test]
    fn an_empty_body_is_always_replayable() {
        let r = Replay::new(ProxyBody::default());
        assert!(r.take_unsent().is_some());
        assert!(r.take_unsent().is_some());
    }

    fn tokio_stream_from(
        mut rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
    ) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, BoxError>> + Send {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}
