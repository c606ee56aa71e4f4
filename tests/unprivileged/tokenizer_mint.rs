//! The token-minting processors (issue 18) against an independent
//! reference: keys from Python's `cryptography`, secrets written in
//! superfly/tokenizer's JSON and sealed by PyNaCl, JWT signatures checked
//! by `cryptography` (tests/support/mint_reference.py). The tokens are
//! minted by the loopback fake token endpoints (tests/src/loopback.rs)
//! through the standalone tokenizer, and the sealed token that comes back
//! is opened by PyNaCl and then used through the tokenizer.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::process::{Command, Stdio};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use proxypilot::tokenizer::secret::{
    ClientCredentialsProcessor, GitHubAppProcessor, JwtProcessor, NoAuth, SecretBytes, SecretString,
};
use proxypilot::tokenizer::{header, seal, OpenKey, Secret};
use proxypilot_tests::loopback::{form_fields, start_tokenizer, LoopbackUpstream, ProxyConn};
use serde_json::Value;

use super::tokenizer_compat::{keys_of, nacl_available, open_with_pynacl};

fn reference() -> std::path::PathBuf {
    proxypilot_tests::support_dir().join("mint_reference.py")
}

/// PyNaCl and `cryptography` importable (fatal under CI, like the other
/// PyNaCl tests).
fn reference_available() -> bool {
    if !nacl_available() {
        return false;
    }
    let ok = Command::new("python3")
        .args([
            "-c",
            "import cryptography.hazmat.primitives.asymmetric.ed25519",
        ])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("CI is set but python3 cannot import cryptography");
        }
        eprintln!("SKIPPED: python3 without the cryptography package");
    }
    ok
}

