//! Body work the processors need: a streaming placeholder replacement that
//! never buffers the whole body (inject_body, oauth2 with `placeholder`),
//! and a capped buffer for an HMAC over the body.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use zeroize::Zeroizing;

use super::error::TokenizerError;
use super::processor::{hmac_value, BodyStep};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type the front doors forward.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// Bodies larger than this are not buffered for an HMAC. Our own bound:
/// Go's tokenizer buffers the whole body, however large, and has no such
/// constant.
pub const MAX_HMAC_BODY: usize = 10 * 1024 * 1024;

/// What remains to do to the body after [`super::Engine::apply`].
#[derive(Default)]
#[must_use = "the body transform must be applied before forwarding"]
pub struct BodyTransform {
    pub(crate) steps: Vec<BodyStep>,
}

impl std::fmt::Debug for BodyTransform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self
            .steps
            .iter()
            .map(|s| match s {
                BodyStep::Replace { .. } => "replace",
                BodyStep::Hmac { .. } => "hmac",
                BodyStep::Set(_) => "set",
            })
            .collect();
        write!(f, "BodyTransform{names:?}")
    }
}

impl BodyTransform {
    /// True when the body can be forwarded untouched.
    pub fn is_identity(&self) -> bool {
        self.steps.is_empty()
    }

    /// True when a step must read the whole body first (HMAC over it).
    pub fn buffers(&self) -> bool {
        self.steps
            .iter()
            .any(|s| matches!(s, BodyStep::Hmac { .. }))
    }

    /// Apply the steps to `body`; HMAC steps set their header in
    /// `headers`, replacement steps drop Content-Length (the length
    /// changes; the body goes out chunked or as HTTP/2 DATA frames).
    pub async fn apply<B>(
        self,
        headers: &mut HeaderMap,
        body: B,
    ) -> Result<ProxyBody, TokenizerError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let mut body: ProxyBody = body.map_err(|e| -> BoxError { e.into() }).boxed_unsync();
        for step in self.steps {
            match step {
                BodyStep::Replace { placeholder, token } => {
                    headers.remove(http::header::CONTENT_LENGTH);
                    body = ReplaceBody::new(body, placeholder, token).boxed_unsync();
                }
                BodyStep::Hmac { key, fmt, dst } => {
                    let bytes = collect_capped(&mut body, MAX_HMAC_BODY).await?;
                    headers.insert(dst, hmac_value(&key, &bytes, &fmt)?);
                    body = Full::new(bytes).map_err(|e| match e {}).boxed_unsync();
                }
                BodyStep::Set(bytes) => {
                    // The client's body is dropped unread.
                    headers.insert(http::header::CONTENT_LENGTH, bytes.len().into());
                    body = Full::new(bytes).map_err(|e| match e {}).boxed_unsync();
                }
            }
        }
        Ok(body)
    }
}

