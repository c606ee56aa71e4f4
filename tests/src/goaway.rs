//! A fake HTTPS upstream on the raw `h2` crate (server side) that rejects
//! requests at the connection level, for the GOAWAY and REFUSED_STREAM
//! tests. It serves HTTP/2 only, with a certificate from the test's
//! [`TestCa`] (the fake APIs' one, which the tokenizer side trusts).
//!
//! Requests:
//! - `/goaway?after=N` (the marked request) is answered 200 at once; from
//!   then on the connection *holds* new streams: their frames reach no
//!   handler (as on a server that has not got to them). Once N held
//!   streams have been sent complete (END_STREAM seen), or after 10 s, the
//!   fake sends GOAWAY (NO_ERROR) whose last-stream-id is the highest
//!   stream it had let through before the mark (the marked one, when
//!   nothing ran beside it): every held stream is above it, unprocessed.
//!   Streams at or below it are served to the end, then the connection
//!   closes.
//! - `/refuse-once/…`: the first request to each path is reset with
//!   REFUSED_STREAM; later ones are answered.
//! - anything else: 200 with JSON `{"method","path","body_len","conn"}`,
//!   after reading the whole body.
//!
//! Every request a handler saw is in [`GoawayUpstream::served`]; every
//! held stream in [`GoawayUpstream::held`].

use std::{
    collections::{BTreeMap, HashSet},
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{ready, Context, Poll},
    time::{Duration, Instant},
};

use bytes::{Buf, Bytes, BytesMut};
use h2::server::SendResponse;
use http::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;

use crate::testca::TestCa;

/// What a handler did with one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Served {
    /// Which connection (0 is the first accepted).
    pub conn: usize,
    pub stream: u32,
    pub method: String,
    pub path: String,
    pub body_len: usize,
    /// "answered" or "refused".
    pub outcome: &'static str,
}

#[derive(Default)]
struct Shared {
    served: Mutex<Vec<Served>>,
    held: Mutex<Vec<(usize, u32)>>,
    refused_paths: Mutex<HashSet<String>>,
    conns: AtomicUsize,
}

/// The running fake; stopped on drop.
pub struct GoawayUpstream {
    runtime: Option<tokio::runtime::Runtime>,
    shared: Arc<Shared>,
}

impl GoawayUpstream {
    /// Listens on `addr` as `name`. Call it from the test's network
    /// namespace: the listener is bound on the calling thread.
    pub fn start(ca: &TestCa, name: &str, addr: SocketAddr) -> GoawayUpstream {
        let acceptor = TlsAcceptor::from(ca.server_config(&[name], &[b"h2"]));
        let l = std::net::TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        l.set_nonblocking(true).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("goaway-upstream")
            .enable_all()
            .build()
            .unwrap();
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        runtime.spawn(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            loop {
                let Ok((tcp, _)) = l.accept().await else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let (acceptor, s) = (acceptor.clone(), s.clone());
                tokio::spawn(async move {
                    if let Ok(Ok(tls)) =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                    {
                        let n = s.conns.fetch_add(1, Ordering::SeqCst);
                        serve(tls, n, s).await;
                    }
                });
            }
        });
        GoawayUpstream {
            runtime: Some(runtime),
            shared,
        }
    }

    /// Every request a handler saw, in order.
    pub fn served(&self) -> Vec<Served> {
        self.shared.served.lock().unwrap().clone()
    }

    /// Streams held after a mark: (connection, stream id).
    pub fn held(&self) -> Vec<(usize, u32)> {
        self.shared.held.lock().unwrap().clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.conns.load(Ordering::SeqCst)
    }
}

impl Drop for GoawayUpstream {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

async fn serve<T>(io: T, conn: usize, shared: Arc<Shared>)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let gate = Arc::new(Gate::default());
    let io = Gated {
        inner: io,
        raw: BytesMut::new(),
        out: BytesMut::new(),
        preface_left: 24,
        gate: gate.clone(),
    };
    let Ok(mut h2) = h2::server::Builder::new()
        .max_concurrent_streams(100)
        .handshake::<_, Bytes>(io)
        .await
    else {
        return;
    };
    let go_away = Arc::new(Notify::new());
    let mut going = false;
    loop {
        tokio::select! {
            next = h2.accept() => match next {
                Some(Ok((req, respond))) => {
                    let ctx = Ctx { conn, shared: shared.clone(), gate: gate.clone(), go_away: go_away.clone() };
                    tokio::spawn(handle(req, respond, ctx));
                }
                _ => break,
            },
            _ = go_away.notified(), if !going => {
                going = true;
                h2.graceful_shutdown();
            }
        }
    }
    // The held streams are the fake's record, whatever the client did.
    let held = gate
        .held
        .lock()
        .unwrap()
        .keys()
        .map(|s| (conn, *s))
        .collect::<Vec<_>>();
    shared.held.lock().unwrap().extend(held);
}

