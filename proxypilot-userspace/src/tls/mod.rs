//! TLS for intercepted connections: the sidecar's name-constrained CA
//! (`ca`), per-host leaf certificates (`leaf`), reading the ClientHello
//! without consuming it (`hello`) and replaying it (`rewind`).

pub mod ca;
pub mod hello;
pub mod leaf;
pub mod rewind;

/// Installs ring as rustls' process-wide crypto provider if none is set yet.
/// Everything here builds configs with an explicit provider, but third-party
/// code (and tests) may call `ServerConfig::builder()`; harmless if repeated.
pub fn ensure_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The crypto provider this crate uses for every rustls config.
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}
