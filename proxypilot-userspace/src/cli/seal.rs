//! `proxypilot seal`: seal a token for a tokenizer (replaces the original's
//! seal.go / wrap.sh). The token comes from stdin or an environment
//! variable, never from argv where `ps` would show it.

use std::io::{Read, Write};
use std::process::ExitCode;

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};

use crate::tokenizer::secret::{
    BearerAuth, FlySrcAuth, FmtDst, InjectBodyProcessor, InjectHmacProcessor, InjectProcessor,
    NoAuth, SecretBytes, SecretString,
};
use crate::tokenizer::{seal, SealKey, Secret};

/// Seal a token into a secret for superfly/tokenizer or `proxypilot tokenizer`.
///
/// Reads the token from stdin (one trailing newline is dropped) or from
/// --token-env VAR, and prints the base64 sealed secret for the
/// Proxy-Tokenizer header. By default the tokenizer injects
/// `Authorization: Bearer <token>`.
///
/// Example: printf %s "$KEY" | proxypilot seal --seal-key $SEAL_KEY
///   --host api.anthropic.com --header x-api-key --fly-org my-org --fly-app my-app
#[derive(clap::Args, Debug)]
#[command(group = clap::ArgGroup::new("auth").required(true).args(["fly_org", "bearer_from_env", "macaroon_key_file", "no_auth", "secret_json_file"]))]
#[command(group = clap::ArgGroup::new("hosts").required(true).multiple(true).args(["host", "host_pattern", "secret_json_file"]))]
pub struct SealArgs {
    /// The tokenizer's seal (public) key, 64 hex digits.
    #[arg(
        long,
        env = "SEAL_KEY",
        value_name = "HEX",
        required_unless_present = "dry_run"
    )]
    pub seal_key: Option<String>,

    /// A host the secret may be used for (exact match on the request's
    /// Host, port included when the client writes one). Repeatable.
    #[arg(long = "host", value_name = "HOST")]
    pub host: Vec<String>,

    /// A regular expression the request's Host must match. Go semantics:
    /// an unanchored search, so "api.example.com" also matches
    /// "evilapi.example.com.attacker.net". Anchor it: '^api\.example\.com$'.
    #[arg(long, value_name = "REGEX")]
    pub host_pattern: Option<String>,

    /// Inject into header NAME with format "%s" (the bare token) instead of
    /// `Authorization: Bearer <token>`.
    #[arg(long, value_name = "NAME")]
    pub header: Option<String>,

    /// The format of the injected value: one %s (token) or, with --hmac,
    /// %x / %X (hex digest). E.g. "token %s".
    #[arg(long, value_name = "FMT")]
    pub format: Option<String>,

    /// Let the request choose this header with the parameter
    /// {"dst":"NAME"}; the first is the default. Repeatable.
    #[arg(long, value_name = "NAME")]
    pub allowed_header: Vec<String>,

    /// Let the request choose this format with the parameter
    /// {"fmt":"FMT"}; the first is the default. Repeatable.
    #[arg(long, value_name = "FMT")]
    pub allowed_format: Vec<String>,

    /// fly_src_auth: allow requests signed by Fly.io from this org (needs --fly-app).
    #[arg(long, value_name = "ORG", requires = "fly_app")]
    pub fly_org: Vec<String>,

    /// fly_src_auth: ... and this app.
    #[arg(long, value_name = "APP", requires = "fly_org")]
    pub fly_app: Vec<String>,

    /// fly_src_auth: ... and only this machine (optional, repeatable).
    #[arg(long, value_name = "ID", requires = "fly_org")]
    pub fly_instance: Vec<String>,

    /// bearer_auth: require `Proxy-Authorization: Bearer <value of VAR>`.
    #[arg(long, value_name = "VAR")]
    pub bearer_from_env: Option<String>,

    /// macaroon_auth: require a superfly/macaroon token signed with the
    /// key in FILE (hex), sent as `Proxy-Authorization: FlyV1 <token>`.
    #[arg(long, value_name = "FILE")]
    pub macaroon_key_file: Option<std::path::PathBuf>,

    /// no_auth: anyone who holds the sealed secret may use it.
    #[arg(long)]
    pub no_auth: bool,

    /// inject_hmac_processor: inject the HMAC-SHA256 of the request body
    /// (or of the "msg" parameter) keyed with the token.
    #[arg(long, conflicts_with = "body_placeholder")]
    pub hmac: bool,

    /// inject_body_processor: replace TEXT in the request body by the token.
    #[arg(long, value_name = "TEXT",
          conflicts_with_all = ["header", "format", "allowed_header", "allowed_format"])]
    pub body_placeholder: Option<String>,

    /// Read the token from environment variable VAR instead of stdin.
    #[arg(long, value_name = "VAR")]
    pub token_env: Option<String>,

    /// Print the secret's JSON with the token redacted instead of sealing.
    #[arg(long)]
    pub dry_run: bool,

    #[command(flatten)]
    pub sigv4: super::seal_sigv4::Sigv4SealArgs,

    #[command(flatten)]
    pub oauth: super::seal_oauth::OAuthSealArgs,

    #[command(flatten)]
    pub json: super::seal_json::JsonSealArgs,

    /// The token-minting processors (no token on stdin for them).
    #[command(flatten)]
    pub mint: super::seal_mint::MintArgs,
}

