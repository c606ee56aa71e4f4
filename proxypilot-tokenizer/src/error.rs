//! Errors of the tokenizer engine and front doors, with one mapping to an
//! HTTP status and a body text.
//!
//! The texts follow the Go tokenizer's (`unauthorized to use secret: not
//! authorized: ...`, `request validator failed: bad request: ...`) so clients
//! that grep for them keep working, and add what to do where Go is terse.
//! No variant ever carries secret material: callers pass only shapes,
//! host names and fixed descriptions.

use http::StatusCode;

/// Why a request could not be tokenized or forwarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenizerError {
    /// The `Proxy-Tokenizer` header or its parameters are malformed.
    #[error("bad request: bad tokenizer header: {0}")]
    BadHeader(String),

    /// The sealed secret is not valid standard base64.
    #[error("bad Proxy-Tokenizer encoding: {0}")]
    BadEncoding(String),

    /// The sealed secret does not open with this tokenizer's open key
    /// (sealed to another seal key, or truncated/corrupted).
    #[error(
        "failed Proxy-Tokenizer decryption: the secret was sealed to a different seal key, \
         or it is truncated or corrupted; reseal it with this tokenizer's seal key"
    )]
    Decryption,

    /// The opened secret is not a valid secret document.
    #[error("bad secret json: {0}")]
    BadSecret(String),

    /// The secret uses a processor kind this implementation refuses.
    #[error("bad secret json: {0} is not supported by proxypilot's tokenizer; {1}")]
    UnsupportedProcessor(&'static str, &'static str),

    /// Authentication of the secret's use failed (status 407).
    #[error("unauthorized to use secret: not authorized: {0}")]
    NotAuthorized(String),

    /// A validator (allowed_hosts, allowed_host_pattern) refused the request.
    #[error("request validator failed: bad request: secret not valid for {0}")]
    HostNotAllowed(String),

    /// The processor could not be built or applied (bad fmt, bad dst, ...).
    #[error("bad request: {0}")]
    Processor(String),

    /// `sigv4_processor` could not re-sign the request.
    #[error("bad request: sigv4_processor: {0}")]
    Sigv4(#[from] Sigv4Error),

    /// No sealed secret on a tokenizer that is not an open proxy.
    #[error(
        "bad request: no Proxy-Tokenizer header; this tokenizer only forwards requests \
         that carry a sealed secret (start it with --open-proxy to allow others)"
    )]
    NoSecret,

    /// The request is not something this proxy forwards (CONNECT, https
    /// absolute-form, origin-form, ...).
    #[error("bad request: {0}")]
    BadProxyRequest(String),

    /// The body was too large to buffer for an HMAC over it.
    #[error("bad request: request body larger than {0} bytes cannot be signed by inject_hmac_processor; pass the payload in the \"msg\" parameter instead")]
    BodyTooLarge(usize),

    /// Reading the client's request body failed.
    #[error("bad request: reading the request body failed: {0}")]
    BodyRead(String),

    /// The upstream could not be reached or failed (status 502).
    #[error("bad gateway: {0}")]
    Upstream(String),
}

impl TokenizerError {
    /// The HTTP status the front doors answer with.
    ///
    /// Go answers 502 for secrets that do not decode, open or parse, only
    /// because it forgets to wrap those errors as bad requests; we answer 400
    /// because they are the client's fault and 502 would send the user
    /// looking at the upstream.
    pub fn status(&self) -> StatusCode {
        match self {
            TokenizerError::NotAuthorized(_) => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            TokenizerError::Upstream(_) => StatusCode::BAD_GATEWAY,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// The response body text (the Display form plus a newline).
    pub fn body_text(&self) -> String {
        format!("{self}\n")
    }

    /// A complete error response, as the front doors send it.
    pub fn to_response(&self) -> http::Response<http_body_util::Full<bytes::Bytes>> {
        let mut resp = http::Response::new(http_body_util::Full::new(bytes::Bytes::from(
            self.body_text(),
        )));
        *resp.status_mut() = self.status();
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        resp
    }
}

/// Why a request could not be re-signed. Never carries a key or a value
/// from the request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Sigv4Error {
    #[error("missing access key: seal the sigv4_processor with access_key set")]
    MissingAccessKey,
    #[error("missing secret key: seal the sigv4_processor with secret_key set")]
    MissingSecretKey,
    #[error(
        "expected request to contain an Authorization header: sign the request with SigV4 \
         (placeholder keys are fine) before sending it through the tokenizer"
    )]
    NoAuthorization,
    #[error(
        "invalid credential in auth header: Credential must be \
         ACCESS_KEY/YYYYMMDD/REGION/SERVICE/aws4_request"
    )]
    BadCredential,
    #[error("invalid credential date in auth header: expected YYYYMMDD")]
    BadCredentialDate,
    #[error("invalid X-Amz-Date header: expected YYYYMMDDTHHMMSSZ")]
    BadAmzDate,
    #[error(
        "expected valid sigv4 authentication header in request to tokenizer: the Authorization \
         header has no Credential=ACCESS_KEY/DATE/REGION/SERVICE/aws4_request"
    )]
    NoScope,
    #[error(
        "sigv4_processor cannot be combined with a processor that rewrites or signs the body \
         (inject_body, oauth2_body, inject_hmac without msg): the signature would not cover \
         what is sent; use a separate request or the msg parameter"
    )]
    WithBodyStep,
    #[error(
        "the re-signed request is not a valid URI or header (this is a bug; please report it)"
    )]
    Internal,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        assert_eq!(TokenizerError::NotAuthorized("x".into()).status(), 407);
        assert_eq!(TokenizerError::Upstream("x".into()).status(), 502);
        assert_eq!(TokenizerError::Decryption.status(), 400);
        assert_eq!(TokenizerError::HostNotAllowed("h".into()).status(), 400);
        assert_eq!(
            TokenizerError::NotAuthorized("bad or missing proxy auth".into()).to_string(),
            "unauthorized to use secret: not authorized: bad or missing proxy auth"
        );
    }
}
