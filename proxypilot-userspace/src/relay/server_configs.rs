//! One rustls `ServerConfig` per leaf certificate, built once and shared
//! by every connection presenting that leaf. Cloning the whole config for
//! each connection (its suites, groups, ALPN list and a new `Arc`) cost
//! every handshake an allocation burst for nothing (issue 20).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use crate::tls::leaf::{FixedCert, DEFAULT_CAPACITY};

/// A leaf and the config built to present it.
type Built = (Arc<CertifiedKey>, Arc<ServerConfig>);

pub(super) struct ServerConfigs {
    /// Everything but the certificate.
    base: Arc<ServerConfig>,
    /// Host → the leaf its config was built for, and that config. A host
    /// whose leaf was re-minted (expiry, a new CA) gets a new config.
    by_host: Mutex<HashMap<String, Built>>,
}

impl ServerConfigs {
    pub(super) fn new(base: ServerConfig) -> Self {
        ServerConfigs {
            base: Arc::new(base),
            by_host: Mutex::new(HashMap::new()),
        }
    }

    /// The config that presents `leaf` for `host`.
    pub(super) fn for_leaf(&self, host: &str, leaf: Arc<CertifiedKey>) -> Arc<ServerConfig> {
        let mut by_host = self.by_host.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((cached, cfg)) = by_host.get(host) {
            if Arc::ptr_eq(cached, &leaf) {
                return cfg.clone();
            }
        }
        let mut cfg = (*self.base).clone();
        cfg.cert_resolver = Arc::new(FixedCert(leaf.clone()));
        let cfg = Arc::new(cfg);
        // Bounded like the leaf cache: only intercepted hosts get here.
        if by_host.len() >= DEFAULT_CAPACITY {
            by_host.clear();
        }
        by_host.insert(host.to_string(), (leaf, cfg.clone()));
        cfg
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{ca::CertAuthority, leaf::LeafCache};
    use std::time::Duration;

    fn base() -> ServerConfig {
        ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(super::super::handshake::NoCert))
    }

    #[tokio::test]
    async fn one_config_per_leaf_and_a_new_one_for_a_new_leaf() {
        let hosts = vec!["api.example.com".to_string(), "api.other.com".to_string()];
        let ca = Arc::new(CertAuthority::ephemeral(&hosts).unwrap());
        let leaves = LeafCache::new(ca.clone(), Duration::from_secs(3600), 16);
        let configs = ServerConfigs::new(base());
        let leaf = leaves.get("api.example.com").await.unwrap();
        let first = configs.for_leaf("api.example.com", leaf.clone());
        let again = configs.for_leaf("api.example.com", leaf);
        assert!(
            Arc::ptr_eq(&first, &again),
            "the same leaf rebuilt its config"
        );
        let other = configs.for_leaf("api.other.com", leaves.get("api.other.com").await.unwrap());
        assert!(!Arc::ptr_eq(&first, &other));
        // A re-minted leaf (another cache, as after a CA change) gets its own.
        let fresh = LeafCache::new(ca, Duration::from_secs(3600), 16);
        let renewed = configs.for_leaf(
            "api.example.com",
            fresh.get("api.example.com").await.unwrap(),
        );
        assert!(
            !Arc::ptr_eq(&first, &renewed),
            "a new leaf kept the old config"
        );
    }
}
