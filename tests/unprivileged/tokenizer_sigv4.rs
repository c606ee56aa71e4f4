//! `sigv4_processor` end to end, with botocore as the independent
//! reference on both sides: the client signs with botocore and placeholder
//! keys, the standalone tokenizer re-signs with the sealed keys, and the
//! fake S3 ([`proxypilot_tests::fake_s3`]) re-verifies what it received
//! with botocore and the real keys, answering 200 only on a match.

use std::io::Write;
use std::process::{Command, Stdio};

use base64::Engine as _;
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use proxypilot::tokenizer::secret::{
    FmtDst, InjectBodyProcessor, InjectProcessor, NoAuth, SecretString,
};
use proxypilot::tokenizer::sigv4::Sigv4Processor;
use proxypilot::tokenizer::{seal, Secret};
use proxypilot_tests::fake_s3::{FakeS3, Sigv4Service};
use proxypilot_tests::loopback::{new_engine, start_tokenizer, ProxyConn, Tokenizer};
use serde_json::{json, Value};
use sha2::Digest;

const HOST: &str = "s3.example.test";
const REAL_AK: &str = "AKIAREALACCESSKEY123";
const REAL_SK: &str = "real/Secret+Key/0123456789abcdefghijklmn";
const DUMMY_AK: &str = "AKIDPLACEHOLDER";
const DUMMY_SK: &str = "placeholder";

fn botocore_available() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import botocore.auth"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("CI is set but python3 cannot import botocore: pip install -r tests/requirements.txt (cargo xtask setup does)");
        }
        eprintln!("SKIPPED: python3 with botocore not available; set CI=1 to make this fatal");
    }
    ok
}

fn service() -> Sigv4Service {
    Sigv4Service {
        access_key: REAL_AK.into(),
        secret_key: REAL_SK.into(),
        region: "us-east-1".into(),
        service: "s3".into(),
    }
}

fn sigv4_secret(no_swap: bool) -> Secret {
    Secret {
        sigv4_processor: Some(Sigv4Processor {
            access_key: SecretString::new(REAL_AK),
            secret_key: SecretString::new(REAL_SK),
            no_swap,
        }),
        no_auth: Some(NoAuth {}),
        allowed_hosts: Some(vec![HOST.into()]),
        ..Default::default()
    }
}

