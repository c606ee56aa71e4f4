//! A deadline for every HTTP/2 request's headers, not just the first.
//!
//! hyper bounds how long HTTP/1.1 headers may take, but on HTTP/2 a client
//! can open a header block (a HEADERS frame without END_HEADERS, or a
//! HEADERS frame trickled a byte at a time) and leave it open: no request
//! exists yet, so nothing counts as in flight, and no other stream can be
//! served on that connection meanwhile (a header block must be contiguous).
//! [`HeaderWatch`] reads the client's frames as they pass, without changing
//! them, and tells the connection how long a header block has been open,
//! so `http::serve_http` can close it after `--header-read-timeout`.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client connection preface (RFC 9113 §3.4), before the first frame.
/// hyper serves HTTP/2 on it whatever ALPN said, so the watch keys on it
/// too, not on ALPN.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;

/// When the header block now being received began, if one is open.
#[derive(Debug, Default)]
pub struct OpenHeaderBlock(Mutex<Option<Instant>>);

impl OpenHeaderBlock {
    /// How long the open header block has been arriving.
    pub fn open_for(&self) -> Option<Duration> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|t| t.elapsed())
    }

    fn set(&self, open: bool) {
        let mut at = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match (open, at.is_some()) {
            (true, false) => *at = Some(Instant::now()),
            (false, _) => *at = None,
            (true, true) => {}
        }
    }
}

/// Where the parser is in the client's byte stream.
#[derive(Debug)]
enum Position {
    /// `seen` bytes of the preface matched so far.
    Preface {
        seen: usize,
    },
    /// Not HTTP/2 (hyper's HTTP/1.1 has its own header deadline).
    NotHttp2,
    FrameHeader {
        have: usize,
        buf: [u8; FRAME_HEADER_LEN],
    },
    Payload {
        left: usize,
        ends_block: bool,
    },
}

/// The client's half of an HTTP/2 connection, watched.
pub struct HeaderWatch<S> {
    inner: S,
    at: Position,
    block: Arc<OpenHeaderBlock>,
}

impl<S> HeaderWatch<S> {
    pub fn new(inner: S) -> (HeaderWatch<S>, Arc<OpenHeaderBlock>) {
        let block = Arc::new(OpenHeaderBlock::default());
        let watch = HeaderWatch {
            inner,
            at: Position::Preface { seen: 0 },
            block: block.clone(),
        };
        (watch, block)
    }

    /// Follows the frames through `bytes`, just read from the client.
    fn observe(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match &mut self.at {
                Position::NotHttp2 => return,
                Position::Preface { seen } => {
                    let n = (PREFACE.len() - *seen).min(bytes.len());
                    if bytes[..n] != PREFACE[*seen..*seen + n] {
                        self.at = Position::NotHttp2;
                        return;
                    }
                    *seen += n;
                    bytes = &bytes[n..];
                    if *seen == PREFACE.len() {
                        self.at = Position::FrameHeader {
                            have: 0,
                            buf: [0; FRAME_HEADER_LEN],
                        };
                    }
                }
                Position::FrameHeader { have, buf } => {
                    let n = (FRAME_HEADER_LEN - *have).min(bytes.len());
                    buf[*have..*have + n].copy_from_slice(&bytes[..n]);
                    *have += n;
                    bytes = &bytes[n..];
                    if *have < FRAME_HEADER_LEN {
                        continue;
                    }
                    let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
                    let (kind, flags) = (buf[3], buf[4]);
                    let header_frame = kind == HEADERS || kind == CONTINUATION;
                    // A header block is open from its HEADERS frame's first
                    // bytes until a frame with END_HEADERS has fully arrived.
                    if kind == HEADERS {
                        self.block.set(true);
                    }
                    let ends_block = header_frame && flags & END_HEADERS != 0;
                    self.at = Position::Payload {
                        left: len,
                        ends_block,
                    };
                    if len == 0 {
                        self.payload_done();
                    }
                }
                Position::Payload { left, .. } => {
                    let n = (*left).min(bytes.len());
                    *left -= n;
                    bytes = &bytes[n..];
                    if *left == 0 {
                        self.payload_done();
                    }
                }
            }
        }
    }

    fn payload_done(&mut self) {
        if let Position::Payload {
            ends_block: true, ..
        } = self.at
        {
            self.block.set(false);
        }
        self.at = Position::FrameHeader {
            have: 0,
            buf: [0; FRAME_HEADER_LEN],
        };
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for HeaderWatch<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res {
            let this = &mut *self;
            this.observe(&buf.filled()[before..]);
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for HeaderWatch<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
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

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.extend([kind, flags, 0, 0, 0, 1]);
        f.extend_from_slice(payload);
        f
    }

    fn watch() -> (HeaderWatch<tokio::io::Empty>, Arc<OpenHeaderBlock>) {
        let (mut w, b) = HeaderWatch::new(tokio::io::empty());
        w.observe(PREFACE);
        (w, b)
    }

    #[test]
    fn http1_is_left_alone() {
        let (mut w, open) = HeaderWatch::new(tokio::io::empty());
        w.observe(b"GET / HTTP/1.1\r\n");
        w.observe(&frame(HEADERS, 0, &[1; 10]));
        assert!(open.open_for().is_none());
        assert!(matches!(w.at, Position::NotHttp2));
    }

    #[test]
    fn a_header_block_is_open_until_end_headers_has_fully_arrived() {
        let (mut w, open) = watch();
        w.observe(&frame(0x4, 0, &[0; 6])); // SETTINGS
        assert!(open.open_for().is_none());
        w.observe(&frame(HEADERS, 0, &[1; 10]));
        assert!(open.open_for().is_some(), "HEADERS without END_HEADERS");
        w.observe(&frame(CONTINUATION, 0, &[2; 10]));
        assert!(open.open_for().is_some());
        let last = frame(CONTINUATION, END_HEADERS, &[3; 10]);
        w.observe(&last[..12]);
        assert!(open.open_for().is_some(), "END_HEADERS not fully arrived");
        w.observe(&last[12..]);
        assert!(open.open_for().is_none());
        // DATA frames never open one.
        w.observe(&frame(0x0, 0x1, &[0; 100]));
        assert!(open.open_for().is_none());
    }

    #[test]
    fn a_trickled_headers_frame_counts_from_its_first_bytes() {
        let (mut w, open) = watch();
        let f = frame(HEADERS, END_HEADERS | 0x1, &[7; 40]);
        for b in &f[..f.len() - 1] {
            w.observe(std::slice::from_ref(b));
        }
        assert!(open.open_for().is_some());
        w.observe(&f[f.len() - 1..]);
        assert!(open.open_for().is_none());
        // A whole frame in one read opens and closes at once.
        w.observe(&f);
        assert!(open.open_for().is_none());
    }

    #[test]
    fn frames_split_anywhere_are_followed() {
        let mut all = PREFACE.to_vec();
        all.extend(frame(0x4, 0, &[]));
        all.extend(frame(HEADERS, END_HEADERS, &[1; 33]));
        all.extend(frame(0x0, 0, &[0; 70]));
        all.extend(frame(HEADERS, 0, &[1; 5]));
        for chunk in [1, 2, 7, 9, 10, 64] {
            let (mut w, open) = HeaderWatch::new(tokio::io::empty());
            for piece in all.chunks(chunk) {
                w.observe(piece);
            }
            assert!(open.open_for().is_some(), "chunks of {chunk}");
        }
    }
}
