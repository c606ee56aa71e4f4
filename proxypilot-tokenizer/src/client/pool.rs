//! The pool of upstream connections behind [`crate::UpstreamClient`], built
//! on hyper's `conn::http1` / `conn::http2` handshakes.
//!
//! hyper-util's legacy client keeps one HTTP/2 connection per host. Once
//! the peer's `SETTINGS_MAX_CONCURRENT_STREAMS` were all held by long
//! requests (one sandbox client's, say), every other request to that host
//! waited in h2's queue behind them (issue 21). This pool:
//!
//! - tracks the streams in flight on each HTTP/2 connection against the
//!   limit the peer advertised, and opens another connection to the host
//!   when the ones it has are full, still under the per-host cap of
//!   connections (`max_per_host`, open or being dialled, HTTP/1.1 and
//!   HTTP/2 alike);
//! - gives each client connection ([`ClientConn`], an extension the front
//!   doors put on each request) at most half of any one upstream
//!   connection's streams, so one client cannot hold every stream: its
//!   further requests go to another connection, or wait for one of its own
//!   to end, while other clients still find room;
//! - retries, once and on a fresh connection, a request the upstream did not
//!   process (streams above a GOAWAY's last-stream-id, REFUSED_STREAM, a
//!   request never sent), when nothing of its body was consumed yet (see
//!   [`retry`]);
//! - otherwise behaves as the legacy client did: keep-alive reuse of
//!   HTTP/1.1 connections, HTTP/2 by ALPN, idle connections closed after
//!   `idle_timeout`, the same HTTP/2 settings, TLS verified by the
//!   connector.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::TokioExecutor;
use tokio::sync::Notify;

use crate::body::{BoxError, ProxyBody};
use crate::client::{HttpsConnector, CONNECTION_WINDOW, STREAM_WINDOW};

pub mod retry;
use retry::{Replay, Unprocessed};

/// Which client connection a request came from: the relay (and the
/// standalone tokenizer server) put one on each request's extensions, one
/// value per accepted connection. Requests without one get no share limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientConn(u64);

