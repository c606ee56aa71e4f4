//! What a key may be used for: `--permit 'HOST METHOD PATH'` rules per
//! intercepted host.
//!
//! A host without permits is unrestricted (any method, any path). A host
//! with permits relays only the requests one of them matches; every other
//! request is refused with 403 before it reaches the tokenizer.
//!
//! Matching is on the request's path (never the query), after
//! [`path_segments`] has normalised it. Normalising refuses instead of
//! guessing wherever servers disagree on what a path means, so the path
//! the permit saw is the path the API serves:
//! - each segment is percent-decoded once (`%61cme` is `acme`); a bad
//!   escape (`%zz`, `%4`) or bytes that are not UTF-8 are refused;
//! - a `.` or `..` segment, written out or encoded (`%2e%2e`), is refused:
//!   some servers resolve it, others do not;
//! - a segment that decodes to `/`, `\` or `%` (`%2f`, `%5c`, `%25`), a raw
//!   `\`, or a control character is refused (servers split, or decode a
//!   second time, differently);
//! - an empty segment (`//`) is refused; one trailing `/` is ignored, so
//!   `/repos/acme/x/` is `/repos/acme/x`;
//! - paths compare case-sensitively: `/repos/ACME/x` does not match a
//!   permit for `/repos/acme/**`, even where the API ignores case;
//! - methods compare exactly, as HTTP defines them: a permit's METHOD is
//!   stored upper-case, and a request method `get` matches no `GET`
//!   permit (only `*`). `GET` does not imply `HEAD`.
//!
//! GraphQL endpoints (GitHub's `POST /graphql`) are one path: a permit
//! allows every query and mutation sent there, or none.

use std::collections::BTreeMap;
use std::fmt;

use http::Method;

/// One segment of a permit's path glob.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Glob {
    /// The segment, percent-decoded.
    Exact(String),
    /// `*`: exactly one segment.
    One,
    /// `**`: any number of segments, none included.
    Any,
}

/// `METHOD PATH`, e.g. `GET /repos/acme/**`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permit {
    /// `None` for `*`.
    method: Option<Method>,
    path: Vec<Glob>,
    /// As the operator wrote it (normalised spacing): for logs and hints.
    text: String,
}

impl Permit {
    /// Parses `METHOD PATH`.
    pub fn parse(spec: &str) -> Result<Permit, String> {
        let parts: Vec<&str> = spec.split_whitespace().collect();
        let [method, path] = parts[..] else {
            return Err(format!(
                "{spec:?}: expected METHOD PATH, e.g. \"GET /repos/acme/**\""
            ));
        };
        let method = match method {
            "*" => None,
            m => Some(
                Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                    .map_err(|_| format!("{spec:?}: {m:?} is not an HTTP method (or `*`)"))?,
            ),
        };
        if path.contains(['?', '#']) {
            return Err(format!(
                "{spec:?}: a permit matches the path only; remove the query"
            ));
        }
        let segments = path_segments(path).map_err(|e| format!("{spec:?}: {e}"))?;
        let mut globs = Vec::with_capacity(segments.len());
        // Wildcards are written out; an encoded `%2A` is a literal `*`.
        for (raw, s) in raw_segments(path).zip(segments) {
            globs.push(match raw {
                "*" => Glob::One,
                "**" => Glob::Any,
                r if r.contains('*') => {
                    return Err(format!(
                        "{spec:?}: `*` and `**` stand for whole segments only (found {r:?})"
                    ))
                }
                _ => Glob::Exact(s),
            });
        }
        let text = format!("{} {path}", method.as_ref().map_or("*", |m| m.as_str()));
        Ok(Permit {
            method,
            path: globs,
            text,
        })
    }

    /// Whether this permit allows `method` on the normalised `segments`.
    fn matches(&self, method: &Method, segments: &[String]) -> bool {
        self.method.as_ref().is_none_or(|m| m == method) && glob_matches(&self.path, segments)
    }
}

