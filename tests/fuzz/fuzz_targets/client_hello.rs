//! The ClientHello/SNI path the relay runs on every accepted connection
//! before any policy decision: `tls::hello::read_client_hello` over the
//! raw bytes (fed in fuzzer-chosen chunk sizes, as a socket would), and
//! `parse_client_hello` on the same bytes as a handshake body.
//!
//! Input: byte 0 picks the read chunk size (1..=256, or whole buffer);
//! the rest is what the "client" sends.
#![no_main]

use std::pin::Pin;
use std::task::{Context, Poll};

use libfuzzer_sys::fuzz_target;
use proxypilot::tls::hello::{parse_client_hello, read_client_hello, HelloError, MAX_HELLO};
use tokio::io::{AsyncRead, ReadBuf};

/// Hands out `data` at most `chunk` bytes per read, like a slow socket.
struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = self.chunk.min(self.data.len()).min(buf.remaining());
        buf.put_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(()))
    }
}

fn check_host(sni: &str) {
    // What the policy layer relies on: lowercase DNS syntax, no dot at the end.
    assert!(!sni.is_empty() && sni.len() <= 253, "sni length");
    assert!(!sni.ends_with('.'), "sni trailing dot");
    assert!(
        sni.bytes().all(|b| b.is_ascii_lowercase()
            || b.is_ascii_digit()
            || b == b'-'
            || b == b'_'
            || b == b'.'),
        "sni charset: {sni:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, wire)) = data.split_first() else {
        return;
    };
    let chunk = if sel == 0 { usize::MAX } else { sel as usize };

    let mut rd = Chunked { data: wire, chunk };
    // The reader never blocks (Chunked is always ready), so one poll loop
    // on a trivial executor is enough.
    let res = futures_lite_block_on(read_client_hello(&mut rd));
    match res {
        Ok(h) => {
            // Bounded: never more than one read past MAX_HELLO.
            assert!(
                h.raw.len() <= MAX_HELLO + chunk.min(wire.len()),
                "raw too large"
            );
            // The replay buffer is exactly a prefix of what was sent.
            assert!(wire.starts_with(&h.raw), "raw is not a prefix of the input");
            if let Some(s) = &h.sni {
                check_host(s);
            }
            for p in &h.alpn {
                assert!(!p.is_empty() && p.len() <= 255);
            }
        }
        Err(HelloError::Io(e)) => panic!("in-memory reader cannot fail: {e}"),
        Err(_) => {}
    }

    // The body parser alone, on the raw input.
    if let Ok((sni, _alpn)) = parse_client_hello(wire) {
        if let Some(s) = &sni {
            check_host(s);
        }
    }
});

/// Polls a future that never returns Pending (the reader is always ready).
fn futures_lite_block_on<F: std::future::Future>(f: F) -> F::Output {
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}
