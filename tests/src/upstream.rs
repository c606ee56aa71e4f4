//! Fake upstream APIs over HTTPS: api.anthropic.com, api.openai.com and
//! api.github.com, each on its own documentation-range address in the test's
//! network namespace, with certificates from a [`TestCa`].
//!
//! They check credentials as strictly as the real APIs, so a failed
//! injection shows up as the real API's 401 and not as a silent pass:
//! - Anthropic: `x-api-key: K` or `Authorization: Bearer K`; any credential
//!   header holding another value (a forwarded dummy) is a 401.
//! - OpenAI: `Authorization: Bearer K`.
//! - GitHub: `Authorization: token K` or `Bearer K`.
//!
//! Every host also serves generic endpoints for the relay tests: `/echo`,
//! `/echo-body`, `/bytes?n=N`, `/sse?n=N&gap_ms=M`, `/echo-secret` and
//! `/reset-after?n=N` (N bytes of 2N announced, then the connection aborts).
//! Every request is recorded (see [`FakeApis::requests`]).
//!
//! api.openai.com also serves the Realtime API's WebSocket,
//! `wss://…/v1/realtime` (see [`realtime`]); how each session ended is in
//! [`FakeApis::websocket_ends`].
//!
//! Streaming responses (Anthropic, OpenAI, `/sse`) pass each event through
//! an optional [`Gate`], so a test can prove the client saw event N before
//! the server sent event N+1.

use std::{
    collections::HashMap,
    convert::Infallible,
    io,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{header::HeaderValue, HeaderMap, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::{
    dns::{Records, StubDns},
    sandbox::{write_resolv_conf, SandboxCommand},
    testca::TestCa,
    NetNs, TempDir,
};

pub const ANTHROPIC: &str = "api.anthropic.com";
pub const OPENAI: &str = "api.openai.com";
pub const GITHUB: &str = "api.github.com";
/// Where the standard setup runs the stub DNS (port 53).
pub const DNS_IP: &str = "203.0.113.53";

/// The text every fake model answers with; streaming splits it into words.
pub const REPLY_TEXT: &str = "Hello from the fake upstream API.";
/// The login `GET /user` reports.
pub const GITHUB_LOGIN: &str = "proxypilot-test";
/// The scopes GitHub reports in `X-OAuth-Scopes`.
pub const GITHUB_SCOPES: &str = "gist, read:org, repo, workflow";

type Body = BoxBody<Bytes, io::Error>;

/// Which API a host imitates. Every kind also serves the generic endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    Anthropic,
    OpenAi,
    GitHub,
    /// Only the generic endpoints (e.g. a pass-through host).
    Generic,
}

/// One fake host: its name (certificate SAN and DNS name) and addresses.
#[derive(Clone, Debug)]
pub struct HostSpec {
    pub name: String,
    pub api: Api,
    pub addrs: Vec<SocketAddr>,
}

impl HostSpec {
    pub fn new(name: &str, api: Api, addrs: &[&str]) -> HostSpec {
        HostSpec {
            name: name.into(),
            api,
            addrs: addrs
                .iter()
                .map(|a| a.parse().expect("socket address"))
                .collect(),
        }
    }
}

/// The real keys the fakes accept.
#[derive(Clone, Debug)]
pub struct RealKeys {
    pub anthropic: String,
    pub openai: String,
    pub github: String,
}

impl Default for RealKeys {
    fn default() -> Self {
        RealKeys {
            anthropic: "sk-ant-api03-REAL-anthropic-key-for-tests".into(),
            openai: "sk-proj-REAL-openai-key-for-tests".into(),
            github: "ghp_REALgithubTokenForTests0123456789".into(),
        }
    }
}

/// api.anthropic.com on .11, api.openai.com on .12, api.github.com on .13
/// (203.0.113.x and 2001:db8::x, port 443).
pub fn standard_hosts() -> Vec<HostSpec> {
    vec![
        HostSpec::new(
            ANTHROPIC,
            Api::Anthropic,
            &["203.0.113.11:443", "[2001:db8::11]:443"],
        ),
        HostSpec::new(
            OPENAI,
            Api::OpenAi,
            &["203.0.113.12:443", "[2001:db8::12]:443"],
        ),
        HostSpec::new(
            GITHUB,
            Api::GitHub,
            &["203.0.113.13:443", "[2001:db8::13]:443"],
        ),
    ]
}

/// The `lo` addresses [`crate::NetNs::enter_new`] needs for `hosts` plus
/// the stub DNS ([`DNS_IP`]).
pub fn netns_addrs(hosts: &[HostSpec]) -> Vec<String> {
    let mut out = vec![format!("{DNS_IP}/32")];
    for a in hosts.iter().flat_map(|h| &h.addrs) {
        let s = match a.ip() {
            IpAddr::V4(ip) => format!("{ip}/32"),
            IpAddr::V6(ip) => format!("{ip}/128"),
        };
        if !out.contains(&s) {
            out.push(s);
        }
    }
    out
}

/// DNS records for `hosts`, for [`crate::dns::StubDns::start`].
pub fn dns_records(hosts: &[HostSpec]) -> Records {
    let mut r: Records = HashMap::new();
    for h in hosts {
        let ips = r.entry(h.name.clone()).or_default();
        for a in &h.addrs {
            if !ips.contains(&a.ip()) {
                ips.push(a.ip());
            }
        }
    }
    r
}

/// One request as the fake upstream saw it.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    /// The fake host that served it (by listener, not by Host header).
    pub host: String,
    pub sni: Option<String>,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// "HTTP/1.1" or "HTTP/2.0".
    pub version: String,
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Header names are lower case (hyper's normal form), in arrival order.
    pub headers: Vec<(String, String)>,
    /// The body, for the API endpoints (empty for generic ones).
    pub body: Vec<u8>,
    pub status: u16,
}

impl RequestRecord {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Names of headers starting with `prefix` (case-insensitive), e.g. "proxy-".
    pub fn headers_starting_with(&self, prefix: &str) -> Vec<&str> {
        let prefix = prefix.to_ascii_lowercase();
        self.headers
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.as_str())
            .collect()
    }

    pub fn body_json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// Paces streamed events: each event takes one permit. A test creates
/// `Gate::new(1)`, checks the client saw event 1 while `sent() == 1`, then
/// `allow(1)` for the next. While set (see [`FakeApis::set_gate`]) the gate
/// applies to every streaming response.
pub struct Gate {
    permits: Semaphore,
    sent: AtomicUsize,
}

impl Gate {
    pub fn new(initial: usize) -> Arc<Gate> {
        Arc::new(Gate {
            permits: Semaphore::new(initial),
            sent: AtomicUsize::new(0),
        })
    }

    /// Lets `n` more events through.
    pub fn allow(&self, n: usize) {
        self.permits.add_permits(n);
    }

    /// Lets everything through from now on.
    pub fn open(&self) {
        self.permits.add_permits(1 << 24);
    }

    /// Events released to the connection so far.
    pub fn sent(&self) -> usize {
        self.sent.load(Ordering::SeqCst)
    }

    /// Takes one permit for the next event; false if the gate is gone.
    pub(crate) async fn admit(&self) -> bool {
        match self.permits.acquire().await {
            Ok(p) => {
                p.forget();
                true
            }
            Err(_) => false,
        }
    }

    /// Counts an event as released: call it before the send, so a client
    /// that has event N can never observe `sent() < N`.
    pub(crate) fn mark_sent(&self) {
        self.sent.fetch_add(1, Ordering::SeqCst);
    }

    /// Waits (polling) until `sent() >= n`; false on timeout.
    pub fn wait_sent(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.sent() < n {
            if Instant::now() > deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(5));
        }
        true
    }
}

