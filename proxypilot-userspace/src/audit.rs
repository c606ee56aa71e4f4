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
    /// The secret's name (its variable); logged as `secret=`.
    pub secret_name: String,
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
    /// What the host's `--permit`s decided (unset: refused before them).
    rules: std::sync::OnceLock<RuleOutcome>,
    /// The age of the minted short-lived token used (minting targets).
    minted_age: std::sync::OnceLock<std::time::Duration>,
}

/// What a host's rule set decided for a request, as the audit line shows
/// it (the rules themselves live in `relay::rules`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleOutcome {
    /// `unrestricted`, `permitted` or `refused`.
    pub decision: &'static str,
    /// The permit that matched, or which host's permits refused it.
    pub rule: String,
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
            rules: std::sync::OnceLock::new(),
            minted_age: std::sync::OnceLock::new(),
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

    /// The response status so far (0: none yet).
    pub fn status(&self) -> u16 {
        self.status.load(Ordering::Relaxed)
    }

    /// Body bytes so far: (to the API, to the client).
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.bytes_in.load(Ordering::Relaxed),
            self.bytes_out.load(Ordering::Relaxed),
        )
    }

    pub fn elapsed(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// What the permits decided (`unrestricted`, `permitted`, `refused`),
    /// or "" when the request was refused before they were asked.
    pub fn rule_decision(&self) -> &'static str {
        self.rules.get().map_or("", |d| d.decision)
    }

    /// Records what the host's rule set decided, for this line.
    pub fn set_rule_decision(&self, outcome: RuleOutcome) {
        let _ = self.rules.set(outcome);
    }

    /// Records that a minted token this old was used: the line then names
    /// its age and, as `parent_secret`, the secret that minted it.
    pub fn set_minted_age(&self, age: std::time::Duration) {
        let _ = self.minted_age.set(age);
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
            secret = %c.secret_name,
            redacted = self.redactions.get().map_or(0, |r| r.count()),
            // unrestricted, permitted or refused; "" when refused earlier.
            decision = %self.rule_decision(),
            rule = %self.rules.get().map_or("", |d| d.rule.as_str()),
            token_age_s = self.minted_age.get().map(|a| a.as_secs()),
            parent_secret = self.minted_age.get().map(|_| c.secret_name.as_str()),
            "request"
        );
        if let Some(n) = self.redactions.get().map(|r| r.count()).filter(|n| *n > 0) {
            tracing::warn!(target: TARGET, sni = %c.sni, path = %self.info.path, secret = %c.secret_name, redacted = n,
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

/// RFC 3339 UTC with milliseconds, without pulling in time's formatting,
/// written straight into the log line.
pub(crate) struct Rfc3339(pub SystemTime);

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
mod tests {
    use super::*;

    #[test]
    fn redacts_query_values() {
        assert_eq!(redact_path("/v1/messages"), "/v1/messages");
        assert_eq!(redact_path("/x?key=sk-secret&b=2&flag"), "/x?key=&b=&flag=");
        assert_eq!(redact_path("/x?"), "/x?");
    }
}
