//! A stub DNS server for the test namespace: A and AAAA from a fixed table,
//! over UDP and TCP.
//!
//! Written by hand (about 150 lines) rather than with hickory: the tests need
//! exactly one behaviour, and a small parser that is easy to read beats a
//! large dependency. It answers like an authoritative server for its names:
//! - a known name: its A / AAAA records (empty NOERROR when it has none of
//!   the asked type, which is what resolvers expect for "no IPv6");
//! - an unknown name: NXDOMAIN;
//! - anything it cannot parse: FORMERR; other opcodes: NOTIMP.
//!
//! The question is echoed byte for byte (resolvers that randomise the case of
//! the name compare it). An EDNS OPT record in the query is ignored; the
//! answer carries none, which RFC 6891 allows.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, RwLock,
    },
    thread,
    time::Duration,
};

pub const TYPE_A: u16 = 1;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_ANY: u16 = 255;
pub const RCODE_NOERROR: u8 = 0;
pub const RCODE_FORMERR: u8 = 1;
pub const RCODE_NXDOMAIN: u8 = 3;
pub const RCODE_NOTIMP: u8 = 4;

pub type Records = HashMap<String, Vec<IpAddr>>;

/// A running stub DNS server; stops on drop.
pub struct StubDns {
    addr: SocketAddr,
    records: Arc<RwLock<Records>>,
    queries: Arc<Mutex<Vec<(String, u16)>>>,
    stop: Arc<AtomicBool>,
}

impl StubDns {
    /// Serves `records` on `bind` (UDP and TCP), e.g. 203.0.113.53:53 inside
    /// a [`crate::NetNs`]. Names are matched case-insensitively, with or
    /// without the trailing dot.
    pub fn start(bind: SocketAddr, records: Records) -> StubDns {
        let records = Arc::new(RwLock::new(normalize(records)));
        let queries = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let udp = UdpSocket::bind(bind).unwrap_or_else(|e| panic!("bind udp {bind}: {e}"));
        let addr = udp.local_addr().unwrap();
        let tcp = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind tcp {addr}: {e}"));
        // A read timeout lets the UDP thread notice `stop`.
        udp.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();

        let (r, q, s) = (records.clone(), queries.clone(), stop.clone());
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !s.load(Ordering::Relaxed) {
                let Ok((n, peer)) = udp.recv_from(&mut buf) else {
                    continue;
                };
                if let Some(reply) = answer(&buf[..n], &r, &q, 512) {
                    let _ = udp.send_to(&reply, peer);
                }
            }
        });
        let (r, q, s) = (records.clone(), queries.clone(), stop.clone());
        thread::spawn(move || {
            for conn in tcp.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (r, q) = (r.clone(), q.clone());
                thread::spawn(move || serve_tcp(conn, &r, &q));
            }
        });
        StubDns {
            addr,
            records,
            queries,
            stop,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Adds or replaces a name's records while running.
    pub fn set(&self, name: &str, ips: Vec<IpAddr>) {
        self.records.write().unwrap().insert(norm(name), ips);
    }

    /// Every question received so far: (name as asked, qtype).
    pub fn queries(&self) -> Vec<(String, u16)> {
        self.queries.lock().unwrap().clone()
    }
}

impl Drop for StubDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

fn norm(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn normalize(records: Records) -> Records {
    records.into_iter().map(|(k, v)| (norm(&k), v)).collect()
}

/// DNS over TCP: each message is preceded by its 16-bit length.
fn serve_tcp(mut conn: TcpStream, records: &RwLock<Records>, queries: &Mutex<Vec<(String, u16)>>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    loop {
        let mut len = [0u8; 2];
        if conn.read_exact(&mut len).is_err() {
            return;
        }
        let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
        if conn.read_exact(&mut msg).is_err() {
            return;
        }
        let Some(reply) = answer(&msg, records, queries, 65535) else {
            return;
        };
        let mut out = (reply.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&reply);
        if conn.write_all(&out).is_err() {
            return;
        }
    }
}

/// A parsed question: the name (dotted, as asked), its type, and the raw
/// question bytes to echo.
struct Question<'a> {
    name: String,
    qtype: u16,
    raw: &'a [u8],
}

/// Reads the single question that follows the 12-byte header. Compression
/// pointers are not expected in a question and are refused.
fn parse_question(msg: &[u8]) -> Option<Question<'_>> {
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *msg.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        if len & 0xC0 != 0 {
            return None;
        }
        labels.push(String::from_utf8_lossy(msg.get(i..i + len)?).into_owned());
        i += len;
    }
    let qtype = u16::from_be_bytes([*msg.get(i)?, *msg.get(i + 1)?]);
    let _qclass = msg.get(i + 2..i + 4)?;
    Some(Question {
        name: labels.join("."),
        qtype,
        raw: &msg[12..i + 4],
    })
}

