//! Signing the JWTs the minting processors send, with ring (already in the
//! tree through rustls). The key is chosen from the PEM as Go's parseKey
//! does: PKCS#1 RSA, else PKCS#8 (RSA, P-256, P-384, Ed25519), else SEC1
//! EC. RSA signs RS256, P-256 ES256, P-384 ES384, Ed25519 EdDSA. Go also
//! signs ES512 with P-521 keys; ring cannot, so those are refused.

use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, RsaKeyPair};
use rustls::pki_types::PrivateKeyDer;
use zeroize::Zeroizing;

const B64URL: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Why a private key cannot sign. Never carries key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("missing private key")]
    Missing,
    #[error("invalid PEM-encoded private key: no PRIVATE KEY block in private_key")]
    NotPem,
    #[error(
        "unsupported private key: {0} (use an RSA key of 2048 bits or more, a P-256 or P-384 \
         EC key, or an Ed25519 key, in PKCS#1, PKCS#8 or SEC1 PEM)"
    )]
    Unsupported(&'static str),
    #[error("GitHub App requires an RSA private key (GitHub signs app JWTs with RS256 only)")]
    NotRsa,
    #[error("signing the JWT failed")]
    Sign,
}

/// A parsed signing key.
pub enum SigningKey {
    Rsa(RsaKeyPair),
    Es256(EcdsaKeyPair),
    Es384(EcdsaKeyPair),
    EdDsa(Ed25519KeyPair),
}

impl SigningKey {
    /// Parse the first private key of a PEM document.
    pub fn from_pem(pem: &[u8]) -> Result<SigningKey, KeyError> {
        if pem.is_empty() {
            return Err(KeyError::Missing);
        }
        let der = rustls_pemfile::private_key(&mut &pem[..])
            .ok()
            .flatten()
            .ok_or(KeyError::NotPem)?;
        let rng = SystemRandom::new();
        match der {
            PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der())
                .map(SigningKey::Rsa)
                .map_err(|_| KeyError::Unsupported("the PKCS#1 RSA key is rejected (too short?)")),
            PrivateKeyDer::Pkcs8(k) => {
                let k = k.secret_pkcs8_der();
                if let Ok(r) = RsaKeyPair::from_pkcs8(k) {
                    return Ok(SigningKey::Rsa(r));
                }
                ec_from_pkcs8(k, &rng)
                    .or_else(|| {
                        Ed25519KeyPair::from_pkcs8_maybe_unchecked(k)
                            .ok()
                            .map(SigningKey::EdDsa)
                    })
                    .ok_or(KeyError::Unsupported(
                        "the PKCS#8 key is not RSA (2048+ bits), P-256, P-384 or Ed25519",
                    ))
            }
            PrivateKeyDer::Sec1(k) => {
                let sec1 = k.secret_sec1_der();
                [P256_OID, P384_OID]
                    .iter()
                    .find_map(|oid| ec_from_pkcs8(&sec1_to_pkcs8(sec1, oid), &rng))
                    .ok_or(KeyError::Unsupported(
                        "the SEC1 EC key is not on P-256 or P-384",
                    ))
            }
            _ => Err(KeyError::Unsupported("unknown private key format")),
        }
    }

    /// The JWS `alg` this key signs with.
    pub fn alg(&self) -> &'static str {
        match self {
            SigningKey::Rsa(_) => "RS256",
            SigningKey::Es256(_) => "ES256",
            SigningKey::Es384(_) => "ES384",
            SigningKey::EdDsa(_) => "EdDSA",
        }
    }

    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, KeyError> {
        let rng = SystemRandom::new();
        match self {
            SigningKey::Rsa(k) => {
                let mut sig = vec![0; k.public().modulus_len()];
                k.sign(&signature::RSA_PKCS1_SHA256, &rng, msg, &mut sig)
                    .map_err(|_| KeyError::Sign)?;
                Ok(sig)
            }
            SigningKey::Es256(k) | SigningKey::Es384(k) => k
                .sign(&rng, msg)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| KeyError::Sign),
            SigningKey::EdDsa(k) => Ok(k.sign(msg).as_ref().to_vec()),
        }
    }

    /// A compact JWS of `claims` (header `{"alg":…,"typ":"JWT"}`, as
    /// golang-jwt writes it). The result is a bearer credential: wiped on
    /// drop, never logged.
    pub fn sign_jwt(&self, claims: &serde_json::Value) -> Result<Zeroizing<String>, KeyError> {
        let header = serde_json::json!({"alg": self.alg(), "typ": "JWT"});
        let mut out = Zeroizing::new(format!(
            "{}.{}",
            B64URL.encode(header.to_string()),
            B64URL.encode(claims.to_string())
        ));
        let sig = self.sign(out.as_bytes())?;
        out.push('.');
        out.push_str(&B64URL.encode(sig));
        Ok(out)
    }
}

