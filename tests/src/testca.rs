//! The tests' one CA: throwaway, for the fake upstreams (in a network
//! namespace, [`crate::upstream`], or on loopback, [`crate::loopback`]).
//!
//! It stands for the public web PKI: only the tokenizer side (proxypilot's
//! `--upstream-ca`, or a test's own rustls client) trusts it. The sandbox
//! never does; it trusts proxypilot's CA only, so a test that wires this CA
//! into the sandbox would hide an interception failure.

use std::{fs, path::Path, sync::Arc};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A self-signed ECDSA P-256 CA that issues server certificates.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A server certificate (leaf then CA) and its key.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub chain: Vec<CertificateDer<'static>>,
    pub key_der: Vec<u8>,
}

impl Issued {
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

/// The crypto provider every rustls config here uses, chosen explicitly so
/// the process-wide default never matters.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TestCa {
    pub fn new(common_name: &str) -> TestCa {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "proxypilot tests");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("self-sign CA");
        TestCa { cert, key }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    pub fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// Writes the CA certificate PEM (e.g. for `--upstream-ca`, curl's
    /// `--cacert`, or `SSL_CERT_FILE`).
    pub fn write_pem(&self, path: &Path) {
        fs::write(path, self.pem()).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// Issues a server certificate for `names`: DNS names, or IP literals
    /// (which become IP SANs).
    pub fn issue(&self, names: &[&str]) -> Issued {
        let key = KeyPair::generate().expect("leaf key");
        let sans: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).expect("SANs");
        params.distinguished_name = DistinguishedName::new();
        if let Some(first) = names.first() {
            params.distinguished_name.push(DnType::CommonName, *first);
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("sign leaf");
        Issued {
            cert_pem: format!("{}{}", cert.pem(), self.pem()),
            key_pem: key.serialize_pem(),
            chain: vec![cert.der().clone(), self.der()],
            key_der: key.serialize_der(),
        }
    }

    /// A rustls server config presenting a certificate for `names`, with
    /// the given ALPN protocols (e.g. `[b"h2", b"http/1.1"]`).
    pub fn server_config(&self, names: &[&str], alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let issued = self.issue(names);
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(issued.chain.clone(), issued.private_key())
            .expect("server cert");
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(cfg)
    }

    /// A rustls client config that trusts only this CA.
    pub fn client_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        client_config_trusting(self.der(), alpn)
    }
}

/// A rustls client config that trusts only `root` (this harness's CA, or
/// proxypilot's), offering the ALPN protocols `alpn`.
pub fn client_config_trusting(
    root: CertificateDer<'static>,
    alpn: &[&[u8]],
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}
