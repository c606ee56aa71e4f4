//! The engine both front doors call: for each `Proxy-Tokenizer` header, in
//! order, open the sealed secret, authenticate its use, validate the host,
//! and build its processor; then apply them all and strip the proxy
//! headers. As in Go, nothing is applied unless every secret passes.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use base64::Engine as _;
use http::{HeaderMap, Method, Uri};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::body::BodyTransform;
use super::error::TokenizerError;
use super::flysrc::{FlySrcVerifier, FLY_SRC, FLY_SRC_SIGNATURE};
use super::header::{self, PROXY_AUTHORIZATION, PROXY_TOKENIZER};
use super::keys::{OpenKey, SealKey};
use super::mint;
use super::processor::{self, Action};
use super::redact::{ask_for_identity, EchoNeedles, InjectedTokens};
use super::sealed_answer::ResponseSealer;
use super::secret::{compile_host_pattern, AuthRef, BearerAuth, FlySrcAuth, Secret};

/// Compiled host patterns kept; beyond this the cache starts over.
const PATTERN_CACHE_MAX: usize = 1024;
/// Opened secrets kept; beyond this the cache starts over.
const SECRET_CACHE_MAX: usize = 1024;
/// Larger sealed secrets are opened every time rather than cached, so the
/// cache stays small (a few MiB at most) whatever clients send. Real ones
/// are a few hundred bytes.
const SECRET_CACHE_MAX_CIPHERTEXT: usize = 4096;

/// An opened secret, its loggable shape, and the echoes of its tokens to
/// mask in responses (built once per secret).
type Opened = (Arc<Secret>, Arc<str>, Option<Arc<EchoNeedles>>);

/// Opens sealed secrets with one open key and applies them to requests.
pub struct Engine {
    open_key: OpenKey,
    seal_key: SealKey,
    fly_src: Option<FlySrcVerifier>,
    patterns: Mutex<HashMap<String, Arc<regex::Regex>>>,
    /// Opened secrets by sha256 of their ciphertext. Clients send the same
    /// sealed secret on every request, and opening it (two X25519
    /// multiplications) is most of the engine's cost. Only opening is
    /// cached: authentication and validation run on every request. The
    /// cache holds no more than the open key already unlocks.
    opened: Mutex<HashMap<[u8; 32], Opened>>,
}

/// The outcome of [`Engine::apply`] on a request's head.
#[derive(Debug)]
pub struct Applied {
    /// How many sealed secrets were applied.
    pub secrets: usize,
    /// What remains to do to the body (nothing for header-only processors).
    pub body: BodyTransform,
    /// What echoes of the values put into the request look like, to
    /// redact them from the response.
    pub injected: InjectedTokens,
    /// For a minting secret (jwt, client_credentials, github_app): what
    /// turns the token endpoint's answer into a sealed token. The front
    /// door runs it on the response.
    pub mint: Option<ResponseSealer>,
    /// The path a minting secret sends the request to (GitHub's token
    /// path); [`Engine::apply`] has already put it in the URI.
    pub path: Option<String>,
}

impl Engine {
    pub fn new(open_key: OpenKey) -> Self {
        Engine {
            seal_key: open_key.seal_key(),
            open_key,
            fly_src: None,
            patterns: Mutex::new(HashMap::new()),
            opened: Mutex::new(HashMap::new()),
        }
    }

