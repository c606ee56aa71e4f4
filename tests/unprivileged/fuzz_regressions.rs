//! Inputs the fuzz targets in tests/fuzz/ found crashing, kept as plain
//! tests so `cargo test` catches a regression without nightly or
//! cargo-fuzz. Each names its reproducer in tests/fuzz/regressions/.

use std::str::FromStr;

use http::{HeaderMap, HeaderValue};
use proxypilot::relay::credentials::Credential;
use proxypilot::run::secrets::SecretSpec;

/// config-secret-del-format (target `config`, mode 2): a `--secret`
/// FORMAT holding DEL (0x7f) was accepted, and the relay then panicked in
/// `Credential::tokenizer_headers` ("sealed secret and JSON are
/// header-safe") on every request carrying that header, since serde_json
/// does not escape DEL and HeaderValue refuses it.
#[test]
fn secret_spec_format_with_del_is_refused() {
    let input = include_bytes!("../fuzz/regressions/config-secret-del-format");
    // Mode byte, then the spec, then NUL and the client's header value.
    let text = std::str::from_utf8(&input[1..]).unwrap();
    let (spec, client) = text.split_once('\0').unwrap();
    assert!(spec.contains('\u{7f}'));
    assert!(
        SecretSpec::from_str(spec).is_err(),
        "DEL in FORMAT must be refused"
    );
    for bad in [
        "K=h.example:x-k:%s\u{1}",
        "K=h.example:x-k:\t%s",
        "K=h.example:x-k:é%s",
    ] {
        assert!(
            SecretSpec::from_str(bad).is_err(),
            "{bad:?} must be refused"
        );
    }

    // Any spec that is accepted yields header-safe Proxy-Tokenizer values.
    for ok in [
        "K=h.example:x-k:%s",
        "K=h.example:x-k:~ %s !",
        "K=h.example",
    ] {
        let spec = SecretSpec::from_str(ok).unwrap();
        let cred = Credential::new(HeaderValue::from_static("c2VhbGVk"), spec.slots.clone());
        for slot in &spec.slots {
            let mut h = HeaderMap::new();
            h.insert(slot.header.clone(), HeaderValue::from_str(client).unwrap());
            for v in cred.tokenizer_headers(&h) {
                assert!(v.to_str().is_ok());
            }
        }
    }
}
