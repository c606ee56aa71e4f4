//! Stage four of an intercepted connection: HTTP/1.1 or HTTP/2 on the TLS
//! stream (hyper's auto server), each request admitted, turned into the
//! tokenizer's request, forwarded, and its response streamed back.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::body::{Capped, Counted, Direction, RequestScope};
use super::context::ConnCtx;
use super::errors::{error_response, RelayError};
use super::{BoxError, Relay, RelayBody};
use crate::audit::{redact_path, RequestAudit, RequestInfo};
use crate::hop::{self, HopByHop};

/// Serves HTTP on an established TLS stream until the client is done, an
/// error occurs, no request arrives within `header_read_timeout` of the
/// handshake (HTTP/2 too: hyper bounds only HTTP/1.1's headers), an HTTP/2
/// header block stays open that long (`headers`: see `h2_headers`), or no
/// request is in flight for `idle_timeout`. Bytes that are not requests
/// (PINGs, SETTINGS, a trickled preface) keep nothing open.
pub(crate) async fn serve_http<S>(
    io: S,
    ctx: Arc<ConnCtx>,
    headers: Arc<super::h2_headers::OpenHeaderBlock>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let relay = ctx.relay.clone();
    let idle = relay.limits.idle_timeout;
    let first_request = relay.limits.header_read_timeout;
    let stall = relay.limits.stall_timeout;
    let active = ctx.active.clone();
    let this = ctx.clone();
    // The upstream pool gives each client connection a share of the
    // upstream's HTTP/2 streams.
    let client = crate::tokenizer::ClientConn::next();
    let svc = service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(client);
        handle(ctx.clone(), req)
    });
    let conn = relay
        .http
        .serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let shortest = idle.min(first_request).min(stall);
    let mut tick = tokio::time::interval((shortest / 4).max(Duration::from_millis(20)));
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "intercepted connection ended with an error");
                }
                // After a 101, hyper has handed the connection over.
                this.streams.wait().await;
                return;
            }
            _ = tick.tick() => {
                let cut = this.stalls.cut_stalled(stall);
                if cut > 0 {
                    tracing::warn!(sni = %this.sni, cut, ?stall, "cut downloads the client stopped reading (--stall-timeout)");
                }
                let late = active.none_yet() && active.age() >= first_request;
                if late {
                    tracing::debug!(timeout = ?first_request, "no request within the header read timeout; closing");
                }
                let stuck = headers.open_for().is_some_and(|open| open >= first_request);
                if stuck {
                    const REASON: &str = "an HTTP/2 header block was not finished within the header read timeout";
                    let (pid, comm) = (this.audit.pid.unwrap_or(0), this.audit.comm.as_deref().unwrap_or(""));
                    if crate::logbudget::refusals().admit(REASON, pid, comm) {
                        tracing::warn!(sni = %this.sni, pid, comm, timeout = ?first_request, reason = REASON, "closing connection");
                    }
                }
                if late || stuck || active.idle_for().is_some_and(|quiet| quiet >= idle) {
                    tracing::debug!(?idle, "closing idle intercepted connection");
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn.as_mut()).await;
                    return;
                }
            }
        }
    }
}

async fn handle(
    ctx: Arc<ConnCtx>,
    mut req: Request<Incoming>,
) -> Result<Response<RelayBody>, Infallible> {
    let upgrade = super::upgrade::ClientUpgrade::take(&mut req);
    let relay = ctx.live.get();
    let info = RequestInfo {
        conn: ctx.audit.clone(),
        method: req.method().clone(),
        path: redact_path(req.uri().path_and_query().map_or("/", |p| p.as_str())),
    };
    let scope = Arc::new(RequestScope::new(
        RequestAudit::new(info),
        ctx.active.clone(),
        relay.metrics().clone(),
    ));
    let resp = match relay_request(&ctx, &relay, req, upgrade, &scope).await {
        Ok(resp) => {
            if let Some(r) = resp
                .extensions()
                .get::<crate::tokenizer::redact::Redactions>()
            {
                scope.audit.set_redactions(r.clone());
            }
            resp
        }
        Err(e) => {
            tracing::warn!(sni = %ctx.sni, secret = %ctx.secret_name, error = %e, "request not relayed");
            relay.metrics().relay_error(&e);
            error_response(&e)
        }
    };
    scope.audit.set_status(resp.status().as_u16());
    let stalls = &ctx.stalls;
    Ok(resp.map(|b| {
        stalls
            .watch(Counted::new(b, scope, Direction::Out).boxed_unsync())
            .boxed_unsync()
    }))
}