/// Read a whole body, refusing one larger than `cap`. (Not
/// `http_body_util::Limited`: its `Into<BoxError>` bound trips rustc's
/// higher-ranked Send inference inside spawned futures.)
async fn collect_capped(body: &mut ProxyBody, cap: usize) -> Result<Bytes, TokenizerError> {
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| TokenizerError::BodyRead(e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > cap {
                return Err(TokenizerError::BodyTooLarge(cap));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// What [`ReplaceBody`] looks for in a stream and what it puts instead.
pub trait Matcher {
    /// The first occurrence in `hay`, as a byte range.
    fn find(&self, hay: &[u8]) -> Option<std::ops::Range<usize>>;
    /// Appends the replacement for the occurrence `found` to `out`.
    fn replace(&self, found: &[u8], out: &mut Vec<u8>);
    /// How many bytes at the end of `tail` to hold back: the longest suffix
    /// that the next chunk could complete into an occurrence. Holding back
    /// more would delay streamed events (SSE) until the next chunk arrives.
    fn partial_suffix(&self, tail: &[u8]) -> usize;
    /// Rewrites the body's trailers; returns how many occurrences it replaced.
    fn trailers(&self, _trailers: &mut HeaderMap) -> usize {
        0
    }
}

/// One placeholder, replaced by a token (inject_body, oauth2 placeholders).
pub struct Placeholder {
    finder: memchr::memmem::Finder<'static>,
    token: Zeroizing<Vec<u8>>,
}

impl Matcher for Placeholder {
    fn find(&self, hay: &[u8]) -> Option<std::ops::Range<usize>> {
        let at = self.finder.find(hay)?;
        Some(at..at + self.finder.needle().len())
    }

    fn replace(&self, _found: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(&self.token);
    }

    fn partial_suffix(&self, tail: &[u8]) -> usize {
        longest_partial_suffix(tail, std::iter::once(self.finder.needle()))
    }
}

/// The longest suffix of `tail` that is a proper prefix of one of
/// `needles`.
pub fn longest_partial_suffix<'a>(
    tail: &[u8],
    needles: impl Iterator<Item = &'a [u8]> + Clone,
) -> usize {
    let longest = needles.clone().map(<[u8]>::len).max().unwrap_or(0);
    let max_k = longest.saturating_sub(1).min(tail.len());
    (1..=max_k)
        .rev()
        .find(|&k| {
            let t = &tail[tail.len() - k..];
            needles.clone().any(|n| n.len() > k && n.starts_with(t))
        })
        .unwrap_or(0)
}

/// Replaces every occurrence a [`Matcher`] finds in a streamed body,
/// holding back between chunks only what could start an occurrence, so
/// occurrences split across chunks are found.
pub struct ReplaceBody<B, M = Placeholder> {
    inner: B,
    matcher: M,
    carry: Vec<u8>,
    trailers: Option<Frame<Bytes>>,
    done: bool,
    /// Counts replacements, when someone wants to know (redaction).
    counter: Option<std::sync::Arc<std::sync::atomic::AtomicUsize>>,
}

impl<B> ReplaceBody<B> {
    /// Replaces every `placeholder` by `token`.
    pub fn new(inner: B, placeholder: Vec<u8>, token: Zeroizing<Vec<u8>>) -> Self {
        assert!(!placeholder.is_empty(), "empty placeholder");
        Self::with_matcher(
            inner,
            Placeholder {
                finder: memchr::memmem::Finder::new(&placeholder).into_owned(),
                token,
            },
        )
    }
}

impl<B, M: Matcher> ReplaceBody<B, M> {
    pub fn with_matcher(inner: B, matcher: M) -> Self {
        ReplaceBody {
            inner,
            matcher,
            carry: Vec::new(),
            trailers: None,
            done: false,
            counter: None,
        }
    }

    /// Adds one to `counter` for every replacement made.
    pub fn with_counter(mut self, counter: std::sync::Arc<std::sync::atomic::AtomicUsize>) -> Self {
        self.counter = Some(counter);
        self
    }

    fn count(&self, n: usize) {
        if let (Some(c), true) = (&self.counter, n > 0) {
            c.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn feed(&mut self, data: Bytes) -> Bytes {
        // The common case, no occurrence and nothing carried over: pass the
        // chunk on without copying it.
        if self.carry.is_empty() && self.matcher.find(&data).is_none() {
            let k = self.matcher.partial_suffix(&data);
            self.carry = data[data.len() - k..].to_vec();
            return data.slice(..data.len() - k);
        }
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(&data);
        let mut out = Vec::with_capacity(buf.len());
        let mut i = 0;
        let mut n = 0;
        while let Some(r) = self.matcher.find(&buf[i..]) {
            out.extend_from_slice(&buf[i..i + r.start]);
            self.matcher.replace(&buf[i + r.start..i + r.end], &mut out);
            i += r.end.max(1);
            n += 1;
        }
        self.count(n);
        let k = self.matcher.partial_suffix(&buf[i..]);
        let keep_from = buf.len() - k;
        out.extend_from_slice(&buf[i..keep_from]);
        self.carry = buf[keep_from..].to_vec();
        Bytes::from(out)
    }
}

impl<B, M> Body for ReplaceBody<B, M>
where
    B: Body<Data = Bytes> + Unpin,
    M: Matcher + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        loop {
            if let Some(t) = self.trailers.take() {
                return Poll::Ready(Some(Ok(t)));
            }
            if self.done {
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let out = self.feed(data);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    Err(trailers) => {
                        let trailers = match trailers.into_trailers() {
                            Ok(mut t) => {
                                let n = self.matcher.trailers(&mut t);
                                self.count(n);
                                Frame::trailers(t)
                            }
                            Err(other) => other,
                        };
                        // Flush what we held back before the trailers.
                        self.trailers = Some(trailers);
                        self.done = true;
                        let tail = std::mem::take(&mut self.carry);
                        if !tail.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(tail)))));
                        }
                    }
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => {
                    self.done = true;
                    let tail = std::mem::take(&mut self.carry);
                    if !tail.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(tail)))));
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.trailers.is_none() && self.carry.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;

    async fn run(chunks: &[&str], ph: &str, tok: &str) -> String {
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c.as_bytes()))))
            .collect();
        let body = StreamBody::new(futures_util::stream::iter(frames));
        let rb = ReplaceBody::new(
            body,
            ph.as_bytes().to_vec(),
            Zeroizing::new(tok.as_bytes().to_vec()),
        );
        let out = rb.collect().await.unwrap().to_bytes();
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn replaces_across_chunks() {
        let ph = "{{ACCESS_TOKEN}}";
        assert_eq!(run(&["a{{ACCESS_TOKEN}}b"], ph, "T").await, "aTb");
        assert_eq!(
            run(&["a{{ACC", "ESS_TO", "KEN}}b{{", "ACCESS_TOKEN}}"], ph, "T").await,
            "aTbT"
        );
        // One byte at a time.
        let s = "x{{ACCESS_TOKEN}}y{{ACCESS_TOKEN}}{{ACCESS_TOKEN";
        let chunks: Vec<String> = s.chars().map(|c| c.to_string()).collect();
        let refs: Vec<&str> = chunks.iter().map(|s| s.as_str()).collect();
        assert_eq!(run(&refs, ph, "tok").await, "xtokytok{{ACCESS_TOKEN");
        // Overlapping prefixes and no match.
        assert_eq!(run(&["aaa", "ab"], "aab", "X").await, "aaX");
        assert_eq!(run(&["nothing here", ""], ph, "T").await, "nothing here");
        assert_eq!(run(&[], ph, "T").await, "");
        // The replacement is not rescanned.
        assert_eq!(run(&["PP"], "P", "PP").await, "PPPP");
    }

    #[tokio::test]
    async fn holds_back_only_a_possible_start_of_the_needle() {
        static ONE: &[u8] = b"data: one\n\n";
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(ONE))),
            Ok(Frame::data(Bytes::from_static(b"data: tw{{ACC"))),
        ];
        let mut rb = ReplaceBody::new(
            StreamBody::new(futures_util::stream::iter(frames)),
            b"{{ACCESS_TOKEN}}".to_vec(),
            Zeroizing::new(b"T".to_vec()),
        );
        // A whole SSE event goes out at once: nothing in it can start the needle.
        let first = rb.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "data: one\n\n");
        assert_eq!(
            first.as_ptr(),
            ONE.as_ptr(),
            "a clean chunk is passed on, not copied"
        );
        let second = rb.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(second, "data: tw", "only the possible start is held");
    }

    #[tokio::test]
    async fn hmac_step_and_limit() {
        let fmt =
            crate::processor::check_fmt(&Default::default(), &Default::default(), true).unwrap();
        let t = BodyTransform {
            steps: vec![BodyStep::Hmac {
                key: Zeroizing::new(b"key".to_vec()),
                fmt: fmt.clone(),
                dst: http::header::AUTHORIZATION,
            }],
        };
        let mut h = HeaderMap::new();
        let b = t
            .apply(&mut h, Full::new(Bytes::from_static(b"msg")))
            .await
            .unwrap();
        assert_eq!(b.collect().await.unwrap().to_bytes(), "msg");
        // HMAC-SHA256("key", "msg")
        assert_eq!(
            h["authorization"],
            "Bearer 2d93cbc1be167bcb1637a4a23cbff01a7878f0c50ee833954ea5221bb1b8c628"
        );
        let t = BodyTransform {
            steps: vec![BodyStep::Hmac {
                key: Zeroizing::new(b"key".to_vec()),
                fmt,
                dst: http::header::AUTHORIZATION,
            }],
        };
        let big = Full::new(Bytes::from(vec![0u8; MAX_HMAC_BODY + 1]));
        assert_eq!(
            t.apply(&mut h, big).await.unwrap_err(),
            TokenizerError::BodyTooLarge(MAX_HMAC_BODY)
        );
    }
}
