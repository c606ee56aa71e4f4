//! The sidecar's and `proxypilot run`'s configuration inputs:
//!
//! - mode 0: the `--config` TOML file through `RelayArgs::resolve_with`
//!   (with its `permit`s: display round trip, matcher consistency)
//!   (the file is written to a temp path; the environment is a fake map
//!   holding a few sealed-looking values, so `target` entries resolve);
//! - mode 1: `--target HOST=ENVVAR` specs and the `TARGETS` variable via
//!   `resolve_with` with a fuzzed environment;
//! - mode 2: `--secret` specs (`run::secrets::SecretSpec::from_str`), then
//!   what `proxypilot run` does with one: `to_secret`, and the relay's
//!   `Credential::tokenizer_headers` with the client using each slot;
//! - mode 3: `--allow-cidr` (`kernel::AllowRule::from_str`), with its
//!   Display round trip and trie key;
//! - mode 4: `--allow` host patterns (`policy::HostPattern::parse`).
#![no_main]

use std::io::Write as _;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::OnceLock;

use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use proxypilot::kernel::AllowRule;
use proxypilot::policy::HostPattern;
use proxypilot::relay::credentials::Credential;
use proxypilot::run::secrets::SecretSpec;
use proxypilot::settings::RelayArgs;

fn config_path() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        std::env::temp_dir().join(format!(
            "proxypilot-fuzz-config-{}.toml",
            std::process::id()
        ))
    })
}

fn fake_env(k: &str) -> Option<String> {
    match k {
        "GH" | "OPENAI" | "ANTHROPIC" | "SEALED" => Some("c2VhbGVk".into()),
        "BAD" => Some("bad\u{7f}value".into()),
        "TOK" => Some("Bearer tokenizer-auth".into()),
        "PROXY" => Some("http://127.0.0.1:8080".into()),
        _ => None,
    }
}

/// Inputs that name device or proc files could make `resolve_with` read
/// /dev/zero or block on a FIFO (the config's paths are trusted operator
/// input, not a parser bug); skip them.
fn names_special_files(s: &str) -> bool {
    s.contains("/dev") || s.contains("/proc") || s.contains("/sys") || s.contains("/run")
}

fn config_mode(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if names_special_files(text) {
        return;
    }
    let path = config_path();
    {
        let mut f = std::fs::File::create(path).unwrap();
        f.write_all(data).unwrap();
    }
    let args = RelayArgs {
        config: Some(path.clone()),
        ..RelayArgs::default()
    };
    if let Ok(s) = args.resolve_with(&fake_env) {
        for t in &s.targets {
            // What Relay::new will require of every target.
            assert!(HeaderValue::from_str(t.sealed.expose()).is_ok());
            assert!(proxypilot::policy::normalize_host(&t.host).as_deref() == Ok(t.host.as_str()));
            permits_hold(&t.host, &t.permits);
        }
        for a in &s.allow {
            assert_eq!(
                HostPattern::parse(&a.to_string()).as_ref(),
                Ok(a),
                "allow display round trip"
            );
        }
    }
}

/// A permit shows as it parses, and never lets through a path whose
/// normalisation refuses it (the fuzzed file's own text as paths).
fn permits_hold(host: &str, permits: &[proxypilot::relay::rules::Permit]) {
    use proxypilot::relay::rules::{path_segments, Decision, Permit, Rules};
    let mut rules = Rules::default();
    rules.add(host, permits.iter().cloned());
    for p in permits {
        let shown = p.to_string();
        assert_eq!(
            Permit::parse(&shown).as_ref(),
            Ok(p),
            "permit display round trip"
        );
        let path = shown.split_once(' ').map_or("/", |(_, path)| path);
        let d = rules.check(host, &http::Method::GET, path);
        if matches!(d, Decision::Permitted(_)) {
            assert!(
                path_segments(path).is_ok(),
                "{path} permitted but not normal"
            );
        }
    }
}

fn targets_mode(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // First line: --target flags separated by '\n'; the rest: TARGETS.
    let (flags, targets_env) = text.split_once('\u{0}').unwrap_or((text, ""));
    let env = |k: &str| {
        if k == "TARGETS" {
            Some(targets_env.to_string())
        } else {
            fake_env(k)
        }
    };
    let args = RelayArgs {
        targets: flags.split('\n').map(str::to_string).collect(),
        ..RelayArgs::default()
    };
    if let Ok(s) = args.resolve_with(&env) {
        for t in &s.targets {
            assert!(HeaderValue::from_str(t.sealed.expose()).is_ok());
        }
    }
}

fn secret_mode(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (spec, client) = text.split_once('\u{0}').unwrap_or((text, "dummy"));
    let Ok(spec) = SecretSpec::from_str(spec) else {
        return;
    };
    let _ = spec.to_string();
    let secret = spec.to_secret("real-key");
    let json = secret.to_json();
    assert!(
        proxypilot::tokenizer::Secret::from_json(json.as_bytes()).is_ok(),
        "the secret `run` seals must open"
    );
    // The relay names the slot the client filled in its Proxy-Tokenizer
    // params; that must never panic, whatever the spec's FORMAT was.
    let cred = Credential::new(HeaderValue::from_static("c2VhbGVk"), spec.slots.clone());
    for slot in &spec.slots {
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(client) {
            h.insert(slot.header.clone(), v);
        }
        for v in cred.tokenizer_headers(&h) {
            let s = v.to_str().map(str::to_owned).unwrap_or_default();
            let _ = proxypilot::tokenizer::header::parse(&s);
        }
    }
}

fn cidr_mode(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(r) = AllowRule::from_str(text) {
        let shown = r.to_string();
        let again = AllowRule::from_str(&shown).expect("Display output must parse");
        assert_eq!(again, r, "AllowRule display round trip");
        let _ = r.trie_key();
        assert!(r.port != Some(0));
    }
}

fn host_mode(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = HostPattern::parse(text) {
        assert_eq!(HostPattern::parse(&p.to_string()).as_ref(), Ok(&p));
        let _ = p.matches(text);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 5 {
        0 => config_mode(rest),
        1 => targets_mode(rest),
        2 => secret_mode(rest),
        3 => cidr_mode(rest),
        _ => host_mode(rest),
    }
});
