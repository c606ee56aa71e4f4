//! The tokenizer's untrusted inputs:
//!
//! - mode 0: `tokenizer::header::parse` of a `Proxy-Tokenizer` value, and
//!   `header::format` round-tripping through it;
//! - mode 1: `Secret::from_json` on arbitrary bytes (the plaintext of a
//!   sealed secret), with the to_json/from_json round trip and the
//!   accessors the engine calls (processor, auth, host_pattern,
//!   strip_hazmat);
//! - mode 2: `tokenizer::open` with a fixed OpenKey on arbitrary base64;
//! - mode 3 (structured): fuzzer-built secrets sealed with the matching
//!   seal key, sent in Proxy-Tokenizer headers with fuzzed params, request
//!   headers and URI through `Engine::apply_to`, then the resulting body
//!   transform over a fuzzed, fuzzer-chunked body; sigv4_processor
//!   secrets get a SigV4-shaped Authorization (fuzzed scope and
//!   X-Amz-Date) and a fuzzed method, and the re-signed request must keep
//!   the secret key out of every header and leave a valid URI;
//! - mode 4: `ReplaceBody` streaming replacement against a naive replace.
#![no_main]

use std::collections::HashMap;
use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use http_body_util::{BodyExt, StreamBody};
use libfuzzer_sys::fuzz_target;
use proxypilot::tokenizer::body::ReplaceBody;
use proxypilot::tokenizer::header;
use proxypilot::tokenizer::{open, seal, Engine, OpenKey, SealKey, Secret};

/// A fixed key so crashes reproduce; the sealed corpus seeds use it too.
pub const OPEN_KEY_HEX: &str = "0101010101010101010101010101010101010101010101010101010101010101";
/// Every token the harness generates starts with this; no log shape may
/// contain it, and it is scrubbed from every non-secret field.
const MARK: &str = "SeCrEt";

fn engine() -> &'static (Engine, OpenKey, SealKey) {
    static E: OnceLock<(Engine, OpenKey, SealKey)> = OnceLock::new();
    E.get_or_init(|| {
        let k = OpenKey::from_hex(OPEN_KEY_HEX).unwrap();
        let sk = k.seal_key();
        (Engine::new(OpenKey::from_hex(OPEN_KEY_HEX).unwrap()), k, sk)
    })
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let mut f = std::pin::pin!(f);
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

fn naive_replace(hay: &[u8], pat: &[u8], rep: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hay.len());
    let mut i = 0;
    while i < hay.len() {
        if hay[i..].starts_with(pat) {
            out.extend_from_slice(rep);
            i += pat.len();
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    out
}

/// Splits `body` at the fuzzer's cut points into a streamed body.
fn chunked(
    body: &[u8],
    cuts: &[u16],
) -> impl http_body::Body<Data = Bytes, Error = std::convert::Infallible> + Send + 'static {
    let mut frames = Vec::new();
    let mut rest = body;
    for c in cuts {
        if rest.is_empty() {
            break;
        }
        let n = (*c as usize % (rest.len() + 1)).max(1).min(rest.len());
        frames.push(Ok(http_body::Frame::data(Bytes::copy_from_slice(
            &rest[..n],
        ))));
        rest = &rest[n..];
    }
    if !rest.is_empty() || frames.is_empty() {
        frames.push(Ok(http_body::Frame::data(Bytes::copy_from_slice(rest))));
    }
    StreamBody::new(futures_iter(frames))
}

fn futures_iter<T>(v: Vec<T>) -> impl futures_core::Stream<Item = T> + Send + 'static
where
    T: Send + 'static,
{
    struct It<T>(std::vec::IntoIter<T>);
    impl<T> Unpin for It<T> {}
    impl<T> futures_core::Stream for It<T> {
        type Item = T;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<T>> {
            std::task::Poll::Ready(self.0.next())
        }
    }
    It(v.into_iter())
}

async fn collect<B>(b: B) -> Result<Vec<u8>, B::Error>
where
    B: http_body::Body<Data = Bytes>,
{
    Ok(b.collect().await?.to_bytes().to_vec())
}

// ------------------------------------------------------------ mode 0-2