impl ClientConn {
    /// A value no other connection of this process has.
    pub fn next() -> ClientConn {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        ClientConn(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// The most streams one client connection may hold on an upstream HTTP/2
/// connection whose peer allows `limit`: half, rounded up, so that others
/// always find room beside it.
pub fn client_share(limit: usize) -> usize {
    limit.div_ceil(2).max(1)
}

/// Why a request could not be relayed upstream.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Dialling or the TLS handshake failed (shared by the requests that
    /// waited for that dial).
    #[error("could not connect")]
    Connect(#[source] DialError),
    #[error("the HTTP handshake failed")]
    Handshake(#[source] DialError),
    #[error("the request failed")]
    Request(#[source] hyper::Error),
    /// The upstream did not process it, but its body could not be sent
    /// again.
    #[error(
        "the upstream {why} and did not process the request, but part of its body had \
         already been sent, so it was not retried (send the request again)"
    )]
    NotRetried {
        why: Unprocessed,
        #[source]
        source: hyper::Error,
    },
    /// The upstream did not process it; the one retry failed too.
    #[error("the upstream {first}; the retry on a fresh connection failed too")]
    RetryFailed {
        first: Unprocessed,
        #[source]
        source: Box<PoolError>,
    },
}

/// Why a dial failed, shared by every request that waited for it.
pub type DialError = Arc<dyn std::error::Error + Send + Sync>;

/// How the pool is set up.
#[derive(Clone, Debug)]
pub(crate) struct PoolConfig {
    pub idle_timeout: Duration,
    pub max_per_host: usize,
}

/// A cheap-to-clone handle on the pool.
#[derive(Clone)]
pub(crate) struct UpstreamPool {
    inner: Arc<Inner>,
}

struct Inner {
    connector: HttpsConnector,
    cfg: PoolConfig,
    hosts: Mutex<HashMap<String, Arc<Host>>>,
    next_id: AtomicU64,
    reaper: std::sync::Once,
}

/// One host:port's connections.
struct Host {
    state: Mutex<HostState>,
    /// Something was freed: a stream ended, a connection came back idle,
    /// closed, or finished dialling.
    changed: Notify,
}

#[derive(Default)]
struct HostState {
    h2: Vec<H2Entry>,
    idle_h1: Vec<IdleH1>,
    /// Connections open or being dialled; at most `max_per_host`.
    open: usize,
    dialing: usize,
    /// Dials that failed so far, and the last one's error: requests that
    /// waited for a dial fail with it rather than dial again one by one.
    failed_dials: u64,
    last_dial_error: Option<DialError>,
    /// What the last handshake negotiated (None before the first).
    speaks_h2: Option<bool>,
}

struct H2Entry {
    id: u64,
    sender: http2::SendRequest<ProxyBody>,
    /// The peer's SETTINGS_MAX_CONCURRENT_STREAMS, as h2 last saw it.
    limit: Arc<AtomicUsize>,
    in_flight: usize,
    by_client: HashMap<ClientConn, usize>,
    /// A GOAWAY arrived: no new streams here.
    going_away: bool,
    idle_since: Instant,
}

struct IdleH1 {
    id: u64,
    sender: http1::SendRequest<ProxyBody>,
    since: Instant,
}

fn lock(m: &Mutex<HostState>) -> MutexGuard<'_, HostState> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl HostState {
    /// A stream on the first HTTP/2 connection with room for it (oldest
    /// first: busy hosts keep few connections), not `avoid`.
    fn take_h2(
        &mut self,
        client: Option<ClientConn>,
        avoid: Option<u64>,
    ) -> Option<(u64, http2::SendRequest<ProxyBody>)> {
        for e in self.h2.iter_mut() {
            if e.going_away || Some(e.id) == avoid || e.sender.is_closed() {
                continue;
            }
            let limit = e.limit.load(Ordering::Relaxed).max(1);
            if e.in_flight >= limit {
                continue;
            }
            if let Some(c) = client {
                let held = e.by_client.entry(c).or_default();
                if *held >= client_share(limit) {
                    continue;
                }
                *held += 1;
            }
            e.in_flight += 1;
            return Some((e.id, e.sender.clone()));
        }
        None
    }

    fn take_idle_h1(&mut self, idle_timeout: Duration) -> Option<IdleH1> {
        while let Some(c) = self.idle_h1.pop() {
            if !c.sender.is_closed() && c.since.elapsed() < idle_timeout {
                return Some(c);
            }
        }
        None
    }

    fn release_h2(&mut self, id: u64, client: Option<ClientConn>) {
        let Some(e) = self.h2.iter_mut().find(|e| e.id == id) else {
            return;
        };
        e.in_flight = e.in_flight.saturating_sub(1);
        if let Some(c) = client {
            if let Some(n) = e.by_client.get_mut(&c) {
                *n -= 1;
                if *n == 0 {
                    e.by_client.remove(&c);
                }
            }
        }
        if e.in_flight == 0 {
            e.idle_since = Instant::now();
            if e.going_away {
                self.h2.retain(|e| e.id != id);
            }
        }
    }

    fn going_away(&mut self, id: u64) {
        if let Some(e) = self.h2.iter_mut().find(|e| e.id == id) {
            e.going_away = true;
        }
    }
}

/// A checked-out connection: a stream of an HTTP/2 one, or a whole
/// HTTP/1.1 one. Dropping it gives it back.
pub(crate) struct Lease {
    host: Arc<Host>,
    id: u64,
    kind: LeaseKind,
}

enum LeaseKind {
    H2 {
        client: Option<ClientConn>,
        sender: Option<http2::SendRequest<ProxyBody>>,
    },
    H1 {
        sender: Option<http1::SendRequest<ProxyBody>>,
        /// The response ended cleanly: the connection may be reused.
        reusable: bool,
    },
}

impl Drop for Lease {
    fn drop(&mut self) {
        {
            let mut st = lock(&self.host.state);
            match &mut self.kind {
                LeaseKind::H2 { client, .. } => st.release_h2(self.id, *client),
                LeaseKind::H1 { sender, reusable } => {
                    if let (Some(sender), true) = (sender.take(), *reusable) {
                        st.idle_h1.push(IdleH1 {
                            id: self.id,
                            sender,
                            since: Instant::now(),
                        });
                    }
                }
            }
        }
        self.host.changed.notify_waiters();
    }
}

/// A failed attempt: the error, whether the upstream certainly did not
/// process the request, on which connection, and the request itself when
/// hyper never sent it.
struct Failure {
    error: PoolError,
    unprocessed: Option<Unprocessed>,
    conn: Option<u64>,
    unsent: Option<Request<ProxyBody>>,
}

impl UpstreamPool {
    pub(crate) fn new(connector: HttpsConnector, cfg: PoolConfig) -> Self {
        UpstreamPool {
            inner: Arc::new(Inner {
                connector,
                cfg,
                hosts: Mutex::default(),
                next_id: AtomicU64::new(1),
                reaper: std::sync::Once::new(),
            }),
        }
    }

    /// Sends `req` (absolute `https://` URI) on a pooled connection and
    /// retries it once on a fresh one if the upstream did not process it
    /// and its body can be sent again.
    pub(crate) async fn send(
        &self,
        req: Request<ProxyBody>,
    ) -> Result<Response<UpstreamBody>, PoolError> {
        let client = req.extensions().get::<ClientConn>().copied();
        let (parts, body) = req.into_parts();
        let replay = Replay::new(body);
        let first = Request::from_parts(parts.clone(), replay.first_body());
        let failure = match self.send_once(first, client, None).await {
            Ok(resp) => return Ok(resp),
            Err(f) => f,
        };
        let Some(why) = failure.unprocessed else {
            return Err(failure.error);
        };
        let body = match failure.unsent {
            Some(req) => Some(req.into_body()),
            None => replay.take_unsent(),
        };
        let Some(body) = body else {
            let source = match failure.error {
                PoolError::Request(e) => e,
                other => return Err(other),
            };
            tracing::debug!(reason = %why, "upstream did not process a request whose body was sent; not retried");
            return Err(PoolError::NotRetried { why, source });
        };
        tracing::debug!(reason = %why, "retrying a request the upstream did not process");
        self.send_once(Request::from_parts(parts, body), client, failure.conn)
            .await
            .map_err(|f| PoolError::RetryFailed {
                first: why,
                source: Box::new(f.error),
            })
    }

    async fn send_once(
        &self,
        req: Request<ProxyBody>,
        client: Option<ClientConn>,
        avoid: Option<u64>,
    ) -> Result<Response<UpstreamBody>, Failure> {
        let failed = |error| Failure {
            error,
            unprocessed: None,
            conn: None,
            unsent: None,
        };
        let uri = req.uri().clone();
        let key = host_key(&uri).ok_or_else(|| {
            let e: BoxError = format!("upstream URI {uri} has no host").into();
            failed(PoolError::Connect(e.into()))
        })?;
        let host = self.host(&key);
        let mut lease = loop {
            let mut lease = self
                .checkout(&host, &uri, client, avoid)
                .await
                .map_err(failed)?;
            // An idle HTTP/1.1 connection the server closed meanwhile is
            // dropped here, before the request goes out.
            if let LeaseKind::H1 {
                sender: Some(s), ..
            } = &mut lease.kind
            {
                if s.ready().await.is_err() {
                    continue;
                }
            }
            break lease;
        };
        let id = lease.id;
        let sent = match &mut lease.kind {
            LeaseKind::H2 { sender, .. } => {
                let mut s = sender.take().expect("a fresh lease has its sender");
                s.try_send_request(req).await
            }
            LeaseKind::H1 {
                sender: Some(s), ..
            } => s.try_send_request(origin_form(req)).await,
            LeaseKind::H1 { sender: None, .. } => unreachable!("a fresh lease has its sender"),
        };
        match sent {
            Ok(resp) => Ok(resp.map(|inner| UpstreamBody {
                inner,
                lease: Some(lease),
            })),
            Err(mut e) => {
                let unsent = e.take_message();
                let error = e.into_error();
                let unprocessed = if unsent.is_some() {
                    Some(Unprocessed::NotSent)
                } else {
                    retry::classify(&error)
                };
                if unprocessed == Some(Unprocessed::GoAway) {
                    lock(&host.state).going_away(id);
                }
                drop(lease);
                Err(Failure {
                    error: PoolError::Request(error),
                    unprocessed,
                    conn: Some(id),
                    unsent,
                })
            }
        }
    }

    fn host(&self, key: &str) -> Arc<Host> {
        let mut hosts = self.inner.hosts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = hosts.get(key) {
            return h.clone();
        }
        // Forget hosts with nothing open that nobody waits on, so an open
        // proxy's table of hosts stays small.
        if hosts.len() > 1024 {
            hosts.retain(|_, h| Arc::strong_count(h) > 1 || lock(&h.state).open > 0);
        }
        let h = Arc::new(Host {
            state: Mutex::default(),
            changed: Notify::new(),
        });
        hosts.insert(key.to_string(), h.clone());
        h
    }

    /// A stream or connection for one request: room on an HTTP/2
    /// connection, an idle HTTP/1.1 one, a new one under the per-host cap,
    /// or, at the cap, the first of those to free up.
    async fn checkout(
        &self,
        host: &Arc<Host>,
        uri: &Uri,
        client: Option<ClientConn>,
        avoid: Option<u64>,
    ) -> Result<Lease, PoolError> {
        let max = self.inner.cfg.max_per_host.max(1);
        let mut waited_for_dial: Option<u64> = None;
        let slot = loop {
            let notified = host.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = lock(&host.state);
                if let (Some(n), Some(e)) = (waited_for_dial, &st.last_dial_error) {
                    if st.failed_dials != n {
                        return Err(PoolError::Connect(e.clone()));
                    }
                }
                let at_cap = st.open >= max;
                // Avoiding the connection that refused the first attempt
                // is worth a new one, not waiting at the cap.
                let h2 = st
                    .take_h2(client, avoid)
                    .or_else(|| at_cap.then(|| st.take_h2(client, None)).flatten());
                if let Some((id, sender)) = h2 {
                    return Ok(self.lease_h2(host, id, client, sender));
                }
                if let Some(c) = st.take_idle_h1(self.inner.cfg.idle_timeout) {
                    return Ok(Lease {
                        host: host.clone(),
                        id: c.id,
                        kind: LeaseKind::H1 {
                            sender: Some(c.sender),
                            reusable: false,
                        },
                    });
                }
                // One HTTP/2 dial at a time serves everyone waiting.
                let wait_for_dial = st.speaks_h2 != Some(false) && st.dialing > 0;
                waited_for_dial = wait_for_dial.then_some(st.failed_dials);
                if !wait_for_dial && !at_cap {
                    st.open += 1;
                    st.dialing += 1;
                    break DialSlot {
                        host,
                        connected: false,
                        error: None,
                    };
                }
            }
            notified.await;
        };
        self.dial(slot, uri, client).await
    }

    fn lease_h2(
        &self,
        host: &Arc<Host>,
        id: u64,
        client: Option<ClientConn>,
        sender: http2::SendRequest<ProxyBody>,
    ) -> Lease {
        Lease {
            host: host.clone(),
            id,
            kind: LeaseKind::H2 {
                client,
                sender: Some(sender),
            },
        }
    }

    /// Dials and handshakes a connection in `slot` and leases it to the
    /// caller.
    async fn dial(
        &self,
        mut slot: DialSlot<'_>,
        uri: &Uri,
        client: Option<ClientConn>,
    ) -> Result<Lease, PoolError> {
        self.start_reaper();
        let host = slot.host;
        let conn = match self.inner.connector.clone().connect(uri.clone()).await {
            Ok(c) => c,
            Err(e) => {
                let e: DialError = e.into();
                slot.error = Some(e.clone());
                return Err(PoolError::Connect(e));
            }
        };
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        if conn.h2 {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                // See `UpstreamClient::new` for why these values.
                .max_concurrent_reset_streams(4096)
                .max_local_error_reset_streams(None)
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .handshake(conn)
                .await
                .map_err(|e| slot.failed(e, PoolError::Handshake))?;
            let limit = Arc::new(AtomicUsize::new(conn.current_max_send_streams()));
            let mut by_client = HashMap::new();
            if let Some(c) = client {
                by_client.insert(c, 1);
            }
            {
                let mut st = lock(&host.state);
                st.speaks_h2 = Some(true);
                st.h2.push(H2Entry {
                    id,
                    sender: sender.clone(),
                    limit: limit.clone(),
                    in_flight: 1,
                    by_client,
                    going_away: false,
                    idle_since: Instant::now(),
                });
            }
            slot.connected = true;
            let host2 = host.clone();
            tokio::spawn(async move {
                let mut conn = Box::pin(conn);
                let end = poll_fn(|cx| {
                    let r = conn.as_mut().poll(cx);
                    limit.store(conn.current_max_send_streams(), Ordering::Relaxed);
                    r
                })
                .await;
                if let Err(e) = end {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
                }
                drop(conn);
                closed(&host2, id);
            });
            Ok(self.lease_h2(host, id, client, sender))
        } else {
            let (sender, conn) = http1::handshake(conn)
                .await
                .map_err(|e| slot.failed(e, PoolError::Handshake))?;
            lock(&host.state).speaks_h2 = Some(false);
            slot.connected = true;
            let host2 = host.clone();
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream HTTP/1.1 connection ended with an error");
                }
                closed(&host2, id);
            });
            Ok(Lease {
                host: host.clone(),
                id,
                kind: LeaseKind::H1 {
                    sender: Some(sender),
                    reusable: false,
                },
            })
        }
    }

    /// Closes connections idle for `idle_timeout`, from the first dial on.
    fn start_reaper(&self) {
        self.inner.reaper.call_once(|| {
            let weak: Weak<Inner> = Arc::downgrade(&self.inner);
            let timeout = self.inner.cfg.idle_timeout;
            let every = (timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(10));
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let Some(inner) = weak.upgrade() else { return };
                    let hosts: Vec<Arc<Host>> = inner
                        .hosts
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .values()
                        .cloned()
                        .collect();
                    for h in hosts {
                        let mut st = lock(&h.state);
                        st.idle_h1
                            .retain(|c| c.since.elapsed() < timeout && !c.sender.is_closed());
                        st.h2.retain(|e| {
                            e.in_flight > 0
                                || (!e.going_away
                                    && !e.sender.is_closed()
                                    && e.idle_since.elapsed() < timeout)
                        });
                    }
                }
            });
        });
    }
}

