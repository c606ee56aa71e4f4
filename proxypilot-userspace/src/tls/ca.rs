//! The sidecar's certificate authority.
//!
//! An ECDSA P-256 CA created on first start in the state directory. Its
//! certificate carries a *critical* nameConstraints extension permitting
//! exactly the intercepted hosts as DNS names, so a sandbox that trusts it
//! trusts it for nothing else (rcgen 0.13 always marks the extension
//! critical; the tests check it with openssl).
//!
//! Re-issue policy: when the set of intercepted hosts changes (or the
//! certificate nears expiry) a NEW key and certificate are generated. A new
//! key means an old certificate that is still trusted somewhere, possibly
//! with a wider constraint, can never validate anything we sign again. The
//! cost is the same either way: the sandbox must re-trust the new
//! certificate (from `--ca-out`, `ca-cert.pem` in the state dir, or
//! `/ca.pem` on the info port), which is logged.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    GeneralSubtree, IsCa, KeyPair, KeyUsagePurpose, NameConstraints, SanType, SerialNumber,
    PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Key file name inside the state dir (PEM, PKCS#8, mode 0600).
pub const KEY_FILE: &str = "ca-key.pem";
/// Certificate file name inside the state dir (PEM): what the sandbox trusts.
pub const CERT_FILE: &str = "ca-cert.pem";
/// What the certificate was issued for, so a restart can tell if it fits.
pub const META_FILE: &str = "ca-meta.json";

const CA_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Re-issue when less than this is left, so leaves never outlive the CA.
const CA_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Leaves are valid from this long before they are minted.
pub const LEAF_BACKDATE: Duration = Duration::from_secs(300);
/// Permitted when no host is intercepted: an empty permitted list would make
/// rcgen drop the extension entirely, i.e. an unconstrained CA.
const NOTHING_HOST: &str = "proxypilot.invalid";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CA state dir {path}: {source}; check that it exists and is writable by proxypilot (--state-dir)")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "CA files in {dir} are unreadable ({detail}); move them away to have a new CA generated"
    )]
    Corrupt { dir: PathBuf, detail: String },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{host} is not an intercepted host; the CA only signs for {allowed:?}")]
    NotPermitted { host: String, allowed: Vec<String> },
}

/// How `load_or_create` obtained the CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaOrigin {
    Created,
    Loaded,
    /// Re-issued with a new key; the sandbox must re-trust the certificate.
    Reissued {
        reason: String,
    },
    /// Never written to disk (tests, `--state-dir` unset).
    Ephemeral,
}

#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct Meta {
    hosts: Vec<String>,
    not_before: i64,
    not_after: i64,
}

/// A certificate and key for one leaf, in the forms rustls wants.
pub struct IssuedLeaf {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
    pub not_after: SystemTime,
}

/// The CA: its key, its certificate, and the hosts it is constrained to.
pub struct CertAuthority {
    hosts: Vec<String>,
    cert_pem: String,
    cert_path: Option<PathBuf>,
    origin: CaOrigin,
    /// rcgen needs an issuer `Certificate` to sign with; only its subject
    /// name and key identifier matter, and both are rebuilt identically.
    issuer: rcgen::Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertAuthority")
            .field("hosts", &self.hosts)
            .field("cert_path", &self.cert_path)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl CertAuthority {
    /// Loads the CA from `state_dir`, or creates it, or re-issues it when
    /// `hosts` differ from what it was issued for. `hosts` must already be
    /// normalised (lowercase DNS names, see `policy::normalize_host`).
    pub fn load_or_create(state_dir: &Path, hosts: &[String]) -> Result<Self, CaError> {
        let hosts = sorted(hosts);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CaError::Io { path, source }
        };
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(io(state_dir))?;
        let key_path = state_dir.join(KEY_FILE);
        let cert_path = state_dir.join(CERT_FILE);
        let meta_path = state_dir.join(META_FILE);

        let reissue_reason = if !key_path.exists() || !cert_path.exists() || !meta_path.exists() {
            None
        } else {
            let meta: Meta = read_meta(&meta_path)?;
            let left = meta.not_after - OffsetDateTime::now_utc().unix_timestamp();
            if meta.hosts != hosts {
                Some(format!(
                    "intercepted hosts changed from {:?} to {:?}",
                    meta.hosts, hosts
                ))
            } else if left < CA_RENEW_BEFORE.as_secs() as i64 {
                Some("the CA certificate expires within 30 days".to_string())
            } else {
                let key_pem = fs::read_to_string(&key_path).map_err(io(&key_path))?;
                let cert_pem = fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
                let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Corrupt {
                    dir: state_dir.to_path_buf(),
                    detail: format!("{KEY_FILE}: {e}"),
                })?;
                check_cert_matches_key(&cert_pem, &key).map_err(|detail| CaError::Corrupt {
                    dir: state_dir.to_path_buf(),
                    detail,
                })?;
                let issuer =
                    ca_params(&hosts, meta.not_before, meta.not_after)?.self_signed(&key)?;
                return Ok(CertAuthority {
                    hosts,
                    cert_pem,
                    cert_path: Some(cert_path),
                    origin: CaOrigin::Loaded,
                    issuer,
                    key,
                });
            }
        };