fn header_mode(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok((b64, params)) = header::parse(s) {
        assert!(!b64.is_empty() && !b64.contains(';'));
        assert_eq!(b64, b64.trim());
        let again = header::format(b64, &params);
        let (b2, p2) = header::parse(&again).expect("format output must parse");
        assert_eq!(b2, b64);
        assert_eq!(p2, params);
    }
}

fn json_mode(data: &[u8]) {
    let Ok(s) = Secret::from_json(data) else {
        return;
    };
    check_secret(&s);
}

fn check_secret(s: &Secret) {
    let json = s.to_json();
    let s2 = Secret::from_json(json.as_bytes()).expect("to_json output must parse");
    assert_eq!(s2.to_json(), json, "to_json is not a fixed point");
    let _ = s.processor();
    let _ = s.auth();
    let _ = s.unsupported_processor();
    if s.allowed_host_pattern.len() < 256 {
        let _ = s.host_pattern();
    }
    let stripped = s.strip_hazmat_string();
    assert!(
        Secret::from_json(stripped.as_bytes()).is_ok(),
        "stripped secret must still parse"
    );
}

fn open_mode(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(secret) = open(&engine().1, s) {
        check_secret(&secret);
    }
}

// ------------------------------------------------------------ mode 3

#[derive(Arbitrary, Debug)]
enum Proc {
    Inject,
    Hmac {
        sha256: bool,
        key: Vec<u8>,
    },
    InjectBody,
    OAuth2 {
        refresh: Option<String>,
    },
    OAuth2Body {
        refresh: Option<String>,
    },
    Sigv4 {
        no_swap: Option<bool>,
    },
    Two,
    None,
    /// jwt_processor with the test RSA key, or with these bytes as its key.
    Jwt {
        key: Option<Vec<u8>>,
        email: String,
        sub: String,
        scopes: String,
        token_url: String,
    },
    /// client_credentials_processor; its secret is the marked token.
    ClientCredentials {
        id: String,
        token_url: String,
        scopes: String,
    },
    /// github_app_processor with the test RSA key, or these bytes.
    GitHubApp {
        key: Option<Vec<u8>>,
        app_id: String,
        installation_id: String,
        token_url: Option<String>,
    },
    /// A minting processor inside multi_processor: always refused.
    MultiMint,
}

/// A test-only RSA key (the seal tests' fixture), so the minting
/// processors get as far as signing.
const TEST_RSA_PEM: &str = include_str!("../../fixtures/github-app-test-key.pem");

#[derive(Arbitrary, Debug)]
enum Auth {
    No,
    /// bearer_auth with the digest of this token; the request may send it.
    Bearer(String),
    FlySrc(Option<Vec<String>>),
    Macaroon,
    Two,
    None,
}

#[derive(Arbitrary, Debug)]
struct FuzzSecret {
    proc_: Proc,
    auth: Auth,
    token: String,
    fmt: Option<String>,
    allowed_fmt: Option<Vec<String>>,
    dst: Option<String>,
    allowed_dst: Option<Vec<String>>,
    placeholder: Option<String>,
    allowed_hosts: Option<Vec<String>>,
    allowed_host_pattern: Option<String>,
    /// Params after `;`: structured, or raw text.
    params: Result<Vec<(String, String)>, String>,
    /// Send `Proxy-Authorization: Bearer <bearer token>`, or this value.
    proxy_auth: Option<Result<(), String>>,
}

#[derive(Arbitrary, Debug)]
struct Structured {
    secrets: Vec<FuzzSecret>,
    uri: String,
    host: Option<String>,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    cuts: Vec<u16>,
    method: u8,
    /// A SigV4 Authorization: Credential date, region, service; and an
    /// X-Amz-Date.
    sigv4_auth: Option<(String, String, String, Option<String>)>,
}

fn scrub(s: &str) -> String {
    s.replace(MARK, "")
}

fn scrub_opt(s: &Option<String>) -> Option<String> {
    s.as_deref().map(scrub)
}

fn scrub_list(l: &Option<Vec<String>>) -> Option<Vec<String>> {
    l.as_ref().map(|v| v.iter().map(|s| scrub(s)).collect())
}

