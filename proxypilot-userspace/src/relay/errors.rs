//! Every error the relay answers with, and the one function that turns an
//! error into a status and a short JSON body a user can act on.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use super::{BoxError, RelayBody};
use crate::tokenizer::client::error_chain;

/// Failures talking to the tokenizer (remote) or the embedded engine.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("the tokenizer at {url} is unreachable")]
    Unreachable {
        url: String,
        #[source]
        source: BoxError,
    },
    /// `via` names what was slow: the remote tokenizer at its URL, or the
    /// upstream API behind the embedded one.
    #[error("{via} did not {stage} within {after:?}")]
    Timeout {
        via: String,
        stage: &'static str,
        after: Duration,
    },
    #[error("the request to the tokenizer at {url} failed")]
    Failed {
        url: String,
        #[source]
        source: BoxError,
    },
    /// The embedded engine refused or failed the request. `status` is what
    /// the remote tokenizer would have answered (400, 407, 502, ...).
    #[error("the embedded tokenizer answered {status}: {message}")]
    Engine { status: StatusCode, message: String },
}

/// Why a request was not relayed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("Host {host:?} does not match the TLS server name {sni:?}")]
    Misdirected { host: String, sni: String },
    #[error("the request has no Host header or :authority")]
    MissingHost,
    /// A reload took the connection's host out of the intercepted ones.
    #[error("{host} is no longer intercepted (the configuration was reloaded)")]
    NoLongerIntercepted { host: String },
    #[error("bad request: {0}")]
    BadRequest(String),
    /// One header line over the relay's per-field cap (8 KiB).
    #[error("the request header {name} is {size} bytes; at most {limit} are relayed")]
    HeaderFieldTooLarge {
        name: String,
        size: usize,
        limit: usize,
    },
    /// `--max-request-body`: declared up front, or found while streaming.
    #[error("the request body is larger than the relay's limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    /// `--rate-limit`: the host's token bucket is empty.
    #[error("more than {per_second} requests per second to {host}")]
    RateLimited {
        host: String,
        per_second: u32,
        retry_after: Duration,
    },
    /// A remote tokenizer answered a WebSocket upgrade with a plain
    /// success: it dropped the upgrade, so the client would fail on it.
    #[error("the tokenizer at {url} answered the WebSocket upgrade request with {status}, not 101 Switching Protocols")]
    UpgradeNotRelayed { url: String, status: u16 },
    /// `--permit`: the host's rule set does not allow this request.
    #[error("{}", .0.why)]
    NotPermitted(super::rules::Refusal),
    #[error(transparent)]
    Forward(#[from] ForwardError),
    /// The target's secret mints short-lived tokens, and none could be had.
    #[error("no short-lived token for {host} (secret {secret})")]
    Mint {
        host: String,
        secret: String,
        #[source]
        source: Box<MintError>,
    },
}

/// What the client is told about an error: its status, what failed, and
/// what to check. Built in one place, [`ErrorResponse::from`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorResponse {
    pub status: StatusCode,
    /// The error and its sources on one line ("a: b: c").
    pub error: String,
    pub hint: String,
}

impl From<&RelayError> for ErrorResponse {
    /// The single mapping from a relay error to what the client sees.
    fn from(err: &RelayError) -> Self {
        let (status, hint): (StatusCode, String) = match err {
            RelayError::Misdirected { sni, .. } => (
                StatusCode::MISDIRECTED_REQUEST,
                format!("send requests on this connection for {sni} only; open a new connection for another host"),
            ),
            RelayError::NoLongerIntercepted { .. } => (
                StatusCode::MISDIRECTED_REQUEST,
                "proxypilot's configuration no longer has a secret for this host; a new connection gets what the current configuration allows".into(),
            ),
            RelayError::MissingHost => (
                StatusCode::BAD_REQUEST,
                "send a Host header (HTTP/1.1) or :authority (HTTP/2)".into(),
            ),
            RelayError::BadRequest(_) => (StatusCode::BAD_REQUEST, "check the request line and headers".into()),
            RelayError::HeaderFieldTooLarge { .. } => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "API front ends (nginx, Cloudflare) refuse a header this large and may close the HTTP/2 connection every request to the API shares; send the data in the body".into(),
            ),
            RelayError::BodyTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "send a smaller body, or raise the cap with --max-request-body (config key max-request-body)".into(),
            ),
            RelayError::RateLimited { host, retry_after, .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                format!("retry in {} s (Retry-After), or raise the limit with --rate-limit {host}=N (config key rate-limit)", retry_after_secs(*retry_after)),
            ),
            RelayError::UpgradeNotRelayed { .. } => (
                StatusCode::BAD_GATEWAY,
                "a plain answer instead of 101 means this tokenizer does not relay WebSocket upgrades (or the API has no WebSocket at this path); use proxypilot's own (`proxypilot tokenizer`) or --tokenizer embedded".into(),
            ),
            RelayError::NotPermitted(r) => (
                StatusCode::FORBIDDEN,
                format!(
                    "the rule set of {} (--permit, config key permit) allows only: {}; ask the operator for a --permit that covers this request",
                    r.host,
                    r.permits.join(", ")
                ),
            ),
            RelayError::Forward(ForwardError::Unreachable { .. }) => (
                StatusCode::BAD_GATEWAY,
                "check that the tokenizer is running and that --tokenizer (or PROXY) points at it".into(),
            ),
            RelayError::Forward(ForwardError::Timeout { .. }) => (
                StatusCode::GATEWAY_TIMEOUT,
                "the tokenizer or the upstream API is slow or stuck; check the tokenizer's logs and its route to the API".into(),
            ),
            RelayError::Forward(ForwardError::Failed { .. }) => (
                StatusCode::BAD_GATEWAY,
                "the connection to the tokenizer broke mid-request; check the tokenizer's logs".into(),
            ),
            RelayError::Mint { source, .. } => (StatusCode::BAD_GATEWAY, source.hint().into()),
            RelayError::Forward(ForwardError::Engine { status, .. }) => (
                *status,
                "check the sealed secret for this host (--target) and the embedded tokenizer's open key".into(),
            ),
        };
        ErrorResponse {
            status,
            error: error_chain(err),
            hint,
        }
    }
}

