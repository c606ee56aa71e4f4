//! `proxypilot seal --secret-json-file FILE`: seal a whole secret document
//! written by hand in superfly/tokenizer's JSON (for `multi_processor`, or
//! any shape the other flags do not make). The file holds the key
//! material, so it is read from disk, never argv; it is checked as the
//! engine would check it before sealing.

use std::path::{Path, PathBuf};

use anyhow::Context;
use zeroize::Zeroizing;

use crate::tokenizer::Secret;

/// Flattened into `SealArgs`.
#[derive(clap::Args, Debug, Default)]
pub struct JsonSealArgs {
    /// Seal the secret JSON in FILE as it is (e.g. a multi_processor), after
    /// checking its shape. No token is read; the processor, auth and host
    /// flags do not apply.
    #[arg(long, value_name = "FILE", conflicts_with_all = [
        "hmac", "body_placeholder", "header", "format", "allowed_header", "allowed_format",
        "token_env", "fly_org", "bearer_from_env", "no_auth", "host", "host_pattern",
        "oauth", "access_key_file", "access_key_env",
    ])]
    pub secret_json_file: Option<PathBuf>,
}

impl JsonSealArgs {
    pub fn selected(&self) -> bool {
        self.secret_json_file.is_some()
    }

    /// The secret in the file, checked.
    pub fn secret(&self) -> anyhow::Result<Option<Secret>> {
        let Some(path) = &self.secret_json_file else {
            return Ok(None);
        };
        read(path)
            .with_context(|| format!("--secret-json-file {}", path.display()))
            .map(Some)
    }
}

fn read(path: &Path) -> anyhow::Result<Secret> {
    let bytes = Zeroizing::new(std::fs::read(path).context("reading the secret")?);
    // The engine's own checks: one processor, one auth, known keys, types;
    // errors name shapes, never values.
    let secret = Secret::from_json(&bytes)?;
    if secret.processors().is_none() {
        anyhow::bail!("bad processor config");
    }
    secret.host_pattern()?;
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::super::seal::parse_args as parse;
    use super::super::seal::run_with;
    use crate::tokenizer::{open, OpenKey};

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn seals_a_multi_processor_file_and_checks_it() {
        let dir = std::env::temp_dir().join(format!("pp-seal-json-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("multi.json");
        let json = r#"{"multi_processor":[{"inject_processor":{"token":"tok-a"}},{"inject_processor":{"token":"tok-b","fmt":"%s","dst":"x-api-key"}}],"no_auth":{},"allowed_hosts":["api.example.com"]}"#;
        std::fs::write(&good, json).unwrap();
        let key = OpenKey::generate();
        let hex = key.seal_key().to_hex();
        let g = good.to_str().unwrap();
        let mut out = Vec::new();
        run_with(
            parse(&["--seal-key", &hex, "--secret-json-file", g]).unwrap(),
            &mut std::io::empty(),
            &mut out,
            &no_env,
        )
        .unwrap();
        let s = open(&key, String::from_utf8(out).unwrap().trim()).unwrap();
        assert_eq!(s.to_json(), json);

        let mut out = Vec::new();
        run_with(
            parse(&["--dry-run", "--secret-json-file", g]).unwrap(),
            &mut std::io::empty(),
            &mut out,
            &no_env,
        )
        .unwrap();
        let shown = String::from_utf8(out).unwrap();
        assert!(
            !shown.contains("tok-a") && shown.contains("REDACTED"),
            "{shown}"
        );

        // Checked as the engine checks it, without echoing values.
        let bad = dir.join("bad.json");
        std::fs::write(&bad, r#"{"inject_processor":{"token":"sekrit"}}"#).unwrap();
        let e = run_with(
            parse(&[
                "--seal-key",
                &hex,
                "--secret-json-file",
                bad.to_str().unwrap(),
            ])
            .unwrap(),
            &mut std::io::empty(),
            &mut Vec::new(),
            &no_env,
        )
        .unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("bad auth config") && !e.contains("sekrit"),
            "{e}"
        );
        // The other processor, auth and host flags do not mix with it.
        assert!(parse(&["--secret-json-file", g, "--no-auth"]).is_err());
        assert!(parse(&["--secret-json-file", g, "--host", "h"]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
