//! Prometheus metrics, served on `--metrics-listen ADDR` (off by default)
//! in the OpenMetrics text format.
//!
//! Every label value comes from a fixed set, never from what the sandbox
//! sends: `host` is a configured intercepted host (or `other`), `method` a
//! standard method (or `other`), `status` a status code (hyper only
//! produces 100-999), `decision` and `kind` names defined here.
//!
//! The listener must be out of the sandbox's reach: the kernel lets the
//! sandbox connect only to its allowlist, and [`check_unreachable`] refuses
//! an address the allowlist would let it dial.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use super::errors::{ForwardError, RelayError};
use super::{LiveRelay, Relay};
use crate::audit::RequestAudit;
use crate::kernel::AllowRule;

/// Label for anything outside a fixed set.
const OTHER: &str = "other";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    host: String,
    method: &'static str,
    status: u16,
    decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabels {
    host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    host: String,
    /// `in`: request bodies (sandbox → API); `out`: responses.
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    /// `in`: sandbox → host; `out`: host → sandbox.
    direction: &'static str,
}

/// Why something was refused, as the `kind` label of
/// `proxypilot_denials_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denial {
    /// A connect or send the kernel programs refused.
    Kernel,
    /// A ClientHello whose server name is neither intercepted nor allowed.
    Sni,
    /// A request whose Host / `:authority` is not the connection's (421).
    Host,
    /// A request no `--permit` matched.
    Rule,
    /// Over `--rate-limit`.
    Rate,
    /// Over `--max-request-body`, or a header line over 8 KiB.
    Size,
    /// A connection closed at accept: not redirected by the kernel, over
    /// `--max-connections` or the process's share, or out of descriptors.
    Connection,
    /// A unix socket connect or send the kernel programs refused.
    Unix,
}

impl Denial {
    fn label(self) -> &'static str {
        match self {
            Denial::Kernel => "kernel",
            Denial::Sni => "sni",
            Denial::Host => "host",
            Denial::Rule => "rule",
            Denial::Rate => "rate",
            Denial::Size => "size",
            Denial::Connection => "connection",
            Denial::Unix => "unix",
        }
    }
}

type Histograms = Family<HostLabels, Histogram, fn() -> Histogram>;

/// The relay's metrics: one set per sidecar, carried from relay to relay
/// across reloads.
pub struct Metrics {
    registry: Registry,
    /// The intercepted hosts: the only `host` label values besides `other`.
    hosts: RwLock<Vec<String>>,
    requests: Family<RequestLabels, Counter>,
    denials: Family<KindLabels, Counter>,
    upstream_errors: Family<KindLabels, Counter>,
    duration: Histograms,
    tokenizer_latency: Histograms,
    bytes: Family<BytesLabels, Counter>,
    open_connections: Gauge,
    leaf_certificates_cached: Gauge,
    passthrough: Family<ResultLabels, Counter>,
    passthrough_bytes: Family<DirectionLabels, Counter>,
    reloads: Family<ResultLabels, Counter>,
    last_reload_success: Gauge,
    last_reload_seconds: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("hosts", &self.hosts)
            .finish_non_exhaustive()
    }
}

/// 5 ms to about 80 s: API calls range from a cached GET to a long
/// non-streaming completion.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

impl Metrics {
    pub fn new(hosts: impl IntoIterator<Item = String>) -> Metrics {
        let mut registry = Registry::with_prefix("proxypilot");
        let m = Metrics {
            hosts: RwLock::new(hosts.into_iter().collect()),
            requests: Family::default(),
            denials: Family::default(),
            upstream_errors: Family::default(),
            duration: Family::new_with_constructor(seconds_histogram),
            tokenizer_latency: Family::new_with_constructor(seconds_histogram),
            bytes: Family::default(),
            open_connections: Gauge::default(),
            leaf_certificates_cached: Gauge::default(),
            passthrough: Family::default(),
            passthrough_bytes: Family::default(),
            reloads: Family::default(),
            last_reload_success: Gauge::default(),
            last_reload_seconds: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests to intercepted hosts, by host, method, status and what the permits decided",
            m.requests.clone(),
        );
        registry.register(
            "denials",
            "Refusals by kind: kernel, sni, host, rule, rate, size",
            m.denials.clone(),
        );
        registry.register(
            "upstream_errors",
            "Requests the tokenizer or the API failed, by kind: unreachable, timeout, failed, engine",
            m.upstream_errors.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from a request's arrival until both its bodies are done, by host",
            m.duration.clone(),
        );
        registry.register(
            "tokenizer_response_seconds",
            "Time until the tokenizer (remote or embedded) answered with a response head, by host",
            m.tokenizer_latency.clone(),
        );
        registry.register(
            "body_bytes",
            "Body bytes relayed, by host and direction (in: to the API, out: to the sandbox)",
            m.bytes.clone(),
        );
        registry.register(
            "open_connections",
            "Connections from the sandbox being handled now",
            m.open_connections.clone(),
        );
        registry.register(
            "leaf_certificates_cached",
            "Leaf certificates in the cache",
            m.leaf_certificates_cached.clone(),
        );
        registry.register(
            "passthrough_connections",
            "Pass-through connections (relayed unchanged) that ended, by result: ok, failed",
            m.passthrough.clone(),
        );
        registry.register(
            "passthrough_bytes",
            "Bytes relayed unchanged on pass-through connections, by direction \
             (in: to the host, out: to the sandbox)",
            m.passthrough_bytes.clone(),
        );
        registry.register(
            "reloads",
            "Configuration reloads (SIGHUP), by result: ok, refused",
            m.reloads.clone(),
        );
        registry.register(
            "last_reload_success",
            "1 if the last reload took effect, 0 if it was refused (1 before any)",
            m.last_reload_success.clone(),
        );
        registry.register(
            "last_reload_timestamp_seconds",
            "When the last reload was tried, in Unix seconds (0: never)",
            m.last_reload_seconds.clone(),
        );
        m.last_reload_success.set(1);
        Metrics { registry, ..m }
    }

