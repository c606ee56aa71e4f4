//! `proxypilot seal`'s flags for the token-minting processors
//! (`jwt_processor`, `client_credentials_processor`,
//! `github_app_processor`). Key material comes from a file or an
//! environment variable, never from the command line.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use zeroize::Zeroizing;

use crate::tokenizer::mint::jwt::SigningKey;
use crate::tokenizer::secret::{
    ClientCredentialsProcessor, GitHubAppProcessor, JwtProcessor, SecretBytes, SecretString,
};
use crate::tokenizer::Secret;

/// The flags the other processors' flags exclude.
const OTHER_PROCESSORS: [&str; 7] = [
    "hmac",
    "body_placeholder",
    "header",
    "format",
    "allowed_header",
    "allowed_format",
    "token_env",
];

#[derive(clap::Args, Debug, Default)]
#[command(group = clap::ArgGroup::new("minting").multiple(false).args(["github_app_id", "client_id", "email"]))]
pub struct MintArgs {
    /// github_app_processor: the GitHub App's id (the app JWT's iss). Needs
    /// --installation-id and --private-key-file/--private-key-env.
    #[arg(long, value_name = "ID", requires = "installation_id",
          conflicts_with_all = OTHER_PROCESSORS)]
    pub github_app_id: Option<String>,

    /// github_app_processor: the installation whose token is minted.
    #[arg(long, value_name = "ID", requires = "github_app_id")]
    pub installation_id: Option<String>,

    /// jwt_processor: the service account's e-mail (the JWT's iss). Needs
    /// --private-key-file/--private-key-env.
    #[arg(long, value_name = "EMAIL", conflicts_with_all = OTHER_PROCESSORS)]
    pub email: Option<String>,

    /// jwt_processor: the user to impersonate (the JWT's sub); the request
    /// parameter "sub" overrides it.
    #[arg(long, value_name = "USER", requires = "email")]
    pub sub: Option<String>,

    /// jwt_processor and client_credentials_processor: the space-separated
    /// scopes asked for (jwt: the request parameter "scopes" overrides it).
    #[arg(long, value_name = "SCOPES")]
    pub scopes: Option<String>,

    /// The PEM private key of --email or --github-app-id (RSA, or for jwt
    /// also P-256, P-384, Ed25519), read from FILE.
    #[arg(long, value_name = "FILE", conflicts_with = "private_key_env")]
    pub private_key_file: Option<PathBuf>,

    /// ... or from environment variable VAR.
    #[arg(long, value_name = "VAR")]
    pub private_key_env: Option<String>,

    /// client_credentials_processor: the OAuth client's id. Needs
    /// --client-secret-file/--client-secret-env and --token-url.
    #[arg(long, value_name = "ID", requires = "token_url",
          conflicts_with_all = OTHER_PROCESSORS)]
    pub client_id: Option<String>,

    /// client_credentials_processor: the client's secret, read from FILE
    /// (one trailing newline is dropped).
    #[arg(long, value_name = "FILE", conflicts_with = "client_secret_env")]
    pub client_secret_file: Option<PathBuf>,

    /// ... or from environment variable VAR.
    #[arg(long, value_name = "VAR")]
    pub client_secret_env: Option<String>,

    /// The token endpoint: jwt's aud (default Google's), client_credentials'
    /// endpoint, github_app's path template with {installation_id}
    /// (default GitHub's).
    #[arg(long, value_name = "URL")]
    pub token_url: Option<String>,
}

impl MintArgs {
    /// Whether these flags choose a minting processor.
    pub fn selected(&self) -> bool {
        self.github_app_id.is_some() || self.client_id.is_some() || self.email.is_some()
    }

