//! CA trust for the sandboxed command: one bundle of the system roots plus
//! proxypilot's CA, named by the variables common runtimes read.

use std::{ffi::OsString, fs, io::Write, os::unix::fs::OpenOptionsExt, path::Path};

use anyhow::{Context, Result};
use base64::Engine as _;

/// Variables that point a runtime at a CA bundle. Python's requests reads
/// REQUESTS_CA_BUNDLE (certifi otherwise), httpx and OpenSSL SSL_CERT_FILE,
/// Node adds NODE_EXTRA_CA_CERTS to its bundled roots, git, pip and Deno
/// their own.
pub const CA_VARS: [&str; 7] = [
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "GIT_SSL_CAINFO",
    "PIP_CERT",
    "DENO_CERT",
];

/// Writes `dir/ca-bundle.pem` (world-readable, so a `--user` command can
/// read it): the system roots, then proxypilot's CA.
pub fn write_bundle(dir: &Path, proxypilot_ca_pem: &str) -> Result<std::path::PathBuf> {
    let roots = rustls_native_certs::load_native_certs();
    for e in &roots.errors {
        tracing::debug!(error = %e, "skipping part of the system trust store");
    }
    let mut pem = String::new();
    for cert in &roots.certs {
        pem.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
    }
    if roots.certs.is_empty() {
        tracing::warn!(
            "no system root certificates found; the sandbox will trust only proxypilot's CA"
        );
    }
    pem.push_str("# proxypilot CA (name-constrained to the intercepted hosts)\n");
    pem.push_str(proxypilot_ca_pem);
    let path = dir.join("ca-bundle.pem");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(pem.as_bytes())?;
    Ok(path)
}

/// The environment entries that point every runtime at `bundle`.
pub fn env_for(bundle: &Path) -> Vec<(OsString, OsString)> {
    CA_VARS
        .iter()
        .map(|v| (OsString::from(v), bundle.as_os_str().to_owned()))
        .collect()
}
