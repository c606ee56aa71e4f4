//! `sigv4_processor`: re-sign an AWS Signature Version 4 request with the
//! sealed keys, as superfly/tokenizer's `Sigv4ProcessorConfig` does
//! (processor.go, a60499d) with aws-sdk-go-v2's `v4.Signer.SignHTTP`
//! (v1.30.3).
//!
//! The client signs its request with placeholder keys. From its
//! `Authorization` header the tokenizer takes the `Credential` scope's
//! date, region and service, and swaps region and service unless the
//! secret says `no_swap` (Go's bug compatibility: secrets sealed without
//! `no_swap` expect clients that write them the other way round). A
//! non-empty `X-Amz-Date` gives the signing time; without one it is
//! midnight of the scope's date. It then drops `Authorization` and the
//! headers Go drops before signing (the proxy and Fly headers, and
//! `Accept-Encoding`, `Via`, `X-Forwarded-*`, `X-Request-Start`), and signs
//! what is left, as Go's signer does:
//!
//! - the payload hash is the `X-Amz-Content-Sha256` header's value, taken
//!   as it is: an absent or empty header signs an empty hash (SignHTTP has
//!   no default; it is not `UNSIGNED-PAYLOAD`), which AWS refuses unless
//!   the header says the same;
//! - signed headers: `host` (the host the request goes to, without port
//!   80), `content-length` when above zero, and every other header except
//!   `Authorization`, `User-Agent`, `X-Amzn-Trace-Id` and `Expect`;
//! - the path is escaped once more (the SDK's default, right for every
//!   service but S3, which signs the path as sent);
//! - the query is re-encoded in canonical form (sorted, `%20` for spaces)
//!   and the request goes upstream with that query, as Go's does;
//! - `X-Amz-Date` is set to the signing time.
//!
//! The secret key never leaves the engine; the access key goes upstream in
//! the new `Authorization` (its echoes are masked, see [`crate::redact`]).

use std::fmt::Write as _;

use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

pub use crate::error::Sigv4Error;
pub use crate::secret::Sigv4Processor;

/// One planned re-signing.
pub(crate) struct Sigv4Step {
    access_key: Zeroizing<String>,
    secret_key: Zeroizing<String>,
    no_swap: bool,
}

impl Sigv4Step {
    pub(crate) fn new(cfg: &Sigv4Processor) -> Result<Self, Sigv4Error> {
        if cfg.access_key.is_empty() {
            return Err(Sigv4Error::MissingAccessKey);
        }
        if cfg.secret_key.is_empty() {
            return Err(Sigv4Error::MissingSecretKey);
        }
        Ok(Sigv4Step {
            access_key: Zeroizing::new(cfg.access_key.expose().to_string()),
            secret_key: Zeroizing::new(cfg.secret_key.expose().to_string()),
            no_swap: cfg.no_swap,
        })
    }