struct State {
    keys: RealKeys,
    log: Mutex<Vec<RequestRecord>>,
    gate: Mutex<Option<Arc<Gate>>>,
    event_delay_ms: AtomicU64,
    ids: AtomicU64,
    /// How each WebSocket session ended, in order.
    ws_ends: Mutex<Vec<WsEnd>>,
    /// SETTINGS_MAX_CONCURRENT_STREAMS of new HTTP/2 connections (0:
    /// hyper's default).
    h2_max_streams: std::sync::atomic::AtomicU32,
    /// The GitHub App whose installation tokens api.github.com mints.
    app: Mutex<Option<GitHubApp>>,
    /// The installation tokens minted so far; /user accepts each.
    minted: Mutex<Vec<String>>,
}

/// A GitHub App the fake api.github.com knows: `POST
/// /app/installations/ID/access_tokens` with an app JWT signed RS256 by its
/// key (checked against `public_key`, with `iss` and `exp`) answers 201
/// with a fresh installation token living `lifetime_secs`.
#[derive(Clone, Debug)]
pub struct GitHubApp {
    pub app_id: String,
    /// The app key's public half, PKCS#1 RSAPublicKey DER.
    pub public_key: Vec<u8>,
    pub lifetime_secs: i64,
}

impl GitHubApp {
    /// The app for a PKCS#1 PEM private key file (the seal tests' fixture).
    pub fn from_private_pem(app_id: &str, pem: &str, lifetime_secs: i64) -> GitHubApp {
        use base64::Engine as _;
        let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        let pair = ring::signature::RsaKeyPair::from_der(&der).expect("a PKCS#1 RSA key");
        use ring::signature::KeyPair as _;
        GitHubApp {
            app_id: app_id.into(),
            public_key: pair.public_key().as_ref().to_vec(),
            lifetime_secs,
        }
    }
}

/// The installation-token endpoint: 401 unless the app JWT verifies.
fn github_app_token(h: &HeaderMap, state: &State) -> Response<Body> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let deny = |why: &str| {
        json_response(
            StatusCode::UNAUTHORIZED,
            json!({"message": format!("A JSON web token could not be decoded: {why}")}),
        )
    };
    let Some(app) = state.app.lock().unwrap().clone() else {
        return deny("no GitHub App configured in the fake");
    };
    let Some(jwt) = header_str(h, "authorization").and_then(|v| v.strip_prefix("Bearer ")) else {
        return deny("no Bearer app JWT");
    };
    let parts: Vec<&str> = jwt.split('.').collect();
    if parts.len() != 3 {
        return deny("not a JWT");
    }
    let (Ok(head), Ok(claims), Ok(sig)) = (
        b64.decode(parts[0]),
        b64.decode(parts[1]),
        b64.decode(parts[2]),
    ) else {
        return deny("bad base64url");
    };
    let head: Value = serde_json::from_slice(&head).unwrap_or(Value::Null);
    let claims: Value = serde_json::from_slice(&claims).unwrap_or(Value::Null);
    if head["alg"] != "RS256" {
        return deny("alg is not RS256");
    }
    let signed = format!("{}.{}", parts[0], parts[1]);
    if ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        &app.public_key,
    )
    .verify(signed.as_bytes(), &sig)
    .is_err()
    {
        return deny("the signature does not verify with the app's public key");
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    if claims["iss"] != app.app_id.as_str() {
        return deny("iss is not the app id");
    }
    let (Some(iat), Some(exp)) = (claims["iat"].as_i64(), claims["exp"].as_i64()) else {
        return deny("no iat/exp");
    };
    if exp <= now || iat > now + 60 || exp - iat > 600 {
        return deny("'Expiration time' claim ('exp') is too far in the future or past");
    }
    let mut minted = state.minted.lock().unwrap();
    let token = format!("ghs_installation{:024}", minted.len() + 1);
    minted.push(token.clone());
    let at = (time::OffsetDateTime::now_utc() + time::Duration::seconds(app.lifetime_secs))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    json_response(
        StatusCode::CREATED,
        json!({"token": token, "expires_at": at, "permissions": {"metadata": "read"}, "repository_selection": "all"}),
    )
}

/// How a fake WebSocket session ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WsEnd {
    /// The client sent a close frame (the fake answered it).
    ClientClosed,
    /// The fake closed it, asked to by a `close` message.
    ServerClosed,
    /// The connection ended without a close handshake.
    Dropped(String),
}

impl State {
    fn id(&self, prefix: &str) -> String {
        let n = self.ids.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}{:024x}", n + 0x0123_4567_89ab)
    }
}

/// The running fake APIs; stopped on drop.
pub struct FakeApis {
    runtime: Option<tokio::runtime::Runtime>,
    state: Arc<State>,
    ca: Arc<TestCa>,
    hosts: Vec<HostSpec>,
    ca_path: PathBuf,
    _dir: TempDir,
}

impl FakeApis {
    /// Starts `hosts` with a fresh [`TestCa`]. Call it from the test's
    /// network namespace: the listeners are bound on the calling thread and
    /// the runtime's threads are created from it.
    pub fn start(keys: RealKeys, hosts: Vec<HostSpec>) -> FakeApis {
        FakeApis::start_with_ca(
            Arc::new(TestCa::new("proxypilot test upstream CA")),
            keys,
            hosts,
        )
    }