    /// `sni` if it is an intercepted host, else `other`.
    fn host(&self, sni: &str) -> String {
        let hosts = self.hosts.read().unwrap_or_else(|p| p.into_inner());
        match hosts.iter().find(|h| *h == sni) {
            Some(h) => h.clone(),
            None => OTHER.to_string(),
        }
    }

    /// The intercepted hosts after a reload. Series of a host no longer
    /// intercepted stay (counters never go back), and get no new counts.
    pub fn set_hosts(&self, hosts: impl IntoIterator<Item = String>) {
        *self.hosts.write().unwrap_or_else(|p| p.into_inner()) = hosts.into_iter().collect();
    }

    /// Counts a reload that took effect (`ok`) or was refused.
    pub fn reloaded(&self, ok: bool) {
        let result = if ok { "ok" } else { "refused" };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
        self.last_reload_success.set(i64::from(ok));
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.last_reload_seconds.set(now as i64);
    }

    /// Counts a pass-through connection that ended, with the bytes each
    /// way (`None`: it failed, bytes unknown).
    pub fn passed_through(&self, bytes: Option<(u64, u64)>) {
        let result = if bytes.is_some() { "ok" } else { "failed" };
        self.passthrough
            .get_or_create(&ResultLabels { result })
            .inc();
        if let Some((up, down)) = bytes {
            for (direction, n) in [("in", up), ("out", down)] {
                self.passthrough_bytes
                    .get_or_create(&DirectionLabels { direction })
                    .inc_by(n);
            }
        }
    }

    pub fn denied(&self, kind: Denial) {
        self.denials
            .get_or_create(&KindLabels { kind: kind.label() })
            .inc();
    }

    /// Counts a request the relay answered with an error.
    pub fn relay_error(&self, e: &RelayError) {
        let upstream = |kind| {
            self.upstream_errors
                .get_or_create(&KindLabels { kind })
                .inc();
        };
        match e {
            RelayError::Misdirected { .. } => self.denied(Denial::Host),
            RelayError::NotPermitted(_) => self.denied(Denial::Rule),
            RelayError::RateLimited { .. } => self.denied(Denial::Rate),
            RelayError::BodyTooLarge { .. } => self.denied(Denial::Size),
            RelayError::NoLongerIntercepted { .. } => self.denied(Denial::Sni),
            RelayError::MissingHost | RelayError::BadRequest(_) => {}
            RelayError::HeaderFieldTooLarge { .. } => self.denied(Denial::Size),
            RelayError::Forward(ForwardError::Unreachable { .. }) => upstream("unreachable"),
            RelayError::Forward(ForwardError::Timeout { .. }) => upstream("timeout"),
            RelayError::Forward(ForwardError::Failed { .. }) => upstream("failed"),
            RelayError::Forward(ForwardError::Engine { .. }) => upstream("engine"),
            RelayError::UpgradeNotRelayed { .. } => upstream("upgrade_not_relayed"),
            RelayError::Mint { .. } => upstream("mint"),
        }
    }

    pub fn tokenizer_answered(&self, sni: &str, after: Duration) {
        self.tokenizer_latency
            .get_or_create(&HostLabels {
                host: self.host(sni),
            })
            .observe(after.as_secs_f64());
    }