/// A slot under the per-host cap taken for a dial. Dropped (the dial done,
/// failed or abandoned with its request), it is given back unless the
/// connection came up: that one's driver gives it back when it closes.
struct DialSlot<'a> {
    host: &'a Arc<Host>,
    connected: bool,
    /// Why the dial failed, for the requests that waited for it.
    error: Option<DialError>,
}

impl DialSlot<'_> {
    fn failed(
        &mut self,
        e: impl std::error::Error + Send + Sync + 'static,
        wrap: fn(DialError) -> PoolError,
    ) -> PoolError {
        let e: DialError = Arc::new(e);
        self.error = Some(e.clone());
        wrap(e)
    }
}

impl Drop for DialSlot<'_> {
    fn drop(&mut self) {
        {
            let mut st = lock(&self.host.state);
            st.dialing -= 1;
            if !self.connected {
                st.open -= 1;
                if let Some(e) = self.error.take() {
                    st.failed_dials += 1;
                    st.last_dial_error = Some(e);
                }
            }
        }
        self.host.changed.notify_waiters();
    }
}

/// A connection's driver ended: its slot under the cap is free.
fn closed(host: &Host, id: u64) {
    {
        let mut st = lock(&host.state);
        st.open = st.open.saturating_sub(1);
        st.h2.retain(|e| e.id != id);
        st.idle_h1.retain(|c| c.id != id);
    }
    host.changed.notify_waiters();
}

