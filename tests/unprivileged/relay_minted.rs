//! proxypilot as the token client of a minting secret (issue 18): the
//! relay → proxypilot's standalone tokenizer → the loopback fake GitHub.
//! The sandbox's requests carry nothing; the relay mints an installation
//! token through the tokenizer once for many requests, again once it is
//! due, and answers 502 naming the step when minting fails.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use proxypilot::kernel::origin::OriginalDestination;
use proxypilot::relay::minted::MintSpec;
use proxypilot::relay::{self, Forwarder, Limits, Relay, RelayConfig, RemoteTokenizer};
use proxypilot::settings::{SecretString, Target};
use proxypilot::tls::ca::CertAuthority;
use proxypilot::tokenizer::secret::{GitHubAppProcessor, NoAuth, SecretBytes};
use proxypilot::tokenizer::{seal, Secret};
use proxypilot_tests::loopback::{new_engine, start_tokenizer, LoopbackUpstream, Tokenizer};
use proxypilot_tests::testca::client_config_trusting;
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};

const GITHUB: &str = "api.github.com";
const SECRET_NAME: &str = "GH_APP_SEALED";
const RSA_KEY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/fixtures/github-app-test-key.pem"
);

struct Redirected;
impl relay::Redirections for Redirected {
    fn take(&self, _peer: SocketAddr) -> Option<OriginalDestination> {
        Some(OriginalDestination {
            addr: "203.0.113.13:443".parse().unwrap(),
            pid: 4242,
            uid: 1000,
            cgroup_id: 7,
            comm: "gh".into(),
        })
    }
}

struct Env {
    relay_addr: SocketAddr,
    relay: Arc<Relay>,
    ca: Arc<CertAuthority>,
    upstream: LoopbackUpstream,
    _tokenizer: Tokenizer,
}

/// The relay with one target, api.github.com, whose secret is a
/// github_app one with `token_url`.
async fn env(token_url: &str) -> Env {
    super::relay_e2e::logs();
    proxypilot::tls::ensure_crypto_provider();
    let upstream = LoopbackUpstream::start(&[GITHUB]).await;
    let tokenizer = start_tokenizer(new_engine(), upstream.client_config(false), false).await;
    let secret = Secret {
        github_app_processor: Some(GitHubAppProcessor {
            private_key: SecretBytes::new(std::fs::read(RSA_KEY).unwrap()),
            app_id: "4711".into(),
            installation_id: "99".into(),
            token_url: token_url.into(),
        }),
        no_auth: Some(NoAuth {}),
        allowed_hosts: Some(vec![GITHUB.into()]),
        ..Default::default()
    };
    let sealed = seal(tokenizer.engine.seal_key(), &secret);
    let ca = Arc::new(CertAuthority::ephemeral(&[GITHUB.to_string()]).unwrap());
    let limits = Limits {
        connect_timeout: Duration::from_secs(2),
        response_timeout: Duration::from_secs(10),
        ..Limits::default()
    };
    let remote = RemoteTokenizer::new(
        &format!("http://{}", tokenizer.addr).parse().unwrap(),
        &[],
        limits.connect_timeout,
    )
    .unwrap();
    let relay = Relay::new(RelayConfig {
        targets: vec![Target {
            host: GITHUB.into(),
            secret_name: SECRET_NAME.into(),
            sealed: SecretString::new(sealed),
            slots: proxypilot::relay::credentials::preset_slots(GITHUB),
            permits: vec![],
        }],
        allow: vec![],
        allow_cidrs: vec![],
        ca: ca.clone(),
        forwarder: Forwarder::Remote(Arc::new(remote)),
        proxy_authorization: None,
        limits,
        leaf_lifetime: Duration::from_secs(3600),
        leaf_capacity: 16,
    })
    .unwrap()
    .minting(GITHUB, MintSpec::of(&secret).unwrap().unwrap())
    .unwrap();
    let relay = Arc::new(relay);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = listener.local_addr().unwrap();
    tokio::spawn(relay::serve(
        listener,
        relay::LiveRelay::new(relay.clone()),
        Redirected,
    ));
    Env {
        relay_addr,
        relay,
        ca,
        upstream,
        _tokenizer: tokenizer,
    }
}