/// Headers after botocore signed `method path_query` with the placeholder
/// keys for `region`/`service`.
fn client_sign(
    method: &str,
    path_query: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    region: &str,
    service: &str,
) -> Vec<(String, String)> {
    let input = json!({
        "method": method,
        "url": format!("https://{HOST}{path_query}"),
        "headers": headers,
        "body_b64": base64::engine::general_purpose::STANDARD.encode(body),
        "access_key": DUMMY_AK, "secret_key": DUMMY_SK,
        "region": region, "service": service,
    });
    let mut child = Command::new("python3")
        .arg(proxypilot_tests::support_dir().join("sigv4_sign.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "sigv4_sign.py failed");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h[0].as_str().unwrap().into(), h[1].as_str().unwrap().into()))
        .collect()
}

fn request(
    method: &str,
    path_query: &str,
    headers: &[(String, String)],
    sealed: &str,
    body: &[u8],
) -> Request<Full<Bytes>> {
    let mut b = Request::builder()
        .method(method)
        .uri(format!("http://{HOST}{path_query}"))
        .header("host", HOST)
        .header("proxy-tokenizer", sealed);
    for (k, v) in headers {
        b = b.header(k.as_str(), v.as_str());
    }
    b.body(Full::new(Bytes::copy_from_slice(body))).unwrap()
}

async fn setup(http2: bool, secret: &Secret) -> (FakeS3, Tokenizer, String) {
    let s3 = FakeS3::start(&[HOST], service()).await;
    let tk = start_tokenizer(new_engine(), s3.client_config(http2), false).await;
    let sealed = seal(tk.engine.seal_key(), secret);
    (s3, tk, sealed)
}

fn set(headers: &mut Vec<(String, String)>, name: &str, value: &str) {
    headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
    headers.push((name.into(), value.into()));
}

/// A GET signed by botocore with placeholder keys arrives re-signed with
/// the real ones, over HTTP/1.1 and HTTP/2 upstream: botocore verifies it,
/// the query is in canonical form, the hop and Fly headers are gone, the
/// real access key is masked in the echo and the secret key is nowhere.
#[tokio::test]
async fn resigned_request_verifies_with_botocore() {
    if !botocore_available() {
        return;
    }
    for http2 in [false, true] {
        let (s3, tk, sealed) = setup(http2, &sigv4_secret(true)).await;
        let pq = "/photos?prefix=2026/01&list-type=2&delimiter=%2F";
        let empty = hex::encode(sha2::Sha256::digest(b""));
        let mut headers = client_sign(
            "GET",
            pq,
            &[
                ("x-amz-content-sha256", &empty),
                ("x-amz-meta-note", "  two   spaces  "),
            ],
            b"",
            "us-east-1",
            "s3",
        );
        for (k, v) in [
            ("x-forwarded-for", "192.0.2.1"),
            ("via", "1.1 fly.io"),
            ("fly-request-id", "01ABC"),
            ("accept-encoding", "gzip"),
            ("user-agent", "aws-cli/2"),
        ] {
            set(&mut headers, k, v);
        }
        let mut c = ProxyConn::connect(tk.addr).await;
        let (status, _, body) = c.send(request("GET", pq, &headers, &sealed, b"")).await;
        assert_eq!(status, 200, "http2={http2}: {body}");
        let got = s3.last();
        assert!(got.ok(), "{}", got.verdict);
        assert_eq!(
            got.target,
            "/photos?delimiter=%2F&list-type=2&prefix=2026%2F01"
        );
        for gone in [
            "x-forwarded-for",
            "via",
            "fly-request-id",
            "proxy-tokenizer",
        ] {
            assert!(got.header(gone).is_none(), "{gone} reached S3");
        }
        assert_eq!(got.header("user-agent"), Some("aws-cli/2"));
        assert_eq!(
            got.verdict["signed_headers"],
            "host;x-amz-content-sha256;x-amz-date;x-amz-meta-note"
        );
        let text = format!("{:?}", got.headers);
        assert!(
            !text.contains(REAL_SK) && !text.contains(DUMMY_AK),
            "{text}"
        );
        // The fake echoes the credential; the sandbox never sees the key id.
        assert!(!body.contains(REAL_AK), "{body}");
        assert_eq!(
            got.verdict["credential"]
                .as_str()
                .unwrap()
                .split('/')
                .next(),
            Some(REAL_AK)
        );
    }
}

/// A PUT with a body: its X-Amz-Content-Sha256 and Content-Length are
/// signed; a hash that does not match the body is S3's refusal, not ours.
#[tokio::test]
async fn body_with_content_hash() {
    if !botocore_available() {
        return;
    }
    let (s3, tk, sealed) = setup(false, &sigv4_secret(true)).await;
    let body = b"hello, bucket";
    let hash = hex::encode(sha2::Sha256::digest(body));
    let pq = "/bucket/notes/a%20b.txt";
    let headers = client_sign(
        "PUT",
        pq,
        &[
            ("x-amz-content-sha256", &hash),
            ("content-type", "text/plain"),
        ],
        body,
        "us-east-1",
        "s3",
    );
    let mut c = ProxyConn::connect(tk.addr).await;
    let (status, _, text) = c.send(request("PUT", pq, &headers, &sealed, body)).await;
    assert_eq!(status, 200, "{text}");
    let got = s3.last();
    assert_eq!(got.body, body);
    assert_eq!(
        got.verdict["signed_headers"],
        "content-length;content-type;host;x-amz-content-sha256;x-amz-date"
    );

    let mut wrong = headers.clone();
    set(
        &mut wrong,
        "x-amz-content-sha256",
        &hex::encode(sha2::Sha256::digest(b"other")),
    );
    let (status, _, text) = c.send(request("PUT", pq, &wrong, &sealed, body)).await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("XAmzContentSHA256Mismatch"), "{text}");
}

/// Go signs the X-Amz-Content-Sha256 header's value as the payload hash:
/// without the header that is an empty hash (aws-sdk-go-v2's SignHTTP has
/// no default), which a service computing the body's hash refuses.
#[tokio::test]
async fn absent_content_hash_signs_an_empty_hash_as_go() {
    if !botocore_available() {
        return;
    }
    let (s3, tk, sealed) = setup(false, &sigv4_secret(true)).await;
    let headers = client_sign("GET", "/bucket", &[], b"", "us-east-1", "s3");
    assert!(!headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("x-amz-content-sha256")));
    let mut c = ProxyConn::connect(tk.addr).await;
    let (status, _, text) = c
        .send(request("GET", "/bucket", &headers, &sealed, b""))
        .await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("SignatureDoesNotMatch"), "{text}");
    assert_eq!(s3.seen().len(), 1);
}

