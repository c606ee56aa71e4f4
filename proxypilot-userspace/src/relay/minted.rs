//! proxypilot as the token client of the minting processors (jwt,
//! client_credentials, github_app): for a target whose sealed secret mints,
//! the relay sends the token request through the tokenizer itself, keeps the
//! sealed short-lived token it gets back, refreshes it before it expires
//! (one token request at a time, however many sandbox requests wait), and
//! sends the sandbox's requests with that sealed token. The sandbox does
//! nothing: it never sees the parent secret, the minted token, or the token
//! endpoint.
//!
//! The sealed token carries its own rules (the parent's auth and hosts;
//! GitHub's `token %s` and api.github.com), so it is sent bare, without the
//! `dst`/`fmt` parameters the relay adds for plain secrets.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Request, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};

use super::{BoxError, Forwarder};
use crate::tokenizer::mint::MintKind;
use crate::tokenizer::sealed_answer::SealedTokenResponse;
use crate::tokenizer::Secret;

/// The largest answer to a token request read (a sealed token is ~500
/// bytes).
const MAX_ANSWER: usize = 64 * 1024;
/// A token is refreshed once this fraction of its life is gone.
const REFRESH_AT: f64 = 0.75;

/// Where a minting secret's token request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MintSpec {
    pub kind: MintKind,
    /// `http://host[:port]/path`, as the relay sends requests to the
    /// tokenizer (which dials it with TLS).
    pub token_uri: Uri,
}

impl MintSpec {
    /// The spec `--mint HOST=TOKEN_URL` gives: a remote tokenizer's secret
    /// cannot be opened here, so the kind is guessed from the path (the
    /// answer is accepted with 200 or 201 either way).
    pub fn from_url(url: &str) -> Result<MintSpec, MintError> {
        let kind = if url.contains("/access_tokens") {
            MintKind::GitHubApp
        } else {
            MintKind::OAuth
        };
        Self::with_url(kind, url)
    }

    fn with_url(kind: MintKind, url: &str) -> Result<MintSpec, MintError> {
        let bad = || MintError::TokenUrl {
            url: url.to_string(),
        };
        let u: Uri = url.parse().map_err(|_| bad())?;
        if u.scheme_str() != Some("https") {
            return Err(bad());
        }
        let authority = u.authority().ok_or_else(bad)?;
        let pq = u.path_and_query().map_or("/", |p| p.as_str());
        let token_uri = format!("http://{authority}{pq}")
            .parse()
            .map_err(|_| bad())?;
        Ok(MintSpec { kind, token_uri })
    }

    /// The spec of `secret` when it is a minting one: its token URL (for
    /// GitHub with the installation id filled in).
    pub fn of(secret: &Secret) -> Result<Option<MintSpec>, MintError> {
        let (kind, url) = if let Some(p) = &secret.jwt_processor {
            (MintKind::OAuth, p.token_url().to_string())
        } else if let Some(p) = &secret.client_credentials_processor {
            (MintKind::OAuth, p.token_url.clone())
        } else if let Some(p) = &secret.github_app_processor {
            (MintKind::GitHubApp, p.token_url())
        } else {
            return Ok(None);
        };
        Self::with_url(kind, &url).map(Some)
    }
}

pub use super::errors::MintError;

struct Cached {
    sealed: HeaderValue,
    minted_at: Instant,
    refresh_at: Instant,
}

/// One minting target: its parent sealed secret, and the cached sealed
/// short-lived token.
pub struct Minted {
    spec: MintSpec,
    parent: HeaderValue,
    /// Held across a token request: concurrent requests wait for it and
    /// then share its token (single flight).
    cache: tokio::sync::Mutex<Option<Cached>>,
    mints: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Minted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minted")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

/// A usable sealed token and how old it is.
pub struct Token {
    pub sealed: HeaderValue,
    pub age: Duration,
}

impl Minted {
    pub fn new(spec: MintSpec, mut parent: HeaderValue) -> Minted {
        parent.set_sensitive(true);
        Minted {
            spec,
            parent,
            cache: tokio::sync::Mutex::new(None),
            mints: Default::default(),
        }
    }

    /// Whether `other` mints from the same sealed secret at the same
    /// token URL, so that a token `other` minted is one this would mint.
    fn same_source(&self, other: &Minted) -> bool {
        self.spec == other.spec && self.parent.as_bytes() == other.parent.as_bytes()
    }

