//! Which request headers may carry a host's credential, and the
//! `Proxy-Tokenizer` headers that put the real key where the client put
//! its dummy.
//!
//! Clients differ: the Python `anthropic` SDK sends `Authorization: Bearer`,
//! curl scripts send `x-api-key`, `gh` sends `Authorization: token`. An API
//! rejects a request in which any credential header is wrong, so the key
//! must replace the dummy in whichever header the client used. Secrets
//! sealed with `allowed_dst`/`allowed_fmt` allow that: the relay names the
//! header and format per request as `dst`/`fmt` parameters.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};

/// A header that may carry the credential, and the formats allowed in it
/// (`Bearer %s`, `token %s`, `%s`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    pub header: HeaderName,
    pub formats: Vec<String>,
}

impl Slot {
    pub fn new(header: &str, formats: &[&str]) -> Slot {
        Slot {
            header: HeaderName::from_bytes(header.as_bytes()).expect("valid header name"),
            formats: formats.iter().map(|f| f.to_string()).collect(),
        }
    }

    /// Which of `formats` the client's value is in: the one whose fixed
    /// prefix it starts with ("token dummy" → "token %s"), else a bare
    /// `%s`, else the first. `None` when the slot lists no format.
    fn format_index(&self, client_value: &[u8]) -> Option<usize> {
        let prefixed = self.formats.iter().position(|f| {
            let prefix = f.split("%s").next().unwrap_or("").as_bytes();
            !prefix.is_empty()
                && client_value.len() >= prefix.len()
                && client_value[..prefix.len()].eq_ignore_ascii_case(prefix)
        });
        prefixed
            .or_else(|| self.formats.iter().position(|f| f.starts_with("%s")))
            .or((!self.formats.is_empty()).then_some(0))
    }
}

/// Where the well-known APIs take their keys.
pub fn preset_slots(host: &str) -> Vec<Slot> {
    match host {
        // x-api-key or a Bearer token; current SDKs use either.
        "api.anthropic.com" => vec![
            Slot::new("x-api-key", &["%s"]),
            Slot::new("authorization", &["Bearer %s"]),
        ],
        "api.openai.com" => vec![Slot::new("authorization", &["Bearer %s"])],
        // gh sends `token X`; the API takes `Bearer X` too.
        "api.github.com" => vec![Slot::new("authorization", &["token %s", "Bearer %s"])],
        _ => Vec::new(),
    }
}

/// A host's sealed secret and its slots.
#[derive(Debug)]
pub struct Credential {
    sealed: HeaderValue,
    slots: Vec<Slot>,
    /// Per slot, the `Proxy-Tokenizer` value for each of its formats (or
    /// for `%s` when it lists none), built once: requests only pick one.
    values: Vec<Vec<HeaderValue>>,
}

impl Credential {
    pub fn new(mut sealed: HeaderValue, slots: Vec<Slot>) -> Arc<Credential> {
        sealed.set_sensitive(true);
        let values = slots
            .iter()
            .map(|slot| {
                let formats: Vec<&str> = if slot.formats.is_empty() {
                    vec!["%s"]
                } else {
                    slot.formats.iter().map(String::as_str).collect()
                };
                formats
                    .into_iter()
                    .map(|fmt| tokenizer_value(&sealed, &slot.header, fmt))
                    .collect()
            })
            .collect();
        Arc::new(Credential {
            sealed,
            slots,
            values,
        })
    }

    /// The sealed secret itself (what a minting target's token request
    /// carries).
    pub fn sealed(&self) -> &HeaderValue {
        &self.sealed
    }

    /// The `Proxy-Tokenizer` values for a request with `client` headers:
    /// one per slot the client filled (each naming that header and its
    /// format), or the bare sealed secret (its own default header) when the
    /// client filled none or the host has no slots.
    pub fn tokenizer_headers(&self, client: &HeaderMap) -> Vec<HeaderValue> {
        let mut out = Vec::new();
        for (slot, values) in self.slots.iter().zip(&self.values) {
            if let Some(v) = client.get(&slot.header) {
                let i = slot.format_index(v.as_bytes()).unwrap_or(0);
                out.push(values[i].clone());
            }
        }
        if out.is_empty() {
            out.push(self.sealed.clone());
        }
        out
    }
}

/// `SEALED; {"dst":"header","fmt":"Bearer %s"}`, marked sensitive.
fn tokenizer_value(sealed: &HeaderValue, header: &HeaderName, fmt: &str) -> HeaderValue {
    let params = serde_json::json!({ "dst": header.as_str(), "fmt": fmt });
    let mut value = Vec::with_capacity(sealed.len() + 64);
    value.extend_from_slice(sealed.as_bytes());
    value.extend_from_slice(b"; ");
    value.extend_from_slice(params.to_string().as_bytes());
    let mut value =
        HeaderValue::from_bytes(&value).expect("sealed secret and JSON are header-safe");
    value.set_sensitive(true);
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (k.parse().unwrap(), v.parse().unwrap()))
            .collect()
    }

    #[test]
    fn names_the_header_and_format_the_client_used() {
        let c = Credential::new(
            HeaderValue::from_static("SEALED"),
            preset_slots("api.anthropic.com"),
        );
        let got = c.tokenizer_headers(&headers(&[("x-api-key", "dummy")]));
        assert_eq!(got, [r#"SEALED; {"dst":"x-api-key","fmt":"%s"}"#]);
        let got = c.tokenizer_headers(&headers(&[("authorization", "Bearer dummy")]));
        assert_eq!(
            got,
            [r#"SEALED; {"dst":"authorization","fmt":"Bearer %s"}"#]
        );
        // Both filled: both replaced, so no dummy reaches the upstream.
        let got = c.tokenizer_headers(&headers(&[
            ("authorization", "Bearer d"),
            ("x-api-key", "d"),
        ]));
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|v| v.is_sensitive()));
    }

    #[test]
    fn github_token_and_bearer_schemes() {
        let c = Credential::new(
            HeaderValue::from_static("S"),
            preset_slots("api.github.com"),
        );
        assert_eq!(
            c.tokenizer_headers(&headers(&[("authorization", "token dummy")])),
            [r#"S; {"dst":"authorization","fmt":"token %s"}"#]
        );
        assert_eq!(
            c.tokenizer_headers(&headers(&[("authorization", "bearer dummy")])),
            [r#"S; {"dst":"authorization","fmt":"Bearer %s"}"#]
        );
    }

    #[test]
    fn no_slot_filled_or_no_slots_sends_the_bare_secret() {
        let c = Credential::new(
            HeaderValue::from_static("S"),
            preset_slots("api.openai.com"),
        );
        assert_eq!(c.tokenizer_headers(&HeaderMap::new()), ["S"]);
        let c = Credential::new(HeaderValue::from_static("S"), vec![]);
        assert_eq!(
            c.tokenizer_headers(&headers(&[("authorization", "Bearer x")])),
            ["S"]
        );
    }

    #[test]
    fn a_slot_without_formats_takes_the_bare_value() {
        let c = Credential::new(HeaderValue::from_static("S"), vec![Slot::new("x-key", &[])]);
        assert_eq!(
            c.tokenizer_headers(&headers(&[("x-key", "dummy")])),
            [r#"S; {"dst":"x-key","fmt":"%s"}"#]
        );
    }
}
