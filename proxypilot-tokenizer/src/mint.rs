//! The token-minting processors (`jwt_processor`,
//! `client_credentials_processor`, `github_app_processor`), with
//! processor.go's semantics. They are stateless: the client sends its token
//! request through the tokenizer, which
//!
//! - rewrites the request ([`plan`]): the jwt-bearer or client-credentials
//!   form body, or for GitHub an RS256 app JWT in `Authorization`, the
//!   Accept and API-version headers, the installation-token path and an
//!   empty body;
//! - rewrites the answer ([`ResponseSealer`]): a 200 (201 for GitHub)
//!   becomes `{"sealed_token","expires_in","token_type":"sealed"}`, the
//!   minted token sealed to this engine's seal key as an
//!   `inject_processor` secret, so the client never sees it. Other
//!   statuses pass through untouched.
//!
//! Deliberate differences from Go are in README's differences table.

pub mod jwt;

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue};
use zeroize::Zeroizing;

pub use crate::secret::{ClientCredentialsProcessor, GitHubAppProcessor, JwtProcessor};

use crate::error::TokenizerError;
use crate::header::{header_value, Params};
use crate::secret::ProcessorRef;
use jwt::SigningKey;

/// Request parameter overriding `jwt_processor`'s `sub`.
pub const PARAM_SUB: &str = "sub";
/// Request parameter overriding `jwt_processor`'s `scopes`.
pub const PARAM_SCOPES: &str = "scopes";
/// The RFC 7523 grant type.
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Lifetime of a `jwt_processor` assertion (Go: one hour).
const JWT_LIFETIME_SECS: u64 = 3600;
/// Lifetime of a GitHub app JWT (Go: ten minutes; GitHub's maximum).
const GITHUB_JWT_LIFETIME_SECS: u64 = 600;

/// Which answer the token endpoint gives on success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MintKind {
    /// RFC 6749 `{"access_token","expires_in"}` with 200.
    OAuth,
    /// GitHub's `{"token","expires_at"}` with 201.
    GitHubApp,
}

/// What a minting processor does to the request.
pub(crate) struct MintRequest {
    pub kind: MintKind,
    /// Set in this order (replacing what the client sent).
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
    /// The new body (the client's is dropped).
    pub body: Zeroizing<Vec<u8>>,
    /// The new path (the client's query is kept), for GitHub.
    pub path: Option<String>,
    /// The credentials this request carries (the signed JWT), to mask
    /// echoes of them in the answer.
    pub sent: Vec<Zeroizing<Vec<u8>>>,
}

/// Whether `p` is one of the minting processors.
pub fn is_minting(p: &ProcessorRef<'_>) -> bool {
    matches!(
        p,
        ProcessorRef::Jwt(_) | ProcessorRef::ClientCredentials(_) | ProcessorRef::GitHubApp(_)
    )
}