    pub fn start_with_ca(ca: Arc<TestCa>, keys: RealKeys, hosts: Vec<HostSpec>) -> FakeApis {
        let dir = TempDir::new("fakeapis");
        let ca_path = dir.0.join("upstream-ca.pem");
        ca.write_pem(&ca_path);
        let state = Arc::new(State {
            keys,
            log: Mutex::new(Vec::new()),
            gate: Mutex::new(None),
            event_delay_ms: AtomicU64::new(0),
            ids: AtomicU64::new(1),
            ws_ends: Mutex::new(Vec::new()),
            h2_max_streams: std::sync::atomic::AtomicU32::new(0),
            app: Mutex::new(None),
            minted: Mutex::new(Vec::new()),
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fake-upstream")
            .enable_all()
            .build()
            .unwrap();
        for host in &hosts {
            let mut names = vec![host.name.as_str()];
            let ips: Vec<String> = host.addrs.iter().map(|a| a.ip().to_string()).collect();
            names.extend(ips.iter().map(String::as_str));
            let acceptor = TlsAcceptor::from(ca.server_config(&names, &[b"h2", b"http/1.1"]));
            for addr in &host.addrs {
                let l = std::net::TcpListener::bind(addr)
                    .unwrap_or_else(|e| panic!("bind {addr} for {}: {e}", host.name));
                l.set_nonblocking(true).unwrap();
                let (state, acceptor) = (state.clone(), acceptor.clone());
                let (name, api) = (host.name.clone(), host.api);
                runtime.spawn(async move {
                    let l = tokio::net::TcpListener::from_std(l).unwrap();
                    serve(l, acceptor, Arc::new(name), api, state).await
                });
            }
        }
        FakeApis {
            runtime: Some(runtime),
            state,
            ca,
            hosts,
            ca_path,
            _dir: dir,
        }
    }

    /// PEM file of the CA that signed the fakes' certificates.
    pub fn ca_pem_path(&self) -> &Path {
        &self.ca_path
    }

    pub fn ca(&self) -> &Arc<TestCa> {
        &self.ca
    }

    pub fn hosts(&self) -> &[HostSpec] {
        &self.hosts
    }

    pub fn keys(&self) -> &RealKeys {
        &self.state.keys
    }

    /// Records for the stub DNS.
    pub fn dns_records(&self) -> Records {
        dns_records(&self.hosts)
    }

    /// Every request so far, in completion order of their headers.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.state.log.lock().unwrap().clone()
    }

    /// Requests served by host `name`.
    pub fn requests_to(&self, name: &str) -> Vec<RequestRecord> {
        self.requests()
            .into_iter()
            .filter(|r| r.host == name)
            .collect()
    }

    /// How each WebSocket session has ended so far.
    pub fn websocket_ends(&self) -> Vec<WsEnd> {
        self.state.ws_ends.lock().unwrap().clone()
    }

    pub fn clear_requests(&self) {
        self.state.log.lock().unwrap().clear();
    }

    /// Sets (or removes) the gate every streaming response passes through.
    pub fn set_gate(&self, gate: Option<Arc<Gate>>) {
        *self.state.gate.lock().unwrap() = gate;
    }

    /// The SETTINGS_MAX_CONCURRENT_STREAMS new HTTP/2 connections advertise
    /// (hyper's default until set), as an API that allows few streams per
    /// connection would.
    pub fn set_h2_max_concurrent_streams(&self, n: u32) {
        self.state.h2_max_streams.store(n, Ordering::Relaxed);
    }

    /// Makes api.github.com mint installation tokens for `app`.
    pub fn set_github_app(&self, app: GitHubApp) {
        *self.state.app.lock().unwrap() = Some(app);
    }

    /// The installation tokens api.github.com has minted, in order.
    pub fn minted_tokens(&self) -> Vec<String> {
        self.state.minted.lock().unwrap().clone()
    }

    /// A pause before each streamed event after the first (default none).
    pub fn set_event_delay(&self, d: Duration) {
        self.state
            .event_delay_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
    }
}

impl Drop for FakeApis {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

async fn serve(
    l: tokio::net::TcpListener,
    acceptor: TlsAcceptor,
    name: Arc<String>,
    api: Api,
    state: Arc<State>,
) {
    loop {
        let Ok((tcp, peer)) = l.accept().await else {
            continue;
        };
        // Real APIs answer without waiting for the client's delayed ACK.
        let _ = tcp.set_nodelay(true);
        let local = tcp.local_addr().unwrap();
        let (acceptor, name, state) = (acceptor.clone(), name.clone(), state.clone());
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    _ => return,
                };
            let sni = tls.get_ref().1.server_name().map(str::to_owned);
            let conn = Arc::new(Conn {
                host: name,
                api,
                sni,
                peer,
                local,
            });
            let max_streams = state.h2_max_streams.load(Ordering::Relaxed);
            let svc = hyper::service::service_fn(move |req| {
                let (conn, state) = (conn.clone(), state.clone());
                async move { Ok::<_, Infallible>(handle(req, &conn, &state).await) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if max_streams > 0 {
                builder.http2().max_concurrent_streams(max_streams);
            }
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(tls), svc)
                .await;
        });
    }
}

struct Conn {
    host: Arc<String>,
    api: Api,
    sni: Option<String>,
    peer: SocketAddr,
    local: SocketAddr,
}

/// Handles one request and records it with the status it got.
async fn handle(mut req: Request<Incoming>, conn: &Conn, state: &Arc<State>) -> Response<Body> {
    let mut upgrade = (conn.api == Api::OpenAi && req.uri().path() == "/v1/realtime")
        .then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_owned();
    let mut record = RequestRecord {
        host: conn.host.to_string(),
        sni: conn.sni.clone(),
        peer: conn.peer,
        local: conn.local,
        version: format!("{:?}", parts.version),
        method: parts.method.to_string(),
        path: path.clone(),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: Vec::new(),
        status: 0,
    };
    let route = parts.uri.path().to_owned();
    let query = parse_query(parts.uri.query().unwrap_or(""));
    let h = &parts.headers;

    let resp = match route.as_str() {
        "/echo" => json_response(StatusCode::OK, echo_json(&record)),
        "/v1/realtime" if upgrade.is_some() => realtime(upgrade.take().unwrap(), h, &query, state),
        "/reply" => {
            // `delay_ms`: the time a real API takes to answer.
            if let Some(ms) = query.get("delay_ms").and_then(|v| v.parse().ok()) {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            reply()
        }
        "/echo-body" => echo_body(body).await,
        "/bytes" => bytes_response(query.get("n").and_then(|n| n.parse().ok()).unwrap_or(0)),
        "/sse" => generic_sse(state, &query),
        "/echo-secret" => echo_secret(h),
        "/echo-secret-as" => echo_secret_as(h, &query),
        "/reset-after" => reset_after(query.get("n").and_then(|n| n.parse().ok()).unwrap_or(0)),
        _ => {
            // The API endpoints read the whole (small) body first.
            let bytes = match Limited::new(body, 8 << 20).collect().await {
                Ok(b) => b.to_bytes().to_vec(),
                Err(_) => Vec::new(),
            };
            record.body = bytes;
            match conn.api {
                Api::Anthropic => anthropic(&parts.method, &route, h, &record.body, state),
                Api::OpenAi => openai(&parts.method, &route, h, &record.body, state),
                Api::GitHub
                    if parts.method == Method::POST
                        && route.starts_with("/app/installations/")
                        && route.ends_with("/access_tokens") =>
                {
                    github_app_token(h, state)
                }
                Api::GitHub => {
                    let minted = state.minted.lock().unwrap().clone();
                    github(
                        &parts.method,
                        &route,
                        h,
                        &record.body,
                        &state.keys.github,
                        &minted,
                    )
                }
                Api::Generic => json_response(StatusCode::NOT_FOUND, json!({"error": "not found"})),
            }
        }
    };
    record.status = resp.status().as_u16();
    state.log.lock().unwrap().push(record);
    resp
}

// ---------- OpenAI Realtime (WebSocket) ----------

/// `wss://api.openai.com/v1/realtime`: checks the key as the real API does
/// (401 otherwise), answers `101` with RFC 6455's accept key, then sends
/// `session.created`, answers a `conversation.item.create` event with
/// `conversation.item.created` (as the OpenAI SDK's realtime client
/// expects), echoes any other text message as `{"type":"echo",...}`, and
/// closes (1000, "bye") when sent `close`. `?status=N` answers the
/// upgrade with N instead, as an API that refuses it would.
fn realtime(
    upgrade: hyper::upgrade::OnUpgrade,
    h: &HeaderMap,
    query: &HashMap<String, String>,
    state: &Arc<State>,
) -> Response<Body> {
    if let Some(code) = query.get("status").and_then(|s| s.parse().ok()) {
        let status = StatusCode::from_u16(code).unwrap();
        return json_response(
            status,
            json!({"error": {"message": "the test asked for this status"}}),
        );
    }
    if header_str(h, "authorization") != Some(&format!("Bearer {}", state.keys.openai)) {
        return json_response(
            StatusCode::UNAUTHORIZED,
            json!({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", "code": "invalid_api_key"}}),
        );
    }
    let lists = |name: &str, token: &str| {
        h.get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    let key = h.get("sec-websocket-key");
    if !lists("connection", "upgrade") || !lists("upgrade", "websocket") || key.is_none() {
        return json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": {"message": "expected a WebSocket upgrade"}}),
        );
    }
    let accept =
        tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.unwrap().as_bytes());
    let state = state.clone();
    tokio::spawn(async move {
        let end = match upgrade.await {
            Ok(io) => realtime_session(TokioIo::new(io), &state).await,
            Err(e) => WsEnd::Dropped(format!("upgrade: {e}")),
        };
        state.ws_ends.lock().unwrap().push(end);
    });
    let mut r = Response::new(
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let hs = r.headers_mut();
    hs.insert("connection", hv("Upgrade"));
    hs.insert("upgrade", hv("websocket"));
    hs.insert("sec-websocket-accept", hv(&accept));
    r
}

async fn realtime_session(io: TokioIo<hyper::upgrade::Upgraded>, state: &State) -> WsEnd {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{
        protocol::{frame::coding::CloseCode, CloseFrame, Role},
        Message,
    };
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(io, Role::Server, None).await;
    let created = json!({
        "type": "session.created",
        "event_id": state.id("event_"),
        "session": {"id": state.id("sess_"), "object": "realtime.session", "model": "gpt-realtime"},
    });
    if let Err(e) = ws.send(Message::text(created.to_string())).await {
        return WsEnd::Dropped(e.to_string());
    }
    // Read until the end, so tungstenite flushes its answer to a close.
    let mut end = None;
    while let Some(msg) = ws.next().await {
        match msg {
            Ok(Message::Text(t)) if t.as_str() == "close" => {
                end = Some(WsEnd::ServerClosed);
                let frame = CloseFrame {
                    code: CloseCode::Normal,
                    reason: "bye".into(),
                };
                if let Err(e) = ws.close(Some(frame)).await {
                    return WsEnd::Dropped(e.to_string());
                }
            }
            Ok(Message::Text(t)) => {
                let event: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                let answer = if event["type"] == "conversation.item.create" {
                    json!({
                        "type": "conversation.item.created",
                        "event_id": state.id("event_"),
                        "previous_item_id": null,
                        "item": event["item"],
                    })
                } else {
                    json!({"type": "echo", "text": t.as_str()})
                };
                if let Err(e) = ws.send(Message::text(answer.to_string())).await {
                    return WsEnd::Dropped(e.to_string());
                }
            }
            // tungstenite answers the client's close frame itself.
            Ok(Message::Close(_)) => {
                end.get_or_insert(WsEnd::ClientClosed);
            }
            Ok(_) => {}
            Err(e) => return WsEnd::Dropped(e.to_string()),
        }
    }
    end.unwrap_or_else(|| WsEnd::Dropped("the connection ended without a close frame".into()))
}

// ---------- Anthropic ----------

fn anthropic(
    m: &Method,
    route: &str,
    h: &HeaderMap,
    body: &[u8],
    state: &Arc<State>,
) -> Response<Body> {
    let err = |status: StatusCode, kind: &str, msg: &str| {
        let mut r = json_response(
            status,
            json!({"type": "error", "error": {"type": kind, "message": msg}}),
        );
        r.headers_mut().insert("request-id", hv(&state.id("req_")));
        r
    };
    // Every credential header present must hold the real key.
    let key = &state.keys.anthropic;
    let x_api_key = header_str(h, "x-api-key");
    let authz = header_str(h, "authorization");
    if x_api_key.is_none() && authz.is_none() {
        return err(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "x-api-key header is required",
        );
    }
    let ok_x = x_api_key.is_none_or(|v| v == key.as_str());
    let ok_auth = authz.is_none_or(|v| bearer(v) == Some(key.as_str()));
    if !(ok_x && ok_auth) {
        return err(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid x-api-key",
        );
    }
    if route != "/v1/messages" {
        return err(StatusCode::NOT_FOUND, "not_found_error", "Not found");
    }
    if m != Method::POST {
        return err(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "Method not allowed",
        );
    }
    let Ok(req) = serde_json::from_slice::<Value>(body) else {
        return err(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "request body is not valid JSON",
        );
    };
    let model = req["model"].as_str().unwrap_or("claude-test").to_owned();
    let id = state.id("msg_01");
    let mut resp = if req["stream"] == true {
        let start = json!({"type": "message_start", "message": {
            "id": id, "type": "message", "role": "assistant", "content": [], "model": model,
            "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 12, "cache_creation_input_tokens": 0,
                      "cache_read_input_tokens": 0, "output_tokens": 1}}});
        let mut events = vec![
            sse_event(Some("message_start"), &start),
            sse_event(
                Some("content_block_start"),
                &json!({"type": "content_block_start", "index": 0,
                        "content_block": {"type": "text", "text": ""}}),
            ),
            sse_event(Some("ping"), &json!({"type": "ping"})),
        ];
        for word in words(REPLY_TEXT) {
            events.push(sse_event(
                Some("content_block_delta"),
                &json!({"type": "content_block_delta", "index": 0,
                        "delta": {"type": "text_delta", "text": word}}),
            ));
        }
        events.push(sse_event(
            Some("content_block_stop"),
            &json!({"type": "content_block_stop", "index": 0}),
        ));
        events.push(sse_event(
            Some("message_delta"),
            &json!({"type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                    "usage": {"output_tokens": words(REPLY_TEXT).len()}}),
        ));
        events.push(sse_event(
            Some("message_stop"),
            &json!({"type": "message_stop"}),
        ));
        stream_events(state, events)
    } else {
        json_response(
            StatusCode::OK,
            json!({
                "id": id, "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": REPLY_TEXT}],
                "stop_reason": "end_turn", "stop_sequence": null,
                "usage": {"input_tokens": 12, "cache_creation_input_tokens": 0,
                          "cache_read_input_tokens": 0, "output_tokens": words(REPLY_TEXT).len()}
            }),
        )
    };
    resp.headers_mut()
        .insert("request-id", hv(&state.id("req_")));
    resp
}

// ---------- OpenAI ----------

fn openai(
    m: &Method,
    route: &str,
    h: &HeaderMap,
    body: &[u8],
    state: &Arc<State>,
) -> Response<Body> {
    let err = |status: StatusCode, msg: &str, kind: &str, code: Value| {
        json_response(
            status,
            json!({"error": {"message": msg, "type": kind, "param": null, "code": code}}),
        )
    };
    match header_str(h, "authorization") {
        None => {
            return err(
                StatusCode::UNAUTHORIZED,
                "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                "invalid_request_error",
                Value::Null,
            )
        }
        Some(v) if bearer(v) != Some(state.keys.openai.as_str()) => {
            let shown = mask(bearer(v).unwrap_or(v));
            return err(
                StatusCode::UNAUTHORIZED,
                &format!("Incorrect API key provided: {shown}. You can find your API key at https://platform.openai.com/account/api-keys."),
                "invalid_request_error",
                json!("invalid_api_key"),
            );
        }
        Some(_) => {}
    }
    if m != Method::POST || !matches!(route, "/v1/responses" | "/v1/chat/completions") {
        return err(
            StatusCode::NOT_FOUND,
            &format!("Invalid URL ({m} {route})"),
            "invalid_request_error",
            Value::Null,
        );
    }
    let Ok(req) = serde_json::from_slice::<Value>(body) else {
        return err(
            StatusCode::BAD_REQUEST,
            "We could not parse the JSON body of your request.",
            "invalid_request_error",
            Value::Null,
        );
    };
    let model = req["model"].as_str().unwrap_or("gpt-test").to_owned();
    let stream = req["stream"] == true;
    let now = unix_now();
    let mut resp = if route == "/v1/responses" {
        let id = state.id("resp_");
        let item_id = state.id("msg_");
        let response = |status: &str, text: Option<&str>| {
            let output = match text {
                Some(t) => json!([{"type": "message", "id": item_id, "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": t, "annotations": [], "logprobs": []}]}]),
                None => json!([]),
            };
            json!({
                "id": id, "object": "response", "created_at": now, "status": status,
                "background": false, "error": null, "incomplete_details": null,
                "instructions": null, "max_output_tokens": null, "model": model,
                "output": output, "parallel_tool_calls": true, "previous_response_id": null,
                "reasoning": {"effort": null, "summary": null}, "store": true,
                "temperature": 1.0, "text": {"format": {"type": "text"}},
                "tool_choice": "auto", "tools": [], "top_p": 1.0, "truncation": "disabled",
                "usage": if text.is_some() { json!({"input_tokens": 12,
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": words(REPLY_TEXT).len(),
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": 12 + words(REPLY_TEXT).len()}) } else { Value::Null },
                "user": null, "metadata": {}
            })
        };
        if stream {
            let mut seq = 0;
            let mut ev = |kind: &str, mut v: Value| {
                v["type"] = json!(kind);
                v["sequence_number"] = json!(seq);
                seq += 1;
                sse_event(Some(kind), &v)
            };
            let in_progress_item = json!({"type": "message", "id": item_id, "status": "in_progress",
                "role": "assistant", "content": []});
            let part = |t: &str| json!({"type": "output_text", "text": t, "annotations": [], "logprobs": []});
            let loc = json!({"item_id": item_id, "output_index": 0, "content_index": 0});
            let with = |mut base: Value, extra: Value| {
                for (k, v) in extra.as_object().unwrap() {
                    base[k] = v.clone();
                }
                base
            };
            let mut events = vec![
                ev(
                    "response.created",
                    json!({"response": response("in_progress", None)}),
                ),
                ev(
                    "response.in_progress",
                    json!({"response": response("in_progress", None)}),
                ),
                ev(
                    "response.output_item.added",
                    json!({"output_index": 0, "item": in_progress_item}),
                ),
                ev(
                    "response.content_part.added",
                    with(loc.clone(), json!({"part": part("")})),
                ),
            ];
            for w in words(REPLY_TEXT) {
                events.push(ev(
                    "response.output_text.delta",
                    with(loc.clone(), json!({"delta": w, "logprobs": []})),
                ));
            }
            events.push(ev(
                "response.output_text.done",
                with(loc.clone(), json!({"text": REPLY_TEXT, "logprobs": []})),
            ));
            events.push(ev(
                "response.content_part.done",
                with(loc, json!({"part": part(REPLY_TEXT)})),
            ));
            let done = response("completed", Some(REPLY_TEXT));
            events.push(ev(
                "response.output_item.done",
                json!({"output_index": 0, "item": done["output"][0].clone()}),
            ));
            events.push(ev("response.completed", json!({"response": done})));
            stream_events(state, events)
        } else {
            json_response(StatusCode::OK, response("completed", Some(REPLY_TEXT)))
        }
    } else {
        let id = state.id("chatcmpl-");
        if stream {
            let chunk = |delta: Value, finish: Value| {
                sse_event(
                    None,
                    &json!({"id": id, "object": "chat.completion.chunk", "created": now,
                        "model": model, "system_fingerprint": "fp_fake", "service_tier": "default",
                        "choices": [{"index": 0, "delta": delta, "logprobs": null,
                                     "finish_reason": finish}]}),
                )
            };
            let mut events = vec![chunk(
                json!({"role": "assistant", "content": "", "refusal": null}),
                Value::Null,
            )];
            for w in words(REPLY_TEXT) {
                events.push(chunk(json!({"content": w}), Value::Null));
            }
            events.push(chunk(json!({}), json!("stop")));
            events.push(Bytes::from_static(b"data: [DONE]\n\n"));
            stream_events(state, events)
        } else {
            json_response(
                StatusCode::OK,
                json!({"id": id, "object": "chat.completion", "created": now, "model": model,
                    "choices": [{"index": 0,
                        "message": {"role": "assistant", "content": REPLY_TEXT,
                                    "refusal": null, "annotations": []},
                        "logprobs": null, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 12, "completion_tokens": words(REPLY_TEXT).len(),
                              "total_tokens": 12 + words(REPLY_TEXT).len()},
                    "service_tier": "default", "system_fingerprint": "fp_fake"}),
            )
        }
    };
    resp.headers_mut()
        .insert("x-request-id", hv(&state.id("req_")));
    resp.headers_mut()
        .insert("openai-processing-ms", HeaderValue::from_static("3"));
    resp
}

// ---------- GitHub ----------

/// `/repos/OWNER/NAME` → (OWNER, NAME).
fn repo_of(route: &str) -> Option<(&str, &str)> {
    let rest = route.strip_prefix("/repos/")?;
    let (owner, name) = rest.split_once('/')?;
    (!owner.is_empty() && !name.is_empty() && !name.contains('/')).then_some((owner, name))
}

fn github(
    m: &Method,
    route: &str,
    h: &HeaderMap,
    body: &[u8],
    real: &str,
    minted: &[String],
) -> Response<Body> {
    let msg = |status: StatusCode, text: &str, doc: &str| {
        json_response(
            status,
            json!({"message": text, "documentation_url": doc, "status": status.as_str()}),
        )
    };
    let token = header_str(h, "authorization").map(|v| {
        let (scheme, rest) = v.split_once(' ').unwrap_or((v, ""));
        if scheme.eq_ignore_ascii_case("token") || scheme.eq_ignore_ascii_case("bearer") {
            rest.trim()
        } else {
            "" // an unknown scheme never matches
        }
    });
    let authed = match token {
        None => false,
        Some(t) if t == real || minted.iter().any(|m| m == t) => true,
        Some(_) => {
            return msg(
                StatusCode::UNAUTHORIZED,
                "Bad credentials",
                "https://docs.github.com/rest",
            )
        }
    };
    let mut resp = match (m.as_str(), route) {
        ("GET", "/user") | ("GET", "/user/") if authed => json_response(
            StatusCode::OK,
            json!({
                "login": GITHUB_LOGIN, "id": 4242, "node_id": "MDQ6VXNlcjQyNDI=",
                "avatar_url": "https://avatars.githubusercontent.com/u/4242?v=4",
                "url": "https://api.github.com/users/proxypilot-test",
                "html_url": "https://gitproxy.zycloud.tk/proxypilot-test",
                "type": "User", "site_admin": false, "name": "Proxypilot Test",
                "company": null, "blog": "", "location": null, "email": null,
                "hireable": null, "bio": null, "public_repos": 1, "public_gists": 0,
                "followers": 0, "following": 0,
                "created_at": "2020-01-01T00:00:00Z", "updated_at": "2024-01-01T00:00:00Z"
            }),
        ),
        ("GET", "/user") => msg(
            StatusCode::UNAUTHORIZED,
            "Requires authentication",
            "https://docs.github.com/rest/users/users#get-the-authenticated-user",
        ),
        ("POST", "/graphql") if authed => {
            let q = serde_json::from_slice::<Value>(body).unwrap_or(Value::Null);
            let query = q["query"].as_str().unwrap_or("");
            if query.contains("viewer") {
                json_response(StatusCode::OK, json!({"data": {"viewer": {"login": GITHUB_LOGIN}}}))
            } else {
                json_response(StatusCode::OK, json!({"data": null, "errors": [{"message": "unsupported query in the fake"}]}))
            }
        }
        ("POST", "/graphql") => msg(
            StatusCode::UNAUTHORIZED,
            "This endpoint requires you to be authenticated.",
            "https://docs.github.com/graphql/guides/forming-calls-with-graphql#authenticating-with-graphql",
        ),
        ("GET", "/") => json_response(StatusCode::OK, json!({"current_user_url": "https://api.github.com/user"})),
        // Any /repos/OWNER/NAME exists (the permit tests' reads and deletes).
        ("GET", r) if authed && repo_of(r).is_some() => {
            let (owner, name) = repo_of(r).unwrap();
            json_response(StatusCode::OK, json!({"full_name": format!("{owner}/{name}"), "name": name, "private": false}))
        }
        ("DELETE", r) if authed && repo_of(r).is_some() => json_response(StatusCode::OK, json!({})),
        _ => msg(StatusCode::NOT_FOUND, "Not Found", "https://docs.github.com/rest"),
    };
    let hs = resp.headers_mut();
    if authed {
        // gh reads the token's scopes from this header.
        hs.insert("x-oauth-scopes", HeaderValue::from_static(GITHUB_SCOPES));
        hs.insert("x-accepted-oauth-scopes", HeaderValue::from_static(""));
    }
    hs.insert(
        "x-github-media-type",
        HeaderValue::from_static("github.v3; format=json"),
    );
    hs.insert("x-ratelimit-limit", HeaderValue::from_static("5000"));
    hs.insert("x-ratelimit-remaining", HeaderValue::from_static("4999"));
    resp
}

// ---------- generic endpoints ----------

fn echo_json(r: &RequestRecord) -> Value {
    let mut headers = serde_json::Map::new();
    for (k, v) in &r.headers {
        match headers.get_mut(k) {
            Some(Value::String(s)) => {
                s.push_str(", ");
                s.push_str(v);
            }
            _ => {
                headers.insert(k.clone(), json!(v));
            }
        }
    }
    json!({"host": r.host, "sni": r.sni, "version": r.version, "method": r.method,
           "path": r.path, "headers": headers})
}

/// A fixed JSON answer the size of a short API reply (~450 bytes) that,
/// unlike `/echo`, carries nothing from the request: the benchmark's
/// steady state, where the proxy's echo redaction has nothing to mask.
fn reply() -> Response<Body> {
    const REPLY: &str = concat!(
        r#"{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","#,
        r#""model":"claude-sonnet-4-5","content":[{"type":"text","text":"Hello! "#,
        r#"The proxy relayed this reply without buffering it. Nothing in it comes "#,
        r#"from the request, so there is nothing to redact."}],"stop_reason":"#,
        r#""end_turn","stop_sequence":null,"usage":{"input_tokens":12,"#,
        r#""cache_creation_input_tokens":0,"cache_read_input_tokens":0,"#,
        r#""output_tokens":31,"service_tier":"standard"}}"#
    );
    let mut r = Response::new(
        Full::new(Bytes::from_static(REPLY.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    r
}

/// Reads the body frame by frame (never whole) and reports its length and
/// SHA-256, so uploads of any size can be checked.
async fn echo_body(mut body: Incoming) -> Response<Body> {
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    len += d.len() as u64;
                    hasher.update(d);
                }
            }
            Err(e) => {
                return json_response(StatusCode::BAD_REQUEST, json!({"error": e.to_string()}))
            }
        }
    }
    json_response(
        StatusCode::OK,
        json!({"len": len, "sha256": hex::encode(hasher.finalize())}),
    )
}

/// Byte `i` of a `/bytes` download.
pub fn pattern_byte(i: u64) -> u8 {
    (i % 251) as u8
}

/// `n` pattern bytes in 64 KiB chunks through a small channel, so the server
/// never holds more than a few chunks however large `n` is.
pub(crate) fn bytes_response(n: u64) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(2);
    tokio::spawn(async move {
        let mut off = 0u64;
        while off < n {
            let len = (n - off).min(64 * 1024);
            let chunk: Vec<u8> = (off..off + len).map(pattern_byte).collect();
            if tx.send(Bytes::from(chunk)).await.is_err() {
                return;
            }
            off += len;
        }
    });
    let mut r = Response::new(ChanBody(rx).boxed());
    r.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("application/octet-stream"),
    );
    r.headers_mut().insert("content-length", hv(&n.to_string()));
    r
}

fn generic_sse(state: &Arc<State>, q: &HashMap<String, String>) -> Response<Body> {
    let n: usize = q.get("n").and_then(|v| v.parse().ok()).unwrap_or(3);
    let gap: Option<u64> = q.get("gap_ms").and_then(|v| v.parse().ok());
    let events = (1..=n)
        .map(|i| Bytes::from(format!("event: tick\nid: {i}\ndata: {{\"n\":{i}}}\n\n")))
        .collect();
    stream_events_with(state, events, gap.map(Duration::from_millis))
}

fn echo_secret(h: &HeaderMap) -> Response<Body> {
    let a = header_str(h, "authorization").unwrap_or("");
    let x = header_str(h, "x-api-key").unwrap_or("");
    let mut r = json_response(StatusCode::OK, json!({"authorization": a, "x-api-key": x}));
    if let Ok(v) = HeaderValue::from_str(a) {
        r.headers_mut().insert("x-echo-authorization", v);
    }
    if let Ok(v) = HeaderValue::from_str(x) {
        r.headers_mut().insert("x-echo-x-api-key", v);
    }
    r
}

/// `/echo-secret-as?form=F`: echoes the `x-api-key` it received in a form
/// the sandbox could ask for, to test that the tokenizer masks it:
/// - `base64`, `base64url`, `base64-nopad`, `base64url-nopad`, `hex`, `HEX`,
///   `percent`: encoded, in the `x-echo` header and the JSON body;
/// - `base64-json&pad=N`: the body is the base64 of a JSON document that
///   holds the key after N filler bytes (each alignment of the key);
/// - `gzip`: the JSON echo gzip-compressed whatever was asked;
///   `gzip-if-asked`: only if Accept-Encoding asked for gzip, as real APIs;
/// - `trailer`: a streamed body, the key in the `x-echo` trailer;
/// - `split`: the key cut in two, in two `x-echo-part` values and in two
///   body chunks sent 50 ms apart.
fn echo_secret_as(h: &HeaderMap, q: &HashMap<String, String>) -> Response<Body> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    use base64::Engine as _;
    let key = header_str(h, "x-api-key").unwrap_or("").to_string();
    let form = q.get("form").map(String::as_str).unwrap_or("");
    let encoded = match form {
        "base64" => Some(STANDARD.encode(&key)),
        "base64url" => Some(URL_SAFE.encode(&key)),
        "base64-nopad" => Some(STANDARD_NO_PAD.encode(&key)),
        "base64url-nopad" => Some(URL_SAFE_NO_PAD.encode(&key)),
        "hex" => Some(hex::encode(&key)),
        "HEX" => Some(hex::encode_upper(&key)),
        "percent" => Some(
            key.bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect(),
        ),
        _ => None,
    };
    if let Some(e) = encoded {
        let mut r = json_response(StatusCode::OK, json!({ "echo": e }));
        if let Ok(v) = HeaderValue::from_str(&e) {
            r.headers_mut().insert("x-echo", v);
        }
        return r;
    }
    let stream = |frames: Vec<Frame<Bytes>>, gap: Duration| {
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, io::Error>>(1);
        tokio::spawn(async move {
            for f in frames {
                if tx.send(Ok(f)).await.is_err() {
                    return;
                }
                tokio::time::sleep(gap).await;
            }
        });
        Response::new(FrameBody(rx).boxed())
    };
    match form {
        "base64-json" => {
            let pad: usize = q.get("pad").and_then(|v| v.parse().ok()).unwrap_or(0);
            let doc = format!("{{\"filler\":\"{}\",\"key\":\"{key}\"}}", "x".repeat(pad));
            Response::new(
                Full::new(Bytes::from(STANDARD.encode(doc)))
                    .map_err(|never| match never {})
                    .boxed(),
            )
        }
        "gzip" | "gzip-if-asked" => {
            let body = json!({ "x-api-key": key }).to_string();
            let asked = header_str(h, "accept-encoding").is_some_and(|v| v.contains("gzip"));
            if form == "gzip-if-asked" && !asked {
                return json_response(StatusCode::OK, json!({ "x-api-key": key }));
            }
            let mut r = Response::new(
                Full::new(Bytes::from(gzip(body.as_bytes())))
                    .map_err(|never| match never {})
                    .boxed(),
            );
            r.headers_mut()
                .insert("content-encoding", HeaderValue::from_static("gzip"));
            r
        }
        "trailer" => {
            let mut t = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(&key) {
                t.insert("x-echo", v);
            }
            let mut r = stream(
                vec![
                    Frame::data(Bytes::from_static(b"see the trailer\n")),
                    Frame::trailers(t),
                ],
                Duration::ZERO,
            );
            r.headers_mut()
                .insert("trailer", HeaderValue::from_static("x-echo"));
            r
        }
        "split" => {
            let (a, b) = key.split_at(key.len() / 2);
            let mut r = stream(
                vec![
                    Frame::data(Bytes::from(format!("key={a}"))),
                    Frame::data(Bytes::from(format!("{b};\n"))),
                ],
                Duration::from_millis(50),
            );
            for part in [a, b] {
                if let Ok(v) = HeaderValue::from_str(part) {
                    r.headers_mut().append("x-echo-part", v);
                }
            }
            r
        }
        _ => json_response(StatusCode::BAD_REQUEST, json!({ "error": "unknown form" })),
    }
}

/// gzip with the system's `gzip` (the tests need real compression only
/// here, so no compression crate).
fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = std::process::Command::new("gzip")
        .args(["-c", "-n"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("gzip runs");
    child.stdin.take().unwrap().write_all(data).unwrap();
    child.wait_with_output().expect("gzip output").stdout
}

/// A body fed frame by frame (data and trailers) through a channel.
struct FrameBody(mpsc::Receiver<Result<Frame<Bytes>, io::Error>>);

impl http_body::Body for FrameBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.0.poll_recv(cx)
    }
}

