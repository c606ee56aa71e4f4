//! Turning a secret's processor plus the request-time parameters into
//! actions on the request, with processor.go's rules:
//!
//! - `fmt`: the param if given, else the secret's `fmt`, else the first of
//!   `allowed_fmt`, else `Bearer %s` (`Bearer %x` for HMAC). A param must
//!   equal `fmt` when that is set and be in `allowed_fmt` when that is
//!   present. The format holds exactly one `%s` (text) or `%x`/`%X`
//!   (binary) and no other `%`.
//! - `dst`: the same with `dst` / `allowed_dst` / `Authorization`, compared
//!   case-insensitively (Go canonicalizes header names).

use hmac::{Hmac, Mac};
use http::{HeaderName, HeaderValue};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::error::TokenizerError;
use super::header::{header_value, Params};
use super::secret::{FmtDst, OAuthToken, ProcessorRef};

pub const PARAM_DST: &str = "dst";
pub const PARAM_FMT: &str = "fmt";
pub const PARAM_MSG: &str = "msg";
pub const PARAM_SUBTOKEN: &str = "st";
pub const PARAM_PLACEHOLDER: &str = "placeholder";
pub const DEFAULT_PLACEHOLDER: &str = "{{ACCESS_TOKEN}}";

/// What one secret does to the request.
pub(crate) enum Action {
    SetHeader(HeaderName, HeaderValue),
    Body(BodyStep),
    /// Re-sign the request (headers and query) with SigV4, in order.
    Sigv4(crate::sigv4::Sigv4Step),
    /// A minting processor's rewrite (see `mint`).
    Mint(Box<crate::mint::MintRequest>),
}

/// One body step, in the order of the Proxy-Tokenizer headers.
pub(crate) enum BodyStep {
    Replace {
        placeholder: Vec<u8>,
        token: Zeroizing<Vec<u8>>,
    },
    Hmac {
        key: Zeroizing<Vec<u8>>,
        fmt: Format,
        dst: http::HeaderName,
    },
    /// The whole body replaced (a minting processor's token request).
    Set(bytes::Bytes),
}

fn bad(msg: &str) -> TokenizerError {
    TokenizerError::Processor(msg.to_string())
}

/// A checked format string: text before and after its one directive.
#[derive(Clone, Debug)]
pub struct Format {
    prefix: String,
    suffix: String,
    upper_hex: bool,
}

impl Format {
    pub(crate) fn render_text(&self, arg: &str) -> Zeroizing<String> {
        Zeroizing::new(format!("{}{arg}{}", self.prefix, self.suffix))
    }
    pub(crate) fn render_binary(&self, arg: &[u8]) -> Zeroizing<String> {
        let mut h = hex::encode(arg);
        if self.upper_hex {
            h.make_ascii_uppercase();
        }
        Zeroizing::new(format!("{}{h}{}", self.prefix, self.suffix))
    }
}

/// The format this request's value is rendered with (`binary` for an
/// HMAC), by the rules above, or why the parameters are refused.
pub fn check_fmt(params: &Params, cfg: &FmtDst, binary: bool) -> Result<Format, TokenizerError> {
    let format = match params.get(PARAM_FMT) {
        Some(p) => p.clone(),
        None if !cfg.fmt.is_empty() => cfg.fmt.clone(),
        None => match cfg.allowed_fmt.as_deref() {
            Some([first, ..]) => first.clone(),
            _ if binary => "Bearer %x".into(),
            _ => "Bearer %s".into(),
        },
    };
    if !cfg.fmt.is_empty() && format != cfg.fmt {
        return Err(bad(
            "bad fmt: the \"fmt\" parameter differs from the secret's fmt",
        ));
    }
    if let Some(allowed) = &cfg.allowed_fmt {
        if !allowed.contains(&format) {
            return Err(bad(
                "bad fmt: the \"fmt\" parameter is not in the secret's allowed_fmt",
            ));
        }
    }
    let i = format
        .find('%')
        .ok_or_else(|| bad("bad fmt: the format has no %s/%x directive"))?;
    let directive = format.as_bytes().get(i + 1).copied();
    let upper_hex = match (directive, binary) {
        (Some(b's'), false) => false,
        (Some(b'x'), true) => false,
        (Some(b'X'), true) => true,
        (Some(b's' | b'x' | b'X'), _) => {
            return Err(bad(if binary {
                "bad fmt: an HMAC is binary; use %x or %X"
            } else {
                "bad fmt: a token is text; use %s"
            }))
        }
        _ => return Err(bad("bad fmt: only %s, %x and %X directives are allowed")),
    };
    let suffix = &format[i + 2..];
    if suffix.contains('%') {
        return Err(bad("bad fmt: the format must hold exactly one directive"));
    }
    Ok(Format {
        prefix: format[..i].to_string(),
        suffix: suffix.to_string(),
        upper_hex,
    })
}