impl fmt::Display for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// `HOST METHOD PATH` (the `--permit` flag): the host and its permit.
pub fn parse_host_permit(spec: &str) -> Result<(String, Permit), String> {
    let spec = spec.trim();
    let (host, rest) = spec.split_once(char::is_whitespace).ok_or_else(|| {
        format!("{spec:?}: expected HOST METHOD PATH, e.g. \"api.github.com GET /repos/acme/**\"")
    })?;
    let host = crate::policy::normalize_host(host)?;
    Ok((host, Permit::parse(rest)?))
}

/// Segment-wise glob match; `**` may take zero or more segments. Dynamic
/// programming, so several `**` never backtrack exponentially.
fn glob_matches(globs: &[Glob], segments: &[String]) -> bool {
    // reach[j]: the globs so far can consume exactly segments[..j].
    let mut reach = vec![false; segments.len() + 1];
    reach[0] = true;
    for g in globs {
        let mut next = vec![false; segments.len() + 1];
        for j in 0..=segments.len() {
            match g {
                Glob::Any => next[j] = reach[j] || (j > 0 && next[j - 1]),
                Glob::One => next[j] = j > 0 && reach[j - 1],
                Glob::Exact(s) => next[j] = j > 0 && reach[j - 1] && segments[j - 1] == *s,
            }
        }
        reach = next;
    }
    reach[segments.len()]
}

/// The path's segments, percent-decoded, or why the path is refused (see
/// the module's documentation). `/` is no segment at all.
pub fn path_segments(path: &str) -> Result<Vec<String>, String> {
    if !path.starts_with('/') {
        return Err(format!("the path {path:?} does not start with /"));
    }
    let mut out = Vec::new();
    for raw in raw_segments(path) {
        if raw.is_empty() {
            return Err(format!(
                "the path {path:?} has an empty segment (`//`), which servers treat differently"
            ));
        }
        let seg = percent_decode(raw).ok_or_else(|| {
            format!(
                "the path {path:?} has a bad percent-escape or bytes that are not UTF-8 in {raw:?}"
            )
        })?;
        if seg == "." || seg == ".." {
            return Err(format!(
                "the path {path:?} has a {seg:?} segment ({raw:?}), which servers resolve differently"
            ));
        }
        if seg.contains(['/', '\\', '%']) || raw.contains('\\') || seg.chars().any(char::is_control)
        {
            return Err(format!(
                "the path {path:?} has {raw:?}, which decodes to a separator, a `%` or a control character"
            ));
        }
        out.push(seg);
    }
    Ok(out)
}

/// The path's segments as written: no leading `/`, one trailing `/`
/// dropped, nothing at all for `/` itself.
fn raw_segments(path: &str) -> impl Iterator<Item = &str> {
    let body = path.strip_prefix('/').unwrap_or(path);
    let body = body.strip_suffix('/').unwrap_or(body);
    let root = path == "/";
    body.split('/').filter(move |_| !root)
}

/// Decodes `%XX` escapes once; `None` for a malformed escape or non-UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(
                u8::from_str_radix(hex, 16)
                    .ok()
                    .filter(|_| hex.bytes().all(|c| c.is_ascii_hexdigit()))?,
            );
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// What the rules decided for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The host has no permits: everything passes, as without rules.
    Unrestricted,
    /// This permit of the host's rule set matched.
    Permitted(String),
    /// No permit matched, or the path was refused before matching.
    Refused(Refusal),
}

impl Decision {
    /// The audit line's `decision` field.
    pub fn name(&self) -> &'static str {
        match self {
            Decision::Unrestricted => "unrestricted",
            Decision::Permitted(_) => "permitted",
            Decision::Refused(_) => "refused",
        }
    }

    /// The audit line's `rule` field: the permit that matched, or the
    /// rule set that refused.
    pub fn rule(&self) -> String {
        match self {
            Decision::Unrestricted => String::new(),
            Decision::Permitted(p) => p.clone(),
            Decision::Refused(r) => format!("permits of {}", r.host),
        }
    }
}