    /// Re-sign the request in place: headers, and the query put in
    /// canonical form.
    pub(crate) fn sign(
        &self,
        method: &Method,
        uri: &mut Uri,
        headers: &mut HeaderMap,
    ) -> Result<(), Sigv4Error> {
        let auth = headers
            .get(http::header::AUTHORIZATION)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        if auth.is_empty() {
            return Err(Sigv4Error::NoAuthorization);
        }
        let scope = parse_scope(&auth, self.no_swap)?;
        let time = match headers
            .get("x-amz-date")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .filter(|v| !v.is_empty())
        {
            Some(v) => parse_amz_date(&v).ok_or(Sigv4Error::BadAmzDate)?,
            None => scope
                .as_ref()
                .map(|s| format!("{}T000000Z", s.date))
                .unwrap_or_default(),
        };
        let scope = scope.ok_or(Sigv4Error::NoScope)?;
        if scope.region.is_empty() || scope.service.is_empty() {
            return Err(Sigv4Error::NoScope);
        }

        headers.remove(http::header::AUTHORIZATION);
        for name in STRIPPED.iter().chain(crate::hop::FLY_HOP_HEADERS.iter()) {
            headers.remove(*name);
        }
        headers.insert(
            HeaderName::from_static("x-amz-date"),
            HeaderValue::from_str(&time).map_err(|_| Sigv4Error::Internal)?,
        );

        let path = go_escaped_path(uri.path());
        let query = canonical_query(uri.query().unwrap_or(""));
        let host = signing_host(uri, headers);
        let payload_hash = headers
            .get("x-amz-content-sha256")
            .map(|v| v.as_bytes().to_vec())
            .unwrap_or_default();
        let (signed, canonical_headers) = canonical_headers(&host, headers);
        // Bytes, not text: a header value need not be UTF-8, and Go signs
        // its bytes.
        let mut canonical_request = Vec::new();
        for part in [method.as_str(), &escape_path(&path), &query] {
            canonical_request.extend_from_slice(part.as_bytes());
            canonical_request.push(b'\n');
        }
        canonical_request.extend_from_slice(&canonical_headers);
        canonical_request.push(b'\n');
        canonical_request.extend_from_slice(signed.as_bytes());
        canonical_request.push(b'\n');
        canonical_request.extend_from_slice(&payload_hash);
        let credential_scope = format!(
            "{}/{}/{}/aws4_request",
            &time[..8],
            scope.region,
            scope.service
        );
        let string_to_sign = format!(
            "AWS4-HMAC-SHA256\n{time}\n{credential_scope}\n{}",
            hex::encode(Sha256::digest(&canonical_request))
        );
        let key = signing_key(&self.secret_key, &time[..8], &scope.region, &scope.service);
        let signature = hex::encode(hmac(&key, string_to_sign.as_bytes()));
        let value = Zeroizing::new(format!(
            "AWS4-HMAC-SHA256 Credential={}/{credential_scope}, SignedHeaders={signed}, Signature={signature}",
            self.access_key.as_str()
        ));
        let mut value = HeaderValue::from_str(&value).map_err(|_| Sigv4Error::Internal)?;
        value.set_sensitive(true);
        headers.insert(http::header::AUTHORIZATION, value);

        let pq = if query.is_empty() {
            path
        } else {
            format!("{path}?{query}")
        };
        let mut parts = uri.clone().into_parts();
        parts.path_and_query = Some(pq.parse().map_err(|_| Sigv4Error::Internal)?);
        *uri = Uri::from_parts(parts).map_err(|_| Sigv4Error::Internal)?;
        Ok(())
    }
}

/// Removed before signing, as Go does (its FilteredHeaders, goproxy's
/// proxy headers, the reverse-proxy headers); the Fly headers too.
const STRIPPED: [&str; 11] = [
    "proxy-authorization",
    "proxy-tokenizer",
    "accept-encoding",
    "proxy-connection",
    "proxy-authenticate",
    "via",
    "x-forwarded-for",
    "x-forwarded-port",
    "x-forwarded-proto",
    "x-forwarded-ssl",
    "x-request-start",
];

/// Never signed (aws-sdk-go-v2 v1.30.3 `IgnoredHeaders`); `host` and
/// `content-length` are signed from the request itself.
const IGNORED: [&str; 6] = [
    "authorization",
    "user-agent",
    "x-amzn-trace-id",
    "expect",
    "host",
    "content-length",
];

#[derive(Debug, PartialEq, Eq)]
struct Scope {
    date: String,
    region: String,
    service: String,
}

/// The Credential scope of an Authorization header, by Go's reading: split
/// at spaces, trailing commas trimmed, the first `Credential=` section.
/// `Ok(None)` when there is none.
fn parse_scope(auth: &str, no_swap: bool) -> Result<Option<Scope>, Sigv4Error> {
    for section in auth.split(' ') {
        let section = section.trim_end_matches(',');
        let Some((k, v)) = section.split_once('=') else {
            continue;
        };
        if k != "Credential" {
            continue;
        }
        let parts: Vec<&str> = v.split('/').collect();
        if parts.len() != 5 {
            return Err(Sigv4Error::BadCredential);
        }
        if !valid_date(parts[1]) {
            return Err(Sigv4Error::BadCredentialDate);
        }
        let (mut region, mut service) = (parts[2].to_string(), parts[3].to_string());
        if !no_swap {
            std::mem::swap(&mut region, &mut service);
        }
        return Ok(Some(Scope {
            date: parts[1].to_string(),
            region,
            service,
        }));
    }
    Ok(None)
}

