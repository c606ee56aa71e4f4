//! Redacting echoes of an injected secret from the upstream's response.
//!
//! An upstream (or a compromised or confused one) that echoes the
//! credential back would hand the real key to the sandbox. The tokenizer
//! knows what it injected, so it masks every occurrence it can recognise:
//! - the token as sent, and its common encodings: base64 (standard and
//!   URL-safe, with and without padding, and inside a longer base64 string
//!   at each of the three byte alignments), hex (lower and upper case) and
//!   percent-encoding; see [`EchoNeedles`];
//! - in the headers, the trailers (HTTP/1.1 chunked and HTTP/2) and the
//!   streamed body, including an echo cut across body chunks or across
//!   consecutive header values;
//! - never inside a compressed body: the request asks for identity
//!   encoding, and a response that is compressed all the same is refused
//!   (502) rather than relayed unsearched.
//!
//! The mask has the matched length, so Content-Length and the framing of
//! the response stay as the upstream sent them. SECURITY.md lists what is
//! out of reach.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use aho_corasick::{AhoCorasick, MatchKind};
use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use zeroize::Zeroizing;

use super::{
    body::{Matcher, ReplaceBody},
    ProxyBody,
};

/// The echoes to mask of the tokens a request carried, one entry per
/// secret whose tokens are long enough to search for; never printed.
#[derive(Default)]
pub struct InjectedTokens(pub Vec<Arc<EchoNeedles>>);

impl std::fmt::Debug for InjectedTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "InjectedTokens(<{} redacted>)", self.0.len())
    }
}

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
/// would corrupt responses, and such a token is no secret anyway. Encoded
/// forms shorter than this are not searched either.
const MIN_TOKEN_LEN: usize = 8;

/// Appends the mask for `len` bytes: `[REDACTED]` padded with `*`.
fn push_mask(len: usize, out: &mut Vec<u8>) {
    const MASK: &[u8] = b"[REDACTED]";
    out.extend_from_slice(&MASK[..len.min(MASK.len())]);
    out.resize(out.len() + len.saturating_sub(MASK.len()), b'*');
}

/// Every form in which the tokens of one secret are searched for, in one
/// automaton. Built once per opened secret (the engine caches it with the
/// secret), so a request pays only for the scan.
pub struct EchoNeedles {
    searcher: AhoCorasick,
    /// Pattern id → the needle, for holding back partial matches.
    needles: Vec<Zeroizing<Vec<u8>>>,
    /// Bytes some needle starts with, and (a bit set indexed by two
    /// bytes) the pairs some needle starts with: most positions of a chunk's
    /// tail are ruled out by one lookup.
    starts: [bool; 256],
    pairs: Box<[u64; 1024]>,
    longest: usize,
}

impl std::fmt::Debug for EchoNeedles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EchoNeedles(<{} redacted>)", self.needles.len())
    }
}

impl EchoNeedles {
    /// The needles for `tokens`; `None` when no token is long enough to be
    /// searched for.
    pub fn new(tokens: &[Zeroizing<Vec<u8>>]) -> Option<Arc<EchoNeedles>> {
        let mut needles: Vec<Zeroizing<Vec<u8>>> = Vec::new();
        for t in tokens.iter().filter(|t| t.len() >= MIN_TOKEN_LEN) {
            for form in encoded_forms(t) {
                if form.len() >= MIN_TOKEN_LEN && !needles.contains(&form) {
                    needles.push(form);
                }
            }
        }
        if needles.is_empty() {
            return None;
        }
        let searcher = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(needles.iter().map(|n| n.as_slice()))
            .ok()?;
        let mut starts = [false; 256];
        let mut pairs = Box::new([0u64; 1024]);
        for n in &needles {
            starts[n[0] as usize] = true;
            let i = pair_index(n[0], n[1]);
            pairs[i >> 6] |= 1 << (i & 63);
        }
        let longest = needles.iter().map(|n| n.len()).max().unwrap_or(0);
        Some(Arc::new(EchoNeedles {
            searcher,
            needles,
            starts,
            pairs,
            longest,
        }))
    }

    /// Masks every echo in `bytes`; returns how many.
    fn mask_in_place(&self, bytes: &mut [u8]) -> usize {
        let found: Vec<std::ops::Range<usize>> = self
            .searcher
            .find_iter(&*bytes)
            .map(|m| m.range())
            .collect();
        for r in &found {
            let mut mask = Vec::with_capacity(r.len());
            push_mask(r.len(), &mut mask);
            bytes[r.clone()].copy_from_slice(&mask);
        }
        found.len()
    }

