//! Open (private) and seal (public) keys, as the Go tokenizer writes them:
//! 32 bytes of hex each; seal key = X25519 base point multiplication of the
//! open key.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::Context;
use crypto_box::{PublicKey, SecretKey};
use zeroize::Zeroizing;

/// The tokenizer's private key. Debug never shows it.
#[derive(Clone)]
pub struct OpenKey(SecretKey);

/// The public key secrets are sealed to.
#[derive(Clone, PartialEq, Eq)]
pub struct SealKey(PublicKey);

/// A key that does not parse; says why without echoing the key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("key is not hex (expected 64 hex digits)")]
    NotHex,
    #[error("key has {0} bytes, expected 32 (64 hex digits)")]
    BadLength(usize),
}

fn parse_hex32(s: &str) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    let raw = Zeroizing::new(hex::decode(s.trim()).map_err(|_| KeyError::NotHex)?);
    let arr: [u8; 32] = raw
        .as_slice()
        .try_into()
        .map_err(|_| KeyError::BadLength(raw.len()))?;
    Ok(Zeroizing::new(arr))
}

impl OpenKey {
    /// A fresh random key from the OS generator.
    pub fn generate() -> Self {
        OpenKey(SecretKey::generate(&mut crypto_box::aead::OsRng))
    }

    /// Parse 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(s: &str) -> Result<Self, KeyError> {
        Ok(OpenKey(SecretKey::from(*parse_hex32(s)?)))
    }

    /// Read a key file written by `keygen` (or holding Go's OPEN_KEY).
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading open key file {}", path.display()))?,
        );
        OpenKey::from_hex(&text).with_context(|| {
            format!(
                "open key file {} is not a tokenizer open key (32 bytes of hex, as `proxypilot keygen --out` writes)",
                path.display()
            )
        })
    }

    /// Hex of the private key: hazmat, for writing the key file only.
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(self.0.to_bytes()))
    }

    /// The matching public seal key.
    pub fn seal_key(&self) -> SealKey {
        SealKey(self.0.public_key())
    }

    /// `crypto_box_seal_open`; None when the box does not open.
    pub(crate) fn unseal(&self, ciphertext: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        self.0.unseal(ciphertext).ok().map(Zeroizing::new)
    }

    /// Write the key to a new file created with mode 0600 (never widened
    /// afterwards), refusing to overwrite an existing file.
    pub fn write_new_file(&self, path: &Path) -> anyhow::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| {
                format!(
                    "creating open key file {} (it must not exist yet; keygen never overwrites a key)",
                    path.display()
                )
            })?;
        let mut line = self.to_hex();
        line.push('\n');
        f.write_all(line.as_bytes())
            .and_then(|_| f.sync_all())
            .with_context(|| format!("writing open key file {}", path.display()))
    }
}

impl fmt::Debug for OpenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "OpenKey(REDACTED, seal key {})",
            self.seal_key().to_hex()
        )
    }
}

impl SealKey {
    /// Parse 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(s: &str) -> Result<Self, KeyError> {
        Ok(SealKey(PublicKey::from(*parse_hex32(s)?)))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0.as_bytes())
    }

    /// `crypto_box_seal` of `plaintext` to this key.
    pub(crate) fn seal_bytes(&self, plaintext: &[u8]) -> Vec<u8> {
        // Only fails if the OS random generator fails, which nothing here
        // could recover from.
        self.0
            .seal(&mut crypto_box::aead::OsRng, plaintext)
            .expect("crypto_box_seal failed (OS random generator unavailable?)")
    }
}

impl fmt::Debug for SealKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SealKey({})", self.to_hex())
    }
}

impl fmt::Display for SealKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc7748_public_key() {
        // RFC 7748 section 6.1, Alice's key pair.
        let k =
            OpenKey::from_hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
                .unwrap();
        assert_eq!(
            k.seal_key().to_hex(),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
        assert!(!format!("{k:?}").contains("77076d"));
    }

    #[test]
    fn bad_keys() {
        assert_eq!(OpenKey::from_hex("zz").unwrap_err(), KeyError::NotHex);
        assert_eq!(
            OpenKey::from_hex("abcd").unwrap_err(),
            KeyError::BadLength(2)
        );
        assert!(SealKey::from_hex(&"ab".repeat(33)).is_err());
    }

    #[test]
    fn seal_roundtrip() {
        let k = OpenKey::generate();
        let ct = k.seal_key().seal_bytes(b"hello");
        assert_eq!(ct.len(), 32 + 16 + 5);
        assert_eq!(k.unseal(&ct).unwrap().as_slice(), b"hello");
        assert!(OpenKey::generate().unseal(&ct).is_none());
        assert!(k.unseal(&ct[..40]).is_none());
    }

    #[test]
    fn key_file_mode_and_no_overwrite() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("pp-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("open.key");
        let _ = std::fs::remove_file(&p);
        let k = OpenKey::generate();
        k.write_new_file(&p).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(OpenKey::from_file(&p).unwrap().seal_key(), k.seal_key());
        assert!(OpenKey::generate().write_new_file(&p).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
