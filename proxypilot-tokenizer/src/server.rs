//! The standalone tokenizer: an HTTP/1.1 proxy taking absolute-form
//! requests (`GET http://api.example.com/x`), applying their sealed secrets
//! and forwarding them over TLS, as superfly/tokenizer does:
//!
//! - the upstream is always dialled with TLS; port 80 or none means 443,
//!   another port is kept, port 443 is refused ("proxied request must be
//!   HTTP": the client must not do TLS itself, or we could not inject);
//! - CONNECT is refused (Go tunnels CONNECT to ports other than 443;
//!   we do not implement that tunnel);
//! - origin-form requests are refused ("I'm not that kind of server");
//! - requests without a sealed secret are refused unless `open_proxy`.
//!
//! Unlike Go, client and upstream connections are kept alive and pooled.
//! WebSocket upgrades are relayed: the secret goes into the upgrade
//! request, and after the upstream's 101 the two connections are spliced.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{header, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::body::ProxyBody;
use super::client::UpstreamClient;
use super::engine::Engine;
use super::error::TokenizerError;
use super::upgrade;

/// An upgraded stream (WebSocket) with no byte moving either way for this
/// long is closed. The relay in front has its own, configurable one.
pub const STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// What a tokenizer serves with: the engine that opens sealed secrets and
/// the pooled client to the upstream APIs. The standalone server and the
/// embedded one (the relay's `EmbeddedTokenizer`) share it. Not a TLS
/// config, hence not `ServerConfig`.
#[derive(Clone, Debug)]
pub struct TokenizerService {
    pub engine: Arc<Engine>,
    pub client: UpstreamClient,
    /// Forward requests that carry no sealed secret.
    pub open_proxy: bool,
}

/// Serves proxy requests on one accepted connection (HTTP/1.1, keep-alive,
/// upgrades) until it ends. The accept loop is the caller's: the
/// `proxypilot tokenizer` command runs the one every listener shares.
pub async fn serve_connection(cfg: Arc<TokenizerService>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    // Each client connection gets its share of the upstream's streams.
    let client = crate::client::pool::ClientConn::next();
    let svc = service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(client);
        let cfg = cfg.clone();
        async move { Ok::<_, Infallible>(handle(&cfg, req, peer).await) }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades()
        .await
    {
        tracing::debug!(%peer, error = %e, "client connection ended with an error");
    }
}

