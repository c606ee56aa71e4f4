//! Sealed secrets and the tokenizer engine, wire-compatible with
//! superfly/tokenizer: the same sealed-secret JSON, the same
//! `Proxy-Tokenizer` and `Proxy-Authorization` headers, the same processors.
//! It knows nothing of the relay or the kernel; the relay calls the
//! [`Engine`] in embedded mode.
//!
//! - [`keys`]: open/seal keys; [`seal`](mod@seal): sealing and opening.
//! - [`secret`]: the secret JSON, field for field as Go's.
//! - [`engine`]: applies `Proxy-Tokenizer` headers to a request; used by
//!   the standalone [`server`] and by the relay (embedded mode).
//! - [`processor`]: a secret's processor and the request's parameters
//!   turned into actions; [`body`] carries out the ones on the body.
//! - [`sigv4`]: `sigv4_processor`, re-signing AWS SigV4 requests.
//! - [`mint`]: the token-minting processors (jwt, client_credentials,
//!   github_app) and the sealing of their answers.
//! - [`redact`]: keeps injected credentials out of what upstream echoes.
//! - [`client`]: the pooled, keep-alive, HTTP/2-capable HTTPS upstream client.
//! - [`hop`]: the hop-by-hop header rules, shared with the relay.
//! - [`upgrade`]: WebSocket upgrades and the splice after 101, shared too.

pub mod body;
pub mod client;
pub mod engine;
pub mod error;
pub mod flysrc;
pub mod header;
pub mod hop;
pub mod keys;
pub mod macaroon;
pub mod mint;
pub mod processor;
mod query;
pub mod redact;
pub mod seal;
pub mod sealed_answer;
pub mod secret;
mod sensitive;
pub mod server;
pub mod sigv4;
pub mod upgrade;

pub use body::{BodyTransform, BoxError, ProxyBody};
pub use client::pool::{ClientConn, UpstreamBody};
pub use client::{UpstreamClient, UpstreamClientConfig};
pub use engine::{request_host, Applied, Engine};
pub use error::TokenizerError;
pub use flysrc::FlySrcVerifier;
pub use keys::{OpenKey, SealKey};
pub use seal::{open, seal};
pub use secret::Secret;
pub use server::{forward_request, serve_connection, TokenizerService};