pub(crate) fn resolve_dst(params: &Params, cfg: &FmtDst) -> Result<HeaderName, TokenizerError> {
    let dst = match params.get(PARAM_DST) {
        Some(p) => p.as_str(),
        None if !cfg.dst.is_empty() => cfg.dst.as_str(),
        None => match cfg.allowed_dst.as_deref() {
            Some([first, ..]) => first.as_str(),
            _ => "Authorization",
        },
    };
    if !cfg.dst.is_empty() && !dst.eq_ignore_ascii_case(&cfg.dst) {
        return Err(bad(
            "bad dst: the \"dst\" parameter differs from the secret's dst",
        ));
    }
    if let Some(allowed) = &cfg.allowed_dst {
        if !allowed.iter().any(|a| a.eq_ignore_ascii_case(dst)) {
            return Err(bad(
                "bad dst: the \"dst\" parameter is not in the secret's allowed_dst",
            ));
        }
    }
    HeaderName::from_bytes(dst.as_bytes()).map_err(|_| bad("bad dst: not a valid HTTP header name"))
}

/// HMAC-SHA256 of `msg` rendered with `fmt`.
pub(crate) fn hmac_value(
    key: &[u8],
    msg: &[u8],
    fmt: &Format,
) -> Result<HeaderValue, TokenizerError> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).map_err(|_| bad("missing hmac key"))?;
    m.update(msg);
    header_value(&fmt.render_binary(&m.finalize().into_bytes()))
}

fn oauth_token<'a>(t: &'a Option<OAuthToken>, params: &Params) -> Result<&'a str, TokenizerError> {
    let t = t.as_ref().ok_or_else(|| bad("missing token"))?;
    let tok = if params.get(PARAM_SUBTOKEN).map(String::as_str) == Some("refresh") {
        t.refresh_token.expose()
    } else {
        t.access_token.expose()
    };
    if tok.is_empty() {
        return Err(bad("missing token"));
    }
    Ok(tok)
}

fn body_placeholder(cfg: &str, params: &Params) -> Vec<u8> {
    let p = params
        .get(PARAM_PLACEHOLDER)
        .map(String::as_str)
        .unwrap_or(cfg);
    if p.is_empty() { DEFAULT_PLACEHOLDER } else { p }
        .as_bytes()
        .to_vec()
}