fn build_json(f: &FuzzSecret) -> serde_json::Value {
    use serde_json::json;
    let token = format!("{MARK}{}", f.token);
    let mut fmt_dst = serde_json::Map::new();
    if let Some(v) = scrub_opt(&f.fmt) {
        fmt_dst.insert("fmt".into(), json!(v));
    }
    if let Some(v) = scrub_list(&f.allowed_fmt) {
        fmt_dst.insert("allowed_fmt".into(), json!(v));
    }
    if let Some(v) = scrub_opt(&f.dst) {
        fmt_dst.insert("dst".into(), json!(v));
    }
    if let Some(v) = scrub_list(&f.allowed_dst) {
        fmt_dst.insert("allowed_dst".into(), json!(v));
    }
    let placeholder = scrub_opt(&f.placeholder);
    let oauth = |refresh: &Option<String>| {
        let mut t = json!({ "access_token": token });
        if let Some(r) = refresh {
            t["refresh_token"] = json!(format!("{MARK}{r}"));
        }
        t
    };
    let mut obj = serde_json::Map::new();
    let b64 = |b: &[u8]| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(b)
    };
    let inject = || {
        let mut p = fmt_dst.clone();
        p.insert("token".into(), json!(token));
        serde_json::Value::Object(p)
    };
    match &f.proc_ {
        Proc::Inject => {
            obj.insert("inject_processor".into(), inject());
        }
        Proc::Hmac { sha256, key } => {
            let mut p = fmt_dst.clone();
            p.insert("key".into(), json!(b64(key)));
            p.insert("hash".into(), json!(if *sha256 { "sha256" } else { "md5" }));
            obj.insert("inject_hmac_processor".into(), serde_json::Value::Object(p));
        }
        Proc::InjectBody => {
            let mut p = json!({ "token": token });
            if let Some(ph) = &placeholder {
                p["placeholder"] = json!(ph);
            }
            obj.insert("inject_body_processor".into(), p);
        }
        Proc::OAuth2 { refresh } => {
            obj.insert(
                "oauth2_processor".into(),
                json!({ "token": oauth(refresh) }),
            );
        }
        Proc::OAuth2Body { refresh } => {
            let mut p = json!({ "token": oauth(refresh) });
            if let Some(ph) = &placeholder {
                p["placeholder"] = json!(ph);
            }
            obj.insert("oauth2_body_processor".into(), p);
        }
        Proc::Sigv4 { no_swap } => {
            let mut p = json!({ "access_key": token, "secret_key": sigv4_secret(&f.token) });
            if let Some(n) = no_swap {
                p["no_swap"] = json!(n);
            }
            obj.insert("sigv4_processor".into(), p);
        }
        Proc::Two => {
            obj.insert("inject_processor".into(), inject());
            obj.insert("oauth2_processor".into(), json!({ "token": oauth(&None) }));
        }
        Proc::None => {}
        Proc::Jwt {
            key,
            email,
            sub,
            scopes,
            token_url,
        } => {
            let key = key.as_deref().unwrap_or(TEST_RSA_PEM.as_bytes());
            obj.insert(
                "jwt_processor".into(),
                json!({ "private_key": b64(key), "email": scrub(email), "sub": scrub(sub),
                        "scopes": scrub(scopes), "token_url": scrub(token_url) }),
            );
        }
        Proc::ClientCredentials {
            id,
            token_url,
            scopes,
        } => {
            obj.insert(
                "client_credentials_processor".into(),
                json!({ "client_id": scrub(id), "client_secret": token,
                        "token_url": scrub(token_url), "scopes": scrub(scopes) }),
            );
        }
        Proc::GitHubApp {
            key,
            app_id,
            installation_id,
            token_url,
        } => {
            let key = key.as_deref().unwrap_or(TEST_RSA_PEM.as_bytes());
            let mut p = json!({ "private_key": b64(key), "app_id": scrub(app_id),
                                "installation_id": scrub(installation_id) });
            if let Some(u) = token_url {
                p["token_url"] = json!(scrub(u));
            }
            obj.insert("github_app_processor".into(), p);
        }
        Proc::MultiMint => {
            obj.insert(
                "multi_processor".into(),
                json!([{ "inject_processor": inject() },
                       { "client_credentials_processor": { "client_id": "c",
                           "client_secret": token, "token_url": "u" } }]),
            );
        }
    }
    let digest = |t: &str| {
        use sha2::Digest as _;
        b64(&sha2::Sha256::digest(t.as_bytes()))
    };
    match &f.auth {
        Auth::No => {
            obj.insert("no_auth".into(), json!({}));
        }
        Auth::Bearer(t) => {
            obj.insert("bearer_auth".into(), json!({ "digest": digest(t) }));
        }
        Auth::FlySrc(orgs) => {
            obj.insert("fly_src_auth".into(), json!({ "allowed_orgs": orgs }));
        }
        Auth::Macaroon => {
            // A valid key: Proxy-Authorization values then reach the
            // macaroon verifier (the `macaroon` target goes deeper).
            obj.insert("macaroon_auth".into(), json!({ "key": b64(&[7u8; 32]) }));
        }
        Auth::Two => {
            obj.insert("no_auth".into(), json!({}));
            obj.insert("bearer_auth".into(), json!({ "digest": digest("x") }));
        }
        Auth::None => {}
    }
    if let Some(h) = scrub_list(&f.allowed_hosts) {
        obj.insert("allowed_hosts".into(), json!(h));
    }
    if let Some(p) = scrub_opt(&f.allowed_host_pattern) {
        obj.insert("allowed_host_pattern".into(), json!(p));
    }
    serde_json::Value::Object(obj)
}

