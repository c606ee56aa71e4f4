//! The engine on request heads and bodies: processors, auth kinds,
//! validators, parameter rules and bad input.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use proxypilot::tokenizer::secret::{
    BearerAuth, FlySrcAuth, FmtDst, InjectBodyProcessor, InjectHmacProcessor, InjectProcessor,
    NoAuth, OAuth2BodyProcessor, OAuthToken, SecretBytes, SecretString,
};
use proxypilot::tokenizer::{
    flysrc, header, seal, Engine, FlySrcVerifier, OpenKey, Secret, TokenizerError,
};
use sha2::Digest;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn inject(token: &str) -> Secret {
    Secret {
        inject_processor: Some(InjectProcessor {
            token: SecretString::new(token),
            ..Default::default()
        }),
        no_auth: Some(NoAuth {}),
        ..Default::default()
    }
}

fn parts(uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
    let mut b = http::Request::get(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap().into_parts().0
}

fn apply(
    e: &Engine,
    uri: &str,
    headers: &[(&str, &str)],
) -> Result<http::request::Parts, TokenizerError> {
    let mut p = parts(uri, headers);
    e.apply(&mut p)?;
    Ok(p)
}

#[test]
fn inject_and_strip() {
    let e = Engine::new(OpenKey::generate());
    let s = seal(e.seal_key(), &inject("tok"));
    let p = apply(
        &e,
        "http://h/",
        &[("proxy-tokenizer", &s), ("proxy-authorization", "Bearer x")],
    )
    .unwrap();
    assert_eq!(p.headers["authorization"], "Bearer tok");
    assert!(p.headers["authorization"].is_sensitive());
    assert!(!p.headers.contains_key("proxy-tokenizer"));
    assert!(!p.headers.contains_key("proxy-authorization"));
    // The injected header replaces whatever the client sent.
    let p = apply(
        &e,
        "http://h/",
        &[("proxy-tokenizer", &s), ("authorization", "Bearer dummy")],
    )
    .unwrap();
    assert_eq!(p.headers.get_all("authorization").iter().count(), 1);
    assert_eq!(p.headers["authorization"], "Bearer tok");
    // No secret: nothing applied, Proxy-Authorization still stripped.
    let mut p = parts("http://h/", &[("proxy-authorization", "Bearer x")]);
    assert_eq!(e.apply(&mut p).unwrap().secrets, 0);
    assert!(!p.headers.contains_key("proxy-authorization"));
}

#[test]
fn several_secrets_in_order_and_all_or_nothing() {
    let e = Engine::new(OpenKey::generate());
    let mut a = inject("a");
    a.inject_processor.as_mut().unwrap().fmt_dst.dst = "x-a".into();
    a.inject_processor.as_mut().unwrap().fmt_dst.fmt = "%s".into();
    let b = inject("b");
    let (sa, sb) = (seal(e.seal_key(), &a), seal(e.seal_key(), &b));
    let p = apply(
        &e,
        "http://h/",
        &[("proxy-tokenizer", &sa), ("proxy-tokenizer", &sb)],
    )
    .unwrap();
    assert_eq!(p.headers["x-a"], "a");
    assert_eq!(p.headers["authorization"], "Bearer b");
    // If the second fails, the first is not applied either.
    let mut bad = inject("c");
    bad.allowed_hosts = Some(vec!["other".into()]);
    let sbad = seal(e.seal_key(), &bad);
    let mut p = parts(
        "http://h/",
        &[("proxy-tokenizer", &sa), ("proxy-tokenizer", &sbad)],
    );
    assert_eq!(e.apply(&mut p).unwrap_err().status(), 400);
    assert!(!p.headers.contains_key("x-a"));
}

#[test]
fn allowed_hosts_and_patterns() {
    let e = Engine::new(OpenKey::generate());
    let mut s = inject("t");
    s.allowed_hosts = Some(vec![
        "api.example.com".into(),
        "api.example.com:8443".into(),
    ]);
    let sealed = seal(e.seal_key(), &s);
    let h = [("proxy-tokenizer", sealed.as_str())];
    assert!(apply(&e, "http://api.example.com/x", &h).is_ok());
    assert!(apply(&e, "http://api.example.com:8443/x", &h).is_ok());
    // Exact match: another port, a subdomain or another case is refused.
    for uri in [
        "http://api.example.com:80/",
        "http://x.api.example.com/",
        "http://API.example.com/",
    ] {
        let err = apply(&e, uri, &h).unwrap_err();
        assert_eq!(err.status(), 400, "{uri}");
        assert!(err
            .to_string()
            .starts_with("request validator failed: bad request: secret not valid for "));
    }
    // Origin-form: the Host header counts; no Host at all is the empty host.
    assert!(apply(&e, "/x", &[h[0], ("host", "api.example.com")]).is_ok());
    let err = apply(&e, "/x", &h).unwrap_err();
    assert_eq!(
        err.to_string(),
        "request validator failed: bad request: secret not valid for "
    );

    // Go's MatchString is an unanchored search; so is ours.
    let pat = |p: &str, host: &str| {
        let mut s = inject("t");
        s.allowed_host_pattern = p.into();
        let sealed = seal(e.seal_key(), &s);
        apply(
            &e,
            &format!("http://{host}/"),
            &[("proxy-tokenizer", &sealed)],
        )
        .is_ok()
    };
    assert!(pat("api.example.com", "api.example.com"));
    assert!(pat("api.example.com", "evilapi.example.com.attacker.test"));
    assert!(
        pat("api.example.com", "apiXexample.com"),
        "unescaped dot matches any char"
    );
    assert!(!pat(
        r"^api\.example\.com$",
        "evilapi.example.com.attacker.test"
    ));
    assert!(
        !pat(r"^api\.example\.com$", "api.example.com:8443"),
        "port is part of the host"
    );
    assert!(pat(r"^api\.example\.com(:\d+)?$", "api.example.com:8443"));
    assert!(pat(r"\.example\.com$", "a.example.com"));
    assert!(pat("", "anything"), "empty pattern means no pattern");
    // Both validators apply when both are set.
    let mut s = inject("t");
    s.allowed_hosts = Some(vec!["a.example.com".into()]);
    s.allowed_host_pattern = "^b".into();
    let sealed = seal(e.seal_key(), &s);
    assert!(apply(&e, "http://a.example.com/", &[("proxy-tokenizer", &sealed)]).is_err());
    // A present but empty allowed_hosts allows nothing (Go's non-nil slice).
    // (Sealed raw: like Go's omitempty, Secret drops an empty list when
    // marshalling, but a hand-written secret can carry one.)
    let raw = proxypilot_seal_raw(
        &e,
        r#"{"inject_processor":{"token":"t"},"no_auth":{},"allowed_hosts":[]}"#,
    );
    let sealed = B64.encode(raw);
    assert!(apply(&e, "http://a/", &[("proxy-tokenizer", &sealed)]).is_err());
}

#[test]
fn params_select_dst_and_fmt() {
    let e = Engine::new(OpenKey::generate());
    let s = Secret {
        inject_processor: Some(InjectProcessor {
            token: SecretString::new("K"),
            fmt_dst: FmtDst {
                allowed_dst: Some(vec!["Authorization".into(), "X-Api-Key".into()]),
                allowed_fmt: Some(vec!["Bearer %s".into(), "%s".into()]),
                ..Default::default()
            },
        }),
        no_auth: Some(NoAuth {}),
        ..Default::default()
    };
    let b = seal(e.seal_key(), &s);
    let with = |params: &str| {
        let v = format!("{b}; {params}");
        apply(&e, "http://h/", &[("proxy-tokenizer", &v)])
    };
    let p = apply(&e, "http://h/", &[("proxy-tokenizer", &b)]).unwrap();
    assert_eq!(
        p.headers["authorization"], "Bearer K",
        "first allowed entries are the defaults"
    );
    let p = with(r#"{"dst":"x-api-key","fmt":"%s"}"#).unwrap();
    assert_eq!(p.headers["x-api-key"], "K");
    assert!(!p.headers.contains_key("authorization"));
    assert!(with(r#"{"dst":"Cookie"}"#)
        .unwrap_err()
        .to_string()
        .contains("bad dst"));
    assert!(with(r#"{"fmt":"token %s"}"#)
        .unwrap_err()
        .to_string()
        .contains("bad fmt"));
    let err = with(r#"{"dst":1}"#).unwrap_err();
    assert_eq!(err.status(), 400);
    assert!(err.to_string().contains("JSON object of strings"));
    assert!(with("not json").is_err());
}

#[test]
fn bearer_auth_kinds() {
    let e = Engine::new(OpenKey::generate());
    let mut s = inject("t");
    s.no_auth = None;
    s.bearer_auth = Some(BearerAuth {
        digest: SecretBytes::new(sha2::Sha256::digest(b"pa ss").to_vec()),
    });
    let b = seal(e.seal_key(), &s);
    let ok = |pa: Option<&str>| {
        let mut h = vec![("proxy-tokenizer", b.as_str())];
        if let Some(pa) = pa {
            h.push(("proxy-authorization", pa));
        }
        apply(&e, "http://h/", &h)
    };
    assert!(ok(Some("Bearer pa ss")).is_ok());
    assert!(ok(Some("FlyV1 pa ss")).is_ok());
    assert!(ok(Some(&format!("Basic {}", B64.encode("user:pa ss")))).is_ok());
    assert!(
        ok(Some(&format!("Basic {}", B64.encode("user:pa+ss")))).is_ok(),
        "query-unescaped password"
    );
    assert!(ok(Some(&format!("Basic {}", B64.encode("user:pa%20ss")))).is_ok());
    for bad in [
        None,
        Some("Bearer wrong"),
        Some("bearer pa ss"),
        Some("Bearer"),
        Some("Basic !!!"),
    ] {
        let err = ok(bad).unwrap_err();
        assert_eq!(err.status(), 407, "{bad:?}");
        assert!(err
            .to_string()
            .starts_with("unauthorized to use secret: not authorized: bad or missing proxy auth"));
    }
}

#[test]
fn fly_src_auth() {
    let sk = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
    let verifier = FlySrcVerifier::from_hex(&hex::encode(sk.verifying_key().to_bytes())).unwrap();
    let e = Engine::new(OpenKey::generate()).with_fly_src_verifier(verifier);
    let s = Secret {
        inject_processor: Some(InjectProcessor {
            token: SecretString::new("t"),
            ..Default::default()
        }),
        fly_src_auth: Some(FlySrcAuth {
            allowed_orgs: Some(vec!["my-org".into()]),
            allowed_apps: Some(vec!["my-app".into()]),
            allowed_instances: None,
        }),
        ..Default::default()
    };
    let b = seal(e.seal_key(), &s);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let try_src = |src: &str, sig: &str| {
        apply(
            &e,
            "http://h/",
            &[
                ("proxy-tokenizer", &b),
                ("fly-src", src),
                ("fly-src-signature", sig),
            ],
        )
    };
    let good = format!("instance=m1;app=my-app;org=my-org;ts={now}");
    assert!(try_src(&good, &flysrc::sign(&sk, &good)).is_ok());
    let other_app = format!("instance=m1;app=other;org=my-org;ts={now}");
    let err = try_src(&other_app, &flysrc::sign(&sk, &other_app)).unwrap_err();
    assert_eq!(
        (
            err.status().as_u16(),
            err.to_string().contains("app other not allowed")
        ),
        (407, true)
    );
    let err = try_src(&other_app, &flysrc::sign(&sk, &good)).unwrap_err();
    assert!(err.to_string().contains("bad Fly-Src signature"), "{err}");
    let old = format!("instance=m1;app=my-app;org=my-org;ts={}", now - 120);
    assert!(try_src(&old, &flysrc::sign(&sk, &old))
        .unwrap_err()
        .to_string()
        .contains("expired"));
    let wrong_key = ed25519_dalek::SigningKey::from_bytes(&[1u8; 32]);
    assert_eq!(
        try_src(&good, &flysrc::sign(&wrong_key, &good))
            .unwrap_err()
            .status(),
        407
    );
    let err = apply(&e, "http://h/", &[("proxy-tokenizer", &b)]).unwrap_err();
    assert!(err.to_string().contains("missing Fly-Src header"));

    // Without a configured key: refused with a message saying what to do.
    let e2 = Engine::new(OpenKey::generate());
    let b2 = seal(e2.seal_key(), &s);
    let err = apply(
        &e2,
        "http://h/",
        &[("proxy-tokenizer", &b2), ("fly-src", &good)],
    )
    .unwrap_err();
    assert_eq!(err.status(), 407);
    assert!(err.to_string().contains("--fly-src-pubkey"), "{err}");
}

#[test]
fn bad_input_statuses() {
    let e = Engine::new(OpenKey::generate());
    let good = seal(e.seal_key(), &inject("hunter2"));
    let raw = B64.decode(&good).unwrap();
    let wrong_key = seal(&OpenKey::generate().seal_key(), &inject("hunter2"));
    let truncated = B64.encode(&raw[..raw.len() - 5]);
    let tiny = B64.encode(&raw[..20]);
    let unpadded = good.trim_end_matches('=').to_string();
    let seal_json = |j: &str| B64.encode(proxypilot_seal_raw(&e, j));
    let cases: Vec<(String, u16, &str)> = vec![
        (
            "not base64 at all!".into(),
            400,
            "bad Proxy-Tokenizer encoding",
        ),
        (wrong_key, 400, "failed Proxy-Tokenizer decryption"),
        (truncated, 400, "failed Proxy-Tokenizer decryption"),
        (tiny, 400, "failed Proxy-Tokenizer decryption"),
        ("".into(), 400, "bad tokenizer header"),
        ("; {}".into(), 400, "bad tokenizer header"),
        (seal_json("\"just a string\""), 400, "expected an object"),
        (seal_json("not json"), 400, "not JSON"),
        (
            seal_json(
                r#"{"inject_processor":{"token":"a"},"inject_body_processor":{"token":"b"},"no_auth":{}}"#,
            ),
            400,
            "bad processor config",
        ),
        (
            seal_json(r#"{"inject_hmac_processor":{"key":"aw==","hash":"sha1"},"no_auth":{}}"#),
            400,
            "unsupported hash function",
        ),
        (
            seal_json(r#"{"inject_hmac_processor":{"key":"","hash":"sha256"},"no_auth":{}}"#),
            400,
            "missing hmac key",
        ),
        (
            seal_json(r#"{"inject_processor":{"token":""},"no_auth":{}}"#),
            400,
            "missing token",
        ),
        (
            seal_json(
                r#"{"inject_processor":{"token":"a"},"no_auth":{},"bearer_auth":{"digest":""}}"#,
            ),
            400,
            "bad auth config",
        ),
        (
            seal_json(r#"{"inject_processor":{"token":"a\nb"},"no_auth":{}}"#),
            400,
            "not a valid HTTP header value",
        ),
        (
            seal_json(r#"{"multi_processor":[],"no_auth":{}}"#),
            400,
            "multi_processor is empty",
        ),
        (
            seal_json(
                r#"{"multi_processor":[{"inject_processor":{"token":"a"},"no_auth":{}}],"no_auth":{}}"#,
            ),
            400,
            "multi_processor[0]: expected exactly one of",
        ),
        (
            seal_json(
                r#"{"multi_processor":[{"inject_processor":{"token":"a"}},{"sigv4_processor":{}}],"no_auth":{}}"#,
            ),
            400,
            // Allowed inside multi_processor, as in Go; this one has no keys.
            "sigv4_processor: missing access key",
        ),
        (
            seal_json(
                r#"{"inject_processor":{"token":"a"},"no_auth":{},"allowed_host_pattern":"(["}"#,
            ),
            400,
            "does not compile",
        ),
    ];
    for (value, status, text) in cases {
        let mut p = parts("http://h/", &[("proxy-tokenizer", &value)]);
        let err = e.apply(&mut p).unwrap_err();
        assert_eq!(err.status().as_u16(), status, "{value}: {err}");
        assert!(err.to_string().contains(text), "{err} lacks {text:?}");
        assert!(!err.to_string().contains("hunter2"));
        assert!(!format!("{err:?}").contains("hunter2"));
    }
    // Go's strict StdEncoding needs padding; we accept exactly that.
    assert!(
        apply(&e, "http://h/", &[("proxy-tokenizer", &unpadded)]).is_err() || !good.ends_with('=')
    );
    // Surrounding whitespace is fine.
    assert!(apply(
        &e,
        "http://h/",
        &[("proxy-tokenizer", &format!("  {good}  "))]
    )
    .is_ok());
}

/// Seal arbitrary bytes (not necessarily a valid secret) to the engine.
fn proxypilot_seal_raw(e: &Engine, json: &str) -> Vec<u8> {
    // Sealing raw JSON goes through crypto_box directly: Secret can only
    // hold valid documents.
    let pk = crypto_box::PublicKey::from(
        <[u8; 32]>::try_from(hex::decode(e.seal_key().to_hex()).unwrap()).unwrap(),
    );
    pk.seal(&mut crypto_box::aead::OsRng, json.as_bytes())
        .unwrap()
}

#[test]
fn secrets_never_in_debug_or_errors() {
    let e = Engine::new(OpenKey::generate());
    let mut s = inject("sk-live-hunter2");
    s.allowed_hosts = Some(vec!["nope".into()]);
    assert!(!format!("{s:?}").contains("hunter2"));
    assert!(!s.strip_hazmat_string().contains("hunter2"));
    let b = seal(e.seal_key(), &s);
    let mut p = parts("http://h/", &[("proxy-tokenizer", &b)]);
    let err = e.apply(&mut p).unwrap_err();
    assert!(!format!("{err} {err:?}").contains("hunter2"));
    let mut s = inject("sk-live-hunter2");
    s.allowed_hosts = None;
    let b = seal(e.seal_key(), &s);
    let mut p = parts("http://h/", &[("proxy-tokenizer", &b)]);
    let applied = e.apply(&mut p).unwrap();
    assert!(!format!("{applied:?}").contains("hunter2"));
    assert!(s.strip_hazmat_string().contains("REDACTED"));
    assert!(
        !format!("{:?}", p.headers).contains("hunter2"),
        "injected header is marked sensitive"
    );
    assert!(!format!("{e:?}").contains(OpenKey::generate().to_hex().as_str()));
}

#[tokio::test]
async fn inject_body_streams_across_chunks() {
    let e = Engine::new(OpenKey::generate());
    let s = Secret {
        inject_body_processor: Some(InjectBodyProcessor {
            token: SecretString::new("SECRET"),
            placeholder: String::new(),
        }),
        no_auth: Some(NoAuth {}),
        ..Default::default()
    };
    let b = seal(e.seal_key(), &s);
    let mut p = parts(
        "http://h/",
        &[("proxy-tokenizer", &b), ("content-length", "40")],
    );
    let applied = e.apply(&mut p).unwrap();
    assert!(!applied.body.is_identity() && !applied.body.buffers());
    let chunks: [&'static str; 3] = [
        "{\"key\":\"{{ACCESS",
        "_TOKEN}}\",\"again\":\"{",
        "{ACCESS_TOKEN}}\"}",
    ];
    let stream = futures_util::stream::iter(chunks.into_iter().map(|c| {
        Ok::<_, std::io::Error>(http_body::Frame::data(Bytes::from_static(c.as_bytes())))
    }));
    let body = applied
        .body
        .apply(&mut p.headers, StreamBody::new(stream))
        .await
        .unwrap();
    assert!(!p.headers.contains_key("content-length"), "length changes");
    let out = body.collect().await.unwrap().to_bytes();
    assert_eq!(out, "{\"key\":\"SECRET\",\"again\":\"SECRET\"}");

    // A placeholder chosen by the request ({"placeholder": ...}), and the
    // oauth2 body processor.
    let s = Secret {
        oauth2_body_processor: Some(OAuth2BodyProcessor {
            token: Some(OAuthToken {
                access_token: SecretString::new("AT"),
                refresh_token: SecretString::default(),
            }),
            placeholder: "<<T>>".into(),
        }),
        no_auth: Some(NoAuth {}),
        ..Default::default()
    };
    let v = format!("{}; {{\"placeholder\":\"@@\"}}", seal(e.seal_key(), &s));
    let mut p = parts("http://h/", &[("proxy-tokenizer", &v)]);
    let applied = e.apply(&mut p).unwrap();
    let body = applied
        .body
        .apply(&mut p.headers, Full::new(Bytes::from_static(b"a@@b<<T>>")))
        .await
        .unwrap();
    assert_eq!(body.collect().await.unwrap().to_bytes(), "aATb<<T>>");
}

#[tokio::test]
async fn hmac_over_body_and_msg() {
    use hmac::Mac;
    let e = Engine::new(OpenKey::generate());
    let s = Secret {
        inject_hmac_processor: Some(InjectHmacProcessor {
            key: SecretBytes::new(b"hk".to_vec()),
            hash: "sha256".into(),
            fmt_dst: FmtDst {
                dst: "X-Signature".into(),
                fmt: "sha256=%x".into(),
                ..Default::default()
            },
        }),
        no_auth: Some(NoAuth {}),
        ..Default::default()
    };
    let want = |m: &[u8]| {
        let mut h = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"hk").unwrap();
        h.update(m);
        format!("sha256={}", hex::encode(h.finalize().into_bytes()))
    };
    let b = seal(e.seal_key(), &s);
    let mut p = parts("http://h/", &[("proxy-tokenizer", &b)]);
    let applied = e.apply(&mut p).unwrap();
    assert!(applied.body.buffers());
    let body = applied
        .body
        .apply(&mut p.headers, Full::new(Bytes::from_static(b" payload\n")))
        .await
        .unwrap();
    assert_eq!(
        p.headers["x-signature"],
        want(b" payload\n").as_str(),
        "verbatim body, as Go"
    );
    assert_eq!(body.collect().await.unwrap().to_bytes(), " payload\n");
    // With "msg", no body work at all.
    let v = header::format(&b, &[("msg".to_string(), "m".to_string())].into());
    let mut p = parts("http://h/", &[("proxy-tokenizer", &v)]);
    let applied = e.apply(&mut p).unwrap();
    assert!(applied.body.is_identity());
    assert_eq!(p.headers["x-signature"], want(b"m").as_str());
}
