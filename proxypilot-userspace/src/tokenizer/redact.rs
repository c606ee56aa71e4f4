//! Redacting echoes of an injected secret from the upstream's response.
//!
//! An upstream (or a compromised or confused one) that echoes the
//! credential back in a header or the body would hand the real key to the
//! sandbox. The tokenizer knows what it injected, so it masks every
//! occurrence. The mask has the token's length, so Content-Length and the
//! framing of the response stay as the upstream sent them. A compressed
//! body is not searched.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use http::{HeaderValue, Response};
use http_body_util::BodyExt;
use memchr::memmem::Finder;
use zeroize::Zeroizing;

use super::{body::ReplaceBody, engine::InjectedTokens, ProxyBody};

/// Response extension: how many echoes were masked (final once the body
/// has been read to its end).
#[derive(Clone, Debug, Default)]
pub struct Redactions(pub Arc<AtomicUsize>);

impl Redactions {
    pub fn count(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// Tokens shorter than this are not searched for: masking every "abc"
/// would corrupt responses, and such a token is no secret anyway.
const MIN_TOKEN_LEN: usize = 8;

/// The mask for a token: `[REDACTED]` padded with `*` to its length.
fn mask(len: usize) -> Zeroizing<Vec<u8>> {
    let mut m = b"[REDACTED]".to_vec();
    m.resize(len.max(m.len()), b'*');
    m.truncate(len);
    Zeroizing::new(m)
}

/// Masks `injected` tokens in `resp`'s headers and (streamed) body, and
/// attaches a [`Redactions`] counter.
pub fn redact_response(resp: Response<ProxyBody>, injected: InjectedTokens) -> Response<ProxyBody> {
    let counter = Redactions::default();
    // One searcher per token, shared by the headers and the body.
    let finders: Vec<Finder<'static>> = injected
        .0
        .iter()
        .filter(|t| t.len() >= MIN_TOKEN_LEN)
        .map(|t| Finder::new(t.as_slice()).into_owned())
        .collect();
    let (mut parts, mut body) = resp.into_parts();
    for value in parts.headers.values_mut() {
        if !finders.iter().any(|f| f.find(value.as_bytes()).is_some()) {
            continue;
        }
        let mut bytes = value.as_bytes().to_vec();
        for f in &finders {
            let len = f.needle().len();
            while let Some(at) = f.find(&bytes) {
                bytes[at..at + len].copy_from_slice(&mask(len));
                counter.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Ok(v) = HeaderValue::from_bytes(&bytes) {
            *value = v;
        }
    }
    for f in finders {
        let m = mask(f.needle().len());
        body = ReplaceBody::with_finder(body, f, m)
            .with_counter(counter.0.clone())
            .boxed_unsync();
    }
    parts.extensions.insert(counter);
    Response::from_parts(parts, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::Full;

    fn resp(header: &str, body: &'static str) -> Response<ProxyBody> {
        Response::builder()
            .header("x-echo", header)
            .header("content-length", body.len())
            .body(
                Full::new(Bytes::from_static(body.as_bytes()))
                    .map_err(|e| match e {})
                    .boxed_unsync(),
            )
            .unwrap()
    }

    #[tokio::test]
    async fn masks_headers_and_body_keeping_lengths() {
        let secret = "sk-real-secret-123";
        let injected = InjectedTokens(vec![Zeroizing::new(secret.as_bytes().to_vec())]);
        let r = redact_response(
            resp(
                &format!("Bearer {secret}"),
                "key=sk-real-secret-123; again sk-real-secret-123",
            ),
            injected,
        );
        let count = r.extensions().get::<Redactions>().unwrap().clone();
        assert_eq!(r.headers()["x-echo"], "Bearer [REDACTED]********");
        assert_eq!(r.headers()["content-length"], "48");
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.len(), 48);
        assert!(!String::from_utf8_lossy(&body).contains(secret));
        assert_eq!(count.count(), 3);
    }

    #[tokio::test]
    async fn short_tokens_and_clean_responses_are_untouched() {
        let injected = InjectedTokens(vec![Zeroizing::new(b"abc".to_vec())]);
        let r = redact_response(resp("abc", "abcabc"), injected);
        assert_eq!(r.headers()["x-echo"], "abc");
        let count = r.extensions().get::<Redactions>().unwrap().clone();
        assert_eq!(r.into_body().collect().await.unwrap().to_bytes(), "abcabc");
        assert_eq!(count.count(), 0);
    }
}
