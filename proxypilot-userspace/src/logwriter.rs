//! Where log lines go: a buffer that a writer thread drains to stderr a
//! few dozen times a second, not once a line.
//!
//! Every relayed request logs its audit line. With a thread woken for each
//! line (tracing-appender's channel), the wake-up and the writer's own
//! scheduling cost about 6% of the relay's CPU under keep-alive load
//! (issue 20). Here a logger appends under a mutex held for a copy; the
//! writer wakes every [`FLUSH_EVERY`], or at once when [`FLUSH_AT`] bytes
//! are waiting, and writes them in one write(2). Lines are never dropped:
//! a logger waits while [`WAIT_ABOVE`] bytes are queued (stderr not read),
//! as it waited on the full channel before. Dropping the [`FlushGuard`]
//! writes everything logged so far.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// The longest a line waits in the buffer.
pub const FLUSH_EVERY: Duration = Duration::from_millis(25);
/// Bytes waiting past which the writer is woken at once.
pub const FLUSH_AT: usize = 64 * 1024;
/// Bytes waiting past which loggers wait for the writer.
pub const WAIT_ABOVE: usize = 4 * 1024 * 1024;

#[derive(Default)]
struct Queue {
    bytes: Vec<u8>,
    closing: bool,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    /// Wakes the writer early (a full batch, or closing).
    work: Condvar,
    /// Wakes loggers waiting for room.
    room: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A logger that panicked mid-append left whole bytes behind.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The loggers' end: `tracing_subscriber::fmt().with_writer(this)`.
#[derive(Clone)]
pub struct BatchedStderr {
    shared: Arc<Shared>,
}

/// Writes what is still queued and stops the writer thread when dropped.
pub struct FlushGuard {
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
}

/// Starts the writer thread over `out` (stderr in the binary).
pub fn batched(out: impl Write + Send + 'static) -> (BatchedStderr, FlushGuard) {
    let shared = Arc::new(Shared::default());
    let writer = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("proxypilot-log".into())
            .spawn(move || drain(&shared, out))
            .expect("cannot start the log writer thread")
    };
    (
        BatchedStderr {
            shared: shared.clone(),
        },
        FlushGuard {
            shared,
            writer: Some(writer),
        },
    )
}

fn drain(shared: &Shared, mut out: impl Write) {
    let mut batch = Vec::new();
    loop {
        let closing = {
            let mut q = shared.lock();
            if q.bytes.len() < FLUSH_AT && !q.closing {
                q = shared
                    .work
                    .wait_timeout(q, FLUSH_EVERY)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            std::mem::swap(&mut batch, &mut q.bytes);
            q.closing
        };
        shared.room.notify_all();
        if !batch.is_empty() {
            // Nowhere to report a failing stderr; the lines are lost.
            let _ = out.write_all(&batch).and_then(|()| out.flush());
            // Freed, not kept: a quiet relay holds no log buffer, so the
            // soak's heap figures see no batch-sized steps (40 small
            // allocations a second under load cost nothing).
            batch = Vec::new();
        }
        if closing && shared.lock().bytes.is_empty() {
            return;
        }
    }
}

impl Write for BatchedStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut q = self.shared.lock();
        while q.bytes.len() > WAIT_ABOVE && !q.closing {
            q = self.shared.room.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        q.bytes.extend_from_slice(buf);
        if q.bytes.len() >= FLUSH_AT {
            self.shared.work.notify_one();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchedStderr {
    type Writer = BatchedStderr;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.work.notify_one();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Write` the test can read back.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_arrives_in_order_and_the_guard_flushes_the_rest() {
        let sink = Sink::default();
        let (writer, guard) = batched(sink.clone());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let mut w = writer.clone();
                std::thread::spawn(move || {
                    for i in 0..5000 {
                        w.write_all(format!("t{t} line {i}\n").as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        for t in 0..4 {
            let mine: Vec<&str> = out
                .lines()
                .filter(|l| l.starts_with(&format!("t{t} ")))
                .collect();
            assert_eq!(mine.len(), 5000, "thread {t} lost lines");
            for (i, line) in mine.iter().enumerate() {
                assert_eq!(*line, format!("t{t} line {i}"));
            }
        }
    }

    #[test]
    fn a_line_is_written_without_waiting_for_more() {
        let sink = Sink::default();
        let (mut writer, _guard) = batched(sink.clone());
        writer.write_all(b"only line\n").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while sink.0.lock().unwrap().is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "a lone line was never written"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"only line\n");
    }
}
