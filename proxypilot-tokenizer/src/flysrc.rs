//! Verification of Fly.io's signed `Fly-Src` header, as superfly/tokenizer's
//! flysrc package: `Fly-Src: instance=..;app=..;org=..;ts=<unix secs>` (four
//! `k=v` parts split by `;`, any order), `Fly-Src-Signature: base64 std of
//! ed25519(header value)`, at most 30 s old. The public key is 32 bytes hex
//! (on Fly: /.fly/fly-src.pub).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use ed25519_dalek::{Signature, VerifyingKey};

pub const FLY_SRC: &str = "fly-src";
pub const FLY_SRC_SIGNATURE: &str = "fly-src-signature";
pub const MAX_AGE: Duration = Duration::from_secs(30);

/// A verified Fly-Src.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlySrc {
    pub org: String,
    pub app: String,
    pub instance: String,
    pub ts: u64,
}

/// Checks Fly-Src signatures with one ed25519 public key.
#[derive(Debug, Clone)]
pub struct FlySrcVerifier {
    key: VerifyingKey,
}

impl FlySrcVerifier {
    /// From 64 hex digits.
    pub fn from_hex(s: &str) -> anyhow::Result<Self> {
        let raw = hex::decode(s.trim()).map_err(|_| {
            anyhow::anyhow!("Fly-Src public key is not hex (expected 64 hex digits)")
        })?;
        let arr: [u8; 32] = raw.as_slice().try_into().map_err(|_| {
            anyhow::anyhow!("Fly-Src public key has {} bytes, expected 32", raw.len())
        })?;
        let key = VerifyingKey::from_bytes(&arr)
            .map_err(|_| anyhow::anyhow!("Fly-Src public key is not a valid ed25519 key"))?;
        Ok(FlySrcVerifier { key })
    }

    /// From 64 hex digits, or from a file holding them (e.g. /.fly/fly-src.pub).
    pub fn from_hex_or_file(arg: &str) -> anyhow::Result<Self> {
        let t = arg.trim();
        if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Self::from_hex(t);
        }
        let text = std::fs::read_to_string(Path::new(arg))
            .map_err(|e| anyhow::anyhow!("reading Fly-Src public key file {arg}: {e}"))?;
        Self::from_hex(&text)
    }

    /// Verify a header pair at time `now`.
    pub fn verify(&self, src: &str, sig_b64: &str, now: SystemTime) -> Result<FlySrc, String> {
        let sig = base64::engine::general_purpose::STANDARD
            .decode(sig_b64.trim())
            .map_err(|_| "bad Fly-Src signature: not base64".to_string())?;
        let sig = Signature::from_slice(&sig).map_err(|_| "bad Fly-Src signature".to_string())?;
        // Plain RFC 8032 verification, as Go's ed25519.Verify.
        ed25519_dalek::Verifier::verify(&self.key, src.as_bytes(), &sig)
            .map_err(|_| "bad Fly-Src signature".to_string())?;
        let p = parse(src).map_err(|e| format!("bad Fly-Src header: {e}"))?;
        let now_s = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        // Go: time.Since(ts) > 30s is expired; a timestamp in the future is
        // accepted there too.
        if now_s.saturating_sub(p.ts) > MAX_AGE.as_secs() {
            return Err("expired Fly-Src header".into());
        }
        Ok(p)
    }
}

fn parse(hdr: &str) -> Result<FlySrc, String> {
    let parts: Vec<&str> = hdr.split(';').collect();
    if parts.len() != 4 {
        return Err(format!("malformed Fly-Src header ({} parts)", parts.len()));
    }
    let (mut org, mut app, mut instance, mut ts) = (None, None, None, None);
    for part in parts {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| "malformed Fly-Src header (missing =)".to_string())?;
        match k {
            "org" => org = Some(v.to_string()),
            "app" => app = Some(v.to_string()),
            "instance" => instance = Some(v.to_string()),
            "ts" => {
                ts = Some(
                    v.parse::<u64>()
                        .map_err(|_| "malformed Fly-Src timestamp".to_string())?,
                )
            }
            _ => return Err(format!("malformed Fly-Src header (unknown key: {k:?})")),
        }
    }
    match (org, app, instance, ts) {
        (Some(org), Some(app), Some(instance), Some(ts))
            if !org.is_empty() && !app.is_empty() && !instance.is_empty() && ts != 0 =>
        {
            Ok(FlySrc {
                org,
                app,
                instance,
                ts,
            })
        }
        _ => Err("malformed Fly-Src header (missing parts)".into()),
    }
}

/// Sign a Fly-Src value as Fly's proxy does (for tests and tools).
pub fn sign(signing_key: &ed25519_dalek::SigningKey, src: &str) -> String {
    use ed25519_dalek::Signer;
    base64::engine::general_purpose::STANDARD.encode(signing_key.sign(src.as_bytes()).to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_cases() {
        let sk = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
        let v = FlySrcVerifier::from_hex(&hex::encode(sk.verifying_key().to_bytes())).unwrap();
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_010);
        let src = "instance=i1;app=a1;org=o1;ts=1700000000";
        let sig = sign(&sk, src);
        let p = v.verify(src, &sig, now).unwrap();
        assert_eq!(
            (p.org.as_str(), p.app.as_str(), p.instance.as_str()),
            ("o1", "a1", "i1")
        );
        // tampered
        assert!(v
            .verify("instance=i1;app=a2;org=o1;ts=1700000000", &sig, now)
            .is_err());
        // expired
        let late = UNIX_EPOCH + Duration::from_secs(1_700_000_031);
        assert_eq!(
            v.verify(src, &sig, late).unwrap_err(),
            "expired Fly-Src header"
        );
        // malformed but signed
        let bad = "instance=i1;app=a1;org=o1";
        assert!(v
            .verify(bad, &sign(&sk, bad), now)
            .unwrap_err()
            .contains("3 parts"));
        assert!(v.verify(src, "%%%", now).is_err());
    }
}
