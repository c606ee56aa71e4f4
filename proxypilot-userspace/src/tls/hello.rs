//! Reads a TLS ClientHello off a socket without losing a byte.
//!
//! rustls' `LazyConfigAcceptor` would consume the ClientHello, but a
//! pass-through connection must replay it verbatim to the real server. So
//! the record(s) holding the ClientHello are buffered here, SNI and ALPN are
//! parsed from the buffer, and the caller replays the buffer (see
//! `rewind::Rewind`) into rustls or the upstream socket.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// TLS plaintext records carry at most 2^14 bytes.
const MAX_RECORD: usize = 16 * 1024;
/// A ClientHello may span records (post-quantum key shares make it larger
/// than one record in some clients); bound the total we will buffer.
pub const MAX_HELLO: usize = 64 * 1024;

const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;

#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error("client closed the connection before sending a complete TLS ClientHello")]
    Eof,
    #[error("not TLS: the first bytes are not a TLS handshake record (plain HTTP or another protocol on the intercepted port?)")]
    NotTls,
    #[error("malformed TLS ClientHello: {0}")]
    Malformed(&'static str),
    #[error("TLS ClientHello larger than {MAX_HELLO} bytes")]
    TooLarge,
    #[error("reading the ClientHello: {0}")]
    Io(#[from] std::io::Error),
}

/// What the relay needs from a ClientHello, plus the raw bytes to replay.
#[derive(Debug, Clone)]
pub struct ClientHello {
    /// The server_name (host_name) the client asked for, lowercased and
    /// without a trailing dot; `None` when the extension is absent.
    pub sni: Option<String>,
    /// ALPN protocols offered, in client order.
    pub alpn: Vec<Vec<u8>>,
    /// Every byte read from the socket so far (the ClientHello record(s)
    /// and anything after them), to be replayed first.
    pub raw: Bytes,
}

/// Reads whole TLS records until the ClientHello handshake message is
/// complete. Callers wrap this in the handshake timeout.
pub async fn read_client_hello<R: AsyncRead + Unpin>(
    rd: &mut R,
) -> Result<ClientHello, HelloError> {
    let mut raw = BytesMut::with_capacity(2048);
    let mut handshake = Vec::new(); // handshake payload gathered across records
    let mut pos = 0; // start of the next unread record in `raw`
    loop {
        fill(rd, &mut raw, pos + 5).await?;
        let hdr = &raw[pos..pos + 5];
        if hdr[0] != CONTENT_HANDSHAKE || hdr[1] != 3 {
            return Err(if pos == 0 {
                HelloError::NotTls
            } else {
                HelloError::Malformed("ClientHello interrupted by a non-handshake record")
            });
        }
        let len = u16::from_be_bytes([hdr[3], hdr[4]]) as usize;
        if len == 0 || len > MAX_RECORD {
            return Err(HelloError::Malformed("bad record length"));
        }
        if pos + 5 + len > MAX_HELLO {
            return Err(HelloError::TooLarge);
        }
        fill(rd, &mut raw, pos + 5 + len).await?;
        handshake.extend_from_slice(&raw[pos + 5..pos + 5 + len]);
        pos += 5 + len;
        if handshake.len() >= 4 {
            if handshake[0] != HANDSHAKE_CLIENT_HELLO {
                return Err(HelloError::Malformed(
                    "first handshake message is not a ClientHello",
                ));
            }
            let body_len =
                u32::from_be_bytes([0, handshake[1], handshake[2], handshake[3]]) as usize;
            if body_len > MAX_HELLO {
                return Err(HelloError::TooLarge);
            }
            if handshake.len() >= 4 + body_len {
                let (sni, alpn) = parse_client_hello(&handshake[4..4 + body_len])?;
                return Ok(ClientHello {
                    sni,
                    alpn,
                    raw: raw.freeze(),
                });
            }
        }
    }
}

/// Reads until `buf` holds at least `want` bytes.
async fn fill<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    want: usize,
) -> Result<(), HelloError> {
    while buf.len() < want {
        buf.reserve(want - buf.len());
        if rd.read_buf(buf).await? == 0 {
            return Err(HelloError::Eof);
        }
    }
    Ok(())
}

