//! The one accept loop behind every TCP listener proxypilot serves: the
//! relay's, the standalone tokenizer's, the DNS resolver's TCP port, the
//! info port and `/metrics`. What differs between them is only what a
//! connection is admitted to, which each gives as an [`Admission`].
//!
//! What the loop guarantees to all of them:
//! - out of file descriptors (EMFILE/ENFILE), a spare descriptor is given
//!   up so the waiting connection can be accepted and closed at once,
//!   rather than sit unanswered in the backlog (a client-side hang) until
//!   descriptors come back. Found by the fd-exhaustion fault test
//!   (tests/e2e/faults.rs).
//! - any other accept error backs off instead of spinning.
//! - each admitted connection runs on its own task.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// A connection's task, as an admission returns it.
pub type Serve = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What a listener does with the connections it accepts.
pub trait Admission: Send {
    /// The task serving a connection just accepted, or `None` to close it
    /// now (the admission logs why).
    fn admit(&mut self, stream: TcpStream, peer: SocketAddr) -> Option<Serve>;

    /// A connection accepted only to be closed, because the process is out
    /// of file descriptors. It is closed when this returns.
    fn shed(&mut self, _peer: SocketAddr) {}
}

/// An admission that serves every connection with `serve`.
pub fn every<F, Fut>(serve: F) -> impl Admission
where
    F: FnMut(TcpStream, SocketAddr) -> Fut + Send,
    Fut: Future<Output = ()> + Send + 'static,
{
    Every(serve)
}

struct Every<F>(F);

impl<F, Fut> Admission for Every<F>
where
    F: FnMut(TcpStream, SocketAddr) -> Fut + Send,
    Fut: Future<Output = ()> + Send + 'static,
{
    fn admit(&mut self, stream: TcpStream, peer: SocketAddr) -> Option<Serve> {
        Some(Box::pin((self.0)(stream, peer)))
    }
}

/// Accepts on `listener` until the task is dropped. `server` names the
/// listener in logs.
pub async fn serve(listener: TcpListener, server: &'static str, mut admission: impl Admission) {
    let mut reserve = spare();
    loop {
        let (stream, peer) = match listener.accept().await {
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
                    admission.shed(peer);
                    drop(shed);
                }
                reserve = spare();
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, server, "accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
                reserve = reserve.or_else(spare);
                continue;
            }
        };
        if reserve.is_none() {
            reserve = spare();
        }
        if let Some(task) = admission.admit(stream, peer) {
            tokio::spawn(task);
        }
    }
}

fn spare() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}

fn is_out_of_fds(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Admitted connections are served on their own tasks (a slow one does
    /// not hold up the next), refused ones are closed at once.
    #[tokio::test]
    async fn admits_serves_and_refuses() {
        /// Admits every other connection, and holds each admitted one open.
        struct EveryOther(usize, Arc<AtomicUsize>);
        impl Admission for EveryOther {
            fn admit(&mut self, mut stream: TcpStream, _: SocketAddr) -> Option<Serve> {
                self.0 += 1;
                if self.0 & 1 == 0 {
                    return None;
                }
                let served = self.1.clone();
                Some(Box::pin(async move {
                    served.fetch_add(1, Ordering::SeqCst);
                    let _ = stream.write_all(b"hello").await;
                    // Held open: the next connection must not wait for it.
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }))
            }
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(serve(listener, "test", EveryOther(0, served.clone())));
        for i in 0..4 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut buf = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                let mut five = [0u8; 5];
                if s.read_exact(&mut five).await.is_ok() {
                    buf.extend_from_slice(&five);
                }
            })
            .await;
            assert!(read.is_ok(), "connection {i} neither served nor closed");
            if i % 2 == 0 {
                assert_eq!(buf, b"hello", "connection {i} is admitted");
            } else {
                assert!(buf.is_empty(), "connection {i} is refused, yet got {buf:?}");
            }
        }
        assert_eq!(served.load(Ordering::SeqCst), 2);
        task.abort();
    }
}
