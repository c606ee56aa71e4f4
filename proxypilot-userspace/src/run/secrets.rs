//! `--secret` specs for `proxypilot run`: which variable holds the real key,
//! which host it is for, and which request headers may carry it.

use std::{fmt, str::FromStr};

use http::HeaderName;

use crate::relay::credentials::preset_slots;
pub use crate::relay::credentials::Slot;
use crate::tokenizer::{
    secret::{FmtDst, InjectProcessor, NoAuth, SecretString},
    Secret,
};

/// One secret to keep out of the sandbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretSpec {
    /// The environment variable holding the real value.
    pub var: String,
    /// The host the value is for.
    pub host: String,
    /// Headers the client may put its dummy in, with the formats allowed
    /// there. The real key replaces the dummy in whichever the client uses.
    pub slots: Vec<Slot>,
}

/// Well-known variables: the host their key is for; the slots are the
/// host's presets.
pub fn preset(var: &str) -> Option<SecretSpec> {
    let host = match var {
        "ANTHROPIC_API_KEY" => "api.anthropic.com",
        "OPENAI_API_KEY" => "api.openai.com",
        "GH_TOKEN" | "GITHUB_TOKEN" => "api.github.com",
        _ => return None,
    };
    Some(SecretSpec {
        var: var.to_string(),
        host: host.to_string(),
        slots: preset_slots(host),
    })
}

/// Error for a `--secret` value that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("--secret {input:?}: {why}; write VAR (one of ANTHROPIC_API_KEY, OPENAI_API_KEY, GH_TOKEN, GITHUB_TOKEN) or VAR=HOST[:HEADER[:FORMAT]], e.g. MY_KEY=api.example.com:x-api-key:%s")]
pub struct SecretSpecError {
    input: String,
    why: String,
}

impl FromStr for SecretSpec {
    type Err = SecretSpecError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |why: &str| SecretSpecError {
            input: input.to_string(),
            why: why.to_string(),
        };
        let (var, rest) = match input.split_once('=') {
            None => {
                check_var(input).map_err(err)?;
                return preset(input).ok_or_else(|| {
                    err("no preset for this variable; say where it goes with VAR=HOST")
                });
            }
            Some(pair) => pair,
        };
        check_var(var).map_err(err)?;
        // FORMAT may itself contain ':' (rare), so split at most twice.
        let mut parts = rest.splitn(3, ':');
        let host = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        if host.is_empty()
            || !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        {
            return Err(err("HOST must be a DNS name such as api.example.com"));
        }
        let header = parts
            .next()
            .filter(|h| !h.is_empty())
            .unwrap_or("authorization");
        let header = HeaderName::from_bytes(header.trim().as_bytes())
            .map_err(|_| err("HEADER is not a valid header name"))?;
        let format = match parts.next() {
            Some(f) => f.to_string(),
            None if header == http::header::AUTHORIZATION => "Bearer %s".to_string(),
            None => "%s".to_string(),
        };
        if format.matches("%s").count() != 1 || format.replace("%s", "").contains('%') {
            return Err(err("FORMAT must contain exactly one %s and no other %"));
        }
        // FORMAT ends up in a header value (and in the Proxy-Tokenizer
        // params the relay builds): DEL there made the relay panic on every
        // request using this header (tests/fuzz/regressions/
        // config-secret-del-format), and the tokenizer refuses non-ASCII.
        // Printable ASCII only.
        if !format.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(err(
                "FORMAT must be printable ASCII (it becomes part of a header value)",
            ));
        }
        Ok(SecretSpec {
            var: var.to_string(),
            host,
            slots: vec![Slot {
                header,
                formats: vec![format],
            }],
        })
    }
}

fn check_var(var: &str) -> Result<(), &'static str> {
    let ok = !var.is_empty()
        && !var.starts_with(|c: char| c.is_ascii_digit())
        && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err("VAR must be an environment variable name")
    }
}

impl fmt::Display for SecretSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let slots: Vec<String> = self
            .slots
            .iter()
            .map(|s| format!("{} ({})", s.header, s.formats.join(" | ")))
            .collect();
        write!(f, "{} → {} in {}", self.var, self.host, slots.join(" or "))
    }
}