        let (key, cert, meta) = generate(&hosts)?;
        write_private(&key_path, key.serialize_pem().as_bytes()).map_err(io(&key_path))?;
        write_public(&cert_path, cert.pem().as_bytes()).map_err(io(&cert_path))?;
        let meta_json = serde_json::to_vec_pretty(&meta).expect("meta serialises");
        write_public(&meta_path, &meta_json).map_err(io(&meta_path))?;
        let origin = match reissue_reason {
            None => CaOrigin::Created,
            Some(reason) => CaOrigin::Reissued { reason },
        };
        Ok(CertAuthority {
            hosts,
            cert_pem: cert.pem(),
            cert_path: Some(cert_path),
            origin,
            issuer: cert,
            key,
        })
    }

    /// A CA that lives only in memory (tests; no state dir).
    pub fn ephemeral(hosts: &[String]) -> Result<Self, CaError> {
        let hosts = sorted(hosts);
        let (key, cert, _) = generate(&hosts)?;
        Ok(CertAuthority {
            hosts,
            cert_pem: cert.pem(),
            cert_path: None,
            origin: CaOrigin::Ephemeral,
            issuer: cert,
            key,
        })
    }

    /// The CA certificate, PEM: for `--ca-out` and `/ca.pem`.
    pub fn ca_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn ca_der(&self) -> CertificateDer<'static> {
        let mut rd = self.cert_pem.as_bytes();
        let der = rustls_pemfile::certs(&mut rd)
            .next()
            .and_then(Result::ok)
            .expect("our own CA PEM parses");
        der
    }

    /// Where the certificate is stored, if on disk.
    pub fn cert_path(&self) -> Option<&Path> {
        self.cert_path.as_deref()
    }

    pub fn origin(&self) -> &CaOrigin {
        &self.origin
    }

    /// The hosts the name constraint permits.
    pub fn hosts(&self) -> &[String] {
        &self.hosts
    }

    /// Signs a leaf for `host`, which must be one of the CA's hosts.
    pub fn issue_leaf(&self, host: &str, lifetime: Duration) -> Result<IssuedLeaf, CaError> {
        self.issue_leaf_at(host, lifetime, SystemTime::now())
    }

    /// [`Self::issue_leaf`] with the current time given (the leaf cache's
    /// clock seam, so tests can skew the clock).
    pub fn issue_leaf_at(
        &self,
        host: &str,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<IssuedLeaf, CaError> {
        if !self.hosts.iter().any(|h| h == host) {
            return Err(CaError::NotPermitted {
                host: host.to_string(),
                allowed: self.hosts.clone(),
            });
        }
        self.issue_leaf_any_at(host, lifetime, now)
    }

    /// Signs a leaf for any name, inside the constraint or not. Only for
    /// proving that the constraint holds; the relay uses `issue_leaf`.
    pub fn issue_leaf_any(&self, host: &str, lifetime: Duration) -> Result<IssuedLeaf, CaError> {
        self.issue_leaf_any_at(host, lifetime, SystemTime::now())
    }

    fn issue_leaf_any_at(
        &self,
        host: &str,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<IssuedLeaf, CaError> {
        let now = OffsetDateTime::from(now);
        let not_after = now + lifetime;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, host);
        params.subject_alt_names = vec![SanType::DnsName(host.try_into()?)];
        // Five minutes of slack for clients whose clock is a little behind.
        params.not_before = now - LEAF_BACKDATE;
        params.not_after = not_after;
        params.serial_number = Some(random_serial());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, &self.issuer, &self.key)?;
        Ok(IssuedLeaf {
            cert: cert.der().clone(),
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_after: not_after.into(),
        })
    }
}