    /// Masks echoes in the values of `headers`, scanning them joined in
    /// order, so an echo cut across consecutive values (of one name, or of
    /// neighbouring names) is found too. Returns how many.
    pub fn mask_headers(&self, headers: &mut HeaderMap) -> usize {
        let mut joined = Vec::new();
        let mut spans = Vec::with_capacity(headers.len());
        for v in headers.values() {
            let start = joined.len();
            joined.extend_from_slice(v.as_bytes());
            spans.push(start..joined.len());
        }
        let joined = &mut Zeroizing::new(joined);
        let n = self.mask_in_place(joined);
        if n == 0 {
            return 0;
        }
        for (value, span) in headers.values_mut().zip(spans) {
            if value.as_bytes() != &joined[span.clone()] {
                // The mask is visible ASCII: always a valid value.
                if let Ok(v) = HeaderValue::from_bytes(&joined[span]) {
                    *value = v;
                }
            }
        }
        n
    }
}

impl Matcher for Arc<EchoNeedles> {
    fn find(&self, hay: &[u8]) -> Option<std::ops::Range<usize>> {
        self.searcher.find(hay).map(|m| m.range())
    }

    fn replace(&self, found: &[u8], out: &mut Vec<u8>) {
        push_mask(found.len(), out);
    }

    fn partial_suffix(&self, tail: &[u8]) -> usize {
        // Earliest start wins (the longest suffix); most positions are
        // rejected by the tables.
        let from = tail.len().saturating_sub(self.longest - 1);
        let may_start = |p: usize| match tail.get(p + 1) {
            Some(&next) => {
                let i = pair_index(tail[p], next);
                self.pairs[i >> 6] >> (i & 63) & 1 == 1
            }
            None => self.starts[tail[p] as usize],
        };
        (from..tail.len())
            .find(|&p| {
                may_start(p) && {
                    let t = &tail[p..];
                    self.needles
                        .iter()
                        .any(|n| n.len() > t.len() && n.starts_with(t))
                }
            })
            .map_or(0, |p| tail.len() - p)
    }

    fn trailers(&self, trailers: &mut HeaderMap) -> usize {
        self.mask_headers(trailers)
    }
}

fn pair_index(a: u8, b: u8) -> usize {
    (a as usize) << 8 | b as usize
}

/// The forms an echo of `token` can take. Inside a longer base64 string
/// the token's bytes can start at any of three positions of a 3-byte
/// group; for each, the characters that encode only the token's bytes
/// are searched for (the first and last one or two characters mix in
/// neighbouring bytes and stay visible).
fn encoded_forms(token: &[u8]) -> Vec<Zeroizing<Vec<u8>>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let z = |v: Vec<u8>| Zeroizing::new(v);
    let mut out = vec![z(token.to_vec())];
    for engine in [&STANDARD, &URL_SAFE] {
        out.push(z(engine.encode(token).into_bytes()));
    }
    for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
        for skip in 0..3 {
            let rest = &token[skip.min(token.len())..];
            let whole = rest.len() / 3 * 3;
            if skip == 0 {
                out.push(z(engine.encode(token).into_bytes()));
            }
            out.push(z(engine.encode(&rest[..whole]).into_bytes()));
        }
    }
    out.push(z(hex::encode(token).into_bytes()));
    out.push(z(hex::encode_upper(token).into_bytes()));
    for upper in [true, false] {
        out.push(z(percent_encode(token, upper)));
    }
    out
}

/// Percent-encodes every byte outside RFC 3986's unreserved set.
fn percent_encode(token: &[u8], upper: bool) -> Vec<u8> {
    let digits: &[u8; 16] = if upper {
        b"0123456789ABCDEF"
    } else {
        b"0123456789abcdef"
    };
    let mut out = Vec::with_capacity(token.len());
    for &b in token {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'%', digits[(b >> 4) as usize], digits[(b & 15) as usize]]);
        }
    }
    out
}

/// Sets `Accept-Encoding: identity`: a compressed response cannot be
/// searched for echoes, so ask for none (the request's own choice is
/// overridden).
pub fn ask_for_identity(headers: &mut HeaderMap) {
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
}

/// The response's content coding, unless it is absent or `identity`.
fn content_coding(headers: &HeaderMap) -> Option<String> {
    let mut codings = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("?").split(','))
        .map(|c| c.trim().to_ascii_lowercase())
        .filter(|c| !c.is_empty() && c != "identity")
        .peekable();
    codings.peek()?;
    Some(codings.collect::<Vec<_>>().join(", "))
}

/// Masks `injected` tokens in `resp`'s headers, trailers and (streamed)
/// body, and attaches a [`Redactions`] counter. A response that is
/// compressed although identity was asked for is replaced by a 502.
pub fn redact_response(resp: Response<ProxyBody>, injected: InjectedTokens) -> Response<ProxyBody> {
    let counter = Redactions::default();
    let (mut parts, mut body) = resp.into_parts();
    if !injected.0.is_empty() {
        if let Some(coding) = content_coding(&parts.headers) {
            tracing::warn!(%coding, "the upstream compressed its response although identity was asked for; refusing it (echoes of the secret could not be searched)");
            return compressed_refusal(&coding, counter);
        }
    }
    for needles in injected.0 {
        let n = needles.mask_headers(&mut parts.headers);
        counter.0.fetch_add(n, Ordering::Relaxed);
        body = ReplaceBody::with_matcher(body, needles)
            .with_counter(counter.0.clone())
            .boxed_unsync();
    }
    parts.extensions.insert(counter);
    Response::from_parts(parts, body)
}