/// Why a request was refused, and the rule set that refused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub host: String,
    /// What was wrong, for the client's `error`.
    pub why: String,
    /// The host's permits, for the client's `hint`.
    pub permits: Vec<String>,
}

/// Every intercepted host's permits.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    by_host: BTreeMap<String, Vec<Permit>>,
}

impl Rules {
    /// `permits` of `host` replace none: they are added to its set.
    pub fn add(&mut self, host: &str, permits: impl IntoIterator<Item = Permit>) {
        let set = self.by_host.entry(host.to_string()).or_default();
        for p in permits {
            if !set.contains(&p) {
                set.push(p);
            }
        }
        if set.is_empty() {
            self.by_host.remove(host);
        }
    }

    /// Decides `method path` (the path without its query) on `host`.
    pub fn check(&self, host: &str, method: &Method, path: &str) -> Decision {
        let Some(permits) = self.by_host.get(host) else {
            return Decision::Unrestricted;
        };
        let refuse = |why: String| {
            Decision::Refused(Refusal {
                host: host.to_string(),
                why,
                permits: permits.iter().map(Permit::to_string).collect(),
            })
        };
        let segments = match path_segments(path) {
            Ok(s) => s,
            Err(why) => return refuse(why),
        };
        match permits.iter().find(|p| p.matches(method, &segments)) {
            Some(p) => Decision::Permitted(p.to_string()),
            None => refuse(format!("{method} {path} is not permitted on {host}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(host: &str, specs: &[&str]) -> Rules {
        let mut r = Rules::default();
        r.add(host, specs.iter().map(|s| Permit::parse(s).unwrap()));
        r
    }

    fn allowed(r: &Rules, method: &str, path: &str) -> bool {
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        match r.check("api.github.com", &m, path) {
            Decision::Refused(_) => false,
            Decision::Unrestricted | Decision::Permitted(_) => true,
        }
    }

    #[test]
    fn a_host_without_permits_is_unrestricted() {
        let r = rules("api.openai.com", &["GET /v1/models"]);
        assert_eq!(
            r.check("api.github.com", &Method::DELETE, "/repos/x/../y"),
            Decision::Unrestricted
        );
    }

    #[test]
    fn globs_match_whole_segments() {
        let r = rules(
            "api.github.com",
            &["GET /repos/acme/**", "post /repos/acme/*/issues", "* /user"],
        );
        for (m, p) in [
            ("GET", "/repos/acme/x"),
            ("GET", "/repos/acme"),
            ("GET", "/repos/acme/x/pulls/1/files"),
            ("GET", "/repos/acme/x/"),
            ("POST", "/repos/acme/x/issues"),
            ("DELETE", "/user"),
            ("PATCH", "/user/"),
        ] {
            assert!(allowed(&r, m, p), "{m} {p}");
        }
        for (m, p) in [
            ("DELETE", "/repos/acme/x"),
            ("POST", "/repos/acme/x"),
            ("POST", "/repos/acme/issues"),
            ("POST", "/repos/acme/x/y/issues"),
            ("GET", "/repos/acmecorp/x"),
            ("GET", "/repos"),
            ("GET", "/"),
            ("GET", "/user/keys"),
            ("HEAD", "/repos/acme/x"),
        ] {
            assert!(!allowed(&r, m, p), "{m} {p}");
        }
    }

    #[test]
    fn several_double_stars_and_the_root() {
        let r = rules("api.github.com", &["GET /**/issues/**/comments", "GET /"]);
        assert!(allowed(&r, "GET", "/issues/comments"));
        assert!(allowed(&r, "GET", "/a/b/issues/1/2/comments"));
        assert!(!allowed(&r, "GET", "/a/b/issues/1/2/comment"));
        assert!(allowed(&r, "GET", "/"));
        // 40 segments against many `**`: answered at once (no backtracking).
        let many = rules("api.github.com", &["GET /**/a/**/a/**/a/**/a/**/b"]);
        let long = "/a".repeat(40);
        assert!(!allowed(&many, "GET", &long));
    }

    #[test]
    fn ambiguous_paths_are_refused_before_matching() {
        let r = rules("api.github.com", &["* /repos/acme/**", "* /**"]);
        for p in [
            "/repos/acme/../other",
            "/repos/acme/./x",
            "/repos/acme/%2e%2e/other",
            "/repos/acme/%2E%2e/other",
            "/repos/acme/.%2e/other",
            "/repos/acme/x%2f..%2fother",
            "/repos/acme/x%2F..%2Fother",
            "/repos/acme/x%5c..%5cother",
            "/repos/acme/x\\..\\other",
            "/repos//acme/x",
            "//repos/acme/x",
            "//",
            "/repos/acme/x//",
            "/repos/acme/%252e%252e/other",
            "/repos/acme/%zz",
            "/repos/acme/%4",
            "/repos/acme/%ff",
            "/repos/acme/a%00b",
            "repos/acme/x",
        ] {
            assert!(!allowed(&r, "GET", p), "{p}");
        }
    }

    #[test]
    fn encoded_ordinary_characters_match_their_decoded_form() {
        let r = rules(
            "api.github.com",
            &["GET /repos/acme/**", "GET /files/a%20b"],
        );
        assert!(allowed(&r, "GET", "/repos/%61cme/x"));
        assert!(allowed(&r, "GET", "/files/a%20b"));
        assert!(allowed(&r, "GET", "/repos/acme/caf%C3%A9"));
    }

    #[test]
    fn an_encoded_star_in_a_permit_is_a_literal_star() {
        let r = rules("api.github.com", &["GET /x/%2A"]);
        assert!(allowed(&r, "GET", "/x/*"));
        assert!(allowed(&r, "GET", "/x/%2a"));
        assert!(!allowed(&r, "GET", "/x/y"));
    }

    #[test]
    fn case_is_significant_for_paths_and_request_methods() {
        let r = rules("api.github.com", &["get /repos/acme/**"]);
        assert!(allowed(&r, "GET", "/repos/acme/x"));
        assert!(!allowed(&r, "GET", "/repos/ACME/x"));
        assert!(!allowed(&r, "GET", "/REPOS/acme/x"));
        assert!(!allowed(&r, "get", "/repos/acme/x"));
    }

    #[test]
    fn refusal_names_the_rule_set() {
        let r = rules("api.github.com", &["GET /repos/acme/**"]);
        let Decision::Refused(f) = r.check("api.github.com", &Method::DELETE, "/repos/acme/x")
        else {
            panic!("not refused")
        };
        assert_eq!(f.host, "api.github.com");
        assert_eq!(f.permits, ["GET /repos/acme/**"]);
        assert!(f.why.contains("DELETE /repos/acme/x"), "{}", f.why);
        let d = r.check("api.github.com", &Method::GET, "/repos/acme/x");
        assert_eq!(d.name(), "permitted");
        assert_eq!(d.rule(), "GET /repos/acme/**");
    }

    #[test]
    fn bad_permits_are_refused_with_the_reason() {
        for (spec, says) in [
            ("GET", "expected METHOD PATH"),
            ("GET /a /b", "expected METHOD PATH"),
            ("G(T /a", "not an HTTP method"),
            ("GET a/b", "does not start with /"),
            ("GET /a?x=1", "remove the query"),
            ("GET /a/../b", "resolve differently"),
            ("GET /a//b", "empty segment"),
            ("GET /a/b*", "whole segments only"),
        ] {
            let e = Permit::parse(spec).unwrap_err();
            assert!(e.contains(says), "{spec}: {e}");
        }
        let (host, p) = parse_host_permit(" API.GitHub.com  GET   /repos/acme/** ").unwrap();
        assert_eq!(host, "api.github.com");
        assert_eq!(p.to_string(), "GET /repos/acme/**");
        assert!(parse_host_permit("api.github.com").is_err());
    }
}
