//! The caveats a `macaroon_auth` token may carry, checked against the
//! request as superfly/tokenizer checks them (its `macaroon/caveats.go`,
//! and superfly/macaroon's `ValidityWindow`). Any other caveat type
//! refuses, as in Go, where an unregistered caveat or one of Fly.io's
//! (which expect another kind of access) prohibits the request.

use std::time::SystemTime;

use super::wire::{self, RawCaveat, WireError};

/// superfly/macaroon's `CavValidityWindow`.
pub const VALIDITY_WINDOW: u64 = 4;
/// `Cav3P`: a third-party caveat (needs a discharge token).
pub const THIRD_PARTY: u64 = 11;
/// `CavBindToParentToken`: only in discharge tokens.
pub const BIND_TO_PARENT: u64 = 12;
/// `CavMinUserDefined`: the tokenizer's caveats are numbered from here.
const USER_DEFINED: u64 = 1 << 48;
pub const REQUEST_METHOD: u64 = USER_DEFINED;
pub const REQUEST_PATH: u64 = USER_DEFINED + 1;
pub const REQUEST_PATH_PREFIX: u64 = USER_DEFINED + 2;
pub const REQUEST_PATH_PATTERN: u64 = USER_DEFINED + 3;
pub const REQUEST_HOST: u64 = USER_DEFINED + 4;

/// What the caveats are checked against: the request as the tokenizer
/// received it.
#[derive(Debug, Clone, Copy)]
pub struct Access<'a> {
    pub method: &'a str,
    /// Go's `req.Host`: the absolute URL's host (with any port), else Host.
    pub host: &'a str,
    /// Go's `req.URL.EscapedPath()`: the path as sent.
    pub path: &'a str,
    pub now: SystemTime,
}

/// Why a caveat refused the request.
#[derive(Debug, thiserror::Error)]
pub enum CaveatError {
    #[error("caveat type {kind}: {source}")]
    Malformed {
        kind: u64,
        #[source]
        source: WireError,
    },
    #[error("the method {0} is not one the token allows")]
    Method(String),
    #[error("the path {0} is not one the token allows")]
    Path(String),
    #[error("the host {0} is not one the token allows")]
    Host(String),
    #[error("the token's RequestPathPattern is not a valid regular expression")]
    Pattern,
    #[error("the token is valid only from {not_before} to {not_after} (Unix seconds)")]
    Window { not_before: i64, not_after: i64 },
    #[error("caveat type {0} is not one the tokenizer knows")]
    Unknown(u64),
}

/// Checks one caveat against the request.
pub fn check(c: &RawCaveat<'_>, a: &Access<'_>) -> Result<(), CaveatError> {
    let malformed = |source| CaveatError::Malformed {
        kind: c.kind,
        source,
    };
    let list = || wire::strings(c.body).map_err(malformed);
    match c.kind {
        VALIDITY_WINDOW => {
            let (not_before, not_after) = wire::window(c.body).map_err(malformed)?;
            let now = match a.now.duration_since(SystemTime::UNIX_EPOCH) {
                Ok(d) => d.as_secs_f64(),
                Err(e) => -e.duration().as_secs_f64(),
            };
            // Go: refused when now is after NotAfter or before NotBefore.
            if now > not_after as f64 || now < not_before as f64 {
                return Err(CaveatError::Window {
                    not_before,
                    not_after,
                });
            }
            Ok(())
        }
        REQUEST_METHOD => one_of(&list()?, a.method, CaveatError::Method),
        REQUEST_PATH => one_of(&list()?, a.path, CaveatError::Path),
        REQUEST_HOST => one_of(&list()?, a.host, CaveatError::Host),
        REQUEST_PATH_PREFIX => {
            if list()?.iter().any(|p| a.path.as_bytes().starts_with(p)) {
                Ok(())
            } else {
                Err(CaveatError::Path(a.path.to_string()))
            }
        }
        REQUEST_PATH_PATTERN => {
            // Go compiles each pattern in turn and refuses at the first
            // one that does not compile.
            for p in list()? {
                let re = std::str::from_utf8(p)
                    .ok()
                    .and_then(|p| regex::RegexBuilder::new(p).size_limit(1 << 20).build().ok())
                    .ok_or(CaveatError::Pattern)?;
                if re.is_match(a.path) {
                    return Ok(());
                }
            }
            Err(CaveatError::Path(a.path.to_string()))
        }
        other => Err(CaveatError::Unknown(other)),
    }
}

fn one_of(
    allowed: &[&[u8]],
    value: &str,
    err: impl FnOnce(String) -> CaveatError,
) -> Result<(), CaveatError> {
    if allowed.contains(&value.as_bytes()) {
        Ok(())
    } else {
        Err(err(value.to_string()))
    }
}
