//! One audit line per relayed request (tracing target `audit`).
//!
//! The line is emitted when the request is completely done: both bodies
//! finished or dropped, so the byte counts are final. It carries the
//! secret's *name* only; secrets, sealed blobs and Authorization values
//! never reach it (the path's query values are removed too, since APIs put
//! tokens there).

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

/// Tracing target of audit lines; route it with `RUST_LOG=audit=info`.
pub const TARGET: &str = "audit";

/// What every request on one intercepted connection shares (built once
/// per connection, so a request's audit record copies no strings).
#[derive(Debug, Clone, Default)]
pub struct ConnectionInfo {
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub original_dst: Option<SocketAddr>,
    pub sni: String,
    pub secret: String,
}

/// Everything known about a request when it starts.
#[derive(Debug, Clone)]
pub struct RequestInfo {
    pub conn: Arc<ConnectionInfo>,
    pub method: http::Method,
    /// Already redacted (see `redact_path`).
    pub path: String,
}

/// A request in flight. Share it (`Arc`) with both body wrappers; the line
/// is written when the last reference goes away.
#[derive(Debug)]
pub struct RequestAudit {
    info: RequestInfo,
    started: Instant,
    wall: SystemTime,
    status: AtomicU16,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    /// Echoes of the secret masked in the response (embedded tokenizer).
    redactions: std::sync::OnceLock<crate::tokenizer::redact::Redactions>,
}

impl RequestAudit {
    pub fn new(info: RequestInfo) -> Self {
        RequestAudit {
            info,
            started: Instant::now(),
            wall: SystemTime::now(),
            status: AtomicU16::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            redactions: std::sync::OnceLock::new(),
        }
    }

    /// What the request is (for warnings about it); never a secret.
    pub fn info(&self) -> &RequestInfo {
        &self.info
    }

    /// Counts the response's masked echoes in this line.
    pub fn set_redactions(&self, r: crate::tokenizer::redact::Redactions) {
        let _ = self.redactions.set(r);
    }

    pub fn set_status(&self, status: u16) {
        self.status.store(status, Ordering::Relaxed);
    }

    /// Request body bytes, client → upstream.
    pub fn add_in(&self, n: u64) {
        self.bytes_in.fetch_add(n, Ordering::Relaxed);
    }

    /// Response body bytes, upstream → client.
    pub fn add_out(&self, n: u64) {
        self.bytes_out.fetch_add(n, Ordering::Relaxed);
    }
}

impl Drop for RequestAudit {
    fn drop(&mut self) {
        let c = &*self.info.conn;
        let status = self.status.load(Ordering::Relaxed);
        tracing::info!(
            target: TARGET,
            time = %Rfc3339(self.wall),
            pid = c.pid,
            process = c.comm.as_deref(),
            original_dst = c.original_dst.map(tracing::field::display),
            sni = %c.sni,
            method = %self.info.method,
            path = %self.info.path,
            // 0: the client went away before a response was produced.
            status,
            bytes_in = self.bytes_in.load(Ordering::Relaxed),
            bytes_out = self.bytes_out.load(Ordering::Relaxed),
            duration_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            secret = %c.secret,
            redacted = self.redactions.get().map_or(0, |r| r.count()),
            "request"
        );
        if let Some(n) = self.redactions.get().map(|r| r.count()).filter(|n| *n > 0) {
            tracing::warn!(target: TARGET, sni = %c.sni, path = %self.info.path, secret = %c.secret, redacted = n,
                "the upstream echoed the secret back; masked it in the response");
        }
    }
}

/// Keeps the path and the query keys, drops the query values:
/// `/v1/x?key=abc&flag` → `/v1/x?key=&flag=`.
pub fn redact_path(path_and_query: &str) -> String {
    match path_and_query.split_once('?') {
        None => path_and_query.to_string(),
        Some((path, query)) => {
            let keys: Vec<String> = query
                .split('&')
                .filter(|kv| !kv.is_empty())
                .map(|kv| format!("{}=", kv.split_once('=').map_or(kv, |(k, _)| k)))
                .collect();
            format!("{path}?{}", keys.join("&"))
        }
    }
}

/// RFC 3339 UTC with milliseconds, without pulling in time's formatting.
pub fn rfc3339(t: SystemTime) -> String {
    Rfc3339(t).to_string()
}

/// Displays as [`rfc3339`] does, straight into the log line.
struct Rfc3339(SystemTime);

impl fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = time::OffsetDateTime::from(self.0);
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        )
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    /// A `MakeWriter` that collects everything written to it.
    #[derive(Clone, Default)]
    pub struct Capture(pub Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
        type Writer = Capture;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    #[test]
    fn redacts_query_values() {
        assert_eq!(redact_path("/v1/messages"), "/v1/messages");
        assert_eq!(redact_path("/x?key=sk-secret&b=2&flag"), "/x?key=&b=&flag=");
        assert_eq!(redact_path("/x?"), "/x?");
    }

    #[test]
    fn audit_line_has_fields_and_no_secret() {
        let cap = Capture::default();
        let sub = tracing_subscriber::fmt()
            .json()
            .with_writer(cap.clone())
            .finish();
        tracing::subscriber::with_default(sub, || {
            let a = RequestAudit::new(RequestInfo {
                conn: Arc::new(ConnectionInfo {
                    pid: Some(42),
                    comm: Some("curl".into()),
                    original_dst: Some("203.0.113.10:443".parse().unwrap()),
                    sni: "api.example.com".into(),
                    secret: "EXAMPLE_SEALED".into(),
                }),
                method: http::Method::POST,
                path: redact_path("/v1/messages?api_key=sk-live-123"),
            });
            a.set_status(200);
            a.add_in(10);
            a.add_out(20);
        });
        let out = String::from_utf8(cap.0.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
        let f = &line["fields"];
        assert_eq!(line["target"], "audit");
        assert_eq!(f["pid"], 42);
        assert_eq!(f["process"], "curl");
        assert_eq!(f["original_dst"], "203.0.113.10:443");
        assert_eq!(f["sni"], "api.example.com");
        assert_eq!(f["method"], "POST");
        assert_eq!(f["path"], "/v1/messages?api_key=");
        assert_eq!(f["status"], 200);
        assert_eq!(f["bytes_in"], 10);
        assert_eq!(f["bytes_out"], 20);
        assert_eq!(f["secret"], "EXAMPLE_SEALED");
        assert!(f["time"].as_str().unwrap().ends_with('Z'));
        assert!(f["duration_ms"].is_number());
        assert!(!out.contains("sk-live-123"));
    }
}