async fn handle(
    cfg: &TokenizerService,
    mut req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<ProxyBody> {
    let start = Instant::now();
    let client_upgrade = upgrade::is_websocket_upgrade(req.version(), req.headers())
        .then(|| hyper::upgrade::on(&mut req));
    let (method, uri) = (req.method().clone(), req.uri().clone());
    let (host, path) = (
        uri.authority().map(|a| a.to_string()).unwrap_or_default(),
        uri.path().to_string(),
    );
    match forward_request(cfg, req).await {
        Ok(f) => {
            tracing::info!(%peer, %method, %host, %path, secrets = f.secrets, status = f.response.status().as_u16(),
                dur_ms = start.elapsed().as_millis() as u64, "proxied");
            let mut resp = super::redact::redact_response(f.response, f.injected);
            if let Some(client) =
                client_upgrade.filter(|_| resp.status() == StatusCode::SWITCHING_PROTOCOLS)
            {
                let counts = Arc::new(upgrade::SpliceCounts::default());
                let splice = upgrade::splice_after_101(
                    client,
                    &mut resp,
                    STREAM_IDLE_TIMEOUT,
                    counts.clone(),
                );
                tokio::spawn(async move {
                    let end = splice.await;
                    tracing::info!(%peer, %host, %path, ?end, bytes_up = counts.up.load(Ordering::Relaxed),
                        bytes_down = counts.down.load(Ordering::Relaxed),
                        dur_ms = start.elapsed().as_millis() as u64, "upgraded stream ended");
                });
            }
            resp
        }
        Err(e) => {
            tracing::warn!(%peer, %method, %host, %path, status = e.status().as_u16(), error = %e,
                dur_ms = start.elapsed().as_millis() as u64, "refused");
            e.to_response()
                .map(|b| b.map_err(|e| match e {}).boxed_unsync())
        }
    }
}

/// Handle one proxy request as the standalone server does, without the
/// server: this is the embedded front door (the relay hands it the same
/// absolute-form request it would send a remote tokenizer). Returns the
/// upstream's response, streamed, and how many secrets were applied.
/// What [`forward_request`] hands back.
pub struct Forwarded {
    pub response: Response<ProxyBody>,
    /// How many sealed secrets were applied.
    pub secrets: usize,
    /// The plaintext values injected, for redacting echoes of them.
    pub injected: super::redact::InjectedTokens,
}

pub async fn forward_request<B>(
    cfg: &TokenizerService,
    req: Request<B>,
) -> Result<Forwarded, TokenizerError>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<super::body::BoxError>,
{
    let (mut parts, body) = req.into_parts();
    let bad = |m: &str| TokenizerError::BadProxyRequest(m.to_string());
    if parts.method == Method::CONNECT {
        return Err(if parts.uri.port_u16() == Some(443) {
            bad("proxied request must be HTTP: CONNECT to port 443 is refused; send the request in \
                 absolute form (GET http://host/path) and the tokenizer dials the host with TLS")
        } else {
            bad("CONNECT is not supported; send requests in absolute form (GET http://host/path)")
        });
    }
    match parts.uri.scheme_str() {
        Some("http") => {}
        Some(_) => {
            return Err(bad(
                "proxied request must be HTTP: send http://host/path and the tokenizer \
                            dials the host with TLS",
            ))
        }
        None => {
            return Err(bad(
                "I'm not that kind of server: send proxy requests in absolute form \
                            (GET http://host/path)",
            ))
        }
    }
    let authority = parts
        .uri
        .authority()
        .cloned()
        .ok_or_else(|| bad("must specify host"))?;
    let port = match authority.port_u16() {
        Some(443) => {
            return Err(bad(
                "proxied request must be HTTP: port 443 means the client speaks TLS; \
                            send http://host/path and the tokenizer dials port 443 with TLS",
            ))
        }
        Some(80) | None => 443,
        Some(p) => p,
    };
    if authority.host().is_empty() {
        return Err(bad("must specify host"));
    }

    let upgrade = crate::upgrade::is_websocket_upgrade(parts.version, &parts.headers);
    crate::hop::strip(&mut parts.headers);
    if upgrade {
        crate::upgrade::set_upgrade_headers(&mut parts.headers);
    }
    let applied = cfg.engine.apply(&mut parts)?;
    for name in crate::hop::FLY_HOP_HEADERS {
        parts.headers.remove(name);
    }
    if applied.secrets == 0 && !cfg.open_proxy {
        return Err(TokenizerError::NoSecret);
    }

    let host = authority.host();
    let up_authority = if port == 443 {
        host.to_string()
    } else {
        format!("{host}:{port}")
    };
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    parts.uri = Uri::builder()
        .scheme("https")
        .authority(up_authority.as_str())
        .path_and_query(pq)
        .build()
        .map_err(|e| bad(&format!("bad upstream URI: {e}")))?;
    // The client derives Host (HTTP/1) or :authority (HTTP/2) from the URI.
    parts.headers.remove(header::HOST);
    parts.version = Version::HTTP_11;

    let body = applied.body.apply(&mut parts.headers, body).await?;
    let req = Request::from_parts(parts, body);
    let resp = if upgrade {
        cfg.client.send_upgrade(req).await?
    } else {
        cfg.client.send(req).await?
    };
    // A 101 keeps the upstream connection in its extensions
    // (`hyper::upgrade::on`); the caller sets its own hop's upgrade headers.
    let (mut rparts, rbody) = resp.into_parts();
    crate::hop::strip(&mut rparts.headers);
    let rbody = rbody
        .map_err(|e| -> super::body::BoxError { Box::new(e) })
        .boxed_unsync();
    let mut response = Response::from_parts(rparts, rbody);
    if let Some(sealer) = applied.mint {
        // A minting secret: the client gets the token sealed, never plain.
        response = sealer.seal(response).await?;
    }
    Ok(Forwarded {
        response,
        secrets: applied.secrets,
        injected: applied.injected,
    })
}