    /// Counts a finished request (both bodies done or dropped).
    pub fn request_done(&self, a: &RequestAudit) {
        let info = a.info();
        let host = self.host(&info.conn.sni);
        self.requests
            .get_or_create(&RequestLabels {
                host: host.clone(),
                method: method_label(&info.method),
                status: a.status(),
                decision: match a.rule_decision() {
                    "" => "none",
                    d => d,
                },
            })
            .inc();
        self.duration
            .get_or_create(&HostLabels { host: host.clone() })
            .observe(a.elapsed().as_secs_f64());
        let (bytes_in, bytes_out) = a.bytes();
        for (direction, n) in [("in", bytes_in), ("out", bytes_out)] {
            self.bytes
                .get_or_create(&BytesLabels {
                    host: host.clone(),
                    direction,
                })
                .inc_by(n);
        }
    }

    /// The exposition, with the gauges read from `relay` now.
    pub fn render(&self, relay: &Relay) -> String {
        let stats = relay.stats();
        self.open_connections.set(stats.connections_open as i64);
        self.leaf_certificates_cached
            .set(stats.leaf_certificates_cached as i64);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// The method's name if it is a standard one, else `other` (a sandbox
/// can send any token as a method).
fn method_label(m: &Method) -> &'static str {
    const STANDARD: [&str; 9] = [
        "GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "CONNECT", "TRACE",
    ];
    STANDARD
        .into_iter()
        .find(|s| *s == m.as_str())
        .unwrap_or(OTHER)
}

/// Refuses a metrics address the sandbox could dial: one an allowed
/// destination (TCP: `--allow-cidr`, `--dns`, the info port) covers with
/// its port. An unspecified address
/// (`0.0.0.0`, `[::]`) listens on every local address, so it is refused
/// when any TCP rule allows its port at all.
pub fn check_unreachable(addr: SocketAddr, allowed: &[AllowRule]) -> Result<(), String> {
    let port_ok = |r: &AllowRule| r.port.is_none_or(|p| p == addr.port());
    let covering = allowed.iter().find(|r| {
        r.tcp && port_ok(r) && (addr.ip().is_unspecified() || r.net.contains(&addr.ip()))
    });
    match covering {
        None => Ok(()),
        Some(r) => Err(format!(
            "--metrics-listen {addr}: the sandbox may dial it (allowed destination {r}, from \
             --allow-cidr, --dns or the info port); listen on another address or port \
             (e.g. 127.0.0.1:9464, outside every --allow-cidr)"
        )),
    }
}

/// Serves `GET /metrics` forever on `listener`, for the live relay.
pub async fn serve(listener: TcpListener, live: Arc<LiveRelay>) {
    crate::local_http::serve(listener, "metrics", move |req| respond(&live.get(), req)).await
}

fn respond(relay: &Relay, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            relay.metrics().render(relay),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "only GET /metrics is served here\n".to_string(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, ctype.parse().expect("static value"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> AllowRule {
        s.parse().unwrap()
    }

    #[test]
    fn an_address_the_allowlist_covers_is_refused() {
        let lo: SocketAddr = "127.0.0.1:9464".parse().unwrap();
        assert!(check_unreachable(lo, &[]).is_ok());
        assert!(check_unreachable(lo, &[rule("10.0.0.0/8")]).is_ok());
        assert!(check_unreachable(lo, &[rule("127.0.0.1:9465")]).is_ok());
        let e = check_unreachable(lo, &[rule("127.0.0.0/8")]).unwrap_err();
        assert!(e.contains("allowed destination 127.0.0.0/8"), "{e}");
        assert!(check_unreachable(lo, &[rule("127.0.0.1:9464")]).is_err());
        let any: SocketAddr = "0.0.0.0:9464".parse().unwrap();
        assert!(check_unreachable(any, &[rule("10.0.0.0/8")]).is_err());
        assert!(check_unreachable(any, &[rule("10.0.0.0/8:5432")]).is_ok());
    }

    #[test]
    fn methods_outside_the_standard_set_are_other() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::DELETE), "DELETE");
        for m in ["get", "PROPFIND", "X-SANDBOX-CHOSE-THIS"] {
            assert_eq!(
                method_label(&Method::from_bytes(m.as_bytes()).unwrap()),
                OTHER
            );
        }
    }

    #[test]
    fn hosts_are_the_configured_ones_or_other() {
        let m = Metrics::new(["api.github.com".to_string()]);
        assert_eq!(m.host("api.github.com"), "api.github.com");
        assert_eq!(m.host("evil.example"), OTHER);
        m.denied(Denial::Rule);
        m.tokenizer_answered("api.github.com", Duration::from_millis(3));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry).unwrap();
        assert!(
            out.contains("proxypilot_denials_total{kind=\"rule\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("proxypilot_tokenizer_response_seconds_count{host=\"api.github.com\"} 1"),
            "{out}"
        );
    }
}