fn gen_cases(key: &OpenKey) -> Vec<Value> {
    let out = Command::new("python3")
        .arg(reference())
        .args(["gen", &key.seal_key().to_hex()])
        .output()
        .unwrap();
    assert!(out.status.success(), "mint_reference.py gen failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The JWT's header and claims, once `cryptography` has verified its
/// signature with `public_pem`; panics if the signature is bad.
fn verify_jwt(jwt: &str, public_pem: &str) -> (Value, Value) {
    let mut child = Command::new("python3")
        .arg(reference())
        .arg("verify")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let req = serde_json::json!({"jwt": jwt, "public_pem": public_pem});
    child
        .stdin
        .take()
        .unwrap()
        .write_all(req.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "cryptography could not verify the JWT's signature with the key's public half"
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    (v["header"].clone(), v["claims"].clone())
}

fn post(uri: &str, sealed: &str, params: &Value, extra: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let params: HashMap<String, String> = match params {
        Value::Null => HashMap::new(),
        v => serde_json::from_value(v.clone()).unwrap(),
    };
    let host = uri.parse::<http::Uri>().unwrap();
    let mut b = Request::post(uri)
        .header("host", host.authority().unwrap().as_str())
        .header("proxy-tokenizer", header::format(sealed, &params))
        .header("content-type", "application/json")
        .header("accept-encoding", "gzip");
    for (k, v) in extra {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::from_static(
        b"{\"client\":\"body to be replaced\"}",
    )))
    .unwrap()
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Each new processor, sealed by PyNaCl from Go-format JSON with keys from
/// `cryptography`: the tokenizer writes the token request (form body,
/// signed assertion or client secret; GitHub's app JWT, headers, path and
/// empty body), the fake endpoint mints, the client gets a sealed token
/// that PyNaCl opens into an inject_processor secret with the parent's
/// auth and validators (GitHub: `token %s`, api.github.com), and that
/// sealed token, sent back, injects the minted token upstream.
#[tokio::test]
async fn pynacl_sealed_minting_secrets_mint_a_sealed_token_that_injects_upstream() {
    if !reference_available() {
        return;
    }
    let up = LoopbackUpstream::start(&["oauth.example.com", "api.github.com"]).await;
    let key = OpenKey::generate();
    let tk = start_tokenizer(
        proxypilot::tokenizer::Engine::new(key.clone()),
        up.client_config(false),
        false,
    )
    .await;
    let cases = gen_cases(&key);
    assert_eq!(cases.len(), 6);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let kind = case["kind"].as_str().unwrap();
        let sealed = case["sealed"].as_str().unwrap();
        let fields = &case["fields"];
        let auth: &[(&str, &str)] = if case["secret"].get("bearer_auth").is_some() {
            &[("proxy-authorization", "Bearer proxy-pass")]
        } else {
            &[]
        };
        let uri = match kind {
            "github_app" => "http://api.github.com/whatever/the/client/sent?per_page=1",
            _ => "http://oauth.example.com/token",
        };
        let mut conn = ProxyConn::connect(tk.addr).await;
        let (status, headers, body) = conn.send(post(uri, sealed, &case["params"], auth)).await;
        let want = if kind == "github_app" { 201 } else { 200 };
        assert_eq!(status, want, "{name}: {body}");
        assert_eq!(headers["content-type"], "application/json", "{name}");

        // What the token endpoint received.
        let seen = up.last();
        assert!(seen.headers.get("proxy-tokenizer").is_none(), "{name}");
        assert_eq!(seen.headers["accept-encoding"], "identity", "{name}");
        let t0 = now();
        let minted = match kind {
            "jwt" => {
                assert_eq!(seen.path, "/token");
                assert_eq!(
                    seen.headers["content-type"],
                    "application/x-www-form-urlencoded"
                );
                let f = form_fields(&seen.body);
                assert_eq!(
                    f.keys().map(String::as_str).collect::<Vec<_>>(),
                    ["assertion", "grant_type"],
                    "{name}"
                );
                assert_eq!(
                    f["grant_type"],
                    "urn:ietf:params:oauth:grant-type:jwt-bearer"
                );
                let (h, c) = verify_jwt(&f["assertion"], case["public_pem"].as_str().unwrap());
                assert_eq!(
                    h,
                    serde_json::json!({"alg": case["alg"], "typ": "JWT"}),
                    "{name}"
                );
                let (sub, scope) = match &case["params"] {
                    Value::Null => (fields["sub"].clone(), fields["scopes"].clone()),
                    p => (p["sub"].clone(), p["scopes"].clone()),
                };
                assert_eq!(c["iss"], fields["email"], "{name}");
                assert_eq!(c["aud"], fields["token_url"], "{name}");
                assert_eq!(c["scope"], scope, "{name}");
                if sub == "" {
                    assert!(
                        c.get("sub").is_none(),
                        "{name}: empty sub is left out, as Go"
                    );
                } else {
                    assert_eq!(c["sub"], sub, "{name}");
                }
                let iat = c["iat"].as_i64().unwrap();
                assert!((t0 - 5..=t0).contains(&iat), "{name}: iat {iat}");
                assert_eq!(c["exp"].as_i64().unwrap() - iat, 3600, "{name}");
                "Bearer minted-access-"
            }
            "client_credentials" => {
                let f = form_fields(&seen.body);
                let want: BTreeMap<String, String> = [
                    ("client_id", "cid-1"),
                    ("client_secret", "cc-secret-value-123"),
                    ("grant_type", "client_credentials"),
                    ("scope", "read write"),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
                assert_eq!(f, want);
                "Bearer minted-access-"
            }
            _ => {
                assert_eq!(seen.method, "POST");
                assert_eq!(
                    seen.uri, "/app/installations/678/access_tokens?per_page=1",
                    "GitHub's path from token_url, the client's query kept"
                );
                assert!(seen.body.is_empty(), "GitHub's token request has no body");
                assert!(seen.headers.get("content-type").is_none());
                assert_eq!(seen.headers["accept"], "application/vnd.github+json");
                assert_eq!(seen.headers["x-github-api-version"], "2022-11-28");
                let jwt = seen.headers["authorization"]
                    .to_str()
                    .unwrap()
                    .strip_prefix("Bearer ")
                    .unwrap()
                    .to_string();
                let (h, c) = verify_jwt(&jwt, case["public_pem"].as_str().unwrap());
                assert_eq!(h["alg"], "RS256");
                assert_eq!(c["iss"], "12345");
                let iat = c["iat"].as_i64().unwrap();
                assert!((t0 - 5..=t0).contains(&iat));
                assert_eq!(c["exp"].as_i64().unwrap() - iat, 600);
                "token ghs_minted"
            }
        };

        // What the client got: Go's SealedTokenResponse, nothing else.
        let v: Value = serde_json::from_str(&body).unwrap();
        let mut got = BTreeSet::new();
        keys_of(&v, "", &mut got);
        assert_eq!(
            got,
            ["expires_in", "sealed_token", "token_type"]
                .into_iter()
                .map(String::from)
                .collect(),
            "{name}: {body}"
        );
        assert_eq!(v["token_type"], "sealed");
        let expires_in = v["expires_in"].as_i64().unwrap();
        assert!(
            (3535..=3540).contains(&expires_in),
            "{name}: the endpoint's hour minus 60 s, got {expires_in}"
        );
        assert!(
            !body.contains("minted"),
            "{name}: the token came back in the clear"
        );

        // PyNaCl opens it: an inject_processor secret, Go's field names.
        let sealed_token = v["sealed_token"].as_str().unwrap();
        let inner: Value = serde_json::from_str(&open_with_pynacl(&key, sealed_token)).unwrap();
        let parent = &case["secret"];
        let token = inner["inject_processor"]["token"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(minted.ends_with(token.trim_end_matches(char::is_numeric)));
        for a in ["no_auth", "bearer_auth"] {
            assert_eq!(inner.get(a), parent.get(a), "{name}: the parent's auth");
        }
        if kind == "github_app" {
            assert_eq!(inner["inject_processor"]["fmt"], "token %s");
            assert_eq!(
                inner["allowed_hosts"],
                serde_json::json!(["api.github.com"])
            );
        } else {
            assert!(inner["inject_processor"].get("fmt").is_none());
            assert_eq!(inner["allowed_hosts"], parent["allowed_hosts"], "{name}");
            assert_eq!(
                inner.get("allowed_host_pattern"),
                parent.get("allowed_host_pattern")
            );
        }

        // Sent back through the tokenizer, it injects the minted token.
        let api = if kind == "github_app" {
            "http://api.github.com/user"
        } else {
            "http://oauth.example.com/v1/data"
        };
        let mut b = Request::get(api)
            .header(
                "host",
                api.parse::<http::Uri>()
                    .unwrap()
                    .authority()
                    .unwrap()
                    .as_str(),
            )
            .header("proxy-tokenizer", sealed_token);
        for (k, v) in auth {
            b = b.header(*k, *v);
        }
        let (status, _, body) = conn.send(b.body(Full::new(Bytes::new())).unwrap()).await;
        assert_eq!(status, 200, "{name}: {body}");
        let got = up.last().headers["authorization"]
            .to_str()
            .unwrap()
            .to_string();
        let scheme = minted.split(' ').next().unwrap();
        assert_eq!(got, format!("{scheme} {token}"), "{name}");
        assert!(got.starts_with(minted), "{name}: {got}");
        assert!(
            !body.contains(&token),
            "{name}: the upstream's echo of the minted token is masked"
        );
    }
}

/// Answers that are not the success status pass through untouched; a
/// success answer that is no token answer is a 502 that does not quote it.
#[tokio::test]
async fn other_statuses_pass_through_and_unsealable_answers_are_502() {
    let up = LoopbackUpstream::start(&["oauth.example.com"]).await;
    let key = OpenKey::generate();
    let tk = start_tokenizer(
        proxypilot::tokenizer::Engine::new(key.clone()),
        up.client_config(false),
        false,
    )
    .await;
    let cc = Secret {
        client_credentials_processor: Some(ClientCredentialsProcessor {
            client_id: "cid".into(),
            client_secret: SecretString::new("cc-secret-passthrough"),
            token_url: "https://oauth.example.com/token".into(),
            scopes: String::new(),
        }),
        no_auth: Some(NoAuth {}),
        ..Default::default()
    };
    let sealed = seal(&key.seal_key(), &cc);
    let mut conn = ProxyConn::connect(tk.addr).await;
    let (status, _, body) = conn
        .send(post(
            "http://oauth.example.com/status/401",
            &sealed,
            &Value::Null,
            &[],
        ))
        .await;
    assert_eq!(
        (status, body.as_str()),
        (401, r#"{"error":"status-from-fake"}"#)
    );
    // /mirror answers 200 with the form body: not a token answer.
    let (status, _, body) = conn
        .send(post(
            "http://oauth.example.com/mirror",
            &sealed,
            &Value::Null,
            &[],
        ))
        .await;
    assert_eq!(status, 502, "{body}");
    assert!(
        body.contains("could not be turned into a sealed token"),
        "{body}"
    );
    assert!(
        !body.contains("cc-secret-passthrough") && !body.contains("client_id"),
        "{body}"
    );
}

/// proxypilot's minting secrets open in PyNaCl with exactly Go's field
/// names (every field written, as Go has no omitempty on them).
#[test]
fn pynacl_opens_proxypilot_minting_secrets_with_go_field_names() {
    if !nacl_available() {
        return;
    }
    let key = OpenKey::generate();
    let pem = SecretBytes::new(b"-----BEGIN PRIVATE KEY-----\n".to_vec());
    let cases: Vec<(Secret, &[&str])> = vec![
        (
            Secret {
                jwt_processor: Some(JwtProcessor {
                    private_key: pem.clone(),
                    email: "sa@x".into(),
                    ..Default::default()
                }),
                no_auth: Some(NoAuth {}),
                ..Default::default()
            },
            &[
                "jwt_processor",
                "jwt_processor.private_key",
                "jwt_processor.email",
                "jwt_processor.sub",
                "jwt_processor.scopes",
                "jwt_processor.token_url",
                "no_auth",
            ],
        ),
        (
            Secret {
                client_credentials_processor: Some(ClientCredentialsProcessor {
                    client_id: "c".into(),
                    client_secret: SecretString::new("s"),
                    token_url: "u".into(),
                    scopes: "a".into(),
                }),
                no_auth: Some(NoAuth {}),
                ..Default::default()
            },
            &[
                "client_credentials_processor",
                "client_credentials_processor.client_id",
                "client_credentials_processor.client_secret",
                "client_credentials_processor.token_url",
                "client_credentials_processor.scopes",
                "no_auth",
            ],
        ),
        (
            Secret {
                github_app_processor: Some(GitHubAppProcessor {
                    private_key: pem.clone(),
                    app_id: "1".into(),
                    installation_id: "2".into(),
                    token_url: String::new(),
                }),
                no_auth: Some(NoAuth {}),
                ..Default::default()
            },
            &[
                "github_app_processor",
                "github_app_processor.private_key",
                "github_app_processor.app_id",
                "github_app_processor.installation_id",
                "github_app_processor.token_url",
                "no_auth",
            ],
        ),
    ];
    for (secret, want) in cases {
        let json = open_with_pynacl(&key, &seal(&key.seal_key(), &secret));
        let v: Value = serde_json::from_str(&json).unwrap();
        let mut got = BTreeSet::new();
        keys_of(&v, "", &mut got);
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        assert_eq!(got, want, "JSON field names differ from Go's: {json}");
        assert_eq!(Secret::from_json(json.as_bytes()).unwrap(), secret);
    }
    // The private key is the PEM, standard base64, as Go's []byte.
    let j = Secret {
        github_app_processor: Some(GitHubAppProcessor {
            private_key: pem,
            ..Default::default()
        }),
        no_auth: Some(NoAuth {}),
        ..Default::default()
    }
    .to_json();
    assert!(
        j.contains(r#""private_key":"LS0tLS1CRUdJTiBQUklWQVRFIEtFWS0tLS0tCg==""#),
        "{j}"
    );
    // Logged shapes never hold the key or the client secret.
    let s = Secret::from_json(j.as_bytes())
        .unwrap()
        .strip_hazmat_string();
    assert!(!s.contains("LS0tLS1"), "{s}");
}

/// A minting processor inside multi_processor is refused (Go would send
/// the minted token back unsealed), and logged shapes hold neither the
/// client secret nor the private key.
#[test]
fn minting_inside_multi_processor_is_refused_and_shapes_are_redacted() {
    let key = OpenKey::generate();
    let engine = proxypilot::tokenizer::Engine::new(key.clone());
    let json = r#"{"multi_processor":[{"inject_processor":{"token":"t"}},{"client_credentials_processor":{"client_id":"c","client_secret":"cc-secret-in-multi","token_url":"https://o.example/token"}}],"no_auth":{}}"#;
    let secret = Secret::from_json(json.as_bytes()).unwrap();
    let shape = secret.strip_hazmat_string();
    assert!(!shape.contains("cc-secret-in-multi"), "{shape}");
    let sealed = seal(&key.seal_key(), &secret);
    let (mut parts, ()) = Request::post("http://o.example/token")
        .header("proxy-tokenizer", sealed)
        .body(())
        .unwrap()
        .into_parts();
    let e = engine.apply(&mut parts).unwrap_err();
    assert_eq!(e.status(), 400);
    assert!(
        e.to_string().contains("cannot be inside multi_processor"),
        "{e}"
    );
    assert!(!e.to_string().contains("cc-secret-in-multi"), "{e}");
}
