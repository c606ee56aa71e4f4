//! `proxypilot seal --macaroon-key-file FILE`: the `macaroon_auth` auth,
//! whose key signs the superfly/macaroon tokens clients send in
//! `Proxy-Authorization`. The file holds the key in hex, as Go's tools
//! take it (`MACAROON_KEY` in superfly/tokenizer's cmd/curl); it is read
//! from a file, never the command line.

use std::path::Path;

use anyhow::{bail, Context};
use zeroize::Zeroizing;

use crate::tokenizer::macaroon::MacaroonAuth;
use crate::tokenizer::secret::SecretBytes;

/// The shortest key accepted: an HMAC-SHA256 key should have 32 bytes of
/// entropy (superfly/macaroon's `NewSigningKey` makes 32).
const MIN_KEY_BYTES: usize = 32;

/// The `macaroon_auth` of the key in `path` (hex, surrounding whitespace
/// ignored).
pub fn auth(path: &Path) -> anyhow::Result<MacaroonAuth> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .with_context(|| format!("--macaroon-key-file {}: reading it", path.display()))?,
    );
    let key = Zeroizing::new(hex::decode(text.trim()).map_err(|_| {
        anyhow::anyhow!(
            "--macaroon-key-file {}: the file must hold the key in hex (e.g. from `openssl rand -hex 32`)",
            path.display()
        )
    })?);
    if key.len() < MIN_KEY_BYTES {
        bail!(
            "--macaroon-key-file {}: the key has {} bytes; use at least {MIN_KEY_BYTES} random bytes (`openssl rand -hex 32`)",
            path.display(),
            key.len()
        );
    }
    Ok(MacaroonAuth {
        key: SecretBytes::new(key.to_vec()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hex_key_file_and_its_refusals() {
        let dir = std::env::temp_dir().join(format!("pp-mac-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("k");
        std::fs::write(&f, format!("{}\n", "ab".repeat(32))).unwrap();
        assert_eq!(auth(&f).unwrap().key.expose(), &[0xab; 32]);
        std::fs::write(&f, "not hex").unwrap();
        let e = format!("{:#}", auth(&f).unwrap_err());
        assert!(e.contains("in hex"), "{e}");
        assert!(
            !e.contains("not hex"),
            "the file's content is never echoed: {e}"
        );
        std::fs::write(&f, "abcd").unwrap();
        assert!(format!("{:#}", auth(&f).unwrap_err()).contains("has 2 bytes"));
        let e = format!("{:#}", auth(&dir.join("missing")).unwrap_err());
        assert!(e.contains("reading it"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
