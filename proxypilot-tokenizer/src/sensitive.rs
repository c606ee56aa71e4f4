//! Credential material as the engine holds it: text and bytes that are
//! never printed (Debug shows `REDACTED`) and are wiped from memory on drop,
//! with Go's JSON shapes. Every secret type (secret.rs, mint) builds on these.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroize;

/// What Go's StripHazmat writes in place of secrets.
pub const REDACTED: &str = "REDACTED";

/// Text that must never be logged (a token). Debug prints `REDACTED`;
/// the memory is wiped on drop.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretString(String);

/// Bytes that must never be logged (an HMAC key, a digest); base64 on the
/// wire like Go's `[]byte`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretBytes(Vec<u8>);

impl SecretString {
    pub fn new(s: impl Into<String>) -> Self {
        SecretString(s.into())
    }
    /// The secret itself: only for injecting it.
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl SecretBytes {
    pub fn new(b: impl Into<Vec<u8>>) -> Self {
        SecretBytes(b.into())
    }
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Go's `base64.StdEncoding.DecodeString("REDACTED")`, which re-encodes
    /// as "REDACTED".
    pub(crate) fn redacted() -> Self {
        use base64::Engine as _;
        SecretBytes(
            base64::engine::general_purpose::STANDARD
                .decode(REDACTED)
                .unwrap_or_default(),
        )
    }
}

impl Drop for SecretString {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}
impl Drop for SecretBytes {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}
impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"REDACTED\"")
    }
}
impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"REDACTED\"")
    }
}

impl Serialize for SecretString {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}
impl<'de> Deserialize<'de> for SecretString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(SecretString(
            Option::<String>::deserialize(d)?.unwrap_or_default(),
        ))
    }
}
impl Serialize for SecretBytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use base64::Engine as _;
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}
impl<'de> Deserialize<'de> for SecretBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use base64::Engine as _;
        let s = zeroize::Zeroizing::new(Option::<String>::deserialize(d)?.unwrap_or_default());
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            // The message must not echo the (secret) input.
            .map(SecretBytes)
            .map_err(|_| serde::de::Error::custom("a binary field is not valid standard base64"))
    }
}

/// Go reads JSON `null` into a non-pointer field as its zero value.
pub(crate) fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}
