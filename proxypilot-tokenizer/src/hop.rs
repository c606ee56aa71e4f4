//! Hop-by-hop headers (RFC 9110 §7.6.1): meaningful for one connection
//! only, so every hop that relays a message removes them. Shared by the
//! relay and the tokenizer, which are both such hops.

use http::header::{self, HeaderMap, HeaderName};

/// Always hop-by-hop, whatever the Connection header says. Proxy-Connection
/// is not standard but old clients send it.
const FIXED: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The hop-by-hop headers of one message: the fixed ones plus those its
/// Connection header names.
pub struct HopByHop {
    named: Vec<HeaderName>,
}

impl HopByHop {
    pub fn of(headers: &HeaderMap) -> Self {
        // Most requests carry no Connection header: no allocation then.
        let named = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        HopByHop { named }
    }

    pub fn contains(&self, name: &HeaderName) -> bool {
        FIXED.contains(name) || self.named.contains(name)
    }
}

/// Removes every hop-by-hop header from `headers`.
pub fn strip(headers: &mut HeaderMap) {
    let hop = HopByHop::of(headers);
    for name in hop.named.iter().chain(FIXED.iter()) {
        headers.remove(name);
    }
}

/// Headers Fly's proxy adds for this hop, or that attest the client to the
/// tokenizer, none of them the upstream API's business: the list Fly's
/// tokenizer image strips (its Dockerfile's `FilteredHeaders`), plus
/// `fly-src-optin`, the client's request for an attestation.
pub const FLY_HOP_HEADERS: [&str; 11] = [
    "fly-client-ip",
    "fly-forwarded-port",
    "fly-forwarded-proto",
    "fly-forwarded-ssl",
    "fly-region",
    "fly-request-id",
    "fly-traceparent",
    "fly-tracestate",
    "fly-src",
    "fly-src-signature",
    "fly-src-optin",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_fixed_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, X-Drop-Me".parse().unwrap());
        h.insert("x-drop-me", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("proxy-connection", "keep-alive".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("trailer", "x-t".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert("content-type", "application/json".parse().unwrap());
        strip(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["content-type"]);
    }

    #[test]
    fn knows_named_headers_only_for_its_message() {
        let mut h = HeaderMap::new();
        h.insert("connection", "close".parse().unwrap());
        let hop = HopByHop::of(&h);
        assert!(hop.contains(&header::TRANSFER_ENCODING));
        assert!(hop.contains(&HeaderName::from_static("close")));
        assert!(!hop.contains(&header::CONTENT_TYPE));
        assert!(!HopByHop::of(&HeaderMap::new()).contains(&HeaderName::from_static("close")));
    }
}
