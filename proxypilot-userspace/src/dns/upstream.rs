//! Asking the upstream resolvers (`--dns`, else the host's resolv.conf)
//! from proxypilot's own cgroup, outside the sandbox: UDP first, TCP when
//! the answer is truncated, each server in turn until one answers.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query},
    rr::{Name, RData, RecordType},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
    time::{timeout, Instant},
};

use super::message::Question;

/// How long one server gets to answer.
const PER_SERVER: Duration = Duration::from_secs(2);
/// How long a query may wait upstream in all.
const OVERALL: Duration = Duration::from_secs(5);

/// Why no upstream answered.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no upstream DNS server is configured (give --dns ADDR)")]
    NoServers,
    #[error("no upstream DNS server answered ({tried} tried; last: {last})")]
    NoAnswer { tried: usize, last: String },
}

/// The servers proxypilot asks, port 53.
#[derive(Debug, Clone)]
pub struct Upstreams {
    servers: Vec<SocketAddr>,
}

impl Upstreams {
    pub fn new(servers: &[IpAddr]) -> Self {
        Upstreams {
            servers: servers.iter().map(|ip| SocketAddr::new(*ip, 53)).collect(),
        }
    }

    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    /// The upstream answer to `q`, checked to be a reply to it.
    pub async fn ask(&self, q: &Question) -> Result<Message, UpstreamError> {
        if self.servers.is_empty() {
            return Err(UpstreamError::NoServers);
        }
        let deadline = Instant::now() + OVERALL;
        let mut last = String::new();
        for server in &self.servers {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match timeout(left.min(PER_SERVER), ask_one(*server, q)).await {
                Ok(Ok(m)) => return Ok(m),
                Ok(Err(e)) => last = format!("{server}: {e}"),
                Err(_) => last = format!("{server}: no answer in {PER_SERVER:?}"),
            }
        }
        Err(UpstreamError::NoAnswer {
            tried: self.servers.len(),
            last,
        })
    }
}

impl Upstreams {
    /// The addresses of `host` (its A and AAAA records, CNAMEs followed by
    /// the server) with `port`: what the pass-through relay dials, so that
    /// it dials what the sandbox's DNS was told, from the same servers.
    pub async fn lookup_host(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        let bad = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, why);
        let name = Name::from_ascii(host).map_err(|e| bad(format!("{host}: {e}")))?;
        let mut out = Vec::new();
        let mut last_error = None;
        for qtype in [RecordType::A, RecordType::AAAA] {
            let mut msg = Message::new(0, MessageType::Query, OpCode::Query);
            msg.metadata.recursion_desired = true;
            msg.add_query(Query::query(name.clone(), qtype));
            let bytes = msg.to_vec().map_err(|e| bad(e.to_string()))?;
            let q = Question::parse(&bytes).map_err(|e| bad(format!("{host}: {e}")))?;
            match self.ask(&q).await {
                Ok(answer) => out.extend(answer.answers.iter().filter_map(|r| match &r.data {
                    RData::A(a) => Some(SocketAddr::new(IpAddr::V4(a.0), port)),
                    RData::AAAA(a) => Some(SocketAddr::new(IpAddr::V6(a.0), port)),
                    _ => None,
                })),
                Err(e) => last_error = Some(e),
            }
        }
        match (out.is_empty(), last_error) {
            (true, Some(e)) => Err(std::io::Error::other(e.to_string())),
            _ => Ok(out),
        }
    }
}

async fn ask_one(server: SocketAddr, q: &Question) -> std::io::Result<Message> {
    let id: u16 = rand::random();
    let query = q.upstream_query(id);
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(local).await?;
    sock.connect(server).await?;
    sock.send(&query).await?;
    let mut buf = vec![0u8; 65_535];
    let answer = loop {
        let n = sock.recv(&mut buf).await?;
        // Anything that is not the reply (late, spoofed) is ignored.
        if let Some(m) = q.matches_upstream(id, &buf[..n]) {
            break m;
        }
    };
    if !answer.metadata.truncation {
        return Ok(answer);
    }
    ask_tcp(server, q).await
}

async fn ask_tcp(server: SocketAddr, q: &Question) -> std::io::Result<Message> {
    let id: u16 = rand::random();
    let query = q.upstream_query(id);
    let mut s = TcpStream::connect(server).await?;
    let mut framed = Vec::with_capacity(query.len() + 2);
    framed.extend_from_slice(&(query.len() as u16).to_be_bytes());
    framed.extend_from_slice(&query);
    s.write_all(&framed).await?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut buf).await?;
    q.matches_upstream(id, &buf).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the TCP answer does not match the query",
        )
    })
}

/// The `nameserver` lines of a resolv.conf.
pub fn resolv_conf_nameservers(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|ip| ip.trim().split('%').next()?.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nameservers() {
        let text = "# x\nsearch example\nnameserver 203.0.113.53\nnameserver fe80::1%eth0\nnameserver junk\n";
        assert_eq!(
            resolv_conf_nameservers(text),
            vec![
                "203.0.113.53".parse::<IpAddr>().unwrap(),
                "fe80::1".parse().unwrap()
            ]
        );
    }
}