/// The secret key of a fuzzed sigv4 secret: never sent anywhere.
fn sigv4_secret(token: &str) -> String {
    format!("{MARK}sk{token}")
}

fn structured_mode(u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    let mut st = Structured::arbitrary(u)?;
    st.secrets.truncate(4);
    let (engine, _, seal_key) = engine();
    let method = [
        Method::GET,
        Method::PUT,
        Method::POST,
        Method::DELETE,
        Method::HEAD,
    ][usize::from(st.method) % 5]
        .clone();
    let mut uri: Uri = match st.uri.parse() {
        Ok(u) => u,
        Err(_) => Uri::from_static("/"),
    };
    let mut headers = HeaderMap::new();
    let mut shapes: Vec<String> = Vec::new();
    let mut multi_mint_sent = false;
    if let Some(h) = &st.host {
        if let Ok(v) = HeaderValue::from_str(h) {
            headers.insert(http::header::HOST, v);
        }
    }
    for (n, v) in st.headers.iter().take(16) {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(n.as_bytes()),
            HeaderValue::from_bytes(v),
        ) {
            headers.append(n, v);
        }
    }
    if let Some((date, region, service, amz_date)) = &st.sigv4_auth {
        let auth = format!(
            "AWS4-HMAC-SHA256 Credential=AKDUMMY/{date}/{region}/{service}/aws4_request, \
             SignedHeaders=host, Signature=00"
        );
        if let Ok(v) = HeaderValue::from_str(&auth) {
            headers.insert(http::header::AUTHORIZATION, v);
        }
        if let Some(Ok(v)) = amz_date.as_deref().map(HeaderValue::from_str) {
            headers.insert("x-amz-date", v);
        }
    }
    let sigv4_keys: Vec<String> = st
        .secrets
        .iter()
        .filter(|f| matches!(f.proc_, Proc::Sigv4 { .. }))
        .map(|f| sigv4_secret(&f.token))
        .collect();
    for f in &st.secrets {
        let json = build_json(f);
        let Ok(secret) = Secret::from_json(json.to_string().as_bytes()) else {
            continue;
        };
        let b64 = seal(seal_key, &secret);
        let value = match &f.params {
            Ok(kv) => {
                let p: HashMap<String, String> = kv.iter().take(8).cloned().collect();
                header::format(&b64, &p)
            }
            Err(raw) => format!("{b64}; {raw}"),
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.append("proxy-tokenizer", v);
            multi_mint_sent |= matches!(f.proc_, Proc::MultiMint);
            // What the engine logs of it (its shape), checked once applied.
            shapes.push(secret.strip_hazmat_string());
        }
        match (&f.proxy_auth, &f.auth) {
            (Some(Ok(())), Auth::Bearer(t)) => {
                if let Ok(v) = HeaderValue::from_str(&format!("Bearer {t}")) {
                    headers.append("proxy-authorization", v);
                }
            }
            (Some(Err(raw)), _) => {
                if let Ok(v) = HeaderValue::from_str(raw) {
                    headers.append("proxy-authorization", v);
                }
            }
            _ => {}
        }
    }
    let n_values = headers.get_all("proxy-tokenizer").iter().count();
    let minting = st
        .secrets
        .iter()
        .filter(|f| {
            matches!(
                f.proc_,
                Proc::Jwt { .. } | Proc::ClientCredentials { .. } | Proc::GitHubApp { .. }
            )
        })
        .count();
    let key_b64 = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(TEST_RSA_PEM)
    };
    for shape in &shapes {
        assert!(
            !shape.contains(&key_b64[40..80]),
            "a private key leaked into a log shape: {shape}"
        );
    }
    match engine.apply_to(&method, &mut uri, &mut headers) {
        Ok(applied) => {
            for key in &sigv4_keys {
                for (name, v) in &headers {
                    assert!(
                        !v.as_bytes().windows(key.len()).any(|w| w == key.as_bytes()),
                        "a sigv4 secret key went out in {name}"
                    );
                }
            }
            let _: Uri = uri.to_string().parse().expect("the re-signed URI parses");
            assert_eq!(applied.secrets, n_values);
            assert!(
                !multi_mint_sent,
                "a minting processor inside multi_processor was applied"
            );
            assert!(applied.mint.is_none() || minting > 0);
            if applied.mint.is_some() {
                assert_eq!(
                    headers.get("accept-encoding").map(|v| v.as_bytes()),
                    Some(&b"identity"[..]),
                    "a token answer must come uncompressed to be sealed"
                );
            }
            assert!(
                headers.get("proxy-tokenizer").is_none(),
                "Proxy-Tokenizer left in"
            );
            assert!(
                headers.get("proxy-authorization").is_none(),
                "Proxy-Authorization left in"
            );
            for shape in &shapes {
                assert!(
                    !shape.contains(MARK),
                    "a token leaked into a log shape: {shape}"
                );
            }
            let buffers = applied.body.buffers();
            let body = chunked(&st.body, &st.cuts);
            let sets_body = applied.mint.is_some() && n_values == 1;
            match block_on(applied.body.apply(&mut headers, body)) {
                Ok(b) => {
                    let out = block_on(collect(b));
                    if let (true, Ok(out)) = (sets_body, &out) {
                        assert_eq!(
                            headers.get("content-length").and_then(|v| v.to_str().ok()),
                            Some(out.len().to_string().as_str()),
                            "a minting request's body and Content-Length differ"
                        );
                    }
                }
                Err(e) => assert!(buffers, "only HMAC steps may fail on the body: {e}"),
            }
        }
        Err(e) => {
            // Error messages are shown to the sandbox and logged: never a token.
            assert!(
                !e.to_string().contains(MARK),
                "a token leaked into an error: {e}"
            );
        }
    }
    Ok(())
}

// ------------------------------------------------------------ mode 4

#[derive(Arbitrary, Debug)]
struct Replace {
    placeholder: Vec<u8>,
    token: Vec<u8>,
    body: Vec<u8>,
    cuts: Vec<u16>,
}

fn replace_mode(u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    let r = Replace::arbitrary(u)?;
    if r.placeholder.is_empty() {
        return Ok(());
    }
    let expected = naive_replace(&r.body, &r.placeholder, &r.token);
    let b = ReplaceBody::new(
        chunked(&r.body, &r.cuts),
        r.placeholder.clone(),
        zeroize::Zeroizing::new(r.token.clone()),
    );
    let got = block_on(collect(b)).unwrap();
    assert_eq!(
        got, expected,
        "streamed replacement differs from a whole-body replace"
    );
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 5 {
        0 => header_mode(rest),
        1 => json_mode(rest),
        2 => open_mode(rest),
        3 => {
            let _ = structured_mode(&mut Unstructured::new(rest));
        }
        _ => {
            let _ = replace_mode(&mut Unstructured::new(rest));
        }
    }
});
