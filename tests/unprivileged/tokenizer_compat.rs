//! Wire compatibility with an independent crypto_box_seal implementation
//! (PyNaCl / libsodium), both ways.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::process::{Command, Stdio};

use proxypilot::tokenizer::secret::{
    BearerAuth, FlySrcAuth, FmtDst, InjectBodyProcessor, InjectHmacProcessor, InjectProcessor,
    NoAuth, OAuth2Processor, OAuthToken, SecretBytes, SecretString,
};
use proxypilot::tokenizer::sigv4::Sigv4Processor;
use proxypilot::tokenizer::{header, seal, Engine, OpenKey, Secret};
use serde_json::Value;

// Beside proxypilot-userspace: its `seal` unit tests use the opener too.
const FIXTURES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../proxypilot-userspace/tests/fixtures/tokenizer/fixtures.json"
);
const OPENER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../proxypilot-userspace/tests/fixtures/tokenizer/open_sealed.py"
);

/// Secrets sealed by PyNaCl from hand-written Go-format JSON: the engine
/// opens each and gives the recorded outcome.
#[test]
fn engine_accepts_pynacl_sealed_fixtures() {
    let fx: Value = serde_json::from_str(&std::fs::read_to_string(FIXTURES).unwrap()).unwrap();
    let key = OpenKey::from_hex(fx["open_key"].as_str().unwrap()).unwrap();
    assert_eq!(
        key.seal_key().to_hex(),
        fx["seal_key"].as_str().unwrap(),
        "X25519 public key differs from libsodium's"
    );
    let engine = Engine::new(key);
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let params: HashMap<String, String> = match &case["params"] {
            Value::Null => HashMap::new(),
            v => serde_json::from_value(v.clone()).unwrap(),
        };
        let value = header::format(case["sealed"].as_str().unwrap(), &params);
        let req = &case["request"];
        let mut b =
            http::Request::get(req["uri"].as_str().unwrap()).header("proxy-tokenizer", value);
        for h in req["headers"].as_array().into_iter().flatten() {
            b = b.header(h[0].as_str().unwrap(), h[1].as_str().unwrap());
        }
        let (mut parts, ()) = b.body(()).unwrap().into_parts();
        let expect = &case["expect"];
        let status = expect["status"].as_u64().unwrap();
        match engine.apply(&mut parts) {
            Ok(applied) => {
                assert_eq!(status, 200, "{name}: expected an error, got success");
                assert_eq!(applied.secrets, 1);
                for (k, v) in expect["headers"].as_object().unwrap() {
                    assert_eq!(
                        parts.headers[k.as_str()],
                        v.as_str().unwrap(),
                        "{name}: header {k}"
                    );
                }
                assert!(!parts.headers.contains_key("proxy-tokenizer"), "{name}");
                assert!(!parts.headers.contains_key("proxy-authorization"), "{name}");
            }
            Err(e) => {
                assert_eq!(u64::from(e.status().as_u16()), status, "{name}: {e}");
                let want = expect["error"].as_str().unwrap();
                assert!(e.to_string().contains(want), "{name}: {e:?} lacks {want:?}");
            }
        }
    }
}

pub(crate) fn nacl_available() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import nacl.public"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("CI is set but python3 cannot import nacl: pip install -r tests/requirements.txt (cargo xtask setup does)");
        }
        eprintln!("SKIPPED: python3 with PyNaCl not available (pip install pynacl); set CI=1 to make this fatal");
    }
    ok
}

pub(crate) fn open_with_pynacl(key: &OpenKey, sealed: &str) -> String {
    let mut child = Command::new("python3")
        .arg(OPENER)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(
        child.stdin.take().unwrap(),
        "{}\n{}",
        key.to_hex().as_str(),
        sealed
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "PyNaCl could not open proxypilot's sealed secret"
    );
    String::from_utf8(out.stdout).unwrap()
}

pub(crate) fn keys_of(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    if let Value::Object(m) = v {
        for (k, v) in m {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            out.insert(path.clone());
            keys_of(v, &path, out);
        }
    }
}