fn digits(s: &str) -> Option<u32> {
    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

/// Go's `time.Parse("20060102", s)`: exactly eight digits, a real date.
fn valid_date(s: &str) -> bool {
    if s.len() != 8 || !s.is_ascii() {
        return false;
    }
    let (Some(y), Some(m), Some(d)) = (digits(&s[..4]), digits(&s[4..6]), digits(&s[6..8])) else {
        return false;
    };
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    (1..=days).contains(&d)
}

/// Go's `time.Parse("20060102T150405Z", s)`, formatted back as the signer
/// does (a fraction after the seconds, which Go accepts, is dropped).
fn parse_amz_date(s: &str) -> Option<String> {
    if !s.is_ascii() || s.len() < 16 || s.as_bytes()[8] != b'T' || !s.ends_with('Z') {
        return None;
    }
    if !valid_date(&s[..8]) {
        return None;
    }
    let (h, mi, se) = (digits(&s[9..11])?, digits(&s[11..13])?, digits(&s[13..15])?);
    if h > 23 || mi > 59 || se > 59 {
        return None;
    }
    let rest = &s[15..s.len() - 1];
    if !rest.is_empty() {
        let frac = rest.strip_prefix(['.', ','])?;
        digits(frac)?;
    }
    Some(s[..15].to_string() + "Z")
}

/// The host Go signs: the request's authority (or Host header), without
/// port 80, which Go's SanitizeHostForHeader drops for an http:// URL
/// (and the tokenizer dials 443 in its place).
fn signing_host(uri: &Uri, headers: &HeaderMap) -> String {
    let host = match uri.authority() {
        Some(a) => {
            let s = a.as_str();
            s.rsplit_once('@').map_or(s, |(_, h)| h).to_string()
        }
        None => headers
            .get(http::header::HOST)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default(),
    };
    match host.strip_suffix(":80") {
        Some(h) => h.to_string(),
        None => host,
    }
}

/// Go's StripExcessSpaces then TrimSpace: spaces trimmed, runs of spaces
/// made one, other ASCII white space trimmed at the ends.
fn clean_value(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len());
    let mut prev_space = false;
    let trimmed = v.trim_ascii_start();
    for &b in trimmed {
        if b == b' ' {
            if !prev_space {
                out.push(b);
            }
            prev_space = true;
        } else {
            out.push(b);
            prev_space = false;
        }
    }
    let end = out.trim_ascii_end().len();
    out.truncate(end);
    out
}

/// The signed header list and the canonical header block (each line
/// ending in a newline).
fn canonical_headers(host: &str, headers: &HeaderMap) -> (String, Vec<u8>) {
    let mut names: Vec<&str> = vec!["host"];
    let length = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|n| *n > 0);
    if length.is_some() {
        names.push("content-length");
    }
    for name in headers.keys() {
        if !IGNORED.contains(&name.as_str()) {
            names.push(name.as_str());
        }
    }
    names.sort_unstable();
    let mut block = Vec::new();
    for name in &names {
        block.extend_from_slice(name.as_bytes());
        block.push(b':');
        match *name {
            "host" => block.extend_from_slice(&clean_value(host.as_bytes())),
            "content-length" => {
                let _ = write!(
                    StringSink(&mut block),
                    "{}",
                    length.expect("content-length is listed only when set")
                );
            }
            _ => {
                for (i, v) in headers.get_all(*name).iter().enumerate() {
                    if i > 0 {
                        block.push(b',');
                    }
                    block.extend_from_slice(&clean_value(v.as_bytes()));
                }
            }
        }
        block.push(b'\n');
    }
    (names.join(";"), block)
}

struct StringSink<'a>(&'a mut Vec<u8>);
impl std::fmt::Write for StringSink<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~')
}

fn push_escaped(out: &mut String, b: u8) {
    let _ = write!(out, "%{b:02X}");
}

/// smithy-go's `EscapePath(path, false)`: every byte but the unreserved
/// ones and `/` percent-encoded (so `%` becomes `%25`).
fn escape_path(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    for &b in p.as_bytes() {
        if unreserved(b) || b == b'/' {
            out.push(b as char);
        } else {
            push_escaped(&mut out, b);
        }
    }
    out
}

/// Go's `URL.EscapedPath()` of the path as received: the path itself when
/// it is a valid escaping (the bytes net/url leaves alone), else the
/// decoded path escaped again as net/url does. "/" for an empty path.
fn go_escaped_path(raw: &str) -> String {
    if raw.is_empty() {
        return "/".into();
    }
    let valid = raw
        .bytes()
        .all(|b| unreserved(b) || b"!$&'()*+,;=:@[]%/".contains(&b));
    if valid {
        return raw.to_string();
    }
    let decoded = percent_decode(raw.as_bytes());
    let mut out = String::with_capacity(decoded.len());
    for b in decoded {
        if unreserved(b) || b"$&+,/:;=@".contains(&b) {
            out.push(b as char);
        } else {
            push_escaped(&mut out, b);
        }
    }
    out
}