    /// Load the open key from a file written by `proxypilot keygen`.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        Ok(Engine::new(OpenKey::from_file(path)?))
    }

    /// Verify `Fly-Src` headers for `fly_src_auth` secrets with this key.
    /// Without one, such secrets are refused (407).
    pub fn with_fly_src_verifier(mut self, v: FlySrcVerifier) -> Self {
        self.fly_src = Some(v);
        self
    }

    /// The seal key matching this engine's open key.
    pub fn seal_key(&self) -> &SealKey {
        &self.seal_key
    }

    /// Apply every `Proxy-Tokenizer` header of a request head.
    pub fn apply(&self, parts: &mut http::request::Parts) -> Result<Applied, TokenizerError> {
        let applied = self.apply_to(&parts.method, &mut parts.uri, &mut parts.headers)?;
        if let Some(path) = &applied.path {
            parts.uri = with_path(&parts.uri, path)?;
        }
        Ok(applied)
    }

    /// Same as [`Engine::apply`] for callers holding the method, URI and
    /// headers. The host validated is [`request_host`] of them. Only
    /// `sigv4_processor` changes the URI (its query, put in canonical form).
    pub fn apply_to(
        &self,
        method: &Method,
        uri: &mut Uri,
        headers: &mut HeaderMap,
    ) -> Result<Applied, TokenizerError> {
        let host = request_host(uri, headers);
        let values = headers
            .get_all(PROXY_TOKENIZER)
            .iter()
            .map(|v| v.to_str().map(str::to_owned))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| TokenizerError::BadHeader("the value is not visible ASCII".into()))?;

        let mut actions = Vec::with_capacity(values.len());
        let mut injected = InjectedTokens::default();
        let mut sealer = None;
        for value in &values {
            let (b64, params) = header::parse(value)?;
            let (secret, shape, needles) = self.open(b64)?;
            tracing::debug!(secret = %shape, host = %host, "applying sealed secret");
            if let Some(kind) = secret.unsupported_processor() {
                return Err(TokenizerError::UnsupportedProcessor(
                    kind,
                    "reseal it with inject_processor, inject_hmac_processor, inject_body_processor, oauth2_processor, sigv4_processor or multi_processor",
                ));
            }
            self.authenticate(&secret, (method, uri, &host), headers)?;
            self.validate(&secret, &host)?;
            let procs = secret
                .processors()
                .ok_or_else(|| TokenizerError::BadSecret("bad processor config".into()))?;
            if secret.multi_processor.is_some() && procs.iter().any(mint::is_minting) {
                return Err(TokenizerError::BadSecret(
                    "a minting processor (jwt, client_credentials, github_app) cannot be inside \
                     multi_processor: its token would come back unsealed; seal it on its own"
                        .into(),
                ));
            }
            for p in procs {
                let action = processor::plan(p, &params)?;
                if let Action::Mint(m) = &action {
                    if sealer.is_some() {
                        return Err(TokenizerError::Processor(
                            "more than one minting secret in one request; send one token request per secret"
                                .into(),
                        ));
                    }
                    sealer = Some(ResponseSealer::new(m.kind, &secret, &self.seal_key));
                    injected.0.extend(EchoNeedles::new(&m.sent));
                }
                actions.push(action);
            }
            injected.0.extend(needles);
        }
        let signs = actions.iter().any(|a| matches!(a, Action::Sigv4(_)));
        if signs && actions.iter().any(|a| matches!(a, Action::Body(_))) {
            return Err(crate::sigv4::Sigv4Error::WithBodyStep.into());
        }

        let mut body = BodyTransform::default();
        let mut path = None;
        for action in actions {
            match action {
                Action::SetHeader(name, value) => {
                    headers.insert(name, value);
                }
                Action::Body(step) => body.steps.push(step),
                Action::Sigv4(step) => step.sign(method, uri, headers)?,
                Action::Mint(m) => {
                    for (name, value) in m.set {
                        headers.insert(name, value);
                    }
                    for name in &m.remove {
                        headers.remove(name);
                    }
                    body.steps
                        .push(super::processor::BodyStep::Set(mint::body_bytes(&m.body)));
                    path = m.path;
                }
            }
        }
        if !injected.0.is_empty() || sealer.is_some() {
            // Echoes in a compressed response could not be masked, nor a
            // compressed token answer sealed. After
            // the processors: sigv4 drops Accept-Encoding before signing,
            // and an unsigned one added after it is what Go's transport
            // does too (it asks for gzip there).
            ask_for_identity(headers);
        }
        headers.remove(PROXY_TOKENIZER);
        headers.remove(PROXY_AUTHORIZATION);
        Ok(Applied {
            secrets: values.len(),
            body,
            injected,
            mint: sealer,
            path,
        })
    }

    fn open(&self, b64: &str) -> Result<Opened, TokenizerError> {
        let ct = super::seal::decode(b64)?;
        let id: [u8; 32] = Sha256::digest(&ct).into();
        if let Some(o) = self
            .opened
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
        {
            return Ok(o.clone());
        }
        let secret = super::seal::open_bytes(&self.open_key, &ct)?;
        let shape: Arc<str> = secret.strip_hazmat_string().into();
        let needles = EchoNeedles::new(&secret.sent_tokens());
        let opened = (Arc::new(secret), shape, needles);
        if ct.len() > SECRET_CACHE_MAX_CIPHERTEXT {
            return Ok(opened);
        }
        let mut cache = self.opened.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= SECRET_CACHE_MAX {
            cache.clear();
        }
        cache.insert(id, opened.clone());
        Ok(opened)
    }

    fn authenticate(
        &self,
        secret: &Secret,
        (method, uri, host): (&Method, &Uri, &str),
        headers: &HeaderMap,
    ) -> Result<(), TokenizerError> {
        match secret.auth() {
            Some(AuthRef::NoAuth) => Ok(()),
            Some(AuthRef::Bearer(b)) => bearer_auth(b, headers),
            Some(AuthRef::FlySrc(f)) => self.fly_src_auth(f, headers),
            Some(AuthRef::Macaroon(m)) => {
                let access = crate::macaroon::Access {
                    method: method.as_str(),
                    host,
                    path: uri.path(),
                    now: SystemTime::now(),
                };
                crate::macaroon::authenticate(m, &proxy_authorization_tokens(headers), &access)
            }
            Some(AuthRef::FlyioMacaroon) => Err(TokenizerError::NotAuthorized(
                "flyio_macaroon_auth is not supported by proxypilot's tokenizer (verifying a \
                 Fly.io macaroon needs Fly's API); reseal the secret with macaroon_auth, \
                 bearer_auth, fly_src_auth or no_auth, or send it to Fly's tokenizer"
                    .into(),
            )),
            None => Err(TokenizerError::BadSecret("bad auth config".into())),
        }
    }

    fn fly_src_auth(&self, cfg: &FlySrcAuth, headers: &HeaderMap) -> Result<(), TokenizerError> {
        let na = |m: String| TokenizerError::NotAuthorized(m);
        let verifier = self.fly_src.as_ref().ok_or_else(|| {
            na("fly_src_auth needs Fly-Src verification, but this tokenizer has no Fly-Src public key \
                (start it with --fly-src-pubkey, or use Fly's tokenizer)"
                .into())
        })?;
        let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let src = get(FLY_SRC).ok_or_else(|| na("missing Fly-Src header".into()))?;
        let sig = get(FLY_SRC_SIGNATURE).ok_or_else(|| na("missing Fly-Src signature".into()))?;
        let fs = verifier.verify(src, sig, SystemTime::now()).map_err(na)?;
        let allowed = |list: &Option<Vec<String>>, v: &str| {
            list.as_ref()
                .is_none_or(|l| l.is_empty() || l.iter().any(|a| a == v))
        };
        if !allowed(&cfg.allowed_orgs, &fs.org) {
            return Err(na(format!("org {} not allowed", fs.org)));
        }
        if !allowed(&cfg.allowed_apps, &fs.app) {
            return Err(na(format!("app {} not allowed", fs.app)));
        }
        if !allowed(&cfg.allowed_instances, &fs.instance) {
            return Err(na(format!("instance {} not allowed", fs.instance)));
        }
        Ok(())
    }

    fn validate(&self, secret: &Secret, host: &str) -> Result<(), TokenizerError> {
        if let Some(hosts) = &secret.allowed_hosts {
            if !hosts.iter().any(|h| h == host) {
                return Err(TokenizerError::HostNotAllowed(host.to_string()));
            }
        }
        if !secret.allowed_host_pattern.is_empty()
            && !self.pattern(&secret.allowed_host_pattern)?.is_match(host)
        {
            return Err(TokenizerError::HostNotAllowed(host.to_string()));
        }
        Ok(())
    }

    fn pattern(&self, p: &str) -> Result<Arc<regex::Regex>, TokenizerError> {
        let mut cache = self.patterns.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(re) = cache.get(p) {
            return Ok(re.clone());
        }
        let re = Arc::new(compile_host_pattern(p)?);
        if cache.len() >= PATTERN_CACHE_MAX {
            cache.clear();
        }
        cache.insert(p.to_string(), re.clone());
        Ok(re)
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("seal_key", &self.seal_key)
            .field("fly_src", &self.fly_src.is_some())
            .finish_non_exhaustive()
    }
}