/// Builds the reply to `msg`, or None when it is too short to answer at all.
fn answer(
    msg: &[u8],
    records: &RwLock<Records>,
    queries: &Mutex<Vec<(String, u16)>>,
    max_len: usize,
) -> Option<Vec<u8>> {
    if msg.len() < 12 || msg[2] & 0x80 != 0 {
        return None; // not a query
    }
    let opcode = (msg[2] >> 3) & 0x0F;
    let rd = msg[2] & 0x01;
    let qdcount = u16::from_be_bytes([msg[4], msg[5]]);
    let header = |rcode: u8, qd: u16, an: u16| {
        let mut h = vec![msg[0], msg[1]];
        // QR=1, opcode echoed, AA=1, RD echoed; RA=1, rcode.
        h.push(0x80 | (opcode << 3) | 0x04 | rd);
        h.push(0x80 | rcode);
        for n in [qd, an, 0, 0] {
            h.extend_from_slice(&n.to_be_bytes());
        }
        h
    };
    if opcode != 0 {
        return Some(header(RCODE_NOTIMP, 0, 0));
    }
    let q = match (qdcount, parse_question(msg)) {
        (1, Some(q)) => q,
        _ => return Some(header(RCODE_FORMERR, 0, 0)),
    };
    queries.lock().unwrap().push((q.name.clone(), q.qtype));
    let Some(ips) = records.read().unwrap().get(&norm(&q.name)).cloned() else {
        let mut out = header(RCODE_NXDOMAIN, 1, 0);
        out.extend_from_slice(q.raw);
        return Some(out);
    };
    let mut answers = Vec::new();
    for ip in ips {
        let (rtype, rdata) = match ip {
            IpAddr::V4(v4) => (TYPE_A, v4.octets().to_vec()),
            IpAddr::V6(v6) => (TYPE_AAAA, v6.octets().to_vec()),
        };
        if q.qtype != rtype && q.qtype != TYPE_ANY {
            continue;
        }
        let mut rr = vec![0xC0, 0x0C]; // pointer to the question's name
        rr.extend_from_slice(&rtype.to_be_bytes());
        rr.extend_from_slice(&1u16.to_be_bytes()); // class IN
        rr.extend_from_slice(&60u32.to_be_bytes()); // TTL
        rr.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        rr.extend_from_slice(&rdata);
        answers.push(rr);
    }
    let mut out = header(RCODE_NOERROR, 1, answers.len() as u16);
    out.extend_from_slice(q.raw);
    for rr in &answers {
        out.extend_from_slice(rr);
    }
    if out.len() > max_len {
        // Truncated: header and question only, TC set, so the client retries over TCP.
        out = header(RCODE_NOERROR, 1, 0);
        out[2] |= 0x02;
        out.extend_from_slice(q.raw);
    }
    Some(out)
}

/// A raw query for `name`/`qtype` (id 0x1234, RD set), optionally with an
/// EDNS OPT record, for tests that talk to the server directly.
pub fn build_query(name: &str, qtype: u16, edns: bool) -> Vec<u8> {
    let mut m = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, edns as u8];
    for label in name.trim_end_matches('.').split('.') {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    if edns {
        // Root name, type OPT, UDP size 1232, ext-rcode/version/flags 0, no options.
        m.extend_from_slice(&[0, 0, 41, 0x04, 0xD0, 0, 0, 0, 0, 0, 0]);
    }
    m
}

/// A parsed reply: rcode, flags byte 2, the echoed question bytes, and the
/// addresses in its answer section.
#[derive(Debug)]
pub struct Reply {
    pub id: u16,
    pub flags: [u8; 2],
    pub rcode: u8,
    pub question: Vec<u8>,
    pub addrs: Vec<IpAddr>,
    pub arcount: u16,
}

/// Parses a reply from this server (answers use a pointer to the question).
pub fn parse_reply(msg: &[u8]) -> Reply {
    let q = parse_question(msg).expect("reply has a question");
    let ancount = u16::from_be_bytes([msg[6], msg[7]]);
    let mut i = 12 + q.raw.len();
    let mut addrs = Vec::new();
    for _ in 0..ancount {
        assert_eq!(
            &msg[i..i + 2],
            &[0xC0, 0x0C],
            "answer name is a pointer to the question"
        );
        let rtype = u16::from_be_bytes([msg[i + 2], msg[i + 3]]);
        let rdlen = u16::from_be_bytes([msg[i + 10], msg[i + 11]]) as usize;
        let rdata = &msg[i + 12..i + 12 + rdlen];
        addrs.push(match rtype {
            TYPE_A => IpAddr::from(<[u8; 4]>::try_from(rdata).unwrap()),
            TYPE_AAAA => IpAddr::from(<[u8; 16]>::try_from(rdata).unwrap()),
            t => panic!("unexpected record type {t}"),
        });
        i += 12 + rdlen;
    }
    Reply {
        id: u16::from_be_bytes([msg[0], msg[1]]),
        flags: [msg[2], msg[3]],
        rcode: msg[3] & 0x0F,
        question: q.raw.to_vec(),
        addrs,
        arcount: u16::from_be_bytes([msg[10], msg[11]]),
    }
}