fn bad(msg: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Processor(msg.to_string())
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The request side of a minting processor, or why it cannot be built
/// (status 400, as Go's Processor errors).
pub(crate) fn plan(p: ProcessorRef<'_>, params: &Params) -> Result<MintRequest, TokenizerError> {
    match p {
        ProcessorRef::Jwt(c) => plan_jwt(c, params),
        ProcessorRef::ClientCredentials(c) => plan_client_credentials(c),
        ProcessorRef::GitHubApp(c) => plan_github(c),
        _ => Err(bad(
            "internal error: not a minting processor (please report this bug)",
        )),
    }
}

fn form_headers() -> Vec<(HeaderName, HeaderValue)> {
    vec![(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-www-form-urlencoded"),
    )]
}

fn plan_jwt(c: &JwtProcessor, params: &Params) -> Result<MintRequest, TokenizerError> {
    let key = SigningKey::from_pem(c.private_key.expose()).map_err(bad)?;
    if c.email.is_empty() {
        return Err(bad("missing email"));
    }
    let sub = params.get(PARAM_SUB).unwrap_or(&c.sub);
    let scopes = params.get(PARAM_SCOPES).unwrap_or(&c.scopes);
    let now = now_secs();
    let mut claims = serde_json::json!({
        "aud": c.token_url(),
        "exp": now + JWT_LIFETIME_SECS,
        "iat": now,
        "iss": c.email,
        "scope": scopes,
    });
    if !sub.is_empty() {
        claims["sub"] = sub.clone().into();
    }
    let assertion = key.sign_jwt(&claims).map_err(bad)?;
    let body = form_encode(&[
        ("assertion", assertion.as_str()),
        ("grant_type", JWT_BEARER_GRANT),
    ]);
    Ok(MintRequest {
        kind: MintKind::OAuth,
        set: form_headers(),
        remove: Vec::new(),
        body,
        path: None,
        sent: vec![Zeroizing::new(assertion.as_bytes().to_vec())],
    })
}

fn plan_client_credentials(c: &ClientCredentialsProcessor) -> Result<MintRequest, TokenizerError> {
    if c.client_id.is_empty() {
        return Err(bad("missing client_id"));
    }
    if c.client_secret.is_empty() {
        return Err(bad("missing client_secret"));
    }
    if c.token_url.is_empty() {
        return Err(bad("missing token_url"));
    }
    let mut fields = vec![
        ("client_id", c.client_id.as_str()),
        ("client_secret", c.client_secret.expose()),
        ("grant_type", "client_credentials"),
    ];
    if !c.scopes.is_empty() {
        fields.push(("scope", c.scopes.as_str()));
    }
    Ok(MintRequest {
        kind: MintKind::OAuth,
        set: form_headers(),
        remove: Vec::new(),
        body: form_encode(&fields),
        path: None,
        // The client secret is in the secret's own echo needles.
        sent: Vec::new(),
    })
}

fn plan_github(c: &GitHubAppProcessor) -> Result<MintRequest, TokenizerError> {
    let key = SigningKey::from_pem(c.private_key.expose()).map_err(bad)?;
    if !matches!(key, SigningKey::Rsa(_)) {
        return Err(bad(jwt::KeyError::NotRsa));
    }
    if c.app_id.is_empty() {
        return Err(bad("missing app_id"));
    }
    if c.installation_id.is_empty() {
        return Err(bad("missing installation_id"));
    }
    let url = c.token_url();
    let target: http::Uri = url
        .parse()
        .map_err(|e| bad(format!("invalid token_url: {e}")))?;
    // Go refuses a URL without a path; http::Uri reads "https://h" as "/".
    let path = target
        .path_and_query()
        .map(|p| p.path())
        .filter(|p| !p.is_empty() && (*p != "/" || url.trim_end_matches('/') != url.as_str()))
        .ok_or_else(|| bad("token_url must include a path"))?
        .to_string();
    let now = now_secs();
    let claims = serde_json::json!({
        "exp": now + GITHUB_JWT_LIFETIME_SECS,
        "iat": now,
        "iss": c.app_id,
    });
    let app_jwt = key.sign_jwt(&claims).map_err(bad)?;
    let auth = header_value(&Zeroizing::new(format!("Bearer {}", app_jwt.as_str())))?;
    Ok(MintRequest {
        kind: MintKind::GitHubApp,
        set: vec![
            (header::AUTHORIZATION, auth),
            (
                header::ACCEPT,
                HeaderValue::from_static("application/vnd.github+json"),
            ),
            (
                HeaderName::from_static("x-github-api-version"),
                HeaderValue::from_static("2022-11-28"),
            ),
        ],
        remove: vec![header::CONTENT_TYPE],
        body: Zeroizing::new(Vec::new()),
        path: Some(path),
        sent: vec![Zeroizing::new(app_jwt.as_bytes().to_vec())],
    })
}

/// `application/x-www-form-urlencoded` as Go's `url.Values.Encode` (keys
/// given sorted): unreserved bytes as is, space as `+`, the rest `%XX`.
fn form_encode(fields: &[(&str, &str)]) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::new());
    for (i, (k, v)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(b'&');
        }
        query_escape(k.as_bytes(), &mut out);
        out.push(b'=');
        query_escape(v.as_bytes(), &mut out);
    }
    out
}

fn query_escape(s: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in s {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b),
            b' ' => out.push(b'+'),
            _ => out.extend_from_slice(&[b'%', HEX[(b >> 4) as usize], HEX[(b & 15) as usize]]),
        }
    }
}

/// The new body as bytes, for the body step.
pub(crate) fn body_bytes(body: &Zeroizing<Vec<u8>>) -> Bytes {
    Bytes::copy_from_slice(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_encoding_is_gos() {
        let b = form_encode(&[("a b", "x+y/z=~"), ("grant_type", JWT_BEARER_GRANT)]);
        assert_eq!(
            std::str::from_utf8(&b).unwrap(),
            "a+b=x%2By%2Fz%3D~&grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer"
        );
    }

    #[test]
    fn github_token_url() {
        let mut c = GitHubAppProcessor {
            installation_id: "42".into(),
            ..Default::default()
        };
        assert_eq!(
            c.token_url(),
            "https://api.github.com/app/installations/42/access_tokens"
        );
        c.token_url =
            "https://ghe.example/api/v3/app/installations/{installation_id}/access_tokens".into();
        assert_eq!(
            c.token_url(),
            "https://ghe.example/api/v3/app/installations/42/access_tokens"
        );
    }

    #[test]
    fn missing_fields_are_named() {
        let e = |p: ProcessorRef<'_>| plan(p, &Params::new()).err().unwrap().to_string();
        let cc = ClientCredentialsProcessor::default();
        assert!(e(ProcessorRef::ClientCredentials(&cc)).contains("missing client_id"));
        let cc = ClientCredentialsProcessor {
            client_id: "id".into(),
            ..Default::default()
        };
        assert!(e(ProcessorRef::ClientCredentials(&cc)).contains("missing client_secret"));
        let j = JwtProcessor::default();
        assert!(e(ProcessorRef::Jwt(&j)).contains("missing private key"));
        let g = GitHubAppProcessor::default();
        assert!(e(ProcessorRef::GitHubApp(&g)).contains("missing private key"));
    }
}