fn compressed_refusal(coding: &str, counter: Redactions) -> Response<ProxyBody> {
    let text = format!(
        "proxypilot: the upstream answered with Content-Encoding: {coding} although proxypilot asked it for identity encoding. \
         A compressed response cannot be searched for echoes of the injected credential, so proxypilot refused to relay it. \
         Retry without asking for compression; if the API compresses regardless, report it to proxypilot's maintainers.\n"
    );
    let mut r = Response::new(
        Full::new(Bytes::from(text))
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *r.status_mut() = StatusCode::BAD_GATEWAY;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r.extensions_mut().insert(counter);
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Frame;
    use http_body_util::StreamBody;

    const SECRET: &str = "sk-real-secret-123";

    fn injected(secret: &str) -> InjectedTokens {
        InjectedTokens(
            EchoNeedles::new(&[Zeroizing::new(secret.as_bytes().to_vec())])
                .into_iter()
                .collect(),
        )
    }

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

    fn streamed(chunks: Vec<Vec<u8>>, trailers: Option<HeaderMap>) -> Response<ProxyBody> {
        let mut frames: Vec<Result<Frame<Bytes>, crate::body::BoxError>> = chunks
            .into_iter()
            .map(|c| Ok(Frame::data(Bytes::from(c))))
            .collect();
        if let Some(t) = trailers {
            frames.push(Ok(Frame::trailers(t)));
        }
        Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync())
    }

    /// The body as the client gets it, the trailers, and the count.
    async fn run(
        r: Response<ProxyBody>,
        secret: &str,
    ) -> (HeaderMap, Vec<u8>, Option<HeaderMap>, usize) {
        let r = redact_response(r, injected(secret));
        let count = r.extensions().get::<Redactions>().unwrap().clone();
        let (parts, body) = r.into_parts();
        let collected = body.collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        let body = collected.to_bytes().to_vec();
        (parts.headers, body, trailers, count.count())
    }

    #[tokio::test]
    async fn masks_headers_and_body_keeping_lengths() {
        let r = resp(
            &format!("Bearer {SECRET}"),
            "key=sk-real-secret-123; again sk-real-secret-123",
        );
        let (h, body, _, n) = run(r, SECRET).await;
        assert_eq!(h["x-echo"], "Bearer [REDACTED]********");
        assert_eq!(h["content-length"], "48");
        assert_eq!(body.len(), 48);
        assert!(!String::from_utf8_lossy(&body).contains(SECRET));
        assert_eq!(n, 3);
    }

    #[tokio::test]
    async fn short_tokens_and_clean_responses_are_untouched() {
        assert!(injected("abc").0.is_empty());
        let r = redact_response(resp("abc", "abcabc"), injected("abc"));
        assert_eq!(r.headers()["x-echo"], "abc");
        let count = r.extensions().get::<Redactions>().unwrap().clone();
        assert_eq!(r.into_body().collect().await.unwrap().to_bytes(), "abcabc");
        assert_eq!(count.count(), 0);
    }

    /// Every encoding the sandbox could ask an echo in.
    fn encodings(secret: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
        use base64::engine::general_purpose::{
            STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD,
        };
        vec![
            ("raw", secret.to_vec()),
            ("base64", STANDARD.encode(secret).into_bytes()),
            (
                "base64 unpadded",
                STANDARD_NO_PAD.encode(secret).into_bytes(),
            ),
            ("base64url", URL_SAFE.encode(secret).into_bytes()),
            (
                "base64url unpadded",
                URL_SAFE_NO_PAD.encode(secret).into_bytes(),
            ),
            ("hex", hex::encode(secret).into_bytes()),
            ("HEX", hex::encode_upper(secret).into_bytes()),
            ("percent", percent_encode(secret, true)),
            ("percent lower", percent_encode(secret, false)),
        ]
    }

    #[tokio::test]
    async fn every_encoding_is_masked_in_headers_body_and_trailers() {
        // "~~~" and "???" encode to `fn5+` and `Pz8/` (`fn5-`, `Pz8_` URL-safe);
        // `/+&=` are percent-encoded.
        let secret = "~~~???tok/+&=0123456789".to_string();
        for (name, form) in encodings(secret.as_bytes()) {
            let value = String::from_utf8(form.clone()).unwrap();
            let mut trailers = HeaderMap::new();
            trailers.insert(
                "x-trailer",
                HeaderValue::from_str(&format!("t={value}")).unwrap(),
            );
            let mut body = b"{\"echo\":\"".to_vec();
            body.extend_from_slice(&form);
            body.extend_from_slice(b"\"}");
            let mut r = streamed(vec![body.clone()], Some(trailers));
            r.headers_mut()
                .insert("x-echo", HeaderValue::from_str(&value).unwrap());
            let (h, out, t, n) = run(r, &secret).await;
            let f = memchr::memmem::Finder::new(&form);
            assert!(
                f.find(h["x-echo"].as_bytes()).is_none(),
                "{name} in a header"
            );
            assert!(f.find(&out).is_none(), "{name} in the body");
            let t = t.expect("trailers kept");
            assert!(
                f.find(t["x-trailer"].as_bytes()).is_none(),
                "{name} in a trailer"
            );
            assert!(t["x-trailer"].to_str().unwrap().starts_with("t=[REDACTED]"));
            assert_eq!(out.len(), body.len(), "{name}: length kept");
            assert_eq!(n, 3, "{name}");
        }
    }

    #[tokio::test]
    async fn base64_of_a_longer_string_is_masked_at_every_alignment() {
        use base64::engine::general_purpose::STANDARD;
        for prefix in ["", "a", "ab", "abc", "abcd"] {
            for suffix in ["", "x", "xy"] {
                let plain = format!("{{\"k\":\"{prefix}{SECRET}{suffix}\"}}");
                let encoded = STANDARD.encode(&plain);
                let (_, out, _, n) =
                    run(streamed(vec![encoded.clone().into_bytes()], None), SECRET).await;
                assert_eq!(n, 1, "{prefix:?}/{suffix:?}");
                // What survives decodes to at most two bytes of the secret
                // at either end.
                let left = String::from_utf8(out).unwrap();
                let visible = left.replace(['[', ']', '*'], "").replace("REDACTED", "");
                assert!(visible.len() + 16 <= encoded.len(), "{left}");
            }
        }
    }

    #[tokio::test]
    async fn an_echo_cut_across_chunks_or_header_values_is_masked() {
        let s = SECRET.as_bytes();
        // Every cut point of the body, and one byte at a time.
        for cut in 1..s.len() {
            let chunks = vec![
                [b"a".as_slice(), &s[..cut]].concat(),
                [&s[cut..], b"b".as_slice()].concat(),
            ];
            let (_, out, _, n) = run(streamed(chunks, None), SECRET).await;
            assert_eq!(out, b"a[REDACTED]********b", "cut at {cut}");
            assert_eq!(n, 1);
        }
        let bytes: Vec<Vec<u8>> = s.iter().map(|&b| vec![b]).collect();
        let (_, out, _, n) = run(streamed(bytes, None), SECRET).await;
        assert_eq!((out.len(), n), (s.len(), 1));
        // Two values of one header, and two neighbouring headers.
        let mut r = streamed(vec![], None);
        r.headers_mut()
            .append("x-part", HeaderValue::from_bytes(&s[..7]).unwrap());
        r.headers_mut()
            .append("x-part", HeaderValue::from_bytes(&s[7..]).unwrap());
        let (h, _, _, n) = run(r, SECRET).await;
        let joined: Vec<u8> = h
            .get_all("x-part")
            .iter()
            .flat_map(|v| v.as_bytes().to_vec())
            .collect();
        assert_eq!(joined, b"[REDACTED]********");
        assert_eq!(n, 1);
    }

    #[tokio::test]
    async fn a_clean_chunk_is_passed_on_and_only_a_possible_start_held_back() {
        static ONE: &[u8] = b"data: one\n\n";
        let r = streamed(vec![ONE.to_vec(), b"data: tw sk-re".to_vec()], None);
        let r = redact_response(r, injected(SECRET));
        let mut body = r.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "data: one\n\n");
        let second = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(second, "data: tw ", "only the possible start is held");
    }

    #[tokio::test]
    async fn a_compressed_response_is_refused_with_a_hint() {
        let mut r = resp("x", "compressed bytes");
        r.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        let (h, body, _, _) = run(r, SECRET).await;
        let text = String::from_utf8(body).unwrap();
        assert!(
            text.contains("Content-Encoding: gzip") && text.contains("identity"),
            "{text}"
        );
        assert_eq!(h[header::CONTENT_TYPE], "text/plain; charset=utf-8");
        let mut r = resp("x", "plain");
        r.headers_mut().insert(
            header::CONTENT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        let r = redact_response(r, injected(SECRET));
        assert_eq!(r.status(), StatusCode::OK);
        // Nothing to mask: nothing refused.
        let mut r = resp("x", "plain");
        r.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("br"));
        assert_eq!(redact_response(r, injected("abc")).status(), StatusCode::OK);
    }
}
