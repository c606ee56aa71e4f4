//! `proxypilot seal`'s `sigv4_processor` flags: the AWS keys come from a
//! file or an environment variable, never from argv where `ps` shows them.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use zeroize::Zeroizing;

use crate::tokenizer::secret::SecretString;
use crate::tokenizer::sigv4::Sigv4Processor;

/// Flattened into `SealArgs`. Giving an access key selects
/// `sigv4_processor`: the tokenizer re-signs the client's AWS SigV4
/// requests with these keys, and no token is read.
#[derive(clap::Args, Debug, Default)]
#[command(group = clap::ArgGroup::new("sigv4_access").args(["access_key_file", "access_key_env"]))]
#[command(group = clap::ArgGroup::new("sigv4_secret").args(["secret_key_file", "secret_key_env"]))]
pub struct Sigv4SealArgs {
    /// sigv4_processor: read the AWS access key id from FILE (one trailing
    /// newline dropped). Needs --secret-key-file or --secret-key-env.
    #[arg(long, value_name = "FILE", requires = "sigv4_secret",
          conflicts_with_all = ["hmac", "body_placeholder", "header", "format", "allowed_header", "allowed_format", "token_env"])]
    pub access_key_file: Option<PathBuf>,

    /// sigv4_processor: the AWS access key id from environment variable VAR.
    #[arg(long, value_name = "VAR", requires = "sigv4_secret",
          conflicts_with_all = ["hmac", "body_placeholder", "header", "format", "allowed_header", "allowed_format", "token_env"])]
    pub access_key_env: Option<String>,

    /// sigv4_processor: read the AWS secret access key from FILE.
    #[arg(long, value_name = "FILE", requires = "sigv4_access")]
    pub secret_key_file: Option<PathBuf>,

    /// sigv4_processor: the AWS secret access key from environment
    /// variable VAR.
    #[arg(long, value_name = "VAR", requires = "sigv4_access")]
    pub secret_key_env: Option<String>,

    /// sigv4_processor: sign with the region and service as the client's
    /// Credential scope names them. Without it the tokenizer swaps them,
    /// as superfly/tokenizer does for clients that write them swapped.
    #[arg(long, requires = "sigv4_access")]
    pub no_swap: bool,
}

impl Sigv4SealArgs {
    /// Whether these flags select `sigv4_processor`.
    pub fn selected(&self) -> bool {
        self.access_key_file.is_some() || self.access_key_env.is_some()
    }

