//! `macaroon_auth`: a secret usable only with a superfly/macaroon token
//! signed by the secret's key, as superfly/tokenizer's
//! `MacaroonAuthConfig`. The client sends the token in
//! `Proxy-Authorization` (`FlyV1 fm2_...`, or Bearer, or Basic's
//! password); it passes when it is a token for the location `tokenizer`,
//! under the key id `sha256(key)[..16]`, whose HMAC-SHA256 chain the key
//! verifies, and whose every caveat allows the request. Several tokens
//! (headers, or comma-separated in one bundle): any one that passes.
//!
//! - [`wire`]: the binary format; [`caveat`]: the caveats and their checks.
//!
//! Deliberate differences from Go: a token with a third-party caveat is
//! refused even with its discharge (Go verifies the discharge offline);
//! the signature covers the bytes as sent, not Go's re-encoding of them,
//! so a token re-encoded in another MessagePack form is refused; caveats
//! Go skips as attestations are refused like any unknown caveat.

pub mod caveat;
pub mod wire;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub use caveat::{Access, CaveatError};
pub use wire::WireError;

use crate::sensitive::SecretBytes;

/// superfly/tokenizer's `macaroon.Location`.
pub const LOCATION: &str = "tokenizer";

/// `macaroon_auth: {"key": base64}` (Go's `MacaroonAuthConfig`): the
/// HMAC key tokens are signed with.
#[derive(Clone, Default, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MacaroonAuth {
    #[serde(default)]
    pub key: SecretBytes,
}

/// Go's `KeyFingerprint`: the key id a token of `key` carries.
pub fn key_fingerprint(key: &[u8]) -> [u8; 16] {
    let d = Sha256::digest(key);
    let mut out = [0u8; 16];
    out.copy_from_slice(&d[..16]);
    out
}

/// Why one permission token did not pass. Never holds token bytes.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("not a macaroon: {0}")]
    Format(#[source] WireError),
    #[error("a part of the bundle is not base64")]
    Base64,
    #[error("the token is for another key (key id {0})")]
    OtherKey(String),
    #[error("the signature does not verify under the secret's key")]
    Signature,
    #[error("third-party caveats are not supported by proxypilot's tokenizer")]
    ThirdParty,
    #[error("a bind-to-parent caveat belongs in a discharge token, not a permission token")]
    BindToParent,
    #[error(transparent)]
    Caveat(#[from] CaveatError),
    #[error("no token for the location \"tokenizer\"")]
    NoPermissionToken,
}

type HmacSha256 = Hmac<Sha256>;

fn sign(key: &[u8], msg: &[u8]) -> [u8; 32] {
    // HMAC takes keys of any length.
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC accepts any key length");
    m.update(msg);
    m.finalize().into_bytes().into()
}

/// Verifies one decoded permission token's signature chain under `key`
/// and returns its caveats to check (as Go's `Macaroon.Verify`, with no
/// discharges).
pub fn verify<'m, 'a>(
    m: &'m wire::Macaroon<'a>,
    key: &[u8],
) -> Result<&'m [wire::RawCaveat<'a>], TokenError> {
    if m.kid != key_fingerprint(key) {
        return Err(TokenError::OtherKey(hex::encode(m.kid)));
    }
    let mut mac = sign(key, m.nonce);
    for c in &m.caveats {
        match c.kind {
            caveat::THIRD_PARTY => return Err(TokenError::ThirdParty),
            caveat::BIND_TO_PARENT => return Err(TokenError::BindToParent),
            _ => {}
        }
        mac = sign(&mac, &c.signed);
    }
    if m.proof {
        mac = sign(b"proof-signature-finalization", &mac);
    }
    if !bool::from(mac.as_slice().ct_eq(m.tail)) {
        return Err(TokenError::Signature);
    }
    Ok(&m.caveats)
}

/// One Proxy-Authorization token (a bundle) checked as Go's
/// `bundle.ParseBundle` + `Verify` + `Validate`: parts that do not look
/// like macaroons are ignored, a malformed one fails the whole bundle, and
/// the bundle passes when one of its permission tokens verifies and its
/// caveats allow the request. The error is the last token's reason.
pub fn check_bundle(bundle: &[u8], key: &[u8], access: &Access<'_>) -> Result<(), TokenError> {
    let text = std::str::from_utf8(bundle).map_err(|_| TokenError::Base64)?;
    let mut raws = Vec::new();
    for part in strip_scheme(text).split(',') {
        let part = part.trim();
        let Some((pfx, b64)) = part.split_once('_') else {
            continue;
        };
        if !matches!(pfx, "fm1r" | "fm1a" | "fm2") {
            continue;
        }
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| TokenError::Base64)?;
        raws.push(raw);
    }
    let mut decoded = Vec::with_capacity(raws.len());
    for raw in &raws {
        decoded.push(wire::decode(raw).map_err(TokenError::Format)?);
    }
    let mut last = TokenError::NoPermissionToken;
    for m in decoded.iter().filter(|m| m.location == LOCATION.as_bytes()) {
        let result = verify(m, key).and_then(|caveats| {
            caveats
                .iter()
                .try_for_each(|c| caveat::check(c, access))
                .map_err(TokenError::from)
        });
        match result {
            Ok(()) => return Ok(()),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// The `macaroon_auth` arm of the engine: `tokens` are the
/// Proxy-Authorization tokens (Go's `proxyAuthorizationTokens`); any one
/// bundle that passes authorizes the request. Each refusal is logged at
/// debug with its reason (never the token); the client gets a 407.
pub fn authenticate(
    cfg: &MacaroonAuth,
    tokens: &[zeroize::Zeroizing<Vec<u8>>],
    access: &Access<'_>,
) -> Result<(), crate::TokenizerError> {
    let key = cfg.key.expose();
    for tok in tokens {
        match check_bundle(tok, key, access) {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::debug!(expected_kid = %hex::encode(key_fingerprint(key)), reason = %e,
                    "a Proxy-Authorization token did not pass macaroon_auth")
            }
        }
    }
    Err(crate::TokenizerError::NotAuthorized(
        "bad or missing proxy auth (macaroon_auth: send Proxy-Authorization: FlyV1 <token>, a \
         superfly/macaroon token for the location \"tokenizer\" signed with the secret's key \
         whose caveats allow this request)"
            .into(),
    ))
}

/// Go's `StripAuthorizationScheme`: drops leading `Bearer`/`FlyV1`
/// schemes (any case), however many.
fn strip_scheme(hdr: &str) -> &str {
    let hdr = hdr.trim();
    match hdr.split_once(' ') {
        Some((pfx, rest))
            if pfx.trim().eq_ignore_ascii_case("bearer")
                || pfx.trim().eq_ignore_ascii_case("flyv1") =>
        {
            strip_scheme(rest)
        }
        _ => hdr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_are_stripped_as_go_does() {
        assert_eq!(strip_scheme(" FlyV1 fm2_x "), "fm2_x");
        assert_eq!(strip_scheme("bearer FLYV1 fm2_x"), "fm2_x");
        assert_eq!(strip_scheme("Token fm2_x"), "Token fm2_x");
        assert_eq!(strip_scheme("fm2_x"), "fm2_x");
    }

    #[test]
    fn the_key_id_is_the_first_half_of_the_keys_sha256() {
        assert_eq!(
            hex::encode(key_fingerprint(b"")),
            "e3b0c44298fc1c149afbf4c8996fb924"
        );
    }
}
