//! The answer side of the minting processors (Go's `sealTokenResponse` and
//! `GitHubAppProcessorConfig.ResponseProcessor`): the token endpoint's
//! success answer is read, its token sealed into an `inject_processor`
//! secret, and the body replaced by a [`SealedTokenResponse`].

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::body::ProxyBody;
use crate::error::TokenizerError;
use crate::keys::SealKey;
use crate::mint::MintKind;
use crate::secret::minting::GITHUB_API_HOST;
use crate::secret::{FmtDst, InjectProcessor, Secret, SecretString};

/// Token answers larger than this are refused (Go reads any size; real
/// ones are a few KiB, GitHub's with a long repository list a few hundred).
pub const MAX_TOKEN_RESPONSE: usize = 1024 * 1024;

/// Taken off `expires_in` when it is larger, for clock skew (Go's 60 s).
const EXPIRY_MARGIN_SECS: i64 = 60;
/// GitHub's installation tokens live one hour; assumed when `expires_at`
/// is missing, as Go does.
const GITHUB_DEFAULT_EXPIRY_SECS: i64 = 3600;

/// The body the client gets instead of the token endpoint's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedTokenResponse {
    /// An `inject_processor` secret holding the minted token, sealed to the
    /// engine's seal key: send it as `Proxy-Tokenizer`.
    pub sealed_token: String,
    /// Seconds it stays valid (the endpoint's, minus 60 when larger).
    pub expires_in: i64,
    /// Always `sealed`.
    pub token_type: String,
}

/// Seals a token endpoint's success answer; built by the engine from the
/// parent secret, run by the front door on the upstream's response.
pub struct ResponseSealer {
    kind: MintKind,
    /// The secret to seal, its token still empty: the parent's auth, and
    /// its validators (jwt, client_credentials) or api.github.com only.
    template: Secret,
    seal_key: SealKey,
}

impl std::fmt::Debug for ResponseSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ResponseSealer({:?})", self.kind)
    }
}

/// Why a success answer could not be sealed (the client gets a 502, as
/// from Go's errorResponse).
fn failed(msg: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Upstream(format!(
        "the token endpoint's answer could not be turned into a sealed token: {msg}"
    ))
}

impl ResponseSealer {
    pub(crate) fn new(kind: MintKind, parent: &Secret, seal_key: &SealKey) -> Self {
        let mut template = parent.auth_only();
        let fmt_dst = match kind {
            MintKind::OAuth => {
                template.allowed_hosts = parent.allowed_hosts.clone();
                template.allowed_host_pattern = parent.allowed_host_pattern.clone();
                FmtDst::default()
            }
            MintKind::GitHubApp => {
                // Installation tokens are only good at api.github.com: pin
                // the sealed secret there whatever the parent allowed.
                template.allowed_hosts = Some(vec![GITHUB_API_HOST.to_string()]);
                FmtDst {
                    fmt: "token %s".into(),
                    ..Default::default()
                }
            }
        };
        template.inject_processor = Some(InjectProcessor {
            token: SecretString::default(),
            fmt_dst,
        });
        ResponseSealer {
            kind,
            template,
            seal_key: seal_key.clone(),
        }
    }

    /// The status a success answer has.
    fn success(&self) -> StatusCode {
        match self.kind {
            MintKind::OAuth => StatusCode::OK,
            MintKind::GitHubApp => StatusCode::CREATED,
        }
    }

    /// Replace a success answer's body by the sealed token; pass any other
    /// status through untouched.
    pub async fn seal(
        self,
        resp: Response<ProxyBody>,
    ) -> Result<Response<ProxyBody>, TokenizerError> {
        if resp.status() != self.success() {
            return Ok(resp);
        }
        let (mut parts, body) = resp.into_parts();
        if let Some(ce) = parts.headers.get(header::CONTENT_ENCODING) {
            if !ce.as_bytes().eq_ignore_ascii_case(b"identity") {
                return Err(failed(
                    "it is compressed although identity encoding was asked for",
                ));
            }
        }
        let raw = Zeroizing::new(read_capped(body).await?.to_vec());
        let (token, expires_in) = match self.kind {
            MintKind::OAuth => parse_oauth(&raw)?,
            MintKind::GitHubApp => parse_github(&raw)?,
        };
        let expires_in = if expires_in > EXPIRY_MARGIN_SECS {
            expires_in - EXPIRY_MARGIN_SECS
        } else {
            expires_in
        };
        let mut secret = self.template;
        if let Some(p) = secret.inject_processor.as_mut() {
            p.token = token;
        }
        let sealed = SealedTokenResponse {
            sealed_token: crate::seal::seal(&self.seal_key, &secret),
            expires_in,
            token_type: "sealed".into(),
        };
        let json = serde_json::to_vec(&sealed).map_err(failed)?;
        tracing::info!(kind = ?self.kind, expires_in, "sealed a minted token");
        parts.headers.remove(header::CONTENT_ENCODING);
        parts.headers.remove(header::ETAG);
        parts.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(json.len()));
        let body = Full::new(Bytes::from(json))
            .map_err(|e| match e {})
            .boxed_unsync();
        Ok(Response::from_parts(parts, body))
    }
}