pub fn run(args: SealArgs) -> anyhow::Result<ExitCode> {
    run_with(
        args,
        &mut std::io::stdin().lock(),
        &mut std::io::stdout().lock(),
        &|k| std::env::var(k).ok(),
    )
}

/// [`run`] with explicit stdin, stdout and environment (for tests).
pub fn run_with(
    args: SealArgs,
    stdin: &mut dyn Read,
    stdout: &mut dyn Write,
    getenv: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<ExitCode> {
    if args.dry_run {
        let secret = build_secret(&args, "REDACTED", getenv)?;
        writeln!(stdout, "{}", secret.strip_hazmat_string())?;
        return Ok(ExitCode::SUCCESS);
    }
    let seal_key = SealKey::from_hex(args.seal_key.as_deref().unwrap_or_default())
        .context("--seal-key / SEAL_KEY")?;
    let token = zeroize::Zeroizing::new(
        if args.sigv4.selected() || args.json.selected() || args.mint.selected() {
            String::new() // the keys come from their own files or variables
        } else {
            read_token(&args, stdin, getenv)?
        },
    );
    let secret = build_secret(&args, &token, getenv)?;
    writeln!(stdout, "{}", seal(&seal_key, &secret))?;
    Ok(ExitCode::SUCCESS)
}

fn read_token(
    args: &SealArgs,
    stdin: &mut dyn Read,
    getenv: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<String> {
    let token = match &args.token_env {
        Some(var) => {
            getenv(var).with_context(|| format!("--token-env {var}: the variable is not set"))?
        }
        None => {
            let mut s = String::new();
            stdin
                .read_to_string(&mut s)
                .context("reading the token from stdin (it must be UTF-8 text)")?;
            if let Some(t) = s.strip_suffix('\n') {
                let t = t.strip_suffix('\r').unwrap_or(t);
                s = t.to_string();
            }
            s
        }
    };
    if token.is_empty() {
        bail!("the token is empty: pipe it on stdin or name a set variable with --token-env");
    }
    Ok(token)
}

/// The secret `seal` would seal for `token`.
pub fn build_secret(
    args: &SealArgs,
    token: &str,
    getenv: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<Secret> {
    if let Some(s) = args.json.secret()? {
        return Ok(s);
    }
    let mut s = Secret::default();
    let header_ok = !token.bytes().any(|b| b < 0x20 || b == 0x7f);

    let opt_list = |v: &Vec<String>| (!v.is_empty()).then(|| v.clone());
    let mut fmt_dst = FmtDst {
        allowed_fmt: opt_list(&args.allowed_format),
        allowed_dst: opt_list(&args.allowed_header),
        ..Default::default()
    };
    if let Some(h) = &args.header {
        http::HeaderName::from_bytes(h.as_bytes())
            .map_err(|_| anyhow::anyhow!("--header {h:?} is not a valid header name"))?;
        fmt_dst.dst = h.clone();
        fmt_dst.fmt = if args.hmac { "%x" } else { "%s" }.into();
    }
    if let Some(f) = &args.format {
        fmt_dst.fmt = f.clone();
    }
    // Check the format rules now rather than at the first request.
    crate::tokenizer::processor::check_fmt(&Default::default(), &fmt_dst, args.hmac)
        .map_err(|e| anyhow::anyhow!("--format/--allowed-format: {e}"))?;

    if args.mint.selected() {
        args.mint.apply(&mut s, getenv)?;
    } else if args.sigv4.selected() {
        s.sigv4_processor = Some(args.sigv4.processor(getenv)?);
    } else if let Some(ph) = &args.body_placeholder {
        if ph.is_empty() {
            bail!("--body-placeholder must not be empty");
        }
        if args.oauth.oauth {
            s.oauth2_body_processor = Some(args.oauth.body_processor(token, ph, getenv)?);
        } else {
            s.inject_body_processor = Some(InjectBodyProcessor {
                token: SecretString::new(token),
                placeholder: ph.clone(),
            });
        }
    } else if args.oauth.oauth {
        if !header_ok {
            bail!("the token contains control characters and cannot go in an HTTP header");
        }
        s.oauth2_processor = Some(args.oauth.processor(token, getenv)?);
    } else if args.hmac {
        s.inject_hmac_processor = Some(InjectHmacProcessor {
            key: SecretBytes::new(token.as_bytes()),
            hash: "sha256".into(),
            fmt_dst,
        });
    } else {
        if !header_ok {
            bail!("the token contains control characters and cannot go in an HTTP header");
        }
        s.inject_processor = Some(InjectProcessor {
            token: SecretString::new(token),
            fmt_dst,
        });
    }

    if !args.fly_org.is_empty() {
        s.fly_src_auth = Some(FlySrcAuth {
            allowed_orgs: opt_list(&args.fly_org),
            allowed_apps: opt_list(&args.fly_app),
            allowed_instances: opt_list(&args.fly_instance),
        });
    } else if let Some(var) = &args.bearer_from_env {
        let v = zeroize::Zeroizing::new(
            getenv(var)
                .with_context(|| format!("--bearer-from-env {var}: the variable is not set"))?,
        );
        if v.is_empty() {
            bail!("--bearer-from-env {var}: the variable is empty");
        }
        s.bearer_auth = Some(BearerAuth {
            digest: SecretBytes::new(Sha256::digest(v.as_bytes()).to_vec()),
        });
    } else if let Some(f) = &args.macaroon_key_file {
        s.macaroon_auth = Some(super::seal_macaroon::auth(f)?);
    } else if args.no_auth {
        s.no_auth = Some(NoAuth {});
    } else {
        bail!("choose the auth: --fly-org/--fly-app, --bearer-from-env VAR, --macaroon-key-file FILE or --no-auth");
    }

    s.allowed_hosts = opt_list(&args.host);
    if let Some(p) = &args.host_pattern {
        s.allowed_host_pattern = p.clone();
        s.host_pattern()
            .map_err(|e| anyhow::anyhow!("--host-pattern: {e}"))?;
    }
    Ok(s)
}

/// `proxypilot seal ARGS` parsed as the command line would be (the seal
/// modules' tests).
#[cfg(test)]
pub(crate) fn parse_args(args: &[&str]) -> Result<SealArgs, clap::Error> {
    use clap::Parser;
    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: SealArgs,
    }
    let mut v = vec!["seal"];
    v.extend_from_slice(args);
    T::try_parse_from(v).map(|t| t.a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::OpenKey;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: SealArgs,
    }

    fn parse(args: &[&str]) -> SealArgs {
        let mut v = vec!["seal"];
        v.extend_from_slice(args);
        T::try_parse_from(v).unwrap().a
    }

    fn env(k: &str) -> Option<String> {
        (k == "PROXY_TOKEN").then(|| "proxy-secret".to_string())
    }

    #[test]
    fn seals_default_inject() {
        let k = OpenKey::generate();
        let sk = k.seal_key().to_hex();
        let a = parse(&["--seal-key", &sk, "--host", "api.example.com", "--no-auth"]);
        let mut out = Vec::new();
        run_with(a, &mut &b"tok\n"[..], &mut out, &env).unwrap();
        let s = crate::tokenizer::open(&k, std::str::from_utf8(&out).unwrap().trim()).unwrap();
        assert_eq!(
            s.to_json(),
            r#"{"inject_processor":{"token":"tok"},"no_auth":{},"allowed_hosts":["api.example.com"]}"#
        );
    }

    #[test]
    fn macaroon_key_file_seals_macaroon_auth() {
        let dir = std::env::temp_dir().join(format!("pp-seal-mac-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("macaroon.key");
        std::fs::write(&f, "01".repeat(32)).unwrap();
        let path = f.to_str().unwrap();
        let a = parse(&["--dry-run", "--host", "h", "--macaroon-key-file", path]);
        let json = build_secret(&a, "T", &env).unwrap().to_json();
        assert_eq!(
            json,
            format!(
                r#"{{"inject_processor":{{"token":"T"}},"macaroon_auth":{{"key":"{}"}},"allowed_hosts":["h"]}}"#,
                base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [1u8; 32])
            )
        );
        let mut v = vec!["seal", "--host", "h", "--macaroon-key-file", path];
        v.push("--no-auth");
        assert!(T::try_parse_from(v).is_err(), "only one auth");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn shapes() {
        let j = |args: &[&str]| {
            let mut v = vec!["--dry-run"];
            v.extend_from_slice(args);
            build_secret(&parse(&v), "T", &env).map(|s| s.to_json())
        };
        assert_eq!(
            j(&[
                "--host",
                "h",
                "--header",
                "x-api-key",
                "--fly-org",
                "o",
                "--fly-app",
                "a"
            ])
            .unwrap(),
            r#"{"inject_processor":{"token":"T","fmt":"%s","dst":"x-api-key"},"fly_src_auth":{"allowed_orgs":["o"],"allowed_apps":["a"],"allowed_instances":null},"allowed_hosts":["h"]}"#
        );
        let b = j(&[
            "--host-pattern",
            "^h$",
            "--bearer-from-env",
            "PROXY_TOKEN",
            "--hmac",
        ])
        .unwrap();
        // sha256("proxy-secret"), key base64("T")
        assert!(
            b.contains(r#""inject_hmac_processor":{"key":"VA==","hash":"sha256"}"#),
            "{b}"
        );
        assert!(b.contains(r#""bearer_auth":{"digest":""#), "{b}");
        assert!(b.contains(r#""allowed_host_pattern":"^h$""#), "{b}");
        assert_eq!(
            j(&["--host", "h", "--no-auth", "--body-placeholder", "{{K}}"]).unwrap(),
            r#"{"inject_body_processor":{"token":"T","placeholder":"{{K}}"},"no_auth":{},"allowed_hosts":["h"]}"#
        );
        assert_eq!(
            j(&[
                "--host",
                "h",
                "--no-auth",
                "--allowed-header",
                "Authorization",
                "--allowed-header",
                "X-Api-Key",
                "--allowed-format",
                "Bearer %s",
                "--allowed-format",
                "%s"
            ])
            .unwrap(),
            r#"{"inject_processor":{"token":"T","allowed_fmt":["Bearer %s","%s"],"allowed_dst":["Authorization","X-Api-Key"]},"no_auth":{},"allowed_hosts":["h"]}"#
        );
        // Refusals.
        assert!(j(&["--host", "h", "--no-auth", "--format", "%d"]).is_err());
        assert!(j(&["--host-pattern", "(", "--no-auth"]).is_err());
        assert!(j(&["--host", "h", "--bearer-from-env", "UNSET_VAR"]).is_err());
        let mut v = vec!["seal", "--host", "h"];
        assert!(T::try_parse_from(v.clone()).is_err(), "auth is required");
        v.extend(["--no-auth", "--fly-org", "o", "--fly-app", "a"]);
        assert!(T::try_parse_from(v).is_err(), "only one auth");
        assert!(
            T::try_parse_from(["seal", "--no-auth", "--dry-run"]).is_err(),
            "a host is required"
        );
        assert!(T::try_parse_from(["seal", "--host", "h", "--fly-org", "o", "--dry-run"]).is_err());
    }

    #[test]
    fn dry_run_redacts_and_token_sources() {
        let a = parse(&["--host", "h", "--no-auth", "--dry-run"]);
        let mut out = Vec::new();
        run_with(a, &mut &b"real-token"[..], &mut out, &env).unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.contains("REDACTED") && !out.contains("real-token"),
            "{out}"
        );

        let k = OpenKey::generate();
        let sk = k.seal_key().to_hex();
        let a = parse(&[
            "--seal-key",
            &sk,
            "--host",
            "h",
            "--no-auth",
            "--token-env",
            "PROXY_TOKEN",
        ]);
        let mut out = Vec::new();
        run_with(a, &mut &b""[..], &mut out, &env).unwrap();
        let s = crate::tokenizer::open(&k, std::str::from_utf8(&out).unwrap().trim()).unwrap();
        assert_eq!(s.inject_processor.unwrap().token.expose(), "proxy-secret");

        let a = parse(&["--seal-key", &sk, "--host", "h", "--no-auth"]);
        assert!(
            run_with(a, &mut &b"\n"[..], &mut Vec::new(), &env).is_err(),
            "empty token"
        );
        let a = parse(&["--seal-key", "abc", "--host", "h", "--no-auth"]);
        assert!(
            run_with(a, &mut &b"t"[..], &mut Vec::new(), &env).is_err(),
            "bad seal key"
        );
    }

    /// The sealed output opens with PyNaCl (libsodium) and carries the Go
    /// JSON the seed's seal command produced.
    #[test]
    fn pynacl_opens_seal_output() {
        use std::process::{Command, Stdio};
        let have_nacl = Command::new("python3")
            .args(["-c", "import nacl.public"])
            .status()
            .is_ok_and(|s| s.success());
        if !have_nacl {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI is set but python3 cannot import nacl: pip install -r tests/requirements.txt (cargo xtask setup does)"
            );
            eprintln!("SKIPPED: python3 with PyNaCl not available (pip install pynacl)");
            return;
        }
        let k = OpenKey::generate();
        let sk = k.seal_key().to_hex();
        let a = parse(&[
            "--seal-key",
            &sk,
            "--host",
            "api.anthropic.com",
            "--header",
            "x-api-key",
            "--fly-org",
            "my-org",
            "--fly-app",
            "my-app",
        ]);
        let mut out = Vec::new();
        run_with(a, &mut &b"sk-ant-123\n"[..], &mut out, &env).unwrap();
        let mut child = Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/tokenizer/open_sealed.py"
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let input = format!(
            "{}\n{}",
            k.to_hex().as_str(),
            String::from_utf8(out).unwrap()
        );
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), input.as_bytes()).unwrap();
        let res = child.wait_with_output().unwrap();
        assert!(res.status.success());
        assert_eq!(
            String::from_utf8(res.stdout).unwrap(),
            r#"{"inject_processor":{"token":"sk-ant-123","fmt":"%s","dst":"x-api-key"},"fly_src_auth":{"allowed_orgs":["my-org"],"allowed_apps":["my-app"],"allowed_instances":null},"allowed_hosts":["api.anthropic.com"]}"#
        );
    }
}
