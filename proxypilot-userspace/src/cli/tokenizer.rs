//! `proxypilot tokenizer`: the standalone tokenizer server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;

use crate::tokenizer::{
    serve_connection, Engine, FlySrcVerifier, TokenizerService, UpstreamClient,
    UpstreamClientConfig,
};

/// Run a tokenizer: an HTTP proxy that opens sealed secrets and injects
/// them, wire-compatible with superfly/tokenizer.
///
/// Clients send absolute-form requests (GET http://api.example.com/x) with
/// `Proxy-Tokenizer: <sealed secret>`; the tokenizer dials the host with TLS
/// (port 80 or none means 443) and forwards the request with the secret
/// injected. CONNECT and requests to port 443 are refused.
#[derive(clap::Args, Debug)]
pub struct TokenizerArgs {
    /// Address to listen on. Keep it unreachable from sandboxes.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// The open (private) key, as written by `proxypilot keygen --out`.
    #[arg(long, value_name = "FILE")]
    pub open_key_file: PathBuf,

    /// Also trust this PEM CA bundle for upstream TLS (on top of the system
    /// roots, which honour SSL_CERT_FILE / SSL_CERT_DIR). Repeatable.
    #[arg(long, value_name = "FILE")]
    pub upstream_ca: Vec<PathBuf>,

    /// Forward requests that carry no sealed secret too.
    #[arg(long)]
    pub open_proxy: bool,

    /// Ed25519 public key (64 hex digits, or a file holding them such as
    /// /.fly/fly-src.pub) that verifies Fly-Src headers for fly_src_auth
    /// secrets. Without it, fly_src_auth secrets are refused.
    #[arg(long, value_name = "HEX|FILE")]
    pub fly_src_pubkey: Option<String>,

    /// Connect to ADDR for HOST:PORT instead of resolving HOST (like curl's
    /// --resolve; TLS still verifies HOST). For tests and overrides.
    #[arg(long, value_name = "HOST:PORT:ADDR", value_parser = parse_resolve)]
    pub resolve: Vec<(String, SocketAddr)>,

    /// Do not offer HTTP/2 to upstreams.
    #[arg(long)]
    pub no_http2: bool,
}

fn parse_resolve(s: &str) -> Result<(String, SocketAddr), String> {
    // HOST:PORT:ADDR where ADDR is IP:PORT or [IPv6]:PORT.
    let mut it = s.splitn(3, ':');
    let (Some(h), Some(p), Some(a)) = (it.next(), it.next(), it.next()) else {
        return Err("expected HOST:PORT:ADDR, e.g. api.example.com:443:127.0.0.1:8443".into());
    };
    let port: u16 = p.parse().map_err(|_| format!("bad port {p:?}"))?;
    let addr: SocketAddr = a
        .parse()
        .map_err(|_| format!("bad address {a:?} (want IP:PORT)"))?;
    Ok((format!("{h}:{port}"), addr))
}

impl TokenizerArgs {
    /// The server configuration these flags describe.
    pub fn service(&self) -> anyhow::Result<TokenizerService> {
        let mut engine = Engine::from_file(&self.open_key_file)?;
        if let Some(k) = &self.fly_src_pubkey {
            engine = engine.with_fly_src_verifier(FlySrcVerifier::from_hex_or_file(k)?);
        }
        let client = UpstreamClient::new(&UpstreamClientConfig {
            extra_ca_files: self.upstream_ca.clone(),
            resolve: self.resolve.iter().cloned().collect(),
            http2: !self.no_http2,
            ..Default::default()
        })?;
        Ok(TokenizerService {
            engine: Arc::new(engine),
            client,
            open_proxy: self.open_proxy,
        })
    }
}

pub async fn run(args: TokenizerArgs) -> anyhow::Result<ExitCode> {
    let config = args.service()?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    tracing::info!(
        address = %listener.local_addr()?,
        seal_key = %config.engine.seal_key(),
        open_proxy = args.open_proxy,
        fly_src = args.fly_src_pubkey.is_some(),
        "tokenizer listening"
    );
    tokio::select! {
        _ = serve(listener, config) => {}
        _ = super::shutdown_signal() => tracing::info!("shutting down"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Serves the tokenizer on `listener` through the accept loop every
/// listener shares, until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, config: TokenizerService) {
    let config = Arc::new(config);
    crate::accept::serve(
        listener,
        "tokenizer",
        crate::accept::every(move |stream, peer| serve_connection(config.clone(), stream, peer)),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_parse() {
        assert_eq!(
            parse_resolve("api.x:443:127.0.0.1:8443").unwrap(),
            ("api.x:443".to_string(), "127.0.0.1:8443".parse().unwrap())
        );
        assert_eq!(
            parse_resolve("a:80:[::1]:1").unwrap().1,
            "[::1]:1".parse().unwrap()
        );
        assert!(parse_resolve("a:443").is_err());
    }
}
