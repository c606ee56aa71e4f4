//! The loopback info server: `GET /ca.pem` (the CA the sandbox must trust),
//! `GET /policy` (what is intercepted and allowed; no secrets) and
//! `GET /stats` (counters: open connections, cached leaf certificates,
//! heap in use).
//!
//! The kernel policy lets the sandbox reach this one loopback port.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::net::TcpListener;

use crate::policy::PolicySummary;

/// What the info server serves.
pub struct InfoState {
    published: RwLock<Published>,
    /// Source of `/stats`; `None` serves an empty object.
    stats: Option<Arc<crate::relay::LiveRelay>>,
    /// Source of the packet backstop's counts in `/stats`.
    kernel: Option<Arc<crate::kernel::Attachment>>,
    /// Source of the resolver's counters and refused names in `/stats`.
    dns: Option<Arc<crate::dns::DnsStats>>,
}

/// `/ca.pem` and `/policy`: replaced together when a reload changes them.
#[derive(Clone)]
pub struct Published {
    pub ca_pem: String,
    pub policy: PolicySummary,
}

impl InfoState {
    pub fn new(
        published: Published,
        stats: Option<Arc<crate::relay::LiveRelay>>,
        kernel: Option<Arc<crate::kernel::Attachment>>,
        dns: Option<Arc<crate::dns::DnsStats>>,
    ) -> Arc<InfoState> {
        Arc::new(InfoState {
            published: RwLock::new(published),
            stats,
            kernel,
            dns,
        })
    }

    /// Serves `published` from now on (after a reload).
    pub fn publish(&self, published: Published) {
        *self.published.write().unwrap_or_else(|p| p.into_inner()) = published;
    }

    fn published(&self) -> Published {
        self.published
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Binds 127.0.0.1:`port`.
pub async fn bind(port: u16) -> std::io::Result<TcpListener> {
    TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await
}

/// Serves forever on `listener`.
pub async fn serve(listener: TcpListener, state: Arc<InfoState>) {
    crate::local_http::serve(listener, "info", move |req| respond(&state, req)).await
}

/// The body of `/stats`.
#[derive(serde::Serialize)]
struct Stats {
    #[serde(flatten)]
    relay: Option<crate::relay::RelayStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    heap_in_use_bytes: Option<u64>,
    #[serde(flatten)]
    packets_dropped: Option<PacketsDropped>,
    #[serde(flatten)]
    dns: Option<crate::dns::DnsStatsView>,
}

/// What the packet backstop dropped since the programs were attached
/// (flat, like every other field: `/stats` is plain counters).
#[derive(serde::Serialize)]
struct PacketsDropped {
    #[serde(rename = "packets_dropped_egress")]
    egress: u64,
    #[serde(rename = "packets_dropped_ingress")]
    ingress: u64,
    #[serde(rename = "packets_dropped_frames")]
    frames: u64,
}

/// Bytes the allocator has handed out and not taken back (glibc's
/// mallinfo2: arena chunks in use plus mmapped blocks). Unlike RSS it keeps
/// no high-water mark of freed memory, so growth in it under a steady load
/// is a leak.
fn heap_in_use_bytes() -> Option<u64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's counters.
        let m = unsafe { libc::mallinfo2() };
        Some((m.uordblks + m.hblkhd) as u64)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

fn respond(state: &InfoState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/ca.pem") => (
            StatusCode::OK,
            "application/x-pem-file",
            state.published().ca_pem,
        ),
        (&Method::GET, "/policy") => (
            StatusCode::OK,
            "application/json",
            serde_json::to_string_pretty(&state.published().policy).expect("summary serialises")
                + "\n",
        ),
        (&Method::GET, "/stats") => (
            StatusCode::OK,
            "application/json",
            serde_json::to_string_pretty(&Stats {
                relay: state.stats.as_ref().map(|live| live.get().stats()),
                heap_in_use_bytes: heap_in_use_bytes(),
                packets_dropped: state.kernel.as_ref().map(|k| {
                    let d = k.packet_drops();
                    PacketsDropped {
                        egress: d.egress,
                        ingress: d.ingress,
                        frames: d.frames,
                    }
                }),
                dns: state.dns.as_ref().map(|d| d.view()),
            })
            .expect("stats serialise")
                + "\n",
        ),
        (&Method::GET, _) => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /ca.pem, /policy or /stats\n".to_string(),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".to_string(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(ctype),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_ca_and_policy() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = InfoState::new(
            Published {
                ca_pem: "-----BEGIN CERTIFICATE-----\nabc\n-----END CERTIFICATE-----\n".into(),
                policy: PolicySummary {
                    intercepted_hosts: vec!["api.example.com".into()],
                    pass_through_hosts: vec!["*.github.io".into()],
                    allowed_destinations: vec!["198.51.100.0/24".into()],
                },
            },
            None,
            None,
            None,
        );
        tokio::spawn(serve(listener, state));
        let get = |path: &'static str| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let ca = get("/ca.pem").await;
        assert!(
            ca.starts_with("HTTP/1.1 200") && ca.contains("BEGIN CERTIFICATE"),
            "{ca}"
        );
        let pol = get("/policy").await;
        let json: serde_json::Value =
            serde_json::from_str(pol.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(json["intercepted_hosts"][0], "api.example.com");
        assert_eq!(json["allowed_destinations"][0], "198.51.100.0/24");
        let stats = get("/stats").await;
        let body = stats.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        let heap = v["heap_in_use_bytes"].as_u64().unwrap();
        assert!(heap > 0 && heap < 1 << 40, "{v}");
        assert_eq!(
            v.as_object().unwrap().len(),
            1,
            "no relay, no relay counters: {v}"
        );
        assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
    }
}
