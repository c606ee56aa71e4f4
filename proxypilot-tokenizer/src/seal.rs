//! Sealing and opening secrets: JSON, libsodium `crypto_box_seal`, base64
//! std, exactly as Go's `Secret.Seal` / `box.OpenAnonymous`.

use base64::Engine as _;

use super::error::TokenizerError;
use super::keys::{OpenKey, SealKey};
use super::secret::Secret;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Seal a secret to `seal_key`; the result goes in `Proxy-Tokenizer`.
pub fn seal(seal_key: &SealKey, secret: &Secret) -> String {
    let json = zeroize::Zeroizing::new(secret.to_json());
    B64.encode(seal_key.seal_bytes(json.as_bytes()))
}

/// Open and parse a base64 sealed secret.
pub fn open(open_key: &OpenKey, b64: &str) -> Result<Secret, TokenizerError> {
    open_bytes(open_key, &decode(b64)?)
}

/// The ciphertext of a base64 sealed secret.
pub(crate) fn decode(b64: &str) -> Result<Vec<u8>, TokenizerError> {
    B64.decode(b64.trim()).map_err(|e| {
        TokenizerError::BadEncoding(format!(
            "the sealed secret is not standard base64 ({e}); send the output of `proxypilot seal` unchanged"
        ))
    })
}

/// Open and parse a sealed secret's ciphertext.
pub(crate) fn open_bytes(open_key: &OpenKey, ct: &[u8]) -> Result<Secret, TokenizerError> {
    let json = open_key.unseal(ct).ok_or(TokenizerError::Decryption)?;
    Secret::from_json(&json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::{InjectProcessor, NoAuth, SecretString};

    #[test]
    fn roundtrip_and_failures() {
        let k = OpenKey::generate();
        let s = Secret {
            inject_processor: Some(InjectProcessor {
                token: SecretString::new("t"),
                ..Default::default()
            }),
            no_auth: Some(NoAuth {}),
            ..Default::default()
        };
        let b = seal(&k.seal_key(), &s);
        assert_eq!(open(&k, &b).unwrap(), s);
        assert!(matches!(
            open(&k, "not base64!"),
            Err(TokenizerError::BadEncoding(_))
        ));
        assert_eq!(
            open(&OpenKey::generate(), &b),
            Err(TokenizerError::Decryption)
        );
        let raw = B64.decode(&b).unwrap();
        let trunc = B64.encode(&raw[..raw.len() - 1]);
        assert_eq!(open(&k, &trunc), Err(TokenizerError::Decryption));
        assert_eq!(
            open(&k, &B64.encode([0u8; 10])),
            Err(TokenizerError::Decryption)
        );
    }
}
