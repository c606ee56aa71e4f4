//! Every error the relay answers with, and the one function that turns an
//! error into a status and a short JSON body a user can act on.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use super::RelayBody;

/// Failures talking to the tokenizer (remote) or the embedded engine.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("the tokenizer at {url} is unreachable: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("the tokenizer at {url} did not {stage} within {after:?}")]
    Timeout {
        url: String,
        stage: &'static str,
        after: Duration,
    },
    #[error("the request to the tokenizer at {url} failed: {detail}")]
    Failed { url: String, detail: String },
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
    #[error("bad request: {0}")]
    BadRequest(String),
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
    #[error(transparent)]
    Forward(#[from] ForwardError),
}

impl RelayError {
    /// Status, what failed, and what to check. The single mapping.
    pub fn classify(&self) -> (StatusCode, String, String) {
        let msg = self.to_string();
        match self {
            RelayError::Misdirected { sni, .. } => (
                StatusCode::MISDIRECTED_REQUEST,
                msg,
                format!("send requests on this connection for {sni} only; open a new connection for another host"),
            ),
            RelayError::MissingHost => (
                StatusCode::BAD_REQUEST,
                msg,
                "send a Host header (HTTP/1.1) or :authority (HTTP/2)".into(),
            ),
            RelayError::BadRequest(_) => (StatusCode::BAD_REQUEST, msg, "check the request line and headers".into()),
            RelayError::BodyTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                msg,
                "send a smaller body, or raise the cap with --max-request-body (config key max-request-body)".into(),
            ),
            RelayError::RateLimited { host, retry_after, .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                msg,
                format!("retry in {} s (Retry-After), or raise the limit with --rate-limit {host}=N (config key rate-limit)", retry_after_secs(*retry_after)),
            ),
            RelayError::Forward(ForwardError::Unreachable { .. }) => (
                StatusCode::BAD_GATEWAY,
                msg,
                "check that the tokenizer is running and that --tokenizer (or PROXY) points at it".into(),
            ),
            RelayError::Forward(ForwardError::Timeout { .. }) => (
                StatusCode::GATEWAY_TIMEOUT,
                msg,
                "the tokenizer or the upstream API is slow or stuck; check the tokenizer's logs and its route to the API".into(),
            ),
            RelayError::Forward(ForwardError::Failed { .. }) => (
                StatusCode::BAD_GATEWAY,
                msg,
                "the connection to the tokenizer broke mid-request; check the tokenizer's logs".into(),
            ),
            RelayError::Forward(ForwardError::Engine { status, .. }) => (
                *status,
                msg,
                "check the sealed secret for this host (--target) and the embedded tokenizer's open key".into(),
            ),
        }
    }
}

/// Renders an error as the client sees it.
pub fn error_response(err: &RelayError) -> Response<RelayBody> {
    let (status, error, hint) = err.classify();
    let mut resp = json_response(status, &serde_json::json!({ "error": error, "hint": hint }));
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
            (RelayError::BodyTooLarge { limit: 10 }, 413),
            (
                RelayError::Forward(ForwardError::Unreachable {
                    url: url.clone(),
                    detail: "refused".into(),
                }),
                502,
            ),
            (
                RelayError::Forward(ForwardError::Timeout {
                    url,
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