/// no_swap both ways: without it (Go's default) region and service trade
/// places, so only a client that wrote them swapped gets through.
#[tokio::test]
async fn no_swap_both_ways() {
    if !botocore_available() {
        return;
    }
    let empty = hex::encode(sha2::Sha256::digest(b""));
    let cases = [
        // (no_swap, client's region, client's service, verified)
        (true, "us-east-1", "s3", true),
        (true, "s3", "us-east-1", false),
        (false, "us-east-1", "s3", false),
        (false, "s3", "us-east-1", true),
    ];
    for (no_swap, region, svc, ok) in cases {
        let (s3, tk, sealed) = setup(false, &sigv4_secret(no_swap)).await;
        let headers = client_sign(
            "GET",
            "/b",
            &[("x-amz-content-sha256", &empty)],
            b"",
            region,
            svc,
        );
        let mut c = ProxyConn::connect(tk.addr).await;
        let (status, _, text) = c.send(request("GET", "/b", &headers, &sealed, b"")).await;
        assert_eq!(
            status == 200,
            ok,
            "no_swap={no_swap} {region}/{svc}: {text}"
        );
        let scope = s3.last().verdict["credential"]
            .as_str()
            .unwrap()
            .to_string();
        let (r, s) = if no_swap {
            (region, svc)
        } else {
            (svc, region)
        };
        assert!(scope.ends_with(&format!("/{r}/{s}")), "{scope}");
    }
}

/// X-Amz-Date wins over the Credential's date; without one the request is
/// signed at midnight of the Credential's date, as Go does.
#[tokio::test]
async fn x_amz_date_wins() {
    if !botocore_available() {
        return;
    }
    let (s3, tk, sealed) = setup(false, &sigv4_secret(true)).await;
    let empty = hex::encode(sha2::Sha256::digest(b""));
    let signed = client_sign(
        "GET",
        "/b",
        &[("x-amz-content-sha256", &empty)],
        b"",
        "us-east-1",
        "s3",
    );
    let amz = signed
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("x-amz-date"))
        .unwrap()
        .1
        .clone();
    let mut c = ProxyConn::connect(tk.addr).await;

    let mut old_scope = signed.clone();
    for (k, v) in old_scope.iter_mut() {
        if k.eq_ignore_ascii_case("authorization") {
            *v = v.replace(&format!("/{}/", &amz[..8]), "/20200101/");
            assert!(v.contains("/20200101/"));
        }
    }
    let (status, _, text) = c.send(request("GET", "/b", &old_scope, &sealed, b"")).await;
    assert_eq!(status, 200, "{text}");
    let got = s3.last();
    assert_eq!(got.header("x-amz-date"), Some(amz.as_str()));
    assert!(got.verdict["credential"]
        .as_str()
        .unwrap()
        .contains(&amz[..8]));

    let mut no_date = signed.clone();
    no_date.retain(|(k, _)| !k.eq_ignore_ascii_case("x-amz-date"));
    let (status, _, text) = c.send(request("GET", "/b", &no_date, &sealed, b"")).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        s3.last().header("x-amz-date"),
        Some(format!("{}T000000Z", &amz[..8]).as_str())
    );
}