/// One request, under `relay` (the live one): admitted, turned into the
/// upstream (tokenizer) request, forwarded, and its response made ready
/// for the client.
async fn relay_request(
    ctx: &ConnCtx,
    relay: &Relay,
    req: Request<Incoming>,
    upgrade: Option<super::upgrade::ClientUpgrade>,
    scope: &Arc<RequestScope>,
) -> Result<Response<RelayBody>, RelayError> {
    let credential =
        relay
            .credentials
            .get(&ctx.sni)
            .ok_or_else(|| RelayError::NoLongerIntercepted {
                host: ctx.sni.clone(),
            })?;
    let (parts, body) = req.into_parts();
    let uri = admit(ctx, relay, &parts, &body, &scope.audit)?;
    let client = parts
        .extensions
        .get::<crate::tokenizer::ClientConn>()
        .copied();
    let minted = match relay.minted(&ctx.sni) {
        None => None,
        Some(m) => Some(super::minted::use_token(ctx, relay, m, &scope.audit).await?),
    };
    let (mut out, over_cap) = upstream_request(relay, credential, minted, parts, body, uri, scope)?;
    if let Some(c) = client {
        out.extensions_mut().insert(c);
    }
    if upgrade.is_some() {
        crate::tokenizer::upgrade::set_upgrade_headers(out.headers_mut());
    }
    let asked = Instant::now();
    let forwarded = relay.forwarder.forward(out, relay.limits.response_timeout);
    let resp = forwarded.await.map_err(|e| {
        // The forwarder failed because our body ended in an error: say why.
        match (relay.limits.max_request_body, &over_cap) {
            (Some(limit), Some(t)) if t.load(Ordering::SeqCst) => {
                RelayError::BodyTooLarge { limit }
            }
            _ => e.into(),
        }
    })?;
    relay
        .metrics()
        .tokenizer_answered(&ctx.sni, asked.elapsed());
    let resp = downstream_response(resp);
    match upgrade {
        Some(client) => super::upgrade::answer(ctx, relay, client, resp, scope),
        None => Ok(resp),
    }
}

/// The per-request checks, cheapest first, before anything reaches the
/// tokenizer: Host/`:authority` against the server name, no CONNECT, the
/// host's `--permit`s, the declared body size, then the host's rate limit
/// (last, so a request refused anyway takes no token). Returns the
/// upstream URI.
/// The largest request header line (name and value) relayed. nginx's
/// default buffer is 8 KiB, and a 12 KB header made an nginx upstream close
/// the whole shared HTTP/2 connection with GOAWAY, failing every other
/// sandbox client's requests on it (issue 21): such a request is answered
/// 431 here and costs only itself.
pub const MAX_HEADER_FIELD: usize = 8 * 1024;

fn admit(
    ctx: &ConnCtx,
    relay: &Relay,
    parts: &http::request::Parts,
    body: &Incoming,
    audit: &RequestAudit,
) -> Result<http::Uri, RelayError> {
    check_authority(parts, &ctx.sni, ctx.port)?;
    if let Some((name, value)) = parts
        .headers
        .iter()
        .find(|(n, v)| n.as_str().len() + v.len() > MAX_HEADER_FIELD)
    {
        return Err(RelayError::HeaderFieldTooLarge {
            name: name.to_string(),
            size: name.as_str().len() + value.len(),
            limit: MAX_HEADER_FIELD,
        });
    }
    let authority = if ctx.port == 443 {
        ctx.sni.clone()
    } else {
        format!("{}:{}", ctx.sni, ctx.port)
    };
    if parts.method == http::Method::CONNECT {
        return Err(RelayError::BadRequest(
            "CONNECT is not supported inside an intercepted connection".into(),
        ));
    }
    let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let uri = tokenizer_uri(&authority, pq)?;
    let decision = relay.rules.check(&ctx.sni, &parts.method, uri.path());
    audit.set_rule_decision(crate::audit::RuleOutcome {
        decision: decision.name(),
        rule: decision.rule(),
    });
    if let super::rules::Decision::Refused(r) = decision {
        return Err(RelayError::NotPermitted(r));
    }
    // hyper gives a declared Content-Length (HTTP/1.1 or HTTP/2) as the
    // exact size hint.
    if let Some(cap) = relay
        .limits
        .max_request_body
        .filter(|&cap| body.size_hint().lower() > cap)
    {
        return Err(RelayError::BodyTooLarge { limit: cap });
    }
    relay
        .rate
        .acquire(&ctx.sni)
        .map_err(|t| RelayError::RateLimited {
            host: ctx.sni.clone(),
            per_second: t.per_second,
            retry_after: t.retry_after,
        })?;
    Ok(uri)
}