    /// How many tokens have been minted so far.
    pub fn mints(&self) -> u64 {
        self.mints.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The cached sealed token, or a fresh one when there is none or it is
    /// due for refresh.
    pub async fn token(
        &self,
        forwarder: &Forwarder,
        proxy_authorization: Option<&HeaderValue>,
        timeout: Duration,
    ) -> Result<Token, MintError> {
        let mut cache = self.cache.lock().await;
        let now = Instant::now();
        if let Some(c) = cache.as_ref().filter(|c| now < c.refresh_at) {
            return Ok(Token {
                sealed: c.sealed.clone(),
                age: now - c.minted_at,
            });
        }
        let (sealed, expires_in) = self.mint(forwarder, proxy_authorization, timeout).await?;
        self.mints
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let minted_at = Instant::now();
        let life = Duration::from_secs(expires_in.max(0) as u64).mul_f64(REFRESH_AT);
        tracing::info!(token_url = %self.spec.token_uri, expires_in, "minted a short-lived token");
        *cache = Some(Cached {
            sealed: sealed.clone(),
            minted_at,
            refresh_at: minted_at + life,
        });
        Ok(Token {
            sealed,
            age: Duration::ZERO,
        })
    }

    async fn mint(
        &self,
        forwarder: &Forwarder,
        proxy_authorization: Option<&HeaderValue>,
        timeout: Duration,
    ) -> Result<(HeaderValue, i64), MintError> {
        let url = self.spec.token_uri.to_string();
        let authority = self
            .spec
            .token_uri
            .authority()
            .map_or("", |a| a.as_str())
            .to_string();
        let mut req = Request::new(
            Full::new(Bytes::new())
                .map_err(|never| -> BoxError { match never {} })
                .boxed_unsync(),
        );
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = self.spec.token_uri.clone();
        *req.version_mut() = Version::HTTP_11;
        let h = req.headers_mut();
        h.insert(
            header::HOST,
            HeaderValue::from_str(&authority)
                .map_err(|_| MintError::TokenUrl { url: url.clone() })?,
        );
        h.insert(
            HeaderName::from_static("proxy-tokenizer"),
            self.parent.clone(),
        );
        if let Some(a) = proxy_authorization {
            h.insert(header::PROXY_AUTHORIZATION, a.clone());
        }
        h.insert(
            HeaderName::from_static("fly-src-optin"),
            HeaderValue::from_static("*"),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        h.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        crate::tokenizer::redact::ask_for_identity(h);
        let resp = forwarder
            .forward(req, timeout)
            .await
            .map_err(|source| MintError::Send {
                url: url.clone(),
                source,
            })?;
        let status = resp.status();
        let body = read_capped(resp.into_body()).await;
        // 200 (OAuth) or 201 (GitHub): either way the answer must be the
        // tokenizer's sealed-token JSON.
        if status != StatusCode::OK && status != StatusCode::CREATED {
            return Err(MintError::Refused {
                url,
                status,
                detail: body.as_deref().map(endpoint_message).unwrap_or_default(),
            });
        }
        let bad = |why| MintError::BadAnswer {
            url: url.clone(),
            why,
        };
        let body = body.ok_or_else(|| bad("it could not be read"))?;
        let answer: SealedTokenResponse =
            serde_json::from_slice(&body).map_err(|_| bad("not the sealed-token JSON"))?;
        if answer.token_type != "sealed" || answer.sealed_token.is_empty() {
            return Err(bad("token_type is not \"sealed\""));
        }
        let mut v = HeaderValue::from_str(&answer.sealed_token)
            .map_err(|_| bad("the sealed token is not header-safe"))?;
        v.set_sensitive(true);
        Ok((v, answer.expires_in))
    }
}

async fn read_capped(mut body: super::RelayBody) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(d) = frame.ok()?.into_data() {
            if out.len() + d.len() > MAX_ANSWER {
                return None;
            }
            out.extend_from_slice(&d);
        }
    }
    Some(out)
}

/// `: <message>` from a JSON error answer's `error_description`, `error`
/// or `message` (short, printable), else "".
fn endpoint_message(body: &[u8]) -> String {
    let Ok(serde_json::Value::Object(m)) = serde_json::from_slice(body) else {
        return String::new();
    };
    ["error_description", "error", "message"]
        .iter()
        .find_map(|k| m.get(*k).and_then(|v| v.as_str()))
        .map(|s| {
            let s: String = s.chars().filter(|c| !c.is_control()).take(200).collect();
            format!(": {s}")
        })
        .unwrap_or_default()
}

/// The sealed token for one sandbox request to a minting target, its age
/// recorded in the audit line; a failure is the request's 502.
pub(crate) async fn use_token(
    ctx: &super::context::ConnCtx,
    relay: &super::Relay,
    m: &Minted,
    audit: &crate::audit::RequestAudit,
) -> Result<HeaderValue, super::errors::RelayError> {
    let t = m
        .token(
            &relay.forwarder,
            relay.proxy_authorization.as_ref(),
            relay.limits.response_timeout,
        )
        .await
        .map_err(|source| super::errors::RelayError::Mint {
            host: ctx.sni.clone(),
            secret: ctx.secret_name.clone(),
            source: Box::new(source),
        })?;
    audit.set_minted_age(t.age);
    Ok(t.sealed)
}

/// After a reload, the minting targets of `new` whose sealed secret and
/// token URL are those of the relay in force (`old`) take over its state,
/// cached token included, so an unchanged target does not mint again. A
/// target whose secret or URL changed keeps its fresh, empty state and
/// mints anew. The caller checks that the tokenizer is the same: a token
/// sealed to another tokenizer's key would not open.
pub(crate) fn carry_over(
    new: &mut std::collections::BTreeMap<String, std::sync::Arc<Minted>>,
    old: &std::collections::BTreeMap<String, std::sync::Arc<Minted>>,
) {
    for (host, m) in new.iter_mut() {
        if let Some(prev) = old.get(host).filter(|prev| prev.same_source(m)) {
            tracing::debug!(%host, "the reload kept the target's minted token");
            *m = prev.clone();
        }
    }
}

/// The minting targets among `targets`, found by opening their sealed
/// secrets with the embedded tokenizer's `open_key` (a secret that does not
/// open is left to fail at its first request, as before).
pub fn detect(
    open_key: &crate::tokenizer::OpenKey,
    targets: &[super::Target],
) -> Result<Vec<(String, MintSpec)>, MintError> {
    let mut out = Vec::new();
    for t in targets {
        let Ok(secret) = crate::tokenizer::open(open_key, t.sealed.expose()) else {
            continue;
        };
        if let Some(spec) = MintSpec::of(&secret)? {
            tracing::info!(host = %t.host, secret = %t.secret_name, token_url = %spec.token_uri,
                "the secret mints short-lived tokens; proxypilot requests and refreshes them");
            out.push((t.host.clone(), spec));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::secret::{ClientCredentialsProcessor, GitHubAppProcessor};

    #[test]
    fn a_reload_keeps_the_state_only_of_unchanged_secrets_and_urls() {
        use std::collections::BTreeMap;
        use std::sync::Arc;
        let spec = |url: &str| MintSpec::from_url(url).unwrap();
        let m = |url: &str, parent: &'static str| {
            Arc::new(Minted::new(spec(url), HeaderValue::from_static(parent)))
        };
        let url = "https://auth.example.com/token";
        let old: BTreeMap<_, _> = [
            ("same".to_string(), m(url, "sealed-a")),
            ("secret".to_string(), m(url, "sealed-b")),
            ("url".to_string(), m(url, "sealed-c")),
        ]
        .into();
        let mut new: BTreeMap<_, _> = [
            ("same".to_string(), m(url, "sealed-a")),
            ("secret".to_string(), m(url, "sealed-b2")),
            (
                "url".to_string(),
                m("https://auth.example.com/other", "sealed-c"),
            ),
            ("added".to_string(), m(url, "sealed-a")),
        ]
        .into();
        carry_over(&mut new, &old);
        assert!(Arc::ptr_eq(&new["same"], &old["same"]));
        assert!(!Arc::ptr_eq(&new["secret"], &old["secret"]));
        assert!(!Arc::ptr_eq(&new["url"], &old["url"]));
        assert!(!Arc::ptr_eq(&new["added"], &old["same"]));
    }

    #[test]
    fn spec_from_the_secret() {
        let gh = Secret {
            github_app_processor: Some(GitHubAppProcessor {
                installation_id: "9".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let s = MintSpec::of(&gh).unwrap().unwrap();
        assert_eq!(s.kind, MintKind::GitHubApp);
        assert_eq!(
            s.token_uri,
            "http://api.github.com/app/installations/9/access_tokens"
        );
        let cc = Secret {
            client_credentials_processor: Some(ClientCredentialsProcessor {
                token_url: "http://plain.example/token".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(matches!(MintSpec::of(&cc), Err(MintError::TokenUrl { .. })));
        assert!(MintSpec::of(&Secret::default()).unwrap().is_none());
        assert_eq!(
            endpoint_message(br#"{"error":"invalid_grant","x":1}"#),
            ": invalid_grant"
        );
        assert_eq!(endpoint_message(b"not json"), "");
    }
}