/// Renders an error as the client sees it.
pub fn error_response(err: &RelayError) -> Response<RelayBody> {
    let e = ErrorResponse::from(err);
    let mut resp = json_response(
        e.status,
        &serde_json::json!({ "error": e.error, "hint": e.hint }),
    );
    if let RelayError::RateLimited { retry_after, .. } = err {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, retry_after_secs(*retry_after).into());
    }
    resp
}

/// Whole seconds for `Retry-After`: rounded up, at least 1.
fn retry_after_secs(d: Duration) -> u64 {
    d.as_secs_f64().ceil().max(1.0) as u64
}

pub(crate) fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<RelayBody> {
    let mut bytes = serde_json::to_vec(body).expect("json serialises");
    bytes.push(b'\n');
    let mut resp = Response::new(
        Full::new(Bytes::from(bytes))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert("x-proxypilot-error", HeaderValue::from_static("1"));
    resp
}

/// Why no short-lived token could be had; each names the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("the minting secret's token_url {url:?} is not an https:// URL")]
    TokenUrl { url: String },
    #[error("minting a token: sending the token request to {url} through the tokenizer failed")]
    Send {
        url: String,
        #[source]
        source: ForwardError,
    },
    #[error("minting a token: the token endpoint {url} answered {status}{detail}")]
    Refused {
        url: String,
        status: StatusCode,
        /// The endpoint's `error`/`message` field, when it gave one.
        detail: String,
    },
    #[error("minting a token: the answer from {url} is not a sealed token ({why})")]
    BadAnswer { url: String, why: &'static str },
}

impl MintError {
    /// What the sandbox's 502 says to do.
    pub fn hint(&self) -> &'static str {
        match self {
            MintError::TokenUrl { .. } => "reseal the secret with an https:// --token-url",
            MintError::Send { .. } => {
                "the token request did not get through the tokenizer: check that it runs, that the sealed secret opens there, and its route to the token endpoint"
            }
            MintError::Refused { .. } => {
                "the token endpoint refused the token request: check the sealed credential (app id, installation, key, client secret, scopes) and the endpoint's own message"
            }
            MintError::BadAnswer { .. } => {
                "the tokenizer did not seal the token endpoint's answer: use a tokenizer that implements the minting processors (proxypilot's, or superfly/tokenizer since 2025)"
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping() {
        let url = "http://tok:8080".to_string();
        let cases = [
            (
                RelayError::Misdirected {
                    host: "a".into(),
                    sni: "b".into(),
                },
                421,
            ),
            (RelayError::MissingHost, 400),
            (
                RelayError::NoLongerIntercepted {
                    host: "api.x.com".into(),
                },
                421,
            ),
            (
                RelayError::HeaderFieldTooLarge {
                    name: "x-big".into(),
                    size: 12_000,
                    limit: 8192,
                },
                431,
            ),
            (RelayError::BodyTooLarge { limit: 10 }, 413),
            (
                RelayError::UpgradeNotRelayed {
                    url: url.clone(),
                    status: 200,
                },
                502,
            ),
            (
                RelayError::NotPermitted(crate::relay::rules::Refusal {
                    host: "api.x.com".into(),
                    why: "DELETE /x is not permitted on api.x.com".into(),
                    permits: vec!["GET /**".into()],
                }),
                403,
            ),
            (
                RelayError::Forward(ForwardError::Unreachable {
                    url: url.clone(),
                    source: "refused".into(),
                }),
                502,
            ),
            (
                RelayError::Forward(ForwardError::Timeout {
                    via: format!("the tokenizer at {url}"),
                    stage: "answer",
                    after: Duration::from_secs(1),
                }),
                504,
            ),
        ];
        for (e, code) in cases {
            assert_eq!(error_response(&e).status().as_u16(), code, "{e}");
        }
    }

    #[test]
    fn the_error_names_its_sources_once() {
        let e = RelayError::Forward(ForwardError::Unreachable {
            url: "http://tok:8080".into(),
            source: "connection refused".into(),
        });
        let r = ErrorResponse::from(&e);
        assert_eq!(r.status, StatusCode::BAD_GATEWAY);
        assert_eq!(
            r.error,
            "the tokenizer at http://tok:8080 is unreachable: connection refused"
        );
        assert!(r.hint.contains("--tokenizer"), "{}", r.hint);
    }

    #[test]
    fn rate_limited_has_retry_after_in_whole_seconds() {
        for (wait, secs) in [(0, "1"), (50, "1"), (1000, "1"), (1001, "2")] {
            let e = RelayError::RateLimited {
                host: "api.x.com".into(),
                per_second: 5,
                retry_after: Duration::from_millis(wait),
            };
            let resp = error_response(&e);
            assert_eq!(resp.status(), 429);
            assert_eq!(resp.headers()[header::RETRY_AFTER], secs, "{wait} ms");
        }
    }
}