    /// The processor, keys read from their file or variable.
    pub fn processor(
        &self,
        getenv: &dyn Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Sigv4Processor> {
        let access = read_key(
            "access key",
            &self.access_key_file,
            &self.access_key_env,
            "--access-key-file",
            "--access-key-env",
            getenv,
        )?;
        if access
            .bytes()
            .any(|b| b <= b' ' || b == 0x7f || b == b'/' || b == b',')
        {
            bail!(
                "the access key id contains white space, a control character, '/' or ',': \
                 it goes in the Authorization header's Credential; check the file or variable"
            );
        }
        let secret = read_key(
            "secret key",
            &self.secret_key_file,
            &self.secret_key_env,
            "--secret-key-file",
            "--secret-key-env",
            getenv,
        )?;
        Ok(Sigv4Processor {
            access_key: SecretString::new(access.as_str()),
            secret_key: SecretString::new(secret.as_str()),
            no_swap: self.no_swap,
        })
    }
}

fn read_key(
    what: &str,
    file: &Option<PathBuf>,
    env: &Option<String>,
    file_flag: &str,
    env_flag: &str,
    getenv: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<Zeroizing<String>> {
    let value = match (file, env) {
        (Some(path), _) => {
            read_file(path).with_context(|| format!("{file_flag} {}", path.display()))?
        }
        (None, Some(var)) => Zeroizing::new(
            getenv(var).with_context(|| format!("{env_flag} {var}: the variable is not set"))?,
        ),
        (None, None) => bail!("the {what} is missing: give {file_flag} FILE or {env_flag} VAR"),
    };
    if value.is_empty() {
        bail!("the {what} is empty: check {file_flag} / {env_flag}");
    }
    Ok(value)
}

/// The file's text with one trailing newline dropped.
fn read_file(path: &Path) -> anyhow::Result<Zeroizing<String>> {
    let mut s = Zeroizing::new(
        std::fs::read_to_string(path).context("reading the key (it must be UTF-8 text)")?,
    );
    if s.ends_with('\n') {
        s.pop();
        if s.ends_with('\r') {
            s.pop();
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::super::seal::parse_args as parse;
    use super::super::seal::run_with;
    use crate::tokenizer::{open, OpenKey};

    fn env(k: &str) -> Option<String> {
        (k == "AWS_ACCESS_KEY_ID").then(|| "AKIAREAL".to_string())
    }

    #[test]
    fn seals_sigv4_from_env_and_file() {
        let dir = std::env::temp_dir().join(format!("pp-seal-sigv4-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secret");
        std::fs::write(&file, "real/secret+key\n").unwrap();
        let key = OpenKey::generate();
        let seal_key = key.seal_key().to_hex();
        let f = file.to_str().unwrap();
        let args = parse(&[
            "--seal-key",
            &seal_key,
            "--host",
            "s3.amazonaws.com",
            "--no-auth",
            "--access-key-env",
            "AWS_ACCESS_KEY_ID",
            "--secret-key-file",
            f,
            "--no-swap",
        ])
        .unwrap();
        let mut out = Vec::new();
        // stdin is not read: the keys have their own sources.
        run_with(args, &mut std::io::empty(), &mut out, &env).unwrap();
        let sealed = String::from_utf8(out).unwrap();
        let s = open(&key, sealed.trim()).unwrap();
        let p = s.sigv4_processor.as_ref().unwrap();
        assert_eq!(p.access_key.expose(), "AKIAREAL");
        assert_eq!(p.secret_key.expose(), "real/secret+key");
        assert!(p.no_swap);
        assert!(s.no_auth.is_some() && s.inject_processor.is_none());

        let args = parse(&[
            "--dry-run",
            "--host",
            "h",
            "--no-auth",
            "--access-key-env",
            "AWS_ACCESS_KEY_ID",
            "--secret-key-file",
            f,
        ])
        .unwrap();
        let mut out = Vec::new();
        run_with(args, &mut std::io::empty(), &mut out, &env).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap().trim(),
            r#"{"sigv4_processor":{"access_key":"REDACTED","secret_key":"REDACTED","no_swap":false},"no_auth":{},"allowed_hosts":["h"]}"#
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_bad_combinations() {
        let base = ["--host", "h", "--no-auth"];
        let with = |extra: &[&str]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            parse(&v)
        };
        // An access key needs a secret key, and neither mixes with other processors.
        assert!(with(&["--access-key-env", "A"]).is_err());
        assert!(with(&["--secret-key-env", "S"]).is_err());
        assert!(with(&["--access-key-env", "A", "--secret-key-env", "S", "--hmac"]).is_err());
        assert!(with(&[
            "--access-key-env",
            "A",
            "--secret-key-env",
            "S",
            "--header",
            "x"
        ])
        .is_err());
        assert!(with(&["--no-swap"]).is_err());
        // No flag takes a key on the command line.
        assert!(with(&["--access-key", "AKIA", "--secret-key", "S"]).is_err());
        let args = with(&[
            "--dry-run",
            "--access-key-env",
            "UNSET",
            "--secret-key-env",
            "S",
        ])
        .unwrap();
        let e = run_with(args, &mut std::io::empty(), &mut Vec::new(), &env).unwrap_err();
        assert!(
            format!("{e:#}").contains("--access-key-env UNSET: the variable is not set"),
            "{e:#}"
        );
    }
}
