//! `macaroon_auth`'s untrusted input: the Proxy-Authorization token, a
//! bundle of superfly/macaroon tokens, read by
//! `tokenizer::macaroon::check_bundle` with the test key of
//! tests/fixtures/macaroon (the seeds are that fixture's tokens, so the
//! fuzzer starts from tokens that verify). Also `wire::decode` on the raw
//! bytes. Asserts: no panic; a bundle that passes has a part that decodes
//! to a token for the location "tokenizer" under the key's id; refusals
//! never quote the input.
#![no_main]

use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use proxypilot::tokenizer::macaroon::{self, wire, Access};

/// sha256("proxypilot macaroon_auth test key"): the fixture's key.
fn key() -> Vec<u8> {
    use sha2::Digest as _;
    sha2::Sha256::digest(b"proxypilot macaroon_auth test key").to_vec()
}

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = wire::decode(data) {
        let _ = macaroon::verify(&m, &key());
    }
    let (method, rest) = match data.split_first() {
        Some((b, rest)) if b % 2 == 0 => ("GET", rest),
        Some((_, rest)) => ("POST", rest),
        None => ("GET", data),
    };
    let access = Access {
        method,
        host: "api.example.com",
        path: "/v1/things",
        now: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
    };
    let key = key();
    match macaroon::check_bundle(rest, &key, &access) {
        Ok(()) => {
            let text = std::str::from_utf8(rest).expect("a bundle that passes is text");
            let kid = macaroon::key_fingerprint(&key);
            let found = text.split(',').any(|part| {
                let part = part.trim();
                let b64 = part.rsplit(' ').next().unwrap_or(part);
                let Some((_, b64)) = b64.split_once('_') else {
                    return false;
                };
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .ok()
                    .and_then(|raw| {
                        wire::decode(&raw)
                            .ok()
                            .map(|m| m.location == b"tokenizer" && m.kid == kid)
                    })
                    .unwrap_or(false)
            });
            assert!(found, "a bundle passed without a token of the key");
        }
        Err(e) => {
            // No token (the base64 after a part's `fm2_`-style prefix)
            // appears in the reason.
            let msg = e.to_string();
            if let Ok(t) = std::str::from_utf8(rest) {
                for part in t.split(',') {
                    if let Some((_, body)) = part.split_once('_') {
                        let body = body.trim();
                        use base64::Engine as _;
                        let token = body.len() >= 12
                            && base64::engine::general_purpose::STANDARD
                                .decode(body)
                                .is_ok();
                        assert!(!token || !msg.contains(body), "the error quotes the token");
                    }
                }
            }
        }
    }
});