/// "host:port" (443 by default) of an absolute URI.
fn host_key(uri: &Uri) -> Option<String> {
    let host = uri.host()?;
    Some(format!("{host}:{}", uri.port_u16().unwrap_or(443)))
}

/// An HTTP/1.1 request goes out in origin form with a Host header, as the
/// legacy client sent it; HTTP/2 takes `:authority` from the absolute URI.
fn origin_form(mut req: Request<ProxyBody>) -> Request<ProxyBody> {
    if let Some(a) = req.uri().authority() {
        if !req.headers().contains_key(http::header::HOST) {
            if let Ok(v) = http::HeaderValue::from_str(a.as_str()) {
                req.headers_mut().insert(http::header::HOST, v);
            }
        }
    }
    let pq = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    if let Ok(u) = pq.parse() {
        *req.uri_mut() = u;
    }
    req
}

/// An upstream response body. It holds its stream (HTTP/2) or connection
/// (HTTP/1.1) until it ends or is dropped; an HTTP/1.1 connection whose
/// response ended cleanly goes back to the pool.
pub struct UpstreamBody {
    inner: Incoming,
    lease: Option<Lease>,
}

impl UpstreamBody {
    /// A body that belongs to no pool (an upgrade's own connection).
    pub(crate) fn unpooled(inner: Incoming) -> Self {
        UpstreamBody { inner, lease: None }
    }

    fn finished(&mut self, clean: bool) {
        if let Some(mut lease) = self.lease.take() {
            if let LeaseKind::H1 { reusable, .. } = &mut lease.kind {
                *reusable = clean;
            }
        }
    }
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UpstreamBody")
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        let clean = http_body::Body::is_end_stream(&self.inner);
        self.finished(clean);
    }
}

impl http_body::Body for UpstreamBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => this.finished(true),
            Poll::Ready(Some(Err(_))) => this.finished(false),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.finished(true),
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_may_hold_half_of_a_connections_streams_rounded_up() {
        assert_eq!([1, 2, 3, 4, 100].map(client_share), [1, 1, 2, 2, 50]);
    }

    #[test]
    fn http1_requests_go_out_in_origin_form_with_host() {
        let req = Request::get("https://api.example.test:8443/v1/x?y=1")
            .body(ProxyBody::default())
            .unwrap();
        let req = origin_form(req);
        assert_eq!(req.uri().to_string(), "/v1/x?y=1");
        assert_eq!(req.headers()["host"], "api.example.test:8443");
    }
}