/// proxypilot's sealed output opens with PyNaCl, and its JSON carries
/// exactly superfly/tokenizer's field names.
#[test]
fn pynacl_opens_proxypilot_sealed_secrets() {
    if !nacl_available() {
        return;
    }
    let key = OpenKey::generate();
    let fd = FmtDst {
        fmt: "%s".into(),
        dst: "x-api-key".into(),
        allowed_fmt: Some(vec!["%s".into()]),
        allowed_dst: Some(vec!["x-api-key".into()]),
    };
    let cases: Vec<(Secret, &[&str])> = vec![
        (
            Secret {
                inject_processor: Some(InjectProcessor {
                    token: SecretString::new("tok"),
                    fmt_dst: fd.clone(),
                }),
                fly_src_auth: Some(FlySrcAuth {
                    allowed_orgs: Some(vec!["o".into()]),
                    allowed_apps: Some(vec!["a".into()]),
                    allowed_instances: Some(vec!["i".into()]),
                }),
                allowed_hosts: Some(vec!["api.example.com".into()]),
                allowed_host_pattern: "^api\\.example\\.com$".into(),
                ..Default::default()
            },
            &[
                "inject_processor",
                "inject_processor.token",
                "inject_processor.fmt",
                "inject_processor.allowed_fmt",
                "inject_processor.dst",
                "inject_processor.allowed_dst",
                "fly_src_auth",
                "fly_src_auth.allowed_orgs",
                "fly_src_auth.allowed_apps",
                "fly_src_auth.allowed_instances",
                "allowed_hosts",
                "allowed_host_pattern",
            ],
        ),
        (
            Secret {
                inject_hmac_processor: Some(InjectHmacProcessor {
                    key: SecretBytes::new(b"k".to_vec()),
                    hash: "sha256".into(),
                    fmt_dst: FmtDst::default(),
                }),
                bearer_auth: Some(BearerAuth {
                    digest: SecretBytes::new(vec![1; 32]),
                }),
                ..Default::default()
            },
            &[
                "inject_hmac_processor",
                "inject_hmac_processor.key",
                "inject_hmac_processor.hash",
                "bearer_auth",
                "bearer_auth.digest",
            ],
        ),
        (
            Secret {
                inject_body_processor: Some(InjectBodyProcessor {
                    token: SecretString::new("t"),
                    placeholder: "{{K}}".into(),
                }),
                no_auth: Some(NoAuth {}),
                ..Default::default()
            },
            &[
                "inject_body_processor",
                "inject_body_processor.token",
                "inject_body_processor.placeholder",
                "no_auth",
            ],
        ),
        (
            Secret {
                oauth2_processor: Some(OAuth2Processor {
                    token: Some(OAuthToken {
                        access_token: SecretString::new("a"),
                        refresh_token: SecretString::new("r"),
                    }),
                }),
                no_auth: Some(NoAuth {}),
                ..Default::default()
            },
            &[
                "oauth2_processor",
                "oauth2_processor.token",
                "oauth2_processor.token.access_token",
                "oauth2_processor.token.refresh_token",
                "no_auth",
            ],
        ),
        (
            Secret {
                sigv4_processor: Some(Sigv4Processor {
                    access_key: SecretString::new("AKIDEXAMPLE"),
                    secret_key: SecretString::new("sk"),
                    no_swap: false,
                }),
                no_auth: Some(NoAuth {}),
                ..Default::default()
            },
            // Go has no omitempty on no_swap: it is always there.
            &[
                "sigv4_processor",
                "sigv4_processor.access_key",
                "sigv4_processor.secret_key",
                "sigv4_processor.no_swap",
                "no_auth",
            ],
        ),
    ];
    for (secret, want) in cases {
        let sealed = seal(&key.seal_key(), &secret);
        let json = open_with_pynacl(&key, &sealed);
        let v: Value = serde_json::from_str(&json).unwrap();
        let mut got = BTreeSet::new();
        keys_of(&v, "", &mut got);
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        assert_eq!(got, want, "JSON field names differ from Go's: {json}");
        // And it reads back to the same secret.
        assert_eq!(Secret::from_json(json.as_bytes()).unwrap(), secret);
    }
    // Binary fields are standard base64 with padding, like Go's []byte.
    let s = Secret {
        inject_hmac_processor: Some(InjectHmacProcessor {
            key: SecretBytes::new(b"k".to_vec()),
            hash: "sha256".into(),
            fmt_dst: FmtDst::default(),
        }),
        no_auth: Some(NoAuth {}),
        ..Default::default()
    };
    let json = open_with_pynacl(&key, &seal(&key.seal_key(), &s));
    assert_eq!(
        json,
        r#"{"inject_hmac_processor":{"key":"aw==","hash":"sha256"},"no_auth":{}}"#
    );
}

// The `seal` subcommand's output is checked against PyNaCl in
// src/cli/seal.rs (tests::pynacl_opens_seal_output).