/// The tokenizer-shaped request: absolute-form URI, HTTP/1.1, the client's
/// forwardable headers plus `Proxy-Tokenizer`, `Proxy-Authorization` and
/// `fly-src-optin`, identity encoding, and the body counted and capped.
/// The flag, when the body is capped, says whether the cap tripped.
fn upstream_request(
    relay: &Relay,
    credential: &super::credentials::Credential,
    minted: Option<HeaderValue>,
    parts: http::request::Parts,
    body: Incoming,
    uri: http::Uri,
    scope: &Arc<RequestScope>,
) -> Result<(Request<RelayBody>, Option<Arc<AtomicBool>>), RelayError> {
    let mut headers = forwardable_headers(&parts.headers);
    // `tokenizer_uri` made the URI's authority exactly the connection's.
    let authority = uri.authority().map_or("", |a| a.as_str());
    let host =
        HeaderValue::from_str(authority).map_err(|e| RelayError::BadRequest(e.to_string()))?;
    headers.insert(header::HOST, host);
    // A minted token is sent bare: it carries its own header and format.
    let values = match minted {
        Some(sealed) => vec![sealed],
        None => credential.tokenizer_headers(&parts.headers),
    };
    for value in values {
        headers.append(HeaderName::from_static("proxy-tokenizer"), value);
    }
    if let Some(auth) = &relay.proxy_authorization {
        headers.insert(header::PROXY_AUTHORIZATION, auth.clone());
    }
    headers.insert(
        HeaderName::from_static("fly-src-optin"),
        HeaderValue::from_static("*"),
    );
    // Echoes of the key are masked only in uncompressed responses (the
    // embedded engine refuses a compressed one): the sandbox must not get
    // to choose compression.
    crate::tokenizer::redact::ask_for_identity(&mut headers);

    let mut body = body.map_err(|e| Box::new(e) as BoxError).boxed_unsync();
    let mut over_cap = None;
    if let Some(cap) = relay.limits.max_request_body {
        let (b, t) = Capped::new(body, cap, scope.clone());
        body = b.boxed_unsync();
        over_cap = Some(t);
    }
    let body = Counted::new(body, scope.clone(), Direction::In).boxed_unsync();
    let mut out = Request::new(body);
    *out.method_mut() = parts.method;
    *out.uri_mut() = uri;
    *out.version_mut() = Version::HTTP_11; // the tokenizer speaks HTTP/1.1
    *out.headers_mut() = headers;
    Ok((out, over_cap))
}

/// The upstream's response as the client gets it: hop-by-hop headers
/// removed; hyper re-frames it for the client's HTTP version.
fn downstream_response(mut resp: Response<RelayBody>) -> Response<RelayBody> {
    hop::strip(resp.headers_mut());
    *resp.version_mut() = Version::HTTP_11;
    resp
}

/// `http://authority/path?query`, refusing any target that would change
/// the authority (an HTTP/2 `:path` of `@evil.com/` would otherwise turn
/// into `http://api.x.com@evil.com/` and send the secret elsewhere).
fn tokenizer_uri(authority: &str, pq: &str) -> Result<http::Uri, RelayError> {
    let bad = |why: &str| RelayError::BadRequest(format!("request target {pq:?}: {why}"));
    if !pq.starts_with('/') {
        return Err(bad("must start with /"));
    }
    let uri: http::Uri = format!("http://{authority}{pq}")
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
    if uri.authority().map(|a| a.as_str()) != Some(authority) {
        return Err(bad("it changes the host"));
    }
    Ok(uri)
}

