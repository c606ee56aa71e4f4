//! The resolver's decisions and its UDP and TCP listeners.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use hickory_proto::{op::ResponseCode, rr::DNSClass};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{OwnedSemaphorePermit, Semaphore},
    task::JoinHandle,
    time::timeout,
};

use super::{
    limits::{QueryRate, MAX_IN_FLIGHT, MAX_TCP_CONNECTIONS, QUERIES_PER_SECOND, QUERY_BURST},
    message::Question,
    names::NameAllowList,
    stats::{DnsStats, Outcome},
    upstream::Upstreams,
};
use crate::kernel::OriginalDestination;

/// The rcode for a name the sandbox may not resolve (see the module docs).
pub const DENIED_RCODE: ResponseCode = ResponseCode::NXDomain;
/// A TCP connection with no query for this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// Who sent a query, from the kernel's records.
pub trait Senders: Send + Sync + 'static {
    /// The UDP socket whose local address is `peer`.
    fn udp(&self, peer: SocketAddr) -> Option<OriginalDestination>;
    /// The TCP connection accepted from `peer`.
    fn tcp(&self, peer: SocketAddr) -> Option<OriginalDestination>;
}

/// No kernel records (tests).
pub struct Unknown;

impl Senders for Unknown {
    fn udp(&self, _: SocketAddr) -> Option<OriginalDestination> {
        None
    }
    fn tcp(&self, _: SocketAddr) -> Option<OriginalDestination> {
        None
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// The decision on one query before anything is asked upstream.
enum Step {
    /// Dropped, unanswered (counted as malformed).
    Drop,
    /// Answered at once.
    Answer(Vec<u8>),
    /// An allowed name: ask upstream, holding one in-flight slot.
    Ask(Question, OwnedSemaphorePermit),
}

/// The resolver: policy, caps, upstreams and counters. One per sandbox.
pub struct Resolver {
    /// Replaced on a reload (the intercepted and allowed hosts change).
    names: std::sync::RwLock<NameAllowList>,
    upstreams: Upstreams,
    rate: QueryRate,
    in_flight: Arc<Semaphore>,
    stats: Arc<DnsStats>,
    senders: Arc<dyn Senders>,
}

impl Resolver {
    pub fn new(names: NameAllowList, upstreams: Upstreams, senders: Arc<dyn Senders>) -> Self {
        Resolver {
            names: std::sync::RwLock::new(names),
            upstreams,
            rate: QueryRate::new(QUERIES_PER_SECOND, QUERY_BURST),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            stats: Arc::new(DnsStats::default()),
            senders,
        }
    }

    pub fn stats(&self) -> Arc<DnsStats> {
        self.stats.clone()
    }

    /// Answers for `names` from now on (a reload).
    pub fn set_names(&self, names: NameAllowList) {
        *self.names.write().unwrap_or_else(|p| p.into_inner()) = names;
    }

    fn allows(&self, key: &str) -> bool {
        self.names
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .allows(key)
    }

    /// Answers one query (`None`: dropped). `who` is the sender, if known.
    pub async fn handle(
        &self,
        bytes: &[u8],
        transport: Transport,
        who: Option<&OriginalDestination>,
    ) -> Option<Vec<u8>> {
        match self.step(bytes, transport, who) {
            Step::Drop => None,
            Step::Answer(a) => Some(a),
            Step::Ask(q, permit) => Some(self.ask(q, permit, transport, who).await),
        }
    }

    fn step(&self, bytes: &[u8], transport: Transport, who: Option<&OriginalDestination>) -> Step {
        let q = match Question::parse(bytes) {
            Ok(q) => q,
            Err(why) => {
                self.stats.malformed();
                tracing::debug!(target: "dns", pid = who.map(|w| w.pid), %why, len = bytes.len(),
                    transport = transport.name(), "dropped a datagram that is not a DNS query");
                return Step::Drop;
            }
        };
        if !self.rate.admit() {
            // Counted, not logged one by one: a flood must not flood the log.
            self.stats.count(Outcome::RateLimited, &q.key);
            return Step::Answer(q.answer_with(ResponseCode::Refused));
        }
        if q.qclass != DNSClass::IN || !q.host_name || !self.allows(&q.key) {
            self.finish(&q, Outcome::Denied, DENIED_RCODE, 0, transport, who);
            return Step::Answer(q.answer_with(DENIED_RCODE));
        }
        match self.in_flight.clone().try_acquire_owned() {
            Ok(permit) => Step::Ask(q, permit),
            Err(_) => {
                self.finish(&q, Outcome::Busy, ResponseCode::ServFail, 0, transport, who);
                Step::Answer(q.answer_with(ResponseCode::ServFail))
            }
        }
    }

    async fn ask(
        &self,
        q: Question,
        permit: OwnedSemaphorePermit,
        transport: Transport,
        who: Option<&OriginalDestination>,
    ) -> Vec<u8> {
        let answer = self.upstreams.ask(&q).await;
        drop(permit);
        match answer {
            Ok(m) => {
                let rcode = m.metadata.response_code;
                let limit = match transport {
                    Transport::Udp => q.udp_limit(),
                    Transport::Tcp => usize::from(u16::MAX),
                };
                let (bytes, n) = q.relay_answer(m, limit);
                self.finish(&q, Outcome::Answered, rcode, n, transport, who);
                bytes
            }
            Err(e) => {
                tracing::warn!(target: "dns", name = %q.key, error = %e, "could not resolve an allowed name");
                self.finish(
                    &q,
                    Outcome::Failed,
                    ResponseCode::ServFail,
                    0,
                    transport,
                    who,
                );
                q.answer_with(ResponseCode::ServFail)
            }
        }
    }

    /// Counts the query and writes its audit line.
    fn finish(
        &self,
        q: &Question,
        outcome: Outcome,
        rcode: ResponseCode,
        answers: usize,
        transport: Transport,
        who: Option<&OriginalDestination>,
    ) {
        self.stats.count(outcome, &q.key);
        tracing::info!(
            target: crate::audit::TARGET,
            time = %crate::audit::Rfc3339(SystemTime::now()),
            pid = who.map(|w| w.pid),
            process = who.map(|w| w.comm.as_str()),
            server = who.map(|w| tracing::field::display(w.addr)),
            transport = transport.name(),
            name = %q.key,
            qtype = %q.qtype,
            decision = outcome.name(),
            rcode = %rcode,
            answers,
            "dns"
        );
    }
}

/// Serves queries arriving on `sock` until the task is aborted.
pub fn serve_udp(sock: UdpSocket, resolver: Arc<Resolver>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let sock = Arc::new(sock);
        let mut buf = vec![0u8; 65_535];
        loop {
            let (n, peer) = match sock.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(target: "dns", error = %e, "receiving a DNS datagram");
                    continue;
                }
            };
            let who = resolver.senders.udp(peer);
            match resolver.step(&buf[..n], Transport::Udp, who.as_ref()) {
                Step::Drop => {}
                Step::Answer(a) => {
                    let _ = sock.send_to(&a, peer).await;
                }
                Step::Ask(q, permit) => {
                    let (sock, resolver) = (sock.clone(), resolver.clone());
                    tokio::spawn(async move {
                        let a = resolver.ask(q, permit, Transport::Udp, who.as_ref()).await;
                        let _ = sock.send_to(&a, peer).await;
                    });
                }
            }
        }
    })
}

