//! `macaroon_auth` against superfly/macaroon itself: the vectors in
//! tests/fixtures/macaroon were minted by the Go library (with the
//! tokenizer's own caveats) and carry the verdict the Go reference gives
//! each one. Our engine must agree on every vector, except where the
//! fixture records a deliberate difference (`proxypilot`).

use base64::Engine as _;
use proxypilot::tokenizer::macaroon::MacaroonAuth;
use proxypilot::tokenizer::secret::{InjectProcessor, SecretBytes, SecretString};
use proxypilot::tokenizer::{seal, Engine, OpenKey, Secret};
use serde_json::Value;

const FIXTURE: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/fixtures/macaroon/tokenizer-macaroons.json"
));

fn fixture() -> Value {
    serde_json::from_str(FIXTURE).unwrap()
}

fn text<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or_else(|| panic!("{k} in {v}"))
}

fn macaroon_secret(key: &[u8]) -> Secret {
    Secret {
        inject_processor: Some(InjectProcessor {
            token: SecretString::new("real-key"),
            ..Default::default()
        }),
        macaroon_auth: Some(MacaroonAuth {
            key: SecretBytes::new(key.to_vec()),
        }),
        ..Default::default()
    }
}

#[test]
fn every_go_vector_gets_the_go_verdict_and_refusals_are_407() {
    let f = fixture();
    let key = base64::engine::general_purpose::STANDARD
        .decode(text(&f, "key"))
        .unwrap();
    assert_eq!(
        hex::encode(proxypilot::tokenizer::macaroon::key_fingerprint(&key)),
        text(&f, "kid"),
        "the key id is Go's KeyFingerprint"
    );
    let engine = Engine::new(OpenKey::generate());
    let sealed = seal(engine.seal_key(), &macaroon_secret(&key));
    let vectors = f["vectors"].as_array().unwrap();
    assert!(vectors.len() >= 30, "{} vectors", vectors.len());
    let (mut accepted, mut refused) = (0, 0);
    for v in vectors {
        let name = text(v, "name");
        let r = &v["request"];
        let auth: Vec<&str> = v["proxy_authorization"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let mut b = http::Request::builder()
            .method(text(r, "method"))
            .uri(format!("http://{}{}", text(r, "host"), text(r, "path")))
            .header("proxy-tokenizer", sealed.as_str());
        for pa in &auth {
            b = b.header("proxy-authorization", *pa);
        }
        let mut parts = b.body(()).unwrap().into_parts().0;
        let want = v["proxypilot"].as_str().unwrap_or(text(v, "go"));
        match (want, engine.apply(&mut parts)) {
            ("accept", Ok(_)) => {
                accepted += 1;
                assert_eq!(parts.headers["authorization"], "Bearer real-key", "{name}");
                assert!(
                    !parts.headers.contains_key("proxy-authorization"),
                    "{name}: the macaroon is not forwarded"
                );
            }
            ("refuse", Err(e)) => {
                refused += 1;
                assert_eq!(e.status(), 407, "{name}: {e}");
                let msg = e.to_string();
                assert!(msg.contains("macaroon_auth"), "{name}: {msg}");
                for pa in &auth {
                    assert!(!msg.contains(pa), "{name}: the token is in the error");
                }
            }
            (want, got) => panic!(
                "{name} ({}): want {want}, got {:?}",
                text(v, "why"),
                got.map(|_| "accept").map_err(|e| e.to_string())
            ),
        }
    }
    assert!(
        accepted >= 10 && refused >= 15,
        "{accepted} accepted, {refused} refused"
    );
}

#[test]
fn a_macaroon_secret_opens_from_gos_json_and_its_key_never_shows() {
    let json =
        br#"{"inject_processor":{"token":"t"},"macaroon_auth":{"key":"c2VjcmV0LWtleS1ieXRlcw=="}}"#;
    let s = Secret::from_json(json).unwrap();
    assert_eq!(
        s.macaroon_auth.as_ref().unwrap().key.expose(),
        b"secret-key-bytes"
    );
    let shown = s.strip_hazmat_string();
    assert!(!shown.contains("c2VjcmV0"), "{shown}");
    assert!(
        shown.contains("\"macaroon_auth\":{\"key\":\"REDACTED\"}"),
        "{shown}"
    );
    assert!(!format!("{s:?}").contains("secret-key"));
}

/// The standalone tokenizer on loopback: a token with a RequestMethod
/// GET,HEAD caveat gets the key injected into a GET, and a POST a 407
/// whose body says why, never reaching the upstream. Neither the token nor
/// any Proxy-* header goes upstream.
#[tokio::test]
async fn the_tokenizer_server_applies_a_macaroon_secret_per_its_caveats() {
    use bytes::Bytes;
    use http_body_util::Full;
    use proxypilot_tests::loopback::{new_engine, start_tokenizer, LoopbackUpstream, ProxyConn};

    let f = fixture();
    let key = base64::engine::general_purpose::STANDARD
        .decode(text(&f, "key"))
        .unwrap();
    let token = f["vectors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "method_allowed")
        .map(|v| v["proxy_authorization"][0].as_str().unwrap().to_string())
        .unwrap();
    let up = LoopbackUpstream::start(&["api.example.com"]).await;
    let tk = start_tokenizer(new_engine(), up.client_config(false), false).await;
    let mut secret = macaroon_secret(&key);
    secret.allowed_hosts = Some(vec!["api.example.com".into()]);
    let sealed = seal(tk.engine.seal_key(), &secret);
    let mut c = ProxyConn::connect(tk.addr).await;
    let req = |method: &str| {
        http::Request::builder()
            .method(method)
            .uri("http://api.example.com/v1/things")
            .header("host", "api.example.com")
            .header("proxy-tokenizer", sealed.as_str())
            .header("proxy-authorization", token.as_str())
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let (status, _, body) = c.send(req("GET")).await;
    assert_eq!(status, 200, "{body}");
    let seen = up.last();
    assert_eq!(seen.headers["authorization"], "Bearer real-key");
    for name in seen.headers.keys() {
        assert!(!name.as_str().starts_with("proxy-"), "upstream got {name}");
    }
    assert_eq!(up.count(), 1);

    let mut c = ProxyConn::connect(tk.addr).await;
    let (status, _, body) = c.send(req("POST")).await;
    assert_eq!(status, 407, "{body}");
    assert!(body.contains("macaroon_auth"), "{body}");
    assert!(!body.contains(&token[6..]), "the token is not echoed");
    assert_eq!(
        up.count(),
        1,
        "a refused request never reaches the upstream"
    );
}
