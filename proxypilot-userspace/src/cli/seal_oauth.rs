//! `proxypilot seal`'s `oauth2_processor` / `oauth2_body_processor` flags.
//! The access token is the token `seal` reads (stdin or --token-env); the
//! refresh token comes from a file or a variable, never argv.

use std::path::PathBuf;

use anyhow::{bail, Context};
use zeroize::Zeroizing;

use crate::tokenizer::secret::{OAuth2BodyProcessor, OAuth2Processor, OAuthToken, SecretString};

/// Flattened into `SealArgs`.
#[derive(clap::Args, Debug, Default)]
pub struct OAuthSealArgs {
    /// oauth2_processor: the token is an OAuth access token, injected as
    /// `Authorization: Bearer <token>` (the request may ask for the refresh
    /// token with the parameter {"st":"refresh"}). With --body-placeholder:
    /// oauth2_body_processor, the token replaces TEXT in the body.
    #[arg(long, conflicts_with_all = ["hmac", "header", "format", "allowed_header", "allowed_format"])]
    pub oauth: bool,

    /// oauth2_processor: read the refresh token from FILE.
    #[arg(
        long,
        value_name = "FILE",
        requires = "oauth",
        conflicts_with = "refresh_token_env"
    )]
    pub refresh_token_file: Option<PathBuf>,

    /// oauth2_processor: the refresh token from environment variable VAR.
    #[arg(long, value_name = "VAR", requires = "oauth")]
    pub refresh_token_env: Option<String>,
}

impl OAuthSealArgs {
    fn token(
        &self,
        access: &str,
        getenv: &dyn Fn(&str) -> Option<String>,
    ) -> anyhow::Result<OAuthToken> {
        let refresh =
            match (&self.refresh_token_file, &self.refresh_token_env) {
                (Some(path), _) => {
                    let mut s = Zeroizing::new(
                        std::fs::read_to_string(path)
                            .with_context(|| format!("--refresh-token-file {}", path.display()))?,
                    );
                    if s.ends_with('\n') {
                        s.pop();
                    }
                    s
                }
                (None, Some(var)) => Zeroizing::new(getenv(var).with_context(|| {
                    format!("--refresh-token-env {var}: the variable is not set")
                })?),
                (None, None) => Zeroizing::new(String::new()),
            };
        if (self.refresh_token_file.is_some() || self.refresh_token_env.is_some())
            && refresh.is_empty()
        {
            bail!("the refresh token is empty: check --refresh-token-file / --refresh-token-env");
        }
        Ok(OAuthToken {
            access_token: SecretString::new(access),
            refresh_token: SecretString::new(refresh.as_str()),
        })
    }

    pub fn processor(
        &self,
        access: &str,
        getenv: &dyn Fn(&str) -> Option<String>,
    ) -> anyhow::Result<OAuth2Processor> {
        Ok(OAuth2Processor {
            token: Some(self.token(access, getenv)?),
        })
    }

    pub fn body_processor(
        &self,
        access: &str,
        placeholder: &str,
        getenv: &dyn Fn(&str) -> Option<String>,
    ) -> anyhow::Result<OAuth2BodyProcessor> {
        Ok(OAuth2BodyProcessor {
            token: Some(self.token(access, getenv)?),
            placeholder: placeholder.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::seal::{build_secret, parse_args, SealArgs};

    fn parse(args: &[&str]) -> Result<SealArgs, clap::Error> {
        let mut v = vec!["--dry-run", "--host", "h", "--no-auth"];
        v.extend_from_slice(args);
        parse_args(&v)
    }

    fn env(k: &str) -> Option<String> {
        (k == "REFRESH").then(|| "rt-1".to_string())
    }

    #[test]
    fn oauth_shapes() {
        let j = |a: &[&str]| build_secret(&parse(a).unwrap(), "at-1", &env).map(|s| s.to_json());
        assert_eq!(
            j(&["--oauth"]).unwrap(),
            r#"{"oauth2_processor":{"token":{"access_token":"at-1"}},"no_auth":{},"allowed_hosts":["h"]}"#
        );
        assert_eq!(
            j(&["--oauth", "--refresh-token-env", "REFRESH"]).unwrap(),
            r#"{"oauth2_processor":{"token":{"access_token":"at-1","refresh_token":"rt-1"}},"no_auth":{},"allowed_hosts":["h"]}"#
        );
        assert_eq!(
            j(&["--oauth", "--body-placeholder", "{{T}}"]).unwrap(),
            r#"{"oauth2_body_processor":{"token":{"access_token":"at-1"},"placeholder":"{{T}}"},"no_auth":{},"allowed_hosts":["h"]}"#
        );
        let e = j(&["--oauth", "--refresh-token-env", "UNSET"]).unwrap_err();
        assert!(
            format!("{e:#}").contains("--refresh-token-env UNSET"),
            "{e:#}"
        );
        assert!(parse(&["--oauth", "--hmac"]).is_err());
        assert!(parse(&["--refresh-token-env", "REFRESH"]).is_err());
    }
}