/// `/reset-after?n=N` (fault tests): announces 2N bytes, sends N pattern
/// bytes, then fails the body so hyper aborts the connection mid-stream.
fn reset_after(n: u64) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Result<Bytes, io::Error>>(2);
    tokio::spawn(async move {
        let chunk: Vec<u8> = (0..n).map(pattern_byte).collect();
        let _ = tx.send(Ok(Bytes::from(chunk))).await;
        // Let the bytes reach the client before the reset.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = tx
            .send(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "reset-after",
            )))
            .await;
    });
    let mut r = Response::new(ResetBody(rx).boxed());
    r.headers_mut()
        .insert("content-length", hv(&(2 * n).to_string()));
    r
}

struct ResetBody(mpsc::Receiver<Result<Bytes, io::Error>>);

impl http_body::Body for ResetBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }
}

// ---------- helpers ----------

/// A body fed by a channel: each message is one data frame, sent as soon as
/// it is produced.
pub(crate) struct ChanBody(pub(crate) mpsc::Receiver<Bytes>);

impl http_body::Body for ChanBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn stream_events(state: &Arc<State>, events: Vec<Bytes>) -> Response<Body> {
    stream_events_with(state, events, None)
}

/// An SSE response whose events go out one by one: each waits for the gate
/// (if set) and, after the first, for the configured delay.
fn stream_events_with(
    state: &Arc<State>,
    events: Vec<Bytes>,
    gap: Option<Duration>,
) -> Response<Body> {
    let gate = state.gate.lock().unwrap().clone();
    let gap = gap.unwrap_or(Duration::from_millis(
        state.event_delay_ms.load(Ordering::Relaxed),
    ));
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    tokio::spawn(async move {
        for (i, ev) in events.into_iter().enumerate() {
            if let Some(g) = &gate {
                if !g.admit().await {
                    return;
                }
            }
            if i > 0 && !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
            // Counted before the send, so a client that has event N can
            // never observe `sent() < N`.
            if let Some(g) = &gate {
                g.mark_sent();
            }
            if tx.send(ev).await.is_err() {
                return;
            }
        }
    });
    let mut r = Response::new(ChanBody(rx).boxed());
    let hs = r.headers_mut();
    hs.insert(
        "content-type",
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    hs.insert("cache-control", HeaderValue::from_static("no-cache"));
    r
}

fn sse_event(event: Option<&str>, data: &Value) -> Bytes {
    match event {
        Some(e) => Bytes::from(format!("event: {e}\ndata: {data}\n\n")),
        None => Bytes::from(format!("data: {data}\n\n")),
    }
}

fn json_response(status: StatusCode, v: Value) -> Response<Body> {
    let body = Full::new(Bytes::from(v.to_string()))
        .map_err(|never| match never {})
        .boxed();
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    r
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).map(|v| v.to_str().unwrap_or("\u{fffd}"))
}

