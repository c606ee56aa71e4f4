//! The embedded tokenizer: the engine in-process, so an intercepted request
//! costs no extra hop. It receives exactly what a remote tokenizer would
//! (an absolute-form request with `Proxy-Tokenizer`) and answers with the
//! upstream's response.

use std::path::PathBuf;
use std::sync::Arc;

use http::{Request, Response};

use super::{errors::ForwardError, forward::BoxFuture, Forward, Limits, RelayBody};
use crate::tokenizer::{server, Engine, UpstreamClient, UpstreamClientConfig};

/// The engine plus its pooled HTTPS client to the upstream APIs.
pub struct EmbeddedTokenizer {
    config: server::TokenizerService,
}

impl EmbeddedTokenizer {
    /// Its upstream client trusts the system roots plus the `upstream_ca`
    /// files, never the sandbox's trust store, and dials within the
    /// relay's `connect_timeout`.
    pub fn new(
        engine: Engine,
        upstream_ca: &[PathBuf],
        limits: &Limits,
    ) -> anyhow::Result<Arc<Self>> {
        let upstream = UpstreamClientConfig {
            extra_ca_files: upstream_ca.to_vec(),
            connect_timeout: limits.connect_timeout,
            ..Default::default()
        };
        Ok(Arc::new(EmbeddedTokenizer {
            config: server::TokenizerService {
                engine: Arc::new(engine),
                client: UpstreamClient::new(&upstream)?,
                open_proxy: false,
            },
        }))
    }
}

impl Forward for EmbeddedTokenizer {
    fn forward(
        &self,
        req: Request<RelayBody>,
    ) -> BoxFuture<Result<Response<RelayBody>, ForwardError>> {
        let config = self.config.clone();
        Box::pin(async move {
            match server::forward_request(&config, req).await {
                // The engine knows what it injected: echoes are masked.
                Ok(f) => Ok(crate::tokenizer::redact::redact_response(
                    f.response, f.injected,
                )),
                Err(e) => Err(ForwardError::Engine {
                    status: e.status(),
                    message: e.to_string(),
                }),
            }
        })
    }
}