async fn read_capped(mut body: ProxyBody) -> Result<Bytes, TokenizerError> {
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| failed(format!("reading it failed: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > MAX_TOKEN_RESPONSE {
                return Err(failed(format!(
                    "it is larger than {MAX_TOKEN_RESPONSE} bytes"
                )));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

fn parse_json(raw: &[u8]) -> Result<serde_json::Map<String, serde_json::Value>, TokenizerError> {
    // serde's messages could quote the token: say only where it broke.
    match serde_json::from_slice(raw) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(_) => Err(failed("it is not a JSON object")),
        Err(e) => Err(failed(format!(
            "it is not JSON (syntax error at line {} column {})",
            e.line(),
            e.column()
        ))),
    }
}

fn token_field(
    m: &serde_json::Map<String, serde_json::Value>,
    name: &str,
) -> Result<SecretString, TokenizerError> {
    match m.get(name) {
        Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(SecretString::new(s.clone())),
        None | Some(serde_json::Value::Null) => Err(failed(format!("it has no {name}"))),
        Some(serde_json::Value::String(_)) => Err(failed(format!("it has no {name}"))),
        Some(_) => Err(failed(format!("its {name} is not a string"))),
    }
}

/// `{"access_token","expires_in"}`; `expires_in` must be an integer when
/// present (Go's `int`), 0 when absent.
fn parse_oauth(raw: &[u8]) -> Result<(SecretString, i64), TokenizerError> {
    let m = parse_json(raw)?;
    let token = token_field(&m, "access_token")?;
    let expires_in = match m.get("expires_in") {
        None | Some(serde_json::Value::Null) => 0,
        Some(v) => v
            .as_i64()
            .ok_or_else(|| failed("its expires_in is not an integer"))?,
    };
    Ok((token, expires_in))
}

/// `{"token","expires_at"}` (RFC 3339); one hour when `expires_at` is
/// absent or already past, as Go.
fn parse_github(raw: &[u8]) -> Result<(SecretString, i64), TokenizerError> {
    let m = parse_json(raw)?;
    let token = token_field(&m, "token")?;
    let expires_in = match m.get("expires_at") {
        None | Some(serde_json::Value::Null) => GITHUB_DEFAULT_EXPIRY_SECS,
        Some(serde_json::Value::String(s)) => {
            let at = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .map_err(|_| failed("its expires_at is not an RFC 3339 time"))?;
            let secs = (at - time::OffsetDateTime::now_utc()).whole_seconds();
            if secs > 0 {
                secs
            } else {
                GITHUB_DEFAULT_EXPIRY_SECS
            }
        }
        Some(_) => return Err(failed("its expires_at is not a string")),
    };
    Ok((token, expires_in))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oauth_answers() {
        let (t, e) =
            parse_oauth(br#"{"access_token":"ya29.x","expires_in":3599,"token_type":"Bearer"}"#)
                .unwrap();
        assert_eq!((t.expose(), e), ("ya29.x", 3599));
        assert_eq!(parse_oauth(br#"{"access_token":"a"}"#).unwrap().1, 0);
        for bad in [
            &br#"{"expires_in":1}"#[..],
            br#"{"access_token":""}"#,
            br#"{"access_token":"a","expires_in":1.5}"#,
            br#"[1]"#,
            b"secret-token-not-json",
        ] {
            let e = parse_oauth(bad).unwrap_err().to_string();
            assert!(!e.contains("secret-token"), "{e}");
            assert!(
                e.starts_with("bad gateway: the token endpoint's answer"),
                "{e}"
            );
        }
    }

    #[test]
    fn github_answers() {
        let at = (time::OffsetDateTime::now_utc() + time::Duration::seconds(1800))
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        let body = format!(r#"{{"token":"ghs_x","expires_at":"{at}"}}"#);
        let (t, e) = parse_github(body.as_bytes()).unwrap();
        assert_eq!(t.expose(), "ghs_x");
        assert!((1795..=1800).contains(&e), "{e}");
        assert_eq!(parse_github(br#"{"token":"t"}"#).unwrap().1, 3600);
        assert_eq!(
            parse_github(br#"{"token":"t","expires_at":"2001-01-01T00:00:00Z"}"#)
                .unwrap()
                .1,
            3600
        );
        assert!(parse_github(br#"{"token":"t","expires_at":"tomorrow"}"#).is_err());
    }
}