/// The token of a `Bearer` Authorization value (scheme case-insensitive).
fn bearer(v: &str) -> Option<&str> {
    let (scheme, rest) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

/// How OpenAI shows a wrong key: the first and last few characters.
fn mask(key: &str) -> String {
    if key.len() <= 8 {
        return format!("{}***", key.chars().take(2).collect::<String>());
    }
    format!("{}***{}", &key[..3], &key[key.len() - 4..])
}

fn hv(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap()
}

fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, w) in text.split(' ').enumerate() {
        out.push(if i == 0 {
            w.to_owned()
        } else {
            format!(" {w}")
        });
    }
    out
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The usual setup of an end-to-end test: a fresh network namespace (the
/// calling thread enters it), the fake APIs on their addresses, the stub DNS
/// on [`DNS_IP`]:53 serving their names, and a resolv.conf naming it.
pub struct FakeInternet {
    pub apis: FakeApis,
    pub dns: StubDns,
    /// Scratch directory (holds `resolv.conf`); removed on drop.
    pub dir: TempDir,
    pub resolv_conf: PathBuf,
    _ns: NetNs,
}

impl FakeInternet {
    /// [`standard_hosts`] with [`RealKeys::default`].
    pub fn start() -> FakeInternet {
        FakeInternet::start_with(RealKeys::default(), standard_hosts(), &[])
    }

    /// `extra_addrs` are further `lo` addresses for the namespace (e.g. a
    /// tokenizer's or a pass-through host's), as [`NetNs::enter_new`] takes them.
    pub fn start_with(keys: RealKeys, hosts: Vec<HostSpec>, extra_addrs: &[&str]) -> FakeInternet {
        let mut addrs = netns_addrs(&hosts);
        addrs.extend(extra_addrs.iter().map(|a| a.to_string()));
        let ns = NetNs::enter_new(&addrs.iter().map(String::as_str).collect::<Vec<_>>());
        let apis = FakeApis::start(keys, hosts);
        let dns = StubDns::start(
            SocketAddr::new(DNS_IP.parse().unwrap(), 53),
            apis.dns_records(),
        );
        let dir = TempDir::new("fakenet");
        let resolv_conf = write_resolv_conf(&dir.0, DNS_IP.parse().unwrap());
        FakeInternet {
            apis,
            dns,
            dir,
            resolv_conf,
            _ns: ns,
        }
    }

    /// A command that resolves through the stub DNS, with `HOME` set to the
    /// scratch directory and otherwise only `PATH` (add a cgroup, a user and
    /// the sandbox's env as needed).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> SandboxCommand {
        SandboxCommand::new(program)
            .resolv_conf(&self.resolv_conf)
            .env("HOME", &self.dir.0)
    }
}