struct Ctx {
    conn: usize,
    shared: Arc<Shared>,
    gate: Arc<Gate>,
    go_away: Arc<Notify>,
}

async fn handle(req: Request<h2::RecvStream>, mut respond: SendResponse<Bytes>, ctx: Ctx) {
    let stream = respond.stream_id().as_u32();
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let mut record = Served {
        conn: ctx.conn,
        stream,
        method,
        path: path.clone(),
        body_len: 0,
        outcome: "answered",
    };
    if path.starts_with("/refuse-once/")
        && ctx
            .shared
            .refused_paths
            .lock()
            .unwrap()
            .insert(path.clone())
    {
        record.outcome = "refused";
        ctx.shared.served.lock().unwrap().push(record);
        respond.send_reset(h2::Reason::REFUSED_STREAM);
        return;
    }
    if let Some(after) = path.strip_prefix("/goaway?after=") {
        let after: usize = after.parse().unwrap_or(1);
        ctx.gate.hold();
        let (gate, go_away) = (ctx.gate.clone(), ctx.go_away.clone());
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            while gate.held_complete() < after && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            go_away.notify_one();
        });
    }
    let mut body = req.into_body();
    while let Some(chunk) = body.data().await {
        let Ok(chunk) = chunk else { break };
        record.body_len += chunk.len();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let json = format!(
        r#"{{"method":"{}","path":"{}","body_len":{},"conn":{}}}"#,
        record.method, record.path, record.body_len, record.conn
    );
    ctx.shared.served.lock().unwrap().push(record);
    let head = Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(())
        .unwrap();
    if let Ok(mut send) = respond.send_response(head, false) {
        let _ = send.send_data(Bytes::from(json), true);
    }
}

/// What the gate lets through to h2.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    /// Held streams: whether each was sent complete.
    held: Mutex<BTreeMap<u32, bool>>,
}

#[derive(Default)]
struct GateState {
    /// The highest stream whose HEADERS went through.
    max_passed: u32,
    /// Streams above it are held (set by a mark).
    cutoff: Option<u32>,
}

impl Gate {
    fn hold(&self) {
        let mut s = self.state.lock().unwrap();
        s.cutoff = Some(s.max_passed);
    }

    fn held_complete(&self) -> usize {
        self.held.lock().unwrap().values().filter(|e| **e).count()
    }

    /// Whether the frame (`kind`, `flags`, `stream`) goes on to h2.
    fn pass(&self, kind: u8, flags: u8, stream: u32) -> bool {
        const DATA: u8 = 0;
        const HEADERS: u8 = 1;
        const END_STREAM: u8 = 1;
        let mut s = self.state.lock().unwrap();
        if stream != 0 && s.cutoff.is_some_and(|c| stream > c) {
            let mut held = self.held.lock().unwrap();
            let ended = held.entry(stream).or_default();
            if (kind == DATA || kind == HEADERS) && flags & END_STREAM != 0 {
                *ended = true;
            }
            return false;
        }
        if kind == HEADERS && stream > s.max_passed {
            s.max_passed = stream;
        }
        true
    }
}

/// The client-to-server byte stream, cut into HTTP/2 frames so held
/// streams' frames can be left out.
struct Gated<T> {
    inner: T,
    raw: BytesMut,
    out: BytesMut,
    preface_left: usize,
    gate: Arc<Gate>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Gated<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(&this.out[..n]);
                this.out.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.preface_left > 0 && !this.raw.is_empty() {
                let n = this.preface_left.min(this.raw.len());
                let bytes = this.raw.split_to(n);
                this.out.extend_from_slice(&bytes);
                this.preface_left -= n;
                continue;
            }
            while this.preface_left == 0 && this.raw.len() >= 9 {
                let len = u32::from_be_bytes([0, this.raw[0], this.raw[1], this.raw[2]]) as usize;
                if this.raw.len() < 9 + len {
                    break;
                }
                let frame = this.raw.split_to(9 + len);
                let stream =
                    u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
                if this.gate.pass(frame[3], frame[4], stream) {
                    this.out.extend_from_slice(&frame);
                }
            }
            if !this.out.is_empty() {
                continue;
            }
            let mut tmp = [0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut tmp);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
            this.raw.extend_from_slice(rb.filled());
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Gated<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