    /// Set the chosen minting processor on `s`.
    pub fn apply(
        &self,
        s: &mut Secret,
        getenv: &dyn Fn(&str) -> Option<String>,
    ) -> anyhow::Result<()> {
        let stray = |flag: &str, on: bool, kind: &str| -> anyhow::Result<()> {
            if on {
                bail!("{flag} does not apply to {kind}");
            }
            Ok(())
        };
        if let Some(app_id) = &self.github_app_id {
            stray("--scopes", self.scopes.is_some(), "--github-app-id")?;
            stray(
                "--client-secret-*",
                self.client_secret_file.is_some() || self.client_secret_env.is_some(),
                "--github-app-id",
            )?;
            let key = self.private_key(getenv)?;
            check_key(&key, true)?;
            let p = GitHubAppProcessor {
                private_key: SecretBytes::new(key.to_vec()),
                app_id: app_id.clone(),
                installation_id: self.installation_id.clone().unwrap_or_default(),
                token_url: self.token_url.clone().unwrap_or_default(),
            };
            if !p.token_url.is_empty() {
                p.token_url()
                    .parse::<http::Uri>()
                    .with_context(|| format!("--token-url {:?} is not a URL", p.token_url))?;
            }
            s.github_app_processor = Some(p);
        } else if let Some(email) = &self.email {
            stray(
                "--client-secret-*",
                self.client_secret_file.is_some() || self.client_secret_env.is_some(),
                "--email",
            )?;
            let key = self.private_key(getenv)?;
            check_key(&key, false)?;
            s.jwt_processor = Some(JwtProcessor {
                private_key: SecretBytes::new(key.to_vec()),
                email: email.clone(),
                sub: self.sub.clone().unwrap_or_default(),
                scopes: self.scopes.clone().unwrap_or_default(),
                token_url: self.token_url.clone().unwrap_or_default(),
            });
        } else if let Some(id) = &self.client_id {
            stray(
                "--private-key-*",
                self.private_key_file.is_some() || self.private_key_env.is_some(),
                "--client-id",
            )?;
            let secret = read_material(
                self.client_secret_file.as_deref(),
                self.client_secret_env.as_deref(),
                "--client-secret-file or --client-secret-env",
                getenv,
            )?;
            let secret = String::from_utf8(secret.to_vec())
                .map_err(|_| anyhow::anyhow!("the client secret is not UTF-8 text"))?;
            s.client_credentials_processor = Some(ClientCredentialsProcessor {
                client_id: id.clone(),
                client_secret: SecretString::new(secret.trim_end_matches(['\n', '\r'])),
                token_url: self.token_url.clone().unwrap_or_default(),
                scopes: self.scopes.clone().unwrap_or_default(),
            });
        } else {
            bail!("internal error: no minting processor chosen (please report this bug)");
        }
        Ok(())
    }

    fn private_key(
        &self,
        getenv: &dyn Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Zeroizing<Vec<u8>>> {
        read_material(
            self.private_key_file.as_deref(),
            self.private_key_env.as_deref(),
            "--private-key-file or --private-key-env",
            getenv,
        )
    }
}

/// Refuse a key the tokenizer could not sign with now, not at the first
/// token request.
fn check_key(pem: &[u8], github: bool) -> anyhow::Result<()> {
    let key = SigningKey::from_pem(pem).context("the private key")?;
    if github && !matches!(key, SigningKey::Rsa(_)) {
        bail!(
            "GitHub App keys are RSA (GitHub signs app JWTs with RS256 only); this one is {}",
            key.alg()
        );
    }
    Ok(())
}

fn read_material(
    file: Option<&Path>,
    env: Option<&str>,
    which: &str,
    getenv: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let v = match (file, env) {
        (Some(f), _) => {
            Zeroizing::new(std::fs::read(f).with_context(|| format!("reading {}", f.display()))?)
        }
        (None, Some(var)) => Zeroizing::new(
            getenv(var)
                .with_context(|| format!("{var}: the variable is not set"))?
                .into_bytes(),
        ),
        (None, None) => bail!("give {which} (key material is never taken from the command line)"),
    };
    if v.iter().all(u8::is_ascii_whitespace) {
        bail!("{which}: it is empty");
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::seal::{run_with, SealArgs};
    use crate::tokenizer::OpenKey;

    /// A test-only RSA key (PKCS#1), as GitHub hands out app keys.
    const RSA_KEY: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/github-app-test-key.pem"
    );

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: SealArgs,
    }

