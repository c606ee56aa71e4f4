//! The secret document, field for field as superfly/tokenizer's `wireSecret`
//! marshals it (secret.go, processor.go, authorizer.go): one key per
//! processor kind and per auth kind, exactly one of each set, plus the
//! `allowed_hosts` / `allowed_host_pattern` validators.
//!
//! Go quirks kept on purpose: `[]byte` fields are standard base64, JSON
//! `null` reads as "absent", `fly_src_auth` lists marshal as `null` when
//! unset, and an empty-but-present `allowed_hosts`/`allowed_*` list allows
//! nothing. Not kept: Go's case-insensitive key matching.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::error::TokenizerError;
pub mod minting;
pub use minting::{ClientCredentialsProcessor, GitHubAppProcessor, JwtProcessor};

use crate::sensitive::null_default;
pub use crate::sensitive::{SecretBytes, SecretString, REDACTED};

fn none_or_empty(v: &Option<Vec<String>>) -> bool {
    v.as_ref().is_none_or(|v| v.is_empty())
}

/// `FmtProcessor` + `DstProcessor` of processor.go.
#[derive(Clone, Default, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FmtDst {
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub fmt: String,
    #[serde(default, skip_serializing_if = "none_or_empty")]
    pub allowed_fmt: Option<Vec<String>>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub dst: String,
    #[serde(default, skip_serializing_if = "none_or_empty")]
    pub allowed_dst: Option<Vec<String>>,
}

/// `inject_processor`: put `fmt % token` in header `dst`.
#[derive(Clone, Default, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InjectProcessor {
    #[serde(default)]
    pub token: SecretString,
    #[serde(flatten)]
    pub fmt_dst: FmtDst,
}

/// `inject_hmac_processor`: put `fmt % hex(hmac(key, body or msg))` in `dst`.
#[derive(Clone, Default, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InjectHmacProcessor {
    #[serde(default)]
    pub key: SecretBytes,
    #[serde(default, deserialize_with = "null_default")]
    pub hash: String,
    #[serde(flatten)]
    pub fmt_dst: FmtDst,
}

/// `inject_body_processor`: replace `placeholder` in the body by `token`.
#[derive(Clone, Default, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InjectBodyProcessor {
    #[serde(default)]
    pub token: SecretString,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub placeholder: String,
}

/// The `token` object of the OAuth processors.
#[derive(Clone, Default, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OAuthToken {
    #[serde(default)]
    pub access_token: SecretString,
    #[serde(default, skip_serializing_if = "SecretString::is_empty")]
    pub refresh_token: SecretString,
}

/// `oauth2_processor`: `Authorization: Bearer <access_token>` (or the
/// refresh token with param `st=refresh`; into the body with param
/// `placeholder`).
#[derive(Clone, Default, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OAuth2Processor {
    #[serde(default)]
    pub token: Option<OAuthToken>,
}

/// `oauth2_body_processor`: like inject_body with an OAuth token.
#[derive(Clone, Default, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OAuth2BodyProcessor {
    #[serde(default)]
    pub token: Option<OAuthToken>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub placeholder: String,
}

/// `bearer_auth`: the sha256 digest of the Proxy-Authorization token.
#[derive(Clone, Default, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BearerAuth {
    #[serde(default)]
    pub digest: SecretBytes,
}

/// `fly_src_auth`: a signed Fly-Src header from one of these org/app/
/// instances (an empty list does not check that part). Go has no
/// omitempty here, so unset lists marshal as `null`.
#[derive(Clone, Default, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlySrcAuth {
    #[serde(default)]
    pub allowed_orgs: Option<Vec<String>>,
    #[serde(default)]
    pub allowed_apps: Option<Vec<String>>,
    #[serde(default)]
    pub allowed_instances: Option<Vec<String>>,
}

/// `no_auth`: `{}`.
#[derive(Clone, Default, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoAuth {}