impl SecretSpec {
    /// The secret to seal: inject the token into one of the slots (chosen
    /// per request by `dst`/`fmt` params), only for this host, no auth (the
    /// sealing key never leaves this process).
    pub fn to_secret(&self, token: &str) -> Secret {
        let mut dsts: Vec<String> = Vec::new();
        let mut fmts: Vec<String> = Vec::new();
        for slot in &self.slots {
            dsts.push(slot.header.as_str().to_string());
            for f in &slot.formats {
                if !fmts.contains(f) {
                    fmts.push(f.clone());
                }
            }
        }
        Secret {
            inject_processor: Some(InjectProcessor {
                token: SecretString::new(token),
                // The first allowed dst/fmt are the defaults.
                fmt_dst: FmtDst {
                    fmt: String::new(),
                    allowed_fmt: Some(fmts),
                    dst: String::new(),
                    allowed_dst: Some(dsts),
                },
            }),
            no_auth: Some(NoAuth {}),
            allowed_hosts: Some(vec![self.host.clone()]),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_cover_the_well_known_variables() {
        let a: SecretSpec = "ANTHROPIC_API_KEY".parse().unwrap();
        assert_eq!(a.host, "api.anthropic.com");
        assert_eq!(a.slots[0].header, "x-api-key");
        assert_eq!(a.slots[0].formats, ["%s"]);
        assert_eq!(a.slots[1].header, "authorization");
        let o: SecretSpec = "OPENAI_API_KEY".parse().unwrap();
        assert_eq!(
            (o.host.as_str(), o.slots[0].formats[0].as_str()),
            ("api.openai.com", "Bearer %s")
        );
        for v in ["GH_TOKEN", "GITHUB_TOKEN"] {
            let g: SecretSpec = v.parse().unwrap();
            assert_eq!(g.host, "api.github.com");
            assert!(g.slots[0].formats.contains(&"token %s".to_string()));
        }
    }

    #[test]
    fn explicit_specs() {
        let s: SecretSpec = "MY_KEY=API.Example.com".parse().unwrap();
        assert_eq!(
            (s.host.as_str(), s.slots[0].header.as_str()),
            ("api.example.com", "authorization")
        );
        assert_eq!(s.slots[0].formats, ["Bearer %s"]);
        let s: SecretSpec = "MY_KEY=api.example.com:X-Api-Key".parse().unwrap();
        assert_eq!(
            (s.slots[0].header.as_str(), s.slots[0].formats[0].as_str()),
            ("x-api-key", "%s")
        );
        let s: SecretSpec = "MY_KEY=api.example.com:authorization:token %s"
            .parse()
            .unwrap();
        assert_eq!(s.slots[0].formats, ["token %s"]);
    }

    #[test]
    fn bad_specs_say_how_to_write_them() {
        for bad in [
            "",
            "1VAR",
            "UNKNOWN_VAR",
            "V=",
            "V=host name",
            "V=h.com:bad header",
            "V=h.com:x:%d",
            "V=h.com:x:%s%s",
        ] {
            let e = bad.parse::<SecretSpec>().unwrap_err().to_string();
            assert!(e.contains("VAR=HOST[:HEADER[:FORMAT]]"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_sealed_secret_allows_every_slot_and_only_the_host() {
        let a: SecretSpec = "ANTHROPIC_API_KEY".parse().unwrap();
        let json = a.to_secret("sk-real").to_json();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let p = &v["inject_processor"];
        assert_eq!(
            p["allowed_dst"],
            serde_json::json!(["x-api-key", "authorization"])
        );
        assert_eq!(p["allowed_fmt"], serde_json::json!(["%s", "Bearer %s"]));
        assert_eq!(v["allowed_hosts"], serde_json::json!(["api.anthropic.com"]));
        assert_eq!(v["no_auth"], serde_json::json!({}));
        assert!(a.to_string().contains("api.anthropic.com"));
        assert!(!format!("{a:?}").contains("sk-real"));
    }
}