    fn seal(args: &[&str], env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<String> {
        let k = OpenKey::generate();
        let sk = k.seal_key().to_hex();
        let mut v = vec!["seal", "--seal-key", &sk];
        v.extend_from_slice(args);
        let a = T::try_parse_from(v)?.a;
        let mut out = Vec::new();
        // stdin must not be read for a minting secret.
        run_with(a, &mut &b"NOT-A-TOKEN"[..], &mut out, env)?;
        let s = crate::tokenizer::open(&k, std::str::from_utf8(&out)?.trim())?;
        Ok(s.to_json())
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn github_app_from_a_key_file() {
        let j = seal(
            &[
                "--host",
                "api.github.com",
                "--no-auth",
                "--github-app-id",
                "123",
                "--installation-id",
                "456",
                "--private-key-file",
                RSA_KEY,
            ],
            &no_env,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        let p = &v["github_app_processor"];
        assert_eq!(
            (p["app_id"].as_str(), p["installation_id"].as_str()),
            (Some("123"), Some("456"))
        );
        assert_eq!(p["token_url"], "", "Go writes every field");
        use base64::Engine as _;
        let pem = base64::engine::general_purpose::STANDARD
            .decode(p["private_key"].as_str().unwrap())
            .unwrap();
        assert_eq!(
            pem,
            std::fs::read(RSA_KEY).unwrap(),
            "private_key is the PEM, base64"
        );
        assert!(!j.contains("NOT-A-TOKEN"));
    }

    #[test]
    fn client_credentials_from_the_environment() {
        let env = |k: &str| (k == "CC_SECRET").then(|| "s3cret\n".to_string());
        let j = seal(
            &[
                "--host",
                "auth.example.com",
                "--no-auth",
                "--client-id",
                "cid",
                "--client-secret-env",
                "CC_SECRET",
                "--token-url",
                "https://auth.example.com/token",
                "--scopes",
                "a b",
            ],
            &env,
        )
        .unwrap();
        assert_eq!(
            j,
            r#"{"client_credentials_processor":{"client_id":"cid","client_secret":"s3cret","token_url":"https://auth.example.com/token","scopes":"a b"},"no_auth":{},"allowed_hosts":["auth.example.com"]}"#
        );
    }

    #[test]
    fn refusals_name_the_flag() {
        let e = |args: &[&str]| seal(args, &no_env).unwrap_err().to_string();
        // No key material given.
        assert!(e(&["--host", "h", "--no-auth", "--email", "sa@x"]).contains("--private-key-file"));
        // A GitHub App key must be RSA: an EC key is refused at sealing.
        let dir = std::env::temp_dir().join(format!("pp-seal-mint-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ec = dir.join("ec.pem");
        std::fs::write(&ec, rcgen::KeyPair::generate().unwrap().serialize_pem()).unwrap();
        assert!(e(&[
            "--host",
            "h",
            "--no-auth",
            "--github-app-id",
            "1",
            "--installation-id",
            "2",
            "--private-key-file",
            ec.to_str().unwrap()
        ])
        .contains("RS256"));
        // ... and is accepted for jwt.
        let j = seal(
            &[
                "--host",
                "h",
                "--no-auth",
                "--email",
                "sa@x",
                "--sub",
                "u@x",
                "--private-key-file",
                ec.to_str().unwrap(),
            ],
            &no_env,
        )
        .unwrap();
        assert!(
            j.contains(r#""email":"sa@x","sub":"u@x","scopes":"","token_url":"""#),
            "{j}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        // Minting flags exclude the other processors' and each other.
        assert!(e(&["--host", "h", "--no-auth", "--email", "a", "--hmac"])
            .contains("cannot be used with"));
        assert!(e(&[
            "--host",
            "h",
            "--no-auth",
            "--email",
            "a",
            "--client-id",
            "c",
            "--token-url",
            "u"
        ])
        .contains("cannot be used with"));
        assert!(e(&["--host", "h", "--no-auth", "--client-id", "c"]).contains("--token-url"));
    }
}