fn ec_from_pkcs8(der: &[u8], rng: &SystemRandom) -> Option<SigningKey> {
    if let Ok(k) = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, der, rng) {
        return Some(SigningKey::Es256(k));
    }
    EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P384_SHA384_FIXED_SIGNING, der, rng)
        .ok()
        .map(SigningKey::Es384)
}

/// DER of the curve OIDs (prime256v1, secp384r1).
const P256_OID: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const P384_OID: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
/// DER of id-ecPublicKey.
const EC_PUBLIC_KEY_OID: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];

/// Wraps a SEC1 ECPrivateKey into PKCS#8 for `curve`, which is all ring
/// reads. ring refuses the result when the key's own curve parameter
/// differs, so trying each curve finds the right one.
fn sec1_to_pkcs8(sec1: &[u8], curve: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut alg = EC_PUBLIC_KEY_OID.to_vec();
    alg.extend_from_slice(curve);
    let mut body = vec![0x02, 0x01, 0x00];
    der_push(&mut body, 0x30, &alg);
    der_push(&mut body, 0x04, sec1);
    let mut out = Zeroizing::new(Vec::with_capacity(body.len() + 4));
    der_push(&mut out, 0x30, &body);
    body.iter_mut().for_each(|b| *b = 0);
    out
}

fn der_push(out: &mut Vec<u8>, tag: u8, content: &[u8]) {
    out.push(tag);
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else if n < 0x100 {
        out.extend_from_slice(&[0x81, n as u8]);
    } else {
        out.extend_from_slice(&[0x82, (n >> 8) as u8, n as u8]);
    }
    out.extend_from_slice(content);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_is_not_a_key() {
        assert_eq!(SigningKey::from_pem(b"").err(), Some(KeyError::Missing));
        assert_eq!(
            SigningKey::from_pem(b"not pem").err(),
            Some(KeyError::NotPem)
        );
        let cert = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert_eq!(SigningKey::from_pem(cert).err(), Some(KeyError::NotPem));
    }

    #[test]
    fn ed25519_jwt_verifies() {
        let rng = SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(pkcs8.as_ref())
        );
        let key = SigningKey::from_pem(pem.as_bytes()).unwrap();
        assert_eq!(key.alg(), "EdDSA");
        let jwt = key.sign_jwt(&serde_json::json!({"iss": "me"})).unwrap();
        let (signed, sig) = jwt.rsplit_once('.').unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        use ring::signature::KeyPair as _;
        signature::UnparsedPublicKey::new(&signature::ED25519, pair.public_key().as_ref())
            .verify(signed.as_bytes(), &B64URL.decode(sig).unwrap())
            .unwrap();
        let (h, c) = signed.split_once('.').unwrap();
        assert_eq!(B64URL.decode(h).unwrap(), br#"{"alg":"EdDSA","typ":"JWT"}"#);
        assert_eq!(B64URL.decode(c).unwrap(), br#"{"iss":"me"}"#);
    }

    #[test]
    fn p256_in_pkcs8_and_sec1() {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .unwrap();
        let b64 = base64::engine::general_purpose::STANDARD;
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            b64.encode(pkcs8.as_ref())
        );
        assert_eq!(SigningKey::from_pem(pem.as_bytes()).unwrap().alg(), "ES256");
        // ring's P-256 PKCS#8 holds the SEC1 key after 29 bytes (sequence,
        // version, algorithm, octet-string header).
        let sec1 = &pkcs8.as_ref()[29..];
        assert_eq!(sec1[0], 0x30);
        let pem = format!(
            "-----BEGIN EC PRIVATE KEY-----\n{}\n-----END EC PRIVATE KEY-----\n",
            b64.encode(sec1)
        );
        assert_eq!(SigningKey::from_pem(pem.as_bytes()).unwrap().alg(), "ES256");
    }
}