/// Requests it cannot re-sign get a 400 saying what is wrong, and never
/// reach the upstream.
#[tokio::test]
async fn refusals_are_clear_400s() {
    if !botocore_available() {
        return;
    }
    let (s3, tk, sealed) = setup(false, &sigv4_secret(true)).await;
    let signed = client_sign("GET", "/b", &[], b"", "us-east-1", "s3");
    let with_auth = |auth: Option<&str>| {
        let mut h = signed.clone();
        h.retain(|(k, _)| !k.eq_ignore_ascii_case("authorization"));
        if let Some(a) = auth {
            h.push(("authorization".into(), a.into()));
        }
        h
    };
    let cases = [
        (with_auth(None), "expected request to contain an Authorization header"),
        (
            with_auth(Some("AWS4-HMAC-SHA256 Credential=AK/20260102/us-east-1/aws4_request, SignedHeaders=host, Signature=00")),
            "invalid credential in auth header",
        ),
        (
            with_auth(Some("AWS4-HMAC-SHA256 Credential=AK/2026-01-02/us-east-1/s3/aws4_request")),
            "invalid credential date",
        ),
        (with_auth(Some("Bearer dummy")), "expected valid sigv4 authentication header"),
        (
            {
                let mut h = signed.clone();
                set(&mut h, "x-amz-date", "yesterday");
                h
            },
            "invalid X-Amz-Date header",
        ),
    ];
    let mut c = ProxyConn::connect(tk.addr).await;
    for (headers, want) in cases {
        let (status, _, text) = c.send(request("GET", "/b", &headers, &sealed, b"")).await;
        assert_eq!(status, 400, "{want}: {text}");
        assert!(
            text.contains("sigv4_processor: ") && text.contains(want),
            "{want}: {text}"
        );
        assert!(!text.contains(REAL_SK) && !text.contains(REAL_AK), "{text}");
    }
    assert!(s3.seen().is_empty());
}

/// Inside multi_processor (allowed, as in Go) sigv4 signs what the earlier
/// processors set; with a body processor it is refused, since our body
/// steps run after every header step and the signature would not hold.
#[tokio::test]
async fn in_multi_processor() {
    if !botocore_available() {
        return;
    }
    let multi = |first: Secret| Secret {
        multi_processor: Some(vec![
            first,
            Secret {
                sigv4_processor: sigv4_secret(true).sigv4_processor,
                ..Default::default()
            },
        ]),
        no_auth: Some(NoAuth {}),
        ..Default::default()
    };
    let inject = Secret {
        inject_processor: Some(InjectProcessor {
            token: SecretString::new("tenant-token-1"),
            fmt_dst: FmtDst {
                dst: "x-tenant-token".into(),
                fmt: "%s".into(),
                ..Default::default()
            },
        }),
        ..Default::default()
    };
    let (s3, tk, sealed) = setup(false, &multi(inject)).await;
    let empty = hex::encode(sha2::Sha256::digest(b""));
    let headers = client_sign(
        "GET",
        "/b",
        &[("x-amz-content-sha256", &empty)],
        b"",
        "us-east-1",
        "s3",
    );
    let mut c = ProxyConn::connect(tk.addr).await;
    let (status, _, text) = c.send(request("GET", "/b", &headers, &sealed, b"")).await;
    assert_eq!(status, 200, "{text}");
    let got = s3.last();
    assert_eq!(got.header("x-tenant-token"), Some("tenant-token-1"));
    assert!(got.verdict["signed_headers"]
        .as_str()
        .unwrap()
        .contains("x-tenant-token"));

    let body_step = Secret {
        inject_body_processor: Some(InjectBodyProcessor {
            token: SecretString::new("t"),
            placeholder: String::new(),
        }),
        ..Default::default()
    };
    let sealed = seal(tk.engine.seal_key(), &multi(body_step));
    let (status, _, text) = c.send(request("GET", "/b", &headers, &sealed, b"")).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("cannot be combined"), "{text}");
    assert_eq!(s3.seen().len(), 1);
}
