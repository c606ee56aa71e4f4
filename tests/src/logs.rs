//! The tests' one log capture: a writer that keeps everything written to
//! it, for tests that check what the relay logs (and that no secret is in
//! it). Install it with
//! `tracing_subscriber::fmt().with_writer(capture.make_writer())`.

use std::{
    io,
    sync::{Arc, Mutex},
};

/// Bytes written to it, shared by every clone.
#[derive(Clone, Default)]
pub struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl LogCapture {
    /// Everything written so far (lossy UTF-8).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// A writer factory for `tracing_subscriber`'s `with_writer`: each
    /// writer it makes appends here.
    pub fn make_writer(&self) -> impl Fn() -> LogCapture + Send + Sync + 'static {
        let capture = self.clone();
        move || capture.clone()
    }
}

impl io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