/// Build the action of one processor.
pub(crate) fn plan(p: ProcessorRef<'_>, params: &Params) -> Result<Action, TokenizerError> {
    match p {
        ProcessorRef::Inject(c) => {
            if c.token.is_empty() {
                return Err(bad("missing token"));
            }
            let fmt = check_fmt(params, &c.fmt_dst, false)?;
            let dst = resolve_dst(params, &c.fmt_dst)?;
            Ok(Action::SetHeader(
                dst,
                header_value(&fmt.render_text(c.token.expose()))?,
            ))
        }
        ProcessorRef::InjectHmac(c) => {
            if c.hash != "sha256" {
                return Err(TokenizerError::Processor(format!(
                    "unsupported hash function: {:?} (only \"sha256\" is supported)",
                    c.hash
                )));
            }
            if c.key.is_empty() {
                return Err(bad("missing hmac key"));
            }
            let fmt = check_fmt(params, &c.fmt_dst, true)?;
            let dst = resolve_dst(params, &c.fmt_dst)?;
            match params.get(PARAM_MSG) {
                Some(msg) => Ok(Action::SetHeader(
                    dst,
                    hmac_value(c.key.expose(), msg.as_bytes(), &fmt)?,
                )),
                None => Ok(Action::Body(BodyStep::Hmac {
                    key: Zeroizing::new(c.key.expose().to_vec()),
                    fmt,
                    dst,
                })),
            }
        }
        ProcessorRef::InjectBody(c) => {
            if c.token.is_empty() {
                return Err(bad("missing token"));
            }
            Ok(Action::Body(BodyStep::Replace {
                placeholder: body_placeholder(&c.placeholder, params),
                token: Zeroizing::new(c.token.expose().as_bytes().to_vec()),
            }))
        }
        ProcessorRef::OAuth2(c) => {
            let tok = oauth_token(&c.token, params)?;
            match params.get(PARAM_PLACEHOLDER) {
                Some(ph) if !ph.is_empty() => Ok(Action::Body(BodyStep::Replace {
                    placeholder: ph.as_bytes().to_vec(),
                    token: Zeroizing::new(tok.as_bytes().to_vec()),
                })),
                _ => Ok(Action::SetHeader(
                    http::header::AUTHORIZATION,
                    header_value(&Zeroizing::new(format!("Bearer {tok}")))?,
                )),
            }
        }
        ProcessorRef::Sigv4(c) => Ok(Action::Sigv4(crate::sigv4::Sigv4Step::new(c)?)),
        ProcessorRef::OAuth2Body(c) => {
            let tok = oauth_token(&c.token, params)?;
            Ok(Action::Body(BodyStep::Replace {
                placeholder: body_placeholder(&c.placeholder, params),
                token: Zeroizing::new(tok.as_bytes().to_vec()),
            }))
        }
        ProcessorRef::Jwt(_) | ProcessorRef::ClientCredentials(_) | ProcessorRef::GitHubApp(_) => {
            crate::mint::plan(p, params).map(|m| Action::Mint(Box::new(m)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(kv: &[(&str, &str)]) -> Params {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
    fn fd(fmt: &str, af: Option<&[&str]>, dst: &str, ad: Option<&[&str]>) -> FmtDst {
        FmtDst {
            fmt: fmt.into(),
            allowed_fmt: af.map(|v| v.iter().map(|s| s.to_string()).collect()),
            dst: dst.into(),
            allowed_dst: ad.map(|v| v.iter().map(|s| s.to_string()).collect()),
        }
    }
    fn f(params: &Params, cfg: &FmtDst, bin: bool) -> Result<String, TokenizerError> {
        check_fmt(params, cfg, bin).map(|f| f.render_text("T").to_string())
    }

    #[test]
    fn fmt_rules() {
        let none = fd("", None, "", None);
        assert_eq!(f(&p(&[]), &none, false).unwrap(), "Bearer T");
        assert_eq!(
            f(&p(&[("fmt", "token %s")]), &none, false).unwrap(),
            "token T"
        );
        assert_eq!(f(&p(&[]), &fd("%s", None, "", None), false).unwrap(), "T");
        // param must equal a fixed fmt
        assert!(f(
            &p(&[("fmt", "Bearer %s")]),
            &fd("%s", None, "", None),
            false
        )
        .is_err());
        assert_eq!(
            f(&p(&[("fmt", "%s")]), &fd("%s", None, "", None), false).unwrap(),
            "T"
        );
        // allowed list: first is default; others selectable; rest refused
        let al = fd("", Some(&["X %s", "Y %s"]), "", None);
        assert_eq!(f(&p(&[]), &al, false).unwrap(), "X T");
        assert_eq!(f(&p(&[("fmt", "Y %s")]), &al, false).unwrap(), "Y T");
        assert!(f(&p(&[("fmt", "Z %s")]), &al, false).is_err());
        // present but empty list allows nothing (Go: non-nil slice)
        assert!(f(&p(&[]), &fd("", Some(&[]), "", None), false).is_err());
        // directive rules
        for bad in ["none", "trailing %", "%d", "%s %s", "%x", "100%% %s", "%5s"] {
            assert!(f(&p(&[("fmt", bad)]), &none, false).is_err(), "{bad}");
        }
        let b = check_fmt(&p(&[]), &none, true).unwrap();
        assert_eq!(b.render_binary(&[0xab, 0x01]).as_str(), "Bearer ab01");
        let b = check_fmt(&p(&[("fmt", "sig=%X")]), &none, true).unwrap();
        assert_eq!(b.render_binary(&[0xab]).as_str(), "sig=AB");
        assert!(check_fmt(&p(&[("fmt", "%s")]), &none, true).is_err());
    }

    #[test]
    fn dst_rules() {
        let none = fd("", None, "", None);
        assert_eq!(resolve_dst(&p(&[]), &none).unwrap(), "authorization");
        assert_eq!(
            resolve_dst(&p(&[("dst", "X-Key")]), &none).unwrap(),
            "x-key"
        );
        let fixed = fd("", None, "x-api-key", None);
        assert_eq!(resolve_dst(&p(&[]), &fixed).unwrap(), "x-api-key");
        assert_eq!(
            resolve_dst(&p(&[("dst", "X-API-KEY")]), &fixed).unwrap(),
            "x-api-key"
        );
        assert!(resolve_dst(&p(&[("dst", "Authorization")]), &fixed).is_err());
        let al = fd("", None, "", Some(&["X-Goog-Api-Key", "Authorization"]));
        assert_eq!(resolve_dst(&p(&[]), &al).unwrap(), "x-goog-api-key");
        assert_eq!(
            resolve_dst(&p(&[("dst", "authorization")]), &al).unwrap(),
            "authorization"
        );
        assert!(resolve_dst(&p(&[("dst", "Cookie")]), &al).is_err());
        assert!(resolve_dst(&p(&[("dst", "bad header")]), &none).is_err());
    }
}