fn sorted(hosts: &[String]) -> Vec<String> {
    let mut hosts = hosts.to_vec();
    hosts.sort();
    hosts.dedup();
    hosts
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive INTEGER
    SerialNumber::from_slice(&bytes)
}

fn ca_params(
    hosts: &[String],
    not_before: i64,
    not_after: i64,
) -> Result<CertificateParams, CaError> {
    let ts = |t: i64| {
        OffsetDateTime::from_unix_timestamp(t).map_err(|e| CaError::Corrupt {
            dir: PathBuf::new(),
            detail: format!("bad timestamp {t}: {e}"),
        })
    };
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "proxypilot");
    dn.push(DnType::CommonName, "proxypilot sandbox CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = ts(not_before)?;
    params.not_after = ts(not_after)?;
    let permitted = if hosts.is_empty() {
        vec![GeneralSubtree::DnsName(NOTHING_HOST.to_string())]
    } else {
        hosts
            .iter()
            .map(|h| GeneralSubtree::DnsName(h.clone()))
            .collect()
    };
    params.name_constraints = Some(NameConstraints {
        permitted_subtrees: permitted,
        excluded_subtrees: Vec::new(),
    });
    Ok(params)
}

fn generate(hosts: &[String]) -> Result<(KeyPair, rcgen::Certificate, Meta), CaError> {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let meta = Meta {
        hosts: hosts.to_vec(),
        not_before: now - 3600,
        not_after: now + CA_LIFETIME.as_secs() as i64,
    };
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = ca_params(hosts, meta.not_before, meta.not_after)?;
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key)?;
    Ok((key, cert, meta))
}

fn read_meta(path: &Path) -> Result<Meta, CaError> {
    let bytes = fs::read(path).map_err(|source| CaError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|e| CaError::Corrupt {
        dir: path.parent().unwrap_or(path).to_path_buf(),
        detail: format!("{META_FILE}: {e}"),
    })
}

/// The stored certificate must carry the stored key's public key; a
/// mismatch means the files were mixed up and leaves would not verify.
fn check_cert_matches_key(cert_pem: &str, key: &KeyPair) -> Result<(), String> {
    let der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| format!("{CERT_FILE}: no certificate in it"))?;
    let public = key.public_key_raw();
    if der.windows(public.len()).any(|w| w == public) {
        Ok(())
    } else {
        Err(format!("{CERT_FILE} does not belong to {KEY_FILE}"))
    }
}

/// Writes a secret file: created 0600 from the start (never chmod after),
/// via a temporary name and rename so a crash leaves no half-written key.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomically(path, bytes, 0o600)
}

fn write_public(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomically(path, bytes, 0o644)
}

fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    let written = f
        .write_all(bytes)
        .and_then(|()| f.sync_all())
        .and_then(|()| fs::rename(&tmp, path));
    if written.is_err() {
        // A full disk (ENOSPC) fails the write: remove the half-written
        // temporary file instead of leaving partial key material behind
        // (the disk-full fault test in tests/e2e/faults.rs checks this).
        let _ = fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    use rustls::client::danger::ServerCertVerifier;
    use rustls::client::WebPkiServerVerifier;
    use rustls::pki_types::{ServerName, UnixTime};
    use rustls::RootCertStore;

    fn hosts(h: &[&str]) -> Vec<String> {
        h.iter().map(|s| s.to_string()).collect()
    }

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "proxypilot-ca-{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn verify(ca: &CertAuthority, leaf: &IssuedLeaf, name: &str) -> Result<(), rustls::Error> {
        let mut roots = RootCertStore::empty();
        roots.add(ca.ca_der()).unwrap();
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), crate::tls::provider())
                .build()
                .unwrap();
        verifier
            .verify_server_cert(
                &leaf.cert,
                &[],
                &ServerName::try_from(name.to_string()).unwrap(),
                &[],
                UnixTime::now(),
            )
            .map(|_| ())
    }

    #[test]
    fn constraint_permits_inside_and_rejects_outside_with_webpki() {
        let ca = CertAuthority::ephemeral(&hosts(&["api.example.com", "api.other.test"])).unwrap();
        let inside = ca
            .issue_leaf("api.example.com", Duration::from_secs(3600))
            .unwrap();
        verify(&ca, &inside, "api.example.com").expect("inside host verifies");

        let outside = ca
            .issue_leaf_any("evil.example.net", Duration::from_secs(3600))
            .unwrap();
        let err = verify(&ca, &outside, "evil.example.net").unwrap_err();
        assert!(
            format!("{err:?}").contains("NameConstraint")
                || format!("{err:?}").contains("NotValidForName"),
            "{err:?}"
        );
        // The relay itself refuses to sign outside the set.
        assert!(ca
            .issue_leaf("evil.example.net", Duration::from_secs(60))
            .is_err());
    }

    #[test]
    fn empty_host_set_is_still_constrained() {
        let ca = CertAuthority::ephemeral(&[]).unwrap();
        let leaf = ca
            .issue_leaf_any("example.com", Duration::from_secs(3600))
            .unwrap();
        assert!(verify(&ca, &leaf, "example.com").is_err());
    }

    #[test]
    fn openssl_sees_critical_constraint_and_rejects_outside() {
        if std::process::Command::new("openssl")
            .arg("version")
            .output()
            .is_err()
        {
            eprintln!("openssl not installed; skipping the openssl half");
            return;
        }
        let dir = tempdir("openssl");
        fs::create_dir_all(&dir).unwrap();
        let ca = CertAuthority::ephemeral(&hosts(&["api.example.com"])).unwrap();
        let ca_path = dir.join("ca.pem");
        fs::write(&ca_path, ca.ca_pem()).unwrap();
        let text = std::process::Command::new("openssl")
            .args(["x509", "-noout", "-text", "-in"])
            .arg(&ca_path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&text.stdout);
        assert!(
            text.contains("X509v3 Name Constraints: critical"),
            "nameConstraints must be critical:\n{text}"
        );
        assert!(text.contains("DNS:api.example.com"), "{text}");

        let check = |host: &str, leaf: &IssuedLeaf| {
            let p = dir.join(format!("{host}.pem"));
            let pem = format!(
                "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
                base64_lines(&leaf.cert)
            );
            fs::write(&p, pem).unwrap();
            std::process::Command::new("openssl")
                .args(["verify", "-CAfile"])
                .arg(&ca_path)
                .arg(&p)
                .output()
                .unwrap()
        };
        let inside = ca
            .issue_leaf("api.example.com", Duration::from_secs(3600))
            .unwrap();
        let out = check("api.example.com", &inside);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let outside = ca
            .issue_leaf_any("evil.example.net", Duration::from_secs(3600))
            .unwrap();
        let out = check("evil.example.net", &outside);
        assert!(!out.status.success());
        let msg = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            msg.contains("name constraint") || msg.contains("subtree"),
            "{msg}"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    fn base64_lines(der: &[u8]) -> String {
        use base64::Engine;
        let b = base64::engine::general_purpose::STANDARD.encode(der);
        b.as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn state_dir_round_trip_mode_and_reissue() {
        let dir = tempdir("state");
        let h1 = hosts(&["api.example.com"]);
        let a = CertAuthority::load_or_create(&dir, &h1).unwrap();
        assert_eq!(a.origin(), &CaOrigin::Created);
        let mode = fs::metadata(dir.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "key file mode");

        let b = CertAuthority::load_or_create(&dir, &h1).unwrap();
        assert_eq!(b.origin(), &CaOrigin::Loaded);
        assert_eq!(a.ca_pem(), b.ca_pem());
        // A leaf signed by the reloaded CA verifies against the stored cert.
        let leaf = b
            .issue_leaf("api.example.com", Duration::from_secs(600))
            .unwrap();
        verify(&a, &leaf, "api.example.com").unwrap();

        let h2 = hosts(&["api.example.com", "api.github.com"]);
        let c = CertAuthority::load_or_create(&dir, &h2).unwrap();
        assert!(matches!(c.origin(), CaOrigin::Reissued { .. }));
        assert_ne!(a.ca_pem(), c.ca_pem());
        let mode = fs::metadata(dir.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "re-issued key file mode");
        // The old certificate no longer validates new leaves (new key).
        let leaf = c
            .issue_leaf("api.example.com", Duration::from_secs(600))
            .unwrap();
        assert!(verify(&a, &leaf, "api.example.com").is_err());
        verify(&c, &leaf, "api.example.com").unwrap();
        let _ = fs::remove_dir_all(&dir);
    }
}