/// A bounds-checked cursor: every read either succeeds or is `Malformed`.
struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], HelloError> {
        if self.buf.len() < n {
            return Err(HelloError::Malformed(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, HelloError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, HelloError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = self.u8(what)? as usize;
        self.take(n, what)
    }
    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = self.u16(what)? as usize;
        self.take(n, what)
    }
    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// Parses a ClientHello body (after the 4-byte handshake header).
pub fn parse_client_hello(body: &[u8]) -> Result<(Option<String>, Vec<Vec<u8>>), HelloError> {
    let mut c = Cursor { buf: body };
    c.take(2, "truncated version")?;
    c.take(32, "truncated random")?;
    let session_id = c.vec8("truncated session id")?;
    if session_id.len() > 32 {
        return Err(HelloError::Malformed("session id longer than 32 bytes"));
    }
    let suites = c.vec16("truncated cipher suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(HelloError::Malformed("bad cipher suite list"));
    }
    c.vec8("truncated compression methods")?;
    let mut sni = None;
    let mut alpn = Vec::new();
    if c.is_empty() {
        return Ok((sni, alpn)); // no extensions at all (very old clients)
    }
    let mut exts = Cursor {
        buf: c.vec16("truncated extensions")?,
    };
    let mut seen = std::collections::HashSet::new();
    while !exts.is_empty() {
        let ty = exts.u16("truncated extension type")?;
        let data = exts.vec16("truncated extension")?;
        if !seen.insert(ty) {
            return Err(HelloError::Malformed("duplicate extension"));
        }
        match ty {
            EXT_SERVER_NAME => sni = parse_sni(data)?,
            EXT_ALPN => alpn = parse_alpn(data)?,
            _ => {}
        }
    }
    Ok((sni, alpn))
}

fn parse_sni(data: &[u8]) -> Result<Option<String>, HelloError> {
    let mut c = Cursor { buf: data };
    let mut list = Cursor {
        buf: c.vec16("truncated server_name list")?,
    };
    let mut host = None;
    while !list.is_empty() {
        let name_type = list.u8("truncated server_name type")?;
        let name = list.vec16("truncated server_name")?;
        if name_type == 0 {
            if host.is_some() {
                return Err(HelloError::Malformed(
                    "more than one host_name in server_name",
                ));
            }
            host = Some(validate_host(name)?);
        }
    }
    Ok(host)
}

fn validate_host(name: &[u8]) -> Result<String, HelloError> {
    let s =
        std::str::from_utf8(name).map_err(|_| HelloError::Malformed("server_name is not ASCII"))?;
    let s = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !ok {
        return Err(HelloError::Malformed("server_name is not a valid DNS name"));
    }
    Ok(s)
}

fn parse_alpn(data: &[u8]) -> Result<Vec<Vec<u8>>, HelloError> {
    let mut c = Cursor { buf: data };
    let mut list = Cursor {
        buf: c.vec16("truncated ALPN list")?,
    };
    let mut out = Vec::new();
    while !list.is_empty() {
        let p = list.vec8("truncated ALPN protocol")?;
        if p.is_empty() {
            return Err(HelloError::Malformed("empty ALPN protocol"));
        }
        out.push(p.to_vec());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a ClientHello handshake message (with header) by hand.
    fn hello(sni: Option<&str>, alpn: &[&str], pad: usize) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]);
        body.extend_from_slice(&[1, 0]);
        let mut exts = Vec::new();
        if let Some(h) = sni {
            let mut entry = vec![0];
            entry.extend_from_slice(&(h.len() as u16).to_be_bytes());
            entry.extend_from_slice(h.as_bytes());
            let mut ext = (entry.len() as u16).to_be_bytes().to_vec();
            ext.extend_from_slice(&entry);
            exts.extend_from_slice(&0u16.to_be_bytes());
            exts.extend_from_slice(&(ext.len() as u16).to_be_bytes());
            exts.extend_from_slice(&ext);
        }
        if !alpn.is_empty() {
            let mut list = Vec::new();
            for p in alpn {
                list.push(p.len() as u8);
                list.extend_from_slice(p.as_bytes());
            }
            let mut ext = (list.len() as u16).to_be_bytes().to_vec();
            ext.extend_from_slice(&list);
            exts.extend_from_slice(&16u16.to_be_bytes());
            exts.extend_from_slice(&(ext.len() as u16).to_be_bytes());
            exts.extend_from_slice(&ext);
        }
        if pad > 0 {
            exts.extend_from_slice(&21u16.to_be_bytes());
            exts.extend_from_slice(&(pad as u16).to_be_bytes());
            exts.resize(exts.len() + pad, 0);
        }
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut msg = vec![1];
        msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        msg.extend_from_slice(&body);
        msg
    }

    fn records(msg: &[u8], chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for c in msg.chunks(chunk) {
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&(c.len() as u16).to_be_bytes());
            out.extend_from_slice(c);
        }
        out
    }

    async fn read(bytes: &[u8]) -> Result<ClientHello, HelloError> {
        let mut rd = bytes;
        read_client_hello(&mut rd).await
    }

    #[tokio::test]
    async fn parses_sni_and_alpn_and_keeps_bytes() {
        let mut wire = records(
            &hello(Some("API.Example.com."), &["h2", "http/1.1"], 0),
            16384,
        );
        wire.extend_from_slice(b"trailing");
        let h = read(&wire).await.unwrap();
        assert_eq!(h.sni.as_deref(), Some("api.example.com"));
        assert_eq!(h.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert!(wire.starts_with(&h.raw));
    }

    #[tokio::test]
    async fn multi_record_hello() {
        let wire = records(&hello(Some("a.test"), &[], 20000), 1000);
        let h = read(&wire).await.unwrap();
        assert_eq!(h.sni.as_deref(), Some("a.test"));
        assert_eq!(&h.raw[..], &wire[..]);
    }

    #[tokio::test]
    async fn no_sni_is_none() {
        let wire = records(&hello(None, &["h2"], 0), 16384);
        assert_eq!(read(&wire).await.unwrap().sni, None);
    }

    #[tokio::test]
    async fn rejects_non_tls_and_oversize() {
        assert!(matches!(
            read(b"GET / HTTP/1.1\r\n\r\n").await,
            Err(HelloError::NotTls)
        ));
        assert!(matches!(read(b"").await, Err(HelloError::Eof)));
        // A handshake header claiming 16 MiB is refused before reading it.
        let wire = records(&[1, 0xff, 0xff, 0xff, 0, 0], 16384);
        assert!(matches!(read(&wire).await, Err(HelloError::TooLarge)));
        let bad_name = records(&hello(Some("a b.test"), &[], 0), 16384);
        assert!(matches!(
            read(&bad_name).await,
            Err(HelloError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn truncations_and_corruptions_never_panic() {
        let msg = hello(Some("api.example.com"), &["h2"], 10);
        let wire = records(&msg, 16384);
        for cut in 0..wire.len() {
            assert!(read(&wire[..cut]).await.is_err(), "cut at {cut}");
        }
        // Flip every byte of the body in turn: must error or parse, not panic.
        for i in 0..msg.len() {
            let mut m = msg.clone();
            m[i] ^= 0xff;
            let _ = parse_client_hello(&m[4..]);
            let _ = read(&records(&m, 16384)).await;
        }
    }

    #[tokio::test]
    async fn real_rustls_client_hello() {
        crate::tls::ensure_crypto_provider();
        let mut cfg = rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let mut conn = rustls::ClientConnection::new(
            std::sync::Arc::new(cfg),
            "api.example.com".try_into().unwrap(),
        )
        .unwrap();
        let mut wire = Vec::new();
        conn.write_tls(&mut wire).unwrap();
        let h = read(&wire).await.unwrap();
        assert_eq!(h.sni.as_deref(), Some("api.example.com"));
        assert_eq!(h.alpn, vec![b"h2".to_vec()]);
    }
}
