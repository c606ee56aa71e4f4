//! The three token-minting processors' JSON, field for field as
//! processor.go's `JWTProcessorConfig`, `ClientCredentialsProcessorConfig`
//! and `GitHubAppProcessorConfig` marshal them. Go has no `omitempty` on
//! these fields (except `scopes` of client_credentials), so every field is
//! written, empty or not.

use serde::{Deserialize, Serialize};

use crate::sensitive::{null_default, SecretBytes, SecretString};

/// `jwt_processor`: sign a JWT with `private_key` (RS256, ES256/384 or
/// EdDSA by key type) and send the RFC 7523 jwt-bearer form body to the
/// token endpoint; the answer is sealed into an `inject_processor` secret.
#[derive(Clone, Default, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwtProcessor {
    /// The PEM private key (base64 on the wire, as Go's `[]byte`).
    #[serde(default)]
    pub private_key: SecretBytes,
    /// The JWT's `iss` (a Google service account's e-mail).
    #[serde(default, deserialize_with = "null_default")]
    pub email: String,
    /// The JWT's `sub` (the user to impersonate); the `sub` parameter
    /// overrides it.
    #[serde(default, deserialize_with = "null_default")]
    pub sub: String,
    /// The JWT's `scope`, space-separated; the `scopes` parameter
    /// overrides it.
    #[serde(default, deserialize_with = "null_default")]
    pub scopes: String,
    /// The JWT's `aud`; Google's token endpoint when empty.
    #[serde(default, deserialize_with = "null_default")]
    pub token_url: String,
}

/// `client_credentials_processor`: the RFC 6749 §4.4 form body with the
/// client's id and secret; the answer is sealed as for `jwt_processor`.
#[derive(Clone, Default, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientCredentialsProcessor {
    #[serde(default, deserialize_with = "null_default")]
    pub client_id: String,
    #[serde(default)]
    pub client_secret: SecretString,
    /// Required by Go, though only checked to be set: the request goes
    /// where the client sent it.
    #[serde(default, deserialize_with = "null_default")]
    pub token_url: String,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub scopes: String,
}

/// `github_app_processor`: an RS256 app JWT in `Authorization`, the
/// installation-token path from `token_url`, an empty body; GitHub's 201
/// is sealed into an `inject_processor` secret pinned to api.github.com.
#[derive(Clone, Default, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GitHubAppProcessor {
    /// The app's PEM RSA private key (base64 on the wire).
    #[serde(default)]
    pub private_key: SecretBytes,
    /// The app id (the JWT's `iss`).
    #[serde(default, deserialize_with = "null_default")]
    pub app_id: String,
    /// Put in `token_url` for `{installation_id}`.
    #[serde(default, deserialize_with = "null_default")]
    pub installation_id: String,
    /// A template; GitHub's public endpoint when empty.
    #[serde(default, deserialize_with = "null_default")]
    pub token_url: String,
}

/// Google's token endpoint, the default `aud` of `jwt_processor`.
pub const DEFAULT_JWT_TOKEN_URL: &str = "https://oauth2.googleapis.com/token";
/// GitHub's installation-token endpoint, the default `token_url` template.
pub const DEFAULT_GITHUB_TOKEN_URL: &str =
    "https://api.github.com/app/installations/{installation_id}/access_tokens";
/// The host a minted GitHub installation token is pinned to.
pub const GITHUB_API_HOST: &str = "api.github.com";
/// What `token_url` templates are filled in at.
pub const INSTALLATION_ID_TEMPLATE: &str = "{installation_id}";

impl JwtProcessor {
    /// `token_url`, or Google's.
    pub fn token_url(&self) -> &str {
        if self.token_url.is_empty() {
            DEFAULT_JWT_TOKEN_URL
        } else {
            &self.token_url
        }
    }
}

impl GitHubAppProcessor {
    /// The token URL with the installation id filled in.
    pub fn token_url(&self) -> String {
        let tmpl = if self.token_url.is_empty() {
            DEFAULT_GITHUB_TOKEN_URL
        } else {
            &self.token_url
        };
        tmpl.replace(INSTALLATION_ID_TEMPLATE, &self.installation_id)
    }
}