/// A sealed secret's plaintext. Build one with exactly one processor and
/// one auth field set; [`Secret::from_json`] checks that.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Secret {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inject_processor: Option<InjectProcessor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inject_hmac_processor: Option<InjectHmacProcessor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inject_body_processor: Option<InjectBodyProcessor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth2_processor: Option<OAuth2Processor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth2_body_processor: Option<OAuth2BodyProcessor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sigv4_processor: Option<Sigv4Processor>,
    /// Processors applied in order, each an object with one processor key
    /// (Go's `MultiProcessorConfig`). Only the processor fields of an
    /// element are read; [`Secret::from_json`] refuses anything else in one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multi_processor: Option<Vec<Secret>>,
    /// Mints a token by the RFC 7523 jwt-bearer grant (see `mint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_processor: Option<JwtProcessor>,
    /// Mints a token by the client-credentials grant (see `mint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_credentials_processor: Option<ClientCredentialsProcessor>,
    /// Mints a GitHub App installation token (see `mint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub github_app_processor: Option<GitHubAppProcessor>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_auth: Option<BearerAuth>,
    /// A superfly/macaroon token signed by this key (see `macaroon`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub macaroon_auth: Option<crate::macaroon::MacaroonAuth>,
    /// Parsed only to be refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flyio_macaroon_auth: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fly_src_auth: Option<FlySrcAuth>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_auth: Option<NoAuth>,

    #[serde(default, skip_serializing_if = "none_or_empty")]
    pub allowed_hosts: Option<Vec<String>>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub allowed_host_pattern: String,
}