/// `%XX` decoded where well-formed; other bytes kept.
fn percent_decode(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            if let (Some(h), Some(l)) = (
                s.get(i + 1).and_then(|c| (*c as char).to_digit(16)),
                s.get(i + 2).and_then(|c| (*c as char).to_digit(16)),
            ) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

/// Go's `url.ParseQuery` then `Values.Encode` with each key's values
/// sorted and `+` written `%20`: what the signer signs and sends.
fn canonical_query(raw: &str) -> String {
    let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for part in raw.split('&') {
        if part.contains(';') || part.is_empty() {
            continue;
        }
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        let (Some(k), Some(v)) = (
            crate::query::unescape(k.as_bytes()),
            crate::query::unescape(v.as_bytes()),
        ) else {
            continue;
        };
        pairs.push((k.to_vec(), v.to_vec()));
    }
    // Keys sorted; a key's values sorted too (the signer sorts them).
    pairs.sort();
    let mut out = String::new();
    for (k, v) in pairs {
        if !out.is_empty() {
            out.push('&');
        }
        query_escape(&mut out, &k);
        out.push('=');
        query_escape(&mut out, &v);
    }
    out
}

/// Go's `url.QueryEscape`, with the space the signer turns into `%20`.
fn query_escape(out: &mut String, s: &[u8]) {
    for &b in s {
        if unreserved(b) {
            out.push(b as char);
        } else if b == b' ' {
            out.push_str("%20");
        } else {
            push_escaped(out, b);
        }
    }
}

fn hmac(key: &[u8], msg: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(msg);
    Zeroizing::new(m.finalize().into_bytes().to_vec())
}

fn signing_key(secret: &str, date: &str, region: &str, service: &str) -> Zeroizing<Vec<u8>> {
    let k = Zeroizing::new(format!("AWS4{secret}"));
    let k = hmac(k.as_bytes(), date.as_bytes());
    let k = hmac(&k, region.as_bytes());
    let k = hmac(&k, service.as_bytes());
    hmac(&k, b"aws4_request")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::SecretString;

    #[test]
    fn scope_by_go_rules() {
        let a = "AWS4-HMAC-SHA256 Credential=AK/20260102/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00";
        let s = parse_scope(a, true).unwrap().unwrap();
        assert_eq!((s.region.as_str(), s.service.as_str()), ("us-east-1", "s3"));
        let s = parse_scope(a, false).unwrap().unwrap();
        assert_eq!((s.region.as_str(), s.service.as_str()), ("s3", "us-east-1"));
        assert_eq!(s.date, "20260102");
        // No spaces after the commas: Go keeps the rest in the fifth part.
        let tight = "AWS4-HMAC-SHA256 Credential=AK/20260102/r/s/aws4_request,SignedHeaders=host,Signature=00";
        assert!(parse_scope(tight, true).unwrap().is_some());
        assert_eq!(
            parse_scope(
                "AWS4-HMAC-SHA256 Credential=AK/20260102/r/aws4_request",
                true
            ),
            Err(Sigv4Error::BadCredential)
        );
        assert_eq!(
            parse_scope(
                "AWS4-HMAC-SHA256 Credential=AK/20260231/r/s/aws4_request",
                true
            ),
            Err(Sigv4Error::BadCredentialDate)
        );
        assert_eq!(parse_scope("Bearer x", true), Ok(None));
    }

    #[test]
    fn dates_by_go_rules() {
        assert!(valid_date("20240229"));
        assert!(!valid_date("20230229"));
        assert!(!valid_date("2024022"));
        assert!(!valid_date("2024-2-1"));
        assert!(!valid_date("20241301"));
        assert_eq!(
            parse_amz_date("20260102T030405Z").as_deref(),
            Some("20260102T030405Z")
        );
        assert_eq!(
            parse_amz_date("20260102T030405.25Z").as_deref(),
            Some("20260102T030405Z")
        );
        for bad in [
            "20260102T240000Z",
            "20260102T030460Z",
            "20260102 030405Z",
            "20260102T030405",
            "20260102T030405+0000",
            "20260102T030405.Z",
        ] {
            assert_eq!(parse_amz_date(bad), None, "{bad}");
        }
    }

    #[test]
    fn query_in_go_canonical_form() {
        assert_eq!(canonical_query(""), "");
        assert_eq!(
            canonical_query("prefix=a+b&list-type=2&acl&x=%7e&b=2&b=1"),
            "acl=&b=1&b=2&list-type=2&prefix=a%20b&x=~"
        );
        // Pairs net/url refuses are dropped, as Go's URL.Query() drops them.
        assert_eq!(canonical_query("a=1;b=2&c=%zz&d=%2B&&e"), "d=%2B&e=");
    }

    #[test]
    fn path_escaping() {
        assert_eq!(escape_path("/bucket/a b%20c~"), "/bucket/a%20b%2520c~");
        assert_eq!(go_escaped_path(""), "/");
        assert_eq!(go_escaped_path("/a%2Fb"), "/a%2Fb");
        assert_eq!(go_escaped_path("/a{b}%41"), "/a%7Bb%7DA");
    }

    #[test]
    fn header_values_cleaned_as_go() {
        assert_eq!(clean_value(b"  a   b  c \t"), b"a b c");
        assert_eq!(clean_value(b"\ta\t\tb"), b"a\t\tb");
    }

    #[test]
    fn keys_never_in_log_shapes() {
        let j = br#"{"sigv4_processor":{"access_key":"AKIAREALKEY","secret_key":"sekritkey","no_swap":true},"no_auth":{}}"#;
        let s = crate::Secret::from_json(j).unwrap();
        for shown in [format!("{s:?}"), s.strip_hazmat_string()] {
            assert!(
                !shown.contains("AKIAREALKEY") && !shown.contains("sekritkey"),
                "{shown}"
            );
            assert!(
                shown.contains(r#""sigv4_processor":{"access_key":"REDACTED","secret_key":"REDACTED","no_swap":true}"#),
                "{shown}"
            );
        }
        // null reads as false, as Go's bool zero value.
        let j = br#"{"sigv4_processor":{"access_key":"a","secret_key":"b","no_swap":null},"no_auth":{}}"#;
        assert!(
            !crate::Secret::from_json(j)
                .unwrap()
                .sigv4_processor
                .unwrap()
                .no_swap
        );
    }

    #[test]
    fn signs_and_rewrites() {
        let step = Sigv4Step::new(&Sigv4Processor {
            access_key: SecretString::new("AKREAL"),
            secret_key: SecretString::new("SKREAL"),
            no_swap: true,
        })
        .unwrap();
        let mut uri: Uri = "http://s3.example.test:80/b/k?z=1&a=x y"
            .parse()
            .unwrap_or_else(|_| "http://s3.example.test:80/b/k?z=1&a=x%20y".parse().unwrap());
        let mut h = HeaderMap::new();
        h.insert(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=AKDUMMY/20260102/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00"
                .parse()
                .unwrap(),
        );
        h.insert("x-amz-date", "20260102T030405Z".parse().unwrap());
        h.insert("x-amz-content-sha256", "UNSIGNED-PAYLOAD".parse().unwrap());
        h.insert("user-agent", "ua".parse().unwrap());
        h.insert("x-forwarded-for", "1.2.3.4".parse().unwrap());
        h.insert("fly-region", "ams".parse().unwrap());
        h.insert("content-length", "0".parse().unwrap());
        step.sign(&Method::GET, &mut uri, &mut h).unwrap();
        let auth = h["authorization"].to_str().unwrap();
        assert!(
            auth.starts_with(
                "AWS4-HMAC-SHA256 Credential=AKREAL/20260102/us-east-1/s3/aws4_request, \
                 SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature="
            ),
            "{auth}"
        );
        assert!(h["authorization"].is_sensitive());
        assert!(!h.contains_key("x-forwarded-for") && !h.contains_key("fly-region"));
        assert_eq!(uri.path_and_query().unwrap().as_str(), "/b/k?a=x%20y&z=1");
        let dbg = format!("{h:?}");
        assert!(!dbg.contains("AKREAL"), "{dbg}");

        let mut h = HeaderMap::new();
        assert_eq!(
            step.sign(&Method::GET, &mut uri, &mut h),
            Err(Sigv4Error::NoAuthorization)
        );
        h.insert(
            "authorization",
            "AWS4-HMAC-SHA256 Signature=00".parse().unwrap(),
        );
        assert_eq!(
            step.sign(&Method::GET, &mut uri, &mut h),
            Err(Sigv4Error::NoScope)
        );
    }
}