/// Serves DNS over TCP (length-prefixed messages) on `listener`.
pub fn serve_tcp(listener: TcpListener, resolver: Arc<Resolver>) -> JoinHandle<()> {
    tokio::spawn(crate::accept::serve(
        listener,
        "dns",
        TcpAdmission {
            resolver,
            slots: Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS)),
        },
    ))
}

/// A DNS-over-TCP connection takes one of a fixed number of slots.
struct TcpAdmission {
    resolver: Arc<Resolver>,
    slots: Arc<Semaphore>,
}

impl crate::accept::Admission for TcpAdmission {
    fn admit(&mut self, stream: TcpStream, peer: SocketAddr) -> Option<crate::accept::Serve> {
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            tracing::debug!(target: "dns", %peer, "too many DNS connections; closing one");
            return None;
        };
        let resolver = self.resolver.clone();
        Some(Box::pin(async move {
            let who = resolver.senders.tcp(peer);
            let _ = serve_connection(stream, &resolver, who.as_ref()).await;
            drop(slot);
        }))
    }
}

async fn serve_connection(
    mut s: TcpStream,
    resolver: &Resolver,
    who: Option<&OriginalDestination>,
) -> std::io::Result<()> {
    loop {
        let mut len = [0u8; 2];
        match timeout(TCP_IDLE, s.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return Ok(()),
        }
        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if !matches!(timeout(TCP_IDLE, s.read_exact(&mut msg)).await, Ok(Ok(_))) {
            // Not the message its length promised (bytes that are not DNS
            // read as a length, most often): dropped like a bad datagram.
            resolver.stats.malformed();
            return Ok(());
        }
        // A malformed message ends the connection: there is no way to
        // answer it, and nothing after it can be trusted to be framed.
        let Some(answer) = resolver.handle(&msg, Transport::Tcp, who).await else {
            return Ok(());
        };
        let mut out = Vec::with_capacity(answer.len() + 2);
        out.extend_from_slice(&(answer.len() as u16).to_be_bytes());
        out.extend_from_slice(&answer);
        s.write_all(&out).await?;
    }
}