/// The request's Host / :authority must name the TLS server name, so one
/// host's connection (and secret) cannot be used for another host.
fn check_authority(parts: &http::request::Parts, sni: &str, port: u16) -> Result<(), RelayError> {
    let from_uri = parts.uri.authority().map(|a| a.as_str().to_string());
    let from_header = match parts.headers.get(header::HOST) {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| RelayError::BadRequest("Host header is not ASCII".into()))?
                .to_string(),
        ),
        None => None,
    };
    if from_uri.is_none() && from_header.is_none() {
        return Err(RelayError::MissingHost);
    }
    for auth in from_uri.iter().chain(from_header.iter()) {
        if !authority_matches(auth, sni, port) {
            return Err(RelayError::Misdirected {
                host: auth.clone(),
                sni: sni.to_string(),
            });
        }
    }
    Ok(())
}

/// `api.x.com`, `API.x.com.`, `api.x.com:443` match SNI `api.x.com`.
pub(crate) fn authority_matches(auth: &str, sni: &str, port: u16) -> bool {
    let (host, p) = match auth.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
            (h, p.parse::<u16>().ok())
        }
        Some(_) => return false,
        None => (auth, None),
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    host.eq_ignore_ascii_case(sni) && p.is_none_or(|p| p == 443 || p == port)
}

/// The client's headers minus hop-by-hop ones, minus anything the sandbox
/// could use to steer the tokenizer (`Proxy-*`: it must not add its own
/// sealed secrets or credentials) or to spoof Fly's source attestation.
/// HTTP/2 may split Cookie into several fields; HTTP/1.1 wants one.
fn forwardable_headers(inbound: &HeaderMap) -> HeaderMap {
    let drop = HopByHop::of(inbound);
    let mut out = HeaderMap::with_capacity(inbound.len() + 4);
    let mut cookies: Vec<&[u8]> = Vec::new();
    for (name, value) in inbound {
        let n = name.as_str();
        if drop.contains(name)
            || n.starts_with("proxy-")
            || n.starts_with("fly-src")
            || name == header::HOST
        {
            continue;
        }
        if name == header::COOKIE {
            cookies.push(value.as_bytes());
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    if !cookies.is_empty() {
        if let Ok(v) = HeaderValue::from_bytes(&cookies.join(&b"; "[..])) {
            out.insert(header::COOKIE, v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_matching() {
        assert!(authority_matches("api.x.com", "api.x.com", 443));
        assert!(authority_matches("API.X.com.", "api.x.com", 443));
        assert!(authority_matches("api.x.com:443", "api.x.com", 443));
        assert!(authority_matches("api.x.com:8443", "api.x.com", 8443));
        assert!(!authority_matches("api.x.com:8443", "api.x.com", 443));
        assert!(!authority_matches("evil.com", "api.x.com", 443));
        assert!(!authority_matches("api.x.com.evil.com", "api.x.com", 443));
        assert!(!authority_matches("api.x.com:", "api.x.com", 443));
        assert!(!authority_matches("api.x.com:abc", "api.x.com", 443));
    }

    #[test]
    fn tokenizer_uri_keeps_the_authority() {
        let u = tokenizer_uri("api.x.com", "/v1/m?a=b").unwrap();
        assert_eq!(u.to_string(), "http://api.x.com/v1/m?a=b");
        let u = tokenizer_uri("api.x.com:8443", "//evil.com/x").unwrap();
        assert_eq!(u.host(), Some("api.x.com"));
        for bad in ["@evil.com/", "evil.com/", "*", ""] {
            assert!(tokenizer_uri("api.x.com", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn headers_filtered() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, x-drop-me".parse().unwrap());
        h.insert("x-drop-me", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert("proxy-tokenizer", "sandbox-supplied".parse().unwrap());
        h.insert("proxy-authorization", "Bearer x".parse().unwrap());
        h.insert("fly-src", "spoof".parse().unwrap());
        h.insert("host", "api.x.com".parse().unwrap());
        h.insert("content-type", "application/json".parse().unwrap());
        h.insert("authorization", "Bearer dummy".parse().unwrap());
        h.append("cookie", "a=1".parse().unwrap());
        h.append("cookie", "b=2".parse().unwrap());
        let out = forwardable_headers(&h);
        let names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        assert_eq!(out.len(), 3, "{names:?}");
        assert_eq!(out["content-type"], "application/json");
        assert_eq!(out["authorization"], "Bearer dummy");
        assert_eq!(out["cookie"], "a=1; b=2");
    }
}