impl Env {
    /// `GET path` as gh sends it (with its dummy token), on a connection
    /// of its own; the status and body.
    async fn get(&self, path: &str) -> (u16, String) {
        let tcp = TcpStream::connect(self.relay_addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(client_config_trusting(
            self.ca.ca_der(),
            &[b"http/1.1"],
        ))
        .connect(ServerName::try_from(GITHUB).unwrap(), tcp)
        .await
        .unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::get(path)
            .header("host", GITHUB)
            .header("authorization", "token dummy")
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    fn mints_seen(&self) -> usize {
        self.upstream
            .seen()
            .iter()
            .filter(|s| s.path.ends_with("/access_tokens"))
            .count()
    }

    fn auth_of_last(&self, path: &str) -> String {
        let s = self.upstream.seen();
        let last = s.iter().rev().find(|s| s.path == path).unwrap();
        last.headers["authorization"].to_str().unwrap().to_string()
    }
}

/// Many concurrent requests share one mint (single flight); once the token
/// is due (the fake's 64 s life is 3 s after the tokenizer's 60 s margin)
/// the next request mints again; the audit line names the token's age and
/// the parent secret; the sandbox never sees a token.
#[tokio::test]
async fn one_mint_for_many_requests_and_a_second_after_expiry() {
    let e = Arc::new(
        env("https://api.github.com/app/installations/{installation_id}/access_tokens?expires_in=64")
            .await,
    );
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let e = e.clone();
        tasks.push(tokio::spawn(async move { e.get("/user").await }));
    }
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(
            !body.contains("ghs_minted"),
            "the sandbox saw the minted token: {body}"
        );
    }
    assert_eq!(
        e.mints_seen(),
        1,
        "one token request for twelve concurrent requests"
    );
    assert_eq!(e.relay.minted(GITHUB).unwrap().mints(), 1);
    assert_eq!(e.auth_of_last("/user"), "token ghs_minted1");
    let mint = e
        .upstream
        .seen()
        .into_iter()
        .find(|s| s.path.ends_with("/access_tokens"))
        .unwrap();
    assert_eq!(
        mint.uri,
        "/app/installations/99/access_tokens?expires_in=64"
    );
    assert!(mint.headers["authorization"]
        .to_str()
        .unwrap()
        .starts_with("Bearer ey"));

    // Within its life: no new mint, and the audit line names the age.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, _) = e.get("/user").await;
    assert_eq!(status, 200);
    assert_eq!(e.mints_seen(), 1);
    let line = super::relay_e2e::logs()
        .text()
        .lines()
        .rev()
        .find(|l| l.contains("\"token_age_s\":1") && l.contains(SECRET_NAME))
        .map(str::to_owned);
    let line = line.expect("an audit line with token_age_s=1");
    assert!(
        line.contains(&format!("\"parent_secret\":\"{SECRET_NAME}\"")),
        "{line}"
    );

    // Past 3/4 of the 3 s life: a second mint, and its token is used.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let (status, _) = e.get("/user").await;
    assert_eq!(status, 200);
    assert_eq!(e.mints_seen(), 2, "a second mint after expiry");
    assert_eq!(e.auth_of_last("/user"), "token ghs_minted2");
}

/// When the token endpoint refuses, the sandbox's request is a 502 whose
/// hint names the failing step, and nothing reaches the API.
#[tokio::test]
async fn a_refused_mint_is_a_502_naming_the_step() {
    let e = env("https://api.github.com/status/401").await;
    let (status, body) = e.get("/user").await;
    assert_eq!(status, 502, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let (err, hint) = (v["error"].as_str().unwrap(), v["hint"].as_str().unwrap());
    assert!(
        err.contains("no short-lived token for api.github.com (secret GH_APP_SEALED)"),
        "{err}"
    );
    assert!(
        err.contains("the token endpoint http://api.github.com/status/401 answered 401"),
        "{err}"
    );
    assert!(
        err.contains("status-from-fake"),
        "the endpoint's own message: {err}"
    );
    assert!(
        hint.contains("token endpoint refused the token request"),
        "{hint}"
    );
    assert!(
        e.upstream.seen().iter().all(|s| s.path != "/user"),
        "nothing reached the API"
    );
}
