//! Sealed secrets and the tokenizer engine, wire-compatible with
//! superfly/tokenizer (see DESIGN.md, "The tokenizer protocol").
//!
//! - [`keys`]: open/seal keys; [`seal`]: sealing and opening.
//! - [`secret`]: the secret JSON, field for field as Go's.
//! - [`engine`]: applies `Proxy-Tokenizer` headers to a request; used by
//!   the standalone [`server`] and by the relay (embedded mode).
//! - [`client`]: the pooled, keep-alive, HTTP/2-capable HTTPS upstream client.

pub mod body;
pub mod client;
pub mod engine;
pub mod error;
pub mod flysrc;
pub mod header;
pub mod keys;
pub mod processor;
pub mod redact;
pub mod seal;
pub mod secret;
pub mod server;

pub use body::{BodyTransform, BoxError, ProxyBody};
pub use client::{UpstreamClient, UpstreamClientConfig};
pub use engine::{request_host, Applied, Engine};
pub use error::TokenizerError;
pub use flysrc::FlySrcVerifier;
pub use keys::{OpenKey, SealKey};
pub use seal::{open, seal};
pub use secret::Secret;
pub use server::{forward_request, serve, ServerConfig};