/// The secret's processor, checked to be the only one.
#[derive(Debug, Clone, Copy)]
pub enum ProcessorRef<'a> {
    Inject(&'a InjectProcessor),
    InjectHmac(&'a InjectHmacProcessor),
    InjectBody(&'a InjectBodyProcessor),
    OAuth2(&'a OAuth2Processor),
    OAuth2Body(&'a OAuth2BodyProcessor),
    Sigv4(&'a Sigv4Processor),
    Jwt(&'a JwtProcessor),
    ClientCredentials(&'a ClientCredentialsProcessor),
    GitHubApp(&'a GitHubAppProcessor),
}

/// The secret's auth, checked to be the only one.
#[derive(Debug, Clone, Copy)]
pub enum AuthRef<'a> {
    Bearer(&'a BearerAuth),
    FlySrc(&'a FlySrcAuth),
    NoAuth,
    Macaroon(&'a crate::macaroon::MacaroonAuth),
    /// `flyio_macaroon_auth`: parsed, always refused (it needs Fly's API).
    FlyioMacaroon,
}

const PROCESSOR_KEYS: &[&str] = &[
    "inject_processor",
    "inject_hmac_processor",
    "inject_body_processor",
    "oauth2_processor",
    "oauth2_body_processor",
    "sigv4_processor",
    "multi_processor",
    "jwt_processor",
    "client_credentials_processor",
    "github_app_processor",
];
const AUTH_KEYS: &[&str] = &[
    "bearer_auth",
    "macaroon_auth",
    "flyio_macaroon_auth",
    "fly_src_auth",
    "no_auth",
];

impl Secret {
    /// Parse an opened secret. Errors say what is wrong with its shape but
    /// never echo its values.
    pub fn from_json(bytes: &[u8]) -> Result<Secret, TokenizerError> {
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
            TokenizerError::BadSecret(format!(
                "not JSON (syntax error at line {} column {})",
                e.line(),
                e.column()
            ))
        })?;
        let obj = value.as_object().ok_or_else(|| {
            TokenizerError::BadSecret(format!(
                "the secret is a JSON {}, expected an object",
                json_kind(&value)
            ))
        })?;
        let present = |keys: &[&str]| -> Vec<String> {
            keys.iter()
                .filter(|k| obj.get(**k).is_some_and(|v| !v.is_null()))
                .map(|k| k.to_string())
                .collect()
        };
        let procs = present(PROCESSOR_KEYS);
        if procs.len() != 1 {
            return Err(TokenizerError::BadSecret(format!(
                "bad processor config: expected exactly one of {}, found {}{}",
                PROCESSOR_KEYS.join(", "),
                describe(&procs),
                unknown_keys(obj)
            )));
        }
        if let Some(list) = obj.get("multi_processor").and_then(|v| v.as_array()) {
            check_multi(list, 0)?;
        }
        let auths = present(AUTH_KEYS);
        if auths.len() != 1 {
            return Err(TokenizerError::BadSecret(format!(
                "bad auth config: expected exactly one of {}, found {}{}",
                AUTH_KEYS.join(", "),
                describe(&auths),
                unknown_keys(obj)
            )));
        }
        let secret: Secret = serde_json::from_value(value).map_err(|e| {
            // serde's messages can quote the offending value (a token);
            // pass on only those that cannot.
            let msg = e.to_string();
            if msg.starts_with("missing field") || msg.starts_with("a binary field") {
                TokenizerError::BadSecret(msg)
            } else {
                TokenizerError::BadSecret(
                    "a field has the wrong JSON type (strings, lists of strings and objects as in superfly/tokenizer)"
                        .into(),
                )
            }
        })?;
        Ok(secret)
    }

    /// Compile `allowed_host_pattern` (None when unset). The engine caches
    /// compiled patterns; `seal` uses this to refuse a bad one early.
    pub fn host_pattern(&self) -> Result<Option<regex::Regex>, TokenizerError> {
        if self.allowed_host_pattern.is_empty() {
            return Ok(None);
        }
        compile_host_pattern(&self.allowed_host_pattern).map(Some)
    }

    /// The compact JSON Go's `json.Marshal` would produce (field order may
    /// differ only where Go's differs by struct embedding).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a Secret always serializes")
    }

    pub fn processor(&self) -> Option<ProcessorRef<'_>> {
        let all = [
            self.inject_processor.as_ref().map(ProcessorRef::Inject),
            self.inject_hmac_processor
                .as_ref()
                .map(ProcessorRef::InjectHmac),
            self.inject_body_processor
                .as_ref()
                .map(ProcessorRef::InjectBody),
            self.oauth2_processor.as_ref().map(ProcessorRef::OAuth2),
            self.oauth2_body_processor
                .as_ref()
                .map(ProcessorRef::OAuth2Body),
            self.sigv4_processor.as_ref().map(ProcessorRef::Sigv4),
            self.jwt_processor.as_ref().map(ProcessorRef::Jwt),
            self.client_credentials_processor
                .as_ref()
                .map(ProcessorRef::ClientCredentials),
            self.github_app_processor
                .as_ref()
                .map(ProcessorRef::GitHubApp),
        ];
        let mut it = all.into_iter().flatten();
        let first = it.next();
        if it.next().is_some() || self.multi_processor.is_some() {
            return None;
        }
        first
    }

    /// Every processor to apply, in order: the one processor, or a
    /// `multi_processor`'s (flattened). `None` when the shape is bad.
    pub fn processors(&self) -> Option<Vec<ProcessorRef<'_>>> {
        match &self.multi_processor {
            None => self.processor().map(|p| vec![p]),
            Some(list) => {
                let mut out = Vec::new();
                for element in list {
                    out.extend(element.processors()?);
                }
                Some(out)
            }
        }
    }

    /// Name of an unsupported processor kind, if the secret uses one
    /// (inside a `multi_processor` too).
    pub fn unsupported_processor(&self) -> Option<&'static str> {
        self.multi_processor
            .iter()
            .flatten()
            .find_map(Secret::unsupported_processor)
    }

    pub fn auth(&self) -> Option<AuthRef<'_>> {
        let all = [
            self.bearer_auth.as_ref().map(AuthRef::Bearer),
            self.fly_src_auth.as_ref().map(AuthRef::FlySrc),
            self.no_auth.as_ref().map(|_| AuthRef::NoAuth),
            self.macaroon_auth.as_ref().map(AuthRef::Macaroon),
            self.flyio_macaroon_auth
                .as_ref()
                .map(|_| AuthRef::FlyioMacaroon),
        ];
        let mut it = all.into_iter().flatten();
        let first = it.next();
        if it.next().is_some() {
            return None;
        }
        first
    }

    /// A copy safe to log, as Go's StripHazmat: tokens become "REDACTED",
    /// binary keys and digests become base64-decoded "REDACTED".
    /// The plaintext values this secret puts into requests (not HMAC keys,
    /// which never leave), so echoes of them can be redacted from responses.
    pub fn sent_tokens(&self) -> Vec<zeroize::Zeroizing<Vec<u8>>> {
        let mut out = Vec::new();
        let mut push = |s: &SecretString| {
            if !s.is_empty() {
                out.push(zeroize::Zeroizing::new(s.expose().as_bytes().to_vec()));
            }
        };
        if let Some(p) = &self.inject_processor {
            push(&p.token);
        }
        if let Some(p) = &self.inject_body_processor {
            push(&p.token);
        }
        for t in [
            &self
                .oauth2_processor
                .as_ref()
                .and_then(|p| p.token.as_ref()),
            &self
                .oauth2_body_processor
                .as_ref()
                .and_then(|p| p.token.as_ref()),
        ]
        .into_iter()
        .flatten()
        {
            push(&t.access_token);
            push(&t.refresh_token);
        }
        if let Some(p) = &self.sigv4_processor {
            // The access key goes upstream in Authorization (AWS echoes it
            // in SignatureDoesNotMatch errors); the secret key never does,
            // but masking it costs nothing.
            push(&p.access_key);
            push(&p.secret_key);
        }
        if let Some(p) = &self.client_credentials_processor {
            push(&p.client_secret);
        }
        for element in self.multi_processor.iter().flatten() {
            out.extend(element.sent_tokens());
        }
        out
    }

    pub fn strip_hazmat(&self) -> Secret {
        let red = || SecretString::new(REDACTED);
        let red_oauth = |t: &Option<OAuthToken>| {
            t.as_ref().map(|_| OAuthToken {
                access_token: red(),
                refresh_token: red(),
            })
        };
        Secret {
            inject_processor: self.inject_processor.as_ref().map(|p| InjectProcessor {
                token: red(),
                fmt_dst: p.fmt_dst.clone(),
            }),
            inject_hmac_processor: self.inject_hmac_processor.as_ref().map(|p| {
                InjectHmacProcessor {
                    key: SecretBytes::redacted(),
                    hash: REDACTED.into(),
                    fmt_dst: p.fmt_dst.clone(),
                }
            }),
            inject_body_processor: self.inject_body_processor.as_ref().map(|p| {
                InjectBodyProcessor {
                    token: red(),
                    placeholder: p.placeholder.clone(),
                }
            }),
            oauth2_processor: self.oauth2_processor.as_ref().map(|p| OAuth2Processor {
                token: red_oauth(&p.token),
            }),
            oauth2_body_processor: self.oauth2_body_processor.as_ref().map(|p| {
                OAuth2BodyProcessor {
                    token: red_oauth(&p.token),
                    placeholder: p.placeholder.clone(),
                }
            }),
            sigv4_processor: self.sigv4_processor.as_ref().map(|p| Sigv4Processor {
                access_key: red(),
                secret_key: red(),
                no_swap: p.no_swap,
            }),
            multi_processor: self
                .multi_processor
                .as_ref()
                .map(|list| list.iter().map(Secret::strip_hazmat).collect()),
            jwt_processor: self.jwt_processor.as_ref().map(|p| JwtProcessor {
                private_key: SecretBytes::redacted(),
                ..p.clone()
            }),
            client_credentials_processor: self.client_credentials_processor.as_ref().map(|p| {
                ClientCredentialsProcessor {
                    client_secret: red(),
                    ..p.clone()
                }
            }),
            github_app_processor: self
                .github_app_processor
                .as_ref()
                .map(|p| GitHubAppProcessor {
                    private_key: SecretBytes::redacted(),
                    ..p.clone()
                }),
            bearer_auth: self.bearer_auth.as_ref().map(|_| BearerAuth {
                digest: SecretBytes::redacted(),
            }),
            macaroon_auth: self
                .macaroon_auth
                .as_ref()
                .map(|_| crate::macaroon::MacaroonAuth {
                    key: SecretBytes::redacted(),
                }),
            flyio_macaroon_auth: self.flyio_macaroon_auth.as_ref().map(|_| REDACTED.into()),
            fly_src_auth: self.fly_src_auth.clone(),
            no_auth: self.no_auth.clone(),
            allowed_hosts: self.allowed_hosts.clone(),
            allowed_host_pattern: self.allowed_host_pattern.clone(),
        }
    }

    /// Only the auth of this secret (no processor, no validators): what a
    /// minted token's sealed secret starts from.
    pub fn auth_only(&self) -> Secret {
        Secret {
            bearer_auth: self.bearer_auth.clone(),
            macaroon_auth: self.macaroon_auth.clone(),
            flyio_macaroon_auth: self.flyio_macaroon_auth.clone(),
            fly_src_auth: self.fly_src_auth.clone(),
            no_auth: self.no_auth.clone(),
            ..Default::default()
        }
    }

    /// The stripped secret as JSON, for log lines.
    pub fn strip_hazmat_string(&self) -> String {
        self.strip_hazmat().to_json()
    }
}

/// The deepest `multi_processor` nesting accepted (Go has no bound; a
/// sealed secret is small, so this refuses only a hostile shape).
const MULTI_DEPTH: usize = 4;

/// Each element of a `multi_processor`: an object with exactly one
/// processor key (a nested `multi_processor` included) and nothing else.
fn check_multi(list: &[serde_json::Value], depth: usize) -> Result<(), TokenizerError> {
    if depth >= MULTI_DEPTH {
        return Err(TokenizerError::BadSecret(format!(
            "multi_processor nested deeper than {MULTI_DEPTH}"
        )));
    }
    if list.is_empty() {
        return Err(TokenizerError::BadSecret(
            "multi_processor is empty: list the processors to apply".into(),
        ));
    }
    for (i, element) in list.iter().enumerate() {
        let obj = element.as_object().ok_or_else(|| {
            TokenizerError::BadSecret(format!(
                "multi_processor[{i}] is a JSON {}, expected an object with one processor",
                json_kind(element)
            ))
        })?;
        let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        if keys.len() != 1 || !PROCESSOR_KEYS.contains(&keys[0]) {
            return Err(TokenizerError::BadSecret(format!(
                "multi_processor[{i}]: expected exactly one of {}, found {}",
                PROCESSOR_KEYS.join(", "),
                if keys.is_empty() {
                    "none".to_string()
                } else {
                    keys.join(", ")
                }
            )));
        }
        if let Some(inner) = obj.get("multi_processor").and_then(|v| v.as_array()) {
            check_multi(inner, depth + 1)?;
        }
    }
    Ok(())
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({})", self.strip_hazmat_string())
    }
}

/// Compile a host pattern with Go's semantics: `MatchString` is an
/// unanchored search, and so is `Regex::is_match`.
/// Longest `allowed_host_pattern` accepted. Host patterns are short; the
/// cap (with the compiled-size limit below) keeps whoever holds the public
/// seal key from making the engine's pattern cache hold huge automata.
pub const MAX_HOST_PATTERN_LEN: usize = 1024;
/// Compiled size allowed for one host pattern (regex's default is 10 MiB).
const HOST_PATTERN_SIZE_LIMIT: usize = 256 * 1024;

pub fn compile_host_pattern(p: &str) -> Result<regex::Regex, TokenizerError> {
    if p.len() > MAX_HOST_PATTERN_LEN {
        return Err(TokenizerError::BadSecret(format!(
            "allowed_host_pattern is {} bytes; at most {MAX_HOST_PATTERN_LEN} are accepted \
             (list the hosts in allowed_hosts instead)",
            p.len()
        )));
    }
    regex::RegexBuilder::new(p)
        .size_limit(HOST_PATTERN_SIZE_LIMIT)
        .dfa_size_limit(HOST_PATTERN_SIZE_LIMIT)
        .build()
        .map_err(|e| {
            TokenizerError::BadSecret(format!("allowed_host_pattern does not compile: {e}"))
        })
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

fn describe(keys: &[String]) -> String {
    if keys.is_empty() {
        "none".into()
    } else {
        keys.join(" and ")
    }
}

/// Keys we do not know, named so "unknown processor kind" errors are clear.
fn unknown_keys(obj: &serde_json::Map<String, serde_json::Value>) -> String {
    const OTHER: &[&str] = &["allowed_hosts", "allowed_host_pattern"];
    let unknown: Vec<&str> = obj
        .keys()
        .map(|k| k.as_str())
        .filter(|k| !PROCESSOR_KEYS.contains(k) && !AUTH_KEYS.contains(k) && !OTHER.contains(k))
        .collect();
    if unknown.is_empty() {
        String::new()
    } else {
        format!(" (unknown keys: {})", unknown.join(", "))
    }
}

/// `sigv4_processor`: the real AWS keys. Go marshals `no_swap` always.
#[derive(Clone, Default, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sigv4Processor {
    #[serde(default)]
    pub access_key: SecretString,
    #[serde(default)]
    pub secret_key: SecretString,
    /// Sign with the scope's region and service as the client wrote them;
    /// false (Go's default) swaps them.
    #[serde(default, deserialize_with = "null_false")]
    pub no_swap: bool,
}

fn null_false<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_shape_roundtrip() {
        let s = Secret {
            inject_processor: Some(InjectProcessor {
                token: SecretString::new("tok"),
                fmt_dst: FmtDst {
                    dst: "x-api-key".into(),
                    fmt: "%s".into(),
                    ..Default::default()
                },
            }),
            fly_src_auth: Some(FlySrcAuth {
                allowed_orgs: Some(vec!["o".into()]),
                allowed_apps: Some(vec!["a".into()]),
                allowed_instances: None,
            }),
            allowed_hosts: Some(vec!["api.example.com".into()]),
            ..Default::default()
        };
        let j = s.to_json();
        assert_eq!(
            j,
            r#"{"inject_processor":{"token":"tok","fmt":"%s","dst":"x-api-key"},"fly_src_auth":{"allowed_orgs":["o"],"allowed_apps":["a"],"allowed_instances":null},"allowed_hosts":["api.example.com"]}"#
        );
        assert_eq!(Secret::from_json(j.as_bytes()).unwrap(), s);
    }

    #[test]
    fn hazmat_never_in_debug() {
        let j = br#"{"inject_hmac_processor":{"key":"c2VjcmV0a2V5","hash":"sha256"},"bearer_auth":{"digest":"ZGlnZXN0"}}"#;
        let s = Secret::from_json(j).unwrap();
        assert_eq!(
            s.inject_hmac_processor.as_ref().unwrap().key.expose(),
            b"secretkey"
        );
        let dbg = format!("{s:?}");
        assert!(
            !dbg.contains("c2VjcmV0a2V5") && !dbg.contains("ZGlnZXN0"),
            "{dbg}"
        );
        assert!(dbg.contains(r#""key":"REDACTED""#), "{dbg}");
        assert!(dbg.contains(r#""digest":"REDACTED""#), "{dbg}");
    }

    #[test]
    fn host_patterns_are_bounded() {
        assert!(compile_host_pattern(r"^api\.(openai|anthropic)\.com$").is_ok());
        let long = format!("^({})$", vec!["a.example.com"; 100].join("|"));
        let e = compile_host_pattern(&long).unwrap_err().to_string();
        assert!(e.contains("at most 1024"), "{e}");
        // Short but huge once compiled: refused instead of cached.
        let e = compile_host_pattern(r"\w{200}\w{200}\w{200}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not compile"), "{e}");
    }

    #[test]
    fn shape_errors() {
        let e = |j: &str| Secret::from_json(j.as_bytes()).unwrap_err().to_string();
        assert!(e("[1]").contains("expected an object"));
        assert!(e("{").contains("not JSON"));
        assert!(e(r#"{"no_auth":{}}"#).contains("bad processor config"));
        assert!(e(r#"{"foo_processor":{},"no_auth":{}}"#).contains("unknown keys: foo_processor"));
        assert!(
            e(r#"{"inject_processor":{"token":"a"},"oauth2_processor":{},"no_auth":{}}"#)
                .contains("found inject_processor and oauth2_processor")
        );
        assert!(e(r#"{"inject_processor":{"token":"a"}}"#).contains("bad auth config"));
        // A wrongly typed token must not be echoed.
        let m = e(r#"{"inject_processor":{"token":123456789},"no_auth":{}}"#);
        assert!(!m.contains("123456789"), "{m}");
        let m = e(r#"{"inject_hmac_processor":{"key":"!!!sekrit","hash":"sha256"},"no_auth":{}}"#);
        assert!(!m.contains("sekrit"), "{m}");
        let s = Secret::from_json(
            br#"{"inject_processor":{"token":"a"},"no_auth":{},"allowed_host_pattern":"("}"#,
        )
        .unwrap();
        assert!(s
            .host_pattern()
            .unwrap_err()
            .to_string()
            .contains("allowed_host_pattern"));
        // null means absent, as in Go.
        assert!(Secret::from_json(
            br#"{"inject_processor":{"token":"a"},"no_auth":{},"bearer_auth":null}"#
        )
        .is_ok());
    }
}