/// `uri` with its path replaced and its query kept (Go sets `URL.Path`).
fn with_path(uri: &Uri, path: &str) -> Result<Uri, TokenizerError> {
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(pq.parse().map_err(|_| {
        TokenizerError::Processor("token_url's path is not a valid URI path".into())
    })?);
    Uri::from_parts(parts)
        .map_err(|_| TokenizerError::Processor("token_url's path is not a valid URI path".into()))
}

/// The host a secret is validated against, as Go's `r.URL.Host`: the URI's
/// authority (without userinfo, with the port if one was written) for
/// absolute-form and HTTP/2 requests, else the Host header, else "".
pub fn request_host(uri: &Uri, headers: &HeaderMap) -> String {
    if let Some(a) = uri.authority() {
        let s = a.as_str();
        return s.rsplit_once('@').map_or(s, |(_, h)| h).to_string();
    }
    headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

fn bearer_auth(cfg: &BearerAuth, headers: &HeaderMap) -> Result<(), TokenizerError> {
    for tok in proxy_authorization_tokens(headers) {
        let digest = Sha256::digest(&tok);
        if bool::from(cfg.digest.expose().ct_eq(digest.as_slice())) {
            return Ok(());
        }
    }
    Err(TokenizerError::NotAuthorized(
        "bad or missing proxy auth (send Proxy-Authorization: Bearer <token> with the token \
         whose sha256 digest the secret's bearer_auth holds)"
            .into(),
    ))
}

/// The candidate tokens of the Proxy-Authorization headers, as Go's
/// proxyAuthorizationTokens: `Bearer x` and `FlyV1 x` give x; `Basic b64`
/// gives the password, and its URL-query-unescaped form when that parses.
/// Schemes are case-sensitive there, and here.
fn proxy_authorization_tokens(headers: &HeaderMap) -> Vec<Zeroizing<Vec<u8>>> {
    let mut out = Vec::new();
    for v in headers.get_all(PROXY_AUTHORIZATION) {
        let Some((scheme, rest)) = split_once_byte(v.as_bytes(), b' ') else {
            continue;
        };
        match scheme {
            b"Bearer" | b"FlyV1" => out.push(Zeroizing::new(rest.to_vec())),
            b"Basic" => {
                let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(rest) else {
                    continue;
                };
                let raw = Zeroizing::new(raw);
                let Some((_, pw)) = split_once_byte(&raw, b':') else {
                    continue;
                };
                out.push(Zeroizing::new(pw.to_vec()));
                if let Some(plain) = crate::query::unescape(pw) {
                    out.push(plain);
                }
            }
            _ => {}
        }
    }
    out
}

fn split_once_byte(b: &[u8], sep: u8) -> Option<(&[u8], &[u8])> {
    let i = b.iter().position(|&c| c == sep)?;
    Some((&b[..i], &b[i + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_auth_tokens() {
        let mut h = HeaderMap::new();
        let b64 = base64::engine::general_purpose::STANDARD;
        h.append(PROXY_AUTHORIZATION, "Bearer abc".parse().unwrap());
        h.append(PROXY_AUTHORIZATION, "bearer lower".parse().unwrap());
        h.append(PROXY_AUTHORIZATION, "FlyV1 fm2_x".parse().unwrap());
        h.append(
            PROXY_AUTHORIZATION,
            format!("Basic {}", b64.encode("user:p%40ss+word"))
                .parse()
                .unwrap(),
        );
        h.append(
            PROXY_AUTHORIZATION,
            format!("Basic {}", b64.encode("nocolon")).parse().unwrap(),
        );
        h.append(PROXY_AUTHORIZATION, "NoScheme".parse().unwrap());
        let toks: Vec<Vec<u8>> = proxy_authorization_tokens(&h)
            .into_iter()
            .map(|t| t.to_vec())
            .collect();
        assert_eq!(
            toks,
            vec![
                b"abc".to_vec(),
                b"fm2_x".to_vec(),
                b"p%40ss+word".to_vec(),
                b"p@ss word".to_vec()
            ]
        );
    }

    #[test]
    fn host_of_request() {
        let h = HeaderMap::new();
        let u: Uri = "http://api.example.com:8443/x".parse().unwrap();
        assert_eq!(request_host(&u, &h), "api.example.com:8443");
        let u: Uri = "http://user:pw@api.example.com/x".parse().unwrap();
        assert_eq!(request_host(&u, &h), "api.example.com");
        let u: Uri = "/x".parse().unwrap();
        assert_eq!(request_host(&u, &h), "");
        let mut h = HeaderMap::new();
        h.insert(http::header::HOST, "api.example.com:443".parse().unwrap());
        assert_eq!(request_host(&u, &h), "api.example.com:443");
    }
}
