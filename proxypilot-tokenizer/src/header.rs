//! The `Proxy-Tokenizer: <base64 sealed secret>[; {json params}]` header.

use std::collections::HashMap;

use super::error::TokenizerError;

pub const PROXY_TOKENIZER: &str = "proxy-tokenizer";
pub const PROXY_AUTHORIZATION: &str = "proxy-authorization";

/// Request-time parameters (`dst`, `fmt`, `msg`, `st`, `placeholder`).
pub type Params = HashMap<String, String>;

/// Split one header value into the base64 secret and its parameters, as
/// Go's parseHeaderProxyTokenizer: cut at the first `;`, trim both halves,
/// parameters are a JSON object of strings.
pub fn parse(value: &str) -> Result<(&str, Params), TokenizerError> {
    let (b64, params) = value.split_once(';').unwrap_or((value, ""));
    let (b64, params) = (b64.trim(), params.trim());
    if b64.is_empty() {
        return Err(TokenizerError::BadHeader(
            "no sealed secret before ';'".into(),
        ));
    }
    let params = if params.is_empty() {
        Params::new()
    } else {
        serde_json::from_str(params).map_err(|e| {
            TokenizerError::BadHeader(format!(
                "parameters after ';' must be a JSON object of strings like {{\"dst\":\"X-Api-Key\"}}: {e}"
            ))
        })?
    };
    Ok((b64, params))
}

/// Format a header value (what clients send).
pub fn format(b64_secret: &str, params: &Params) -> String {
    if params.is_empty() {
        b64_secret.to_string()
    } else {
        // Sorted for stable output.
        let sorted: std::collections::BTreeMap<_, _> = params.iter().collect();
        format!(
            "{b64_secret}; {}",
            serde_json::to_string(&sorted).unwrap_or_default()
        )
    }
}

/// A header value carrying an injected credential: checked, and marked
/// sensitive so HPACK never indexes it.
pub(crate) fn header_value(v: &str) -> Result<http::HeaderValue, TokenizerError> {
    let mut hv = http::HeaderValue::from_str(v).map_err(|_| {
        TokenizerError::Processor(
            "the injected value is not a valid HTTP header value (control characters in the token?)"
                .to_string(),
        )
    })?;
    hv.set_sensitive(true);
    Ok(hv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        let (b, p) = parse("  abc=  ").unwrap();
        assert_eq!((b, p.len()), ("abc=", 0));
        let (b, p) = parse("abc; {\"dst\":\"X-Key\",\"fmt\":\"%s\"}").unwrap();
        assert_eq!(b, "abc");
        assert_eq!(p["dst"], "X-Key");
        assert_eq!(p["fmt"], "%s");
        assert!(parse("; {}").is_err());
        assert!(parse("").is_err());
        assert!(parse("abc; {\"dst\":1}").is_err());
        assert!(parse("abc; [").is_err());
        // Only the first ';' separates.
        assert_eq!(parse("abc;{\"msg\":\"a;b\"}").unwrap().1["msg"], "a;b");
    }

    #[test]
    fn formats() {
        let mut p = Params::new();
        assert_eq!(format("x", &p), "x");
        p.insert("dst".into(), "A".into());
        assert_eq!(format("x", &p), "x; {\"dst\":\"A\"}");
    }
}
