//! The relay's configuration: `proxypilot sidecar` flags, the `TARGETS`
//! and `PROXY` environment variables of the original tlsproxy, and an
//! optional TOML file. Everything is validated once, before anything
//! binds, and all problems are reported together.
//!
//! Precedence: lists (`target`, `allow`, `upstream-ca`) are merged from
//! the file, `TARGETS` and the flags; a scalar comes from its flag, else
//! the file, else the environment (`PROXY` for the tokenizer), else the
//! default; `rate-limit` is merged per host, a flag beating the file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use serde::Deserialize;

use crate::policy::{normalize_host, HostPattern};
use crate::relay::{
    embedded::EmbeddedTokenizer, Forwarder, Limits, Relay, RelayConfig, RemoteTokenizer,
};
use crate::tls::ca::{CaOrigin, CertAuthority};
use crate::tokenizer::{Engine, OpenKey};

pub const DEFAULT_TOKENIZER: &str = "http://tokenizer.flycast:8080";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/proxypilot";
pub const DEFAULT_INFO_PORT: u16 = 15480;

/// The relay's flags, to be flattened into `proxypilot sidecar`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RelayArgs {
    /// Intercept HOST; the environment variable ENVVAR holds its sealed
    /// secret. Repeatable. `TARGETS="host=ENV,host2=ENV2"` adds more.
    #[arg(long = "target", value_name = "HOST=ENVVAR")]
    pub targets: Vec<String>,
    /// Pass HOST through untouched (exact name, or `*.suffix` for any
    /// subdomain). Repeatable.
    #[arg(long = "allow", value_name = "HOST")]
    pub allow: Vec<String>,
    /// Allow only matching requests to HOST (an intercepted host): METHOD
    /// or `*`, PATH a glob (`*` one segment, `**` any number), e.g.
    /// 'api.github.com GET /repos/acme/**'. Repeatable; a host without
    /// permits allows everything, others get 403.
    #[arg(long = "permit", value_name = "HOST METHOD PATH")]
    pub permits: Vec<String>,
    /// HOST's sealed secret mints short-lived tokens (jwt,
    /// client_credentials, github_app) at TOKEN_URL, an https:// URL: the
    /// relay requests, caches and refreshes them through the tokenizer.
    /// Needed with a remote tokenizer; the embedded one finds out itself.
    /// Repeatable.
    #[arg(long = "mint", value_name = "HOST=TOKEN_URL")]
    pub mint: Vec<String>,
    /// Tokenizer URL (an HTTP proxy, reached over plain HTTP or, with
    /// https://, over TLS), or `embedded` for the in-process engine.
    /// Default: $PROXY, else http://tokenizer.flycast:8080.
    #[arg(long, value_name = "URL|embedded")]
    pub tokenizer: Option<String>,
    /// Extra CA (PEM) trusted for an https:// tokenizer, on top of the
    /// system roots. Repeatable.
    #[arg(long = "tokenizer-ca", value_name = "FILE")]
    pub tokenizer_ca: Vec<PathBuf>,
    /// Environment variable holding the token sent as
    /// `Proxy-Authorization: Bearer <token>` (for bearer_auth secrets).
    #[arg(long, value_name = "VAR")]
    pub tokenizer_auth_env: Option<String>,
    /// The tokenizer's open (private) key file, for `--tokenizer embedded`.
    #[arg(long, value_name = "FILE")]
    pub open_key_file: Option<PathBuf>,
    /// Extra CA (PEM) the embedded tokenizer trusts for upstream APIs, on
    /// top of the system roots. Repeatable.
    #[arg(long = "upstream-ca", value_name = "FILE")]
    pub upstream_ca: Vec<PathBuf>,
    /// Where the CA key and certificate live [default: /var/lib/proxypilot].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Also write the CA certificate (PEM) here, for the sandbox to trust.
    #[arg(long, value_name = "FILE")]
    pub ca_out: Option<PathBuf>,
    /// Loopback port serving /ca.pem and /policy [default: 15480].
    #[arg(long, value_name = "PORT")]
    pub info_port: Option<u16>,
    /// Serve Prometheus metrics (`GET /metrics`) on ADDR, e.g.
    /// 127.0.0.1:9464. Refused if an --allow-cidr would let the sandbox
    /// reach it [default: off].
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// TOML file with the same settings (keys named like the flags).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    pub limits: LimitArgs,
}

/// Caps and timeouts of the relay; each has a safe default.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct LimitArgs {
    /// Connections from the sandbox handled at once; more are closed at
    /// accept and logged [default: 4096].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Of those, the most one sandbox process may hold; its further
    /// connections are closed, not everyone's [default: a quarter of
    /// --max-connections].
    #[arg(long, value_name = "N")]
    pub max_connections_per_process: Option<usize>,
    /// Largest request header block accepted [default: 65536].
    #[arg(long, value_name = "BYTES")]
    pub max_header_bytes: Option<usize>,
    /// Time allowed for the ClientHello and TLS handshake [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub handshake_timeout: Option<Duration>,
    /// Time allowed to send one request's headers [default: 30s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub header_read_timeout: Option<Duration>,
    /// Close a connection with no request in flight and no bytes moving
    /// for this long [default: 300s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// Close an upgraded (WebSocket) stream when no byte has moved either
    /// way for this long [default: 300s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub stream_idle_timeout: Option<Duration>,
    /// Time allowed for the tokenizer's response head; long, since a
    /// non-streaming LLM call answers only when done [default: 600s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub response_timeout: Option<Duration>,
    /// Cut a response the client has stopped reading (data waiting for it,
    /// none taken) after this long, freeing its share of the shared
    /// upstream connection [default: 60s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub stall_timeout: Option<Duration>,
    /// Largest request body relayed to an intercepted host, in bytes or
    /// with a unit (512KiB, 10MiB, 1GiB); more is answered 413
    /// [default: no limit, since API uploads can be hundreds of MB].
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub max_request_body: Option<u64>,
    /// At most N requests per second to HOST (an intercepted host), in
    /// bursts of up to N; more are answered 429. Repeatable
    /// [default: no limit].
    #[arg(long = "rate-limit", value_name = "HOST=N")]
    pub rate_limits: Vec<String>,
}

/// "300", "300s", "5m", "1h" or "250ms".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration; write e.g. 30s, 5m, 250ms"))?;
    let d = match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; use ms, s, m or h")),
    };
    if d.is_zero() {
        return Err(format!(
            "{s:?}: a timeout of zero would cut off every connection"
        ));
    }
    Ok(d)
}

/// "1048576", "512KiB", "10MiB" or "1GiB" (binary units; "B" allowed).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size; write e.g. 1048576, 512KiB, 10MiB"))?;
    let unit_bytes: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        u => return Err(format!("{s:?}: unknown unit {u:?}; use B, KiB, MiB or GiB")),
    };
    match n.checked_mul(unit_bytes) {
        None => Err(format!("{s:?} is too large")),
        Some(0) => Err(format!("{s:?}: a cap of zero would refuse every body")),
        Some(b) => Ok(b),
    }
}

/// Secret text (a sealed secret, a token, a real key): never printed, and
/// wiped from memory on drop. One type for the relay and the tokenizer.
pub use crate::tokenizer::secret::SecretString;

/// The relay's notion of an intercepted host, which settings produce.
pub use crate::relay::Target;

#[derive(Debug, Clone)]
pub enum TokenizerMode {
    Remote {
        url: http::Uri,
        /// `--tokenizer-ca`: extra roots for an https:// tokenizer.
        ca: Vec<PathBuf>,
    },
    /// The engine in this process; `build_relay` builds it from these.
    Embedded {
        /// Read from `--open-key-file`, or generated by `proxypilot run`
        /// (and then never written anywhere).
        open_key: OpenKey,
        upstream_ca: Vec<PathBuf>,
    },
}

/// Two embedded modes are the same when their keys open the same secrets.
impl PartialEq for TokenizerMode {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Remote { url: u1, ca: c1 }, Self::Remote { url: u2, ca: c2 }) => {
                u1 == u2 && c1 == c2
            }
            (
                Self::Embedded {
                    open_key: k1,
                    upstream_ca: c1,
                },
                Self::Embedded {
                    open_key: k2,
                    upstream_ca: c2,
                },
            ) => k1.seal_key() == k2.seal_key() && c1 == c2,
            _ => false,
        }
    }
}

/// What `proxypilot run` seals in its own memory: the embedded engine's
/// key and the targets whose secrets (from `--secret`) are sealed to it.
pub struct SealedInProcess {
    pub open_key: OpenKey,
    pub targets: Vec<Target>,
}

/// Which command the settings are for: they differ in a few defaults.
enum Shape {
    /// `proxypilot sidecar`: a fixed info port the sandbox fetches
    /// `/ca.pem` from; `TARGETS` and `PROXY` read from the environment.
    Sidecar,
    /// `proxypilot run`: no config file, an ephemeral info port (the CA
    /// bundle is handed to the command as a file), and, unless
    /// `--tokenizer` names a remote one, the embedded engine under a key
    /// that lives only in this process.
    Run(SealedInProcess),
}

/// Validated relay settings.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    pub targets: Vec<Target>,
    pub allow: Vec<HostPattern>,
    /// The config file's `allow-dns`: names the sandbox may resolve
    /// besides the intercepted and allowed hosts (`--allow-dns` adds more).
    pub allow_dns: Vec<HostPattern>,
    /// The config file's `dns`: upstream servers, when `--dns` gives none.
    pub dns: Vec<std::net::IpAddr>,
    pub tokenizer: TokenizerMode,
    /// Full `Proxy-Authorization` header value.
    pub proxy_authorization: Option<SecretString>,
    pub state_dir: PathBuf,
    pub ca_out: Option<PathBuf>,
    /// Where `/ca.pem` and `/policy` are served on loopback; 0 (only
    /// `proxypilot run`): any free port.
    pub info_port: u16,
    /// `--metrics-listen`: where Prometheus scrapes; `None`: not served.
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub limits: Limits,
    /// The config file's `allow-cidr` and `allow-unix`: kernel rules added
    /// to the flags' (a reload can change these; flags need a restart).
    pub file_kernel: FileKernelRules,
    /// `--mint`: targets whose secret mints short-lived tokens, and where.
    pub mint: Vec<(String, crate::relay::minted::MintSpec)>,
}

/// Kernel allowlist entries from the config file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileKernelRules {
    pub allow_cidrs: Vec<crate::kernel::AllowRule>,
    pub allow_unix: Vec<crate::kernel::UnixPath>,
}

/// `--config` file schema; keys are the flag names.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    target: Option<TargetList>,
    allow: Option<Vec<String>>,
    /// `allow-dns = ["NAME", "*.suffix"]`, as `--allow-dns`.
    allow_dns: Option<Vec<String>>,
    /// `dns = ["ADDR"]`, as `--dns` (which wins when given).
    dns: Option<Vec<String>>,
    /// `permit = ["HOST METHOD PATH", ...]`, as the flag.
    permit: Option<Vec<String>>,
    /// `allow-cidr = ["10.1.2.3:5432"]`, as the flag (added to it).
    allow_cidr: Option<Vec<String>>,
    /// `allow-unix = ["/run/agent.sock"]`, as the flag (added to it).
    allow_unix: Option<Vec<String>>,
    /// `mint = ["HOST=TOKEN_URL"]` or `mint = { "HOST" = "TOKEN_URL" }`,
    /// as `--mint` (a flag wins for its host).
    mint: Option<MintList>,
    tokenizer: Option<String>,
    tokenizer_ca: Option<Vec<PathBuf>>,
    tokenizer_auth_env: Option<String>,
    open_key_file: Option<PathBuf>,
    upstream_ca: Option<Vec<PathBuf>>,
    state_dir: Option<PathBuf>,
    ca_out: Option<PathBuf>,
    info_port: Option<u16>,
    metrics_listen: Option<String>,
    max_connections: Option<usize>,
    max_connections_per_process: Option<usize>,
    max_header_bytes: Option<usize>,
    handshake_timeout: Option<String>,
    header_read_timeout: Option<String>,
    idle_timeout: Option<String>,
    stream_idle_timeout: Option<String>,
    response_timeout: Option<String>,
    stall_timeout: Option<String>,
    /// `10485760` or `"10MiB"`.
    max_request_body: Option<toml::Value>,
    /// `rate-limit = { "api.openai.com" = 5 }` (or a `[rate-limit]` table).
    rate_limit: Option<toml::Table>,
    /// Not read: named here only to refuse it with a clear message
    /// (it used to be accepted and silently ignored).
    kernel: Option<toml::Value>,
}

/// `target = ["host=ENV"]`, or `[target]` with `"host" = "ENV"` or
/// `"host" = { secret = "ENV", permit = ["GET /x/**"] }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TargetList {
    List(Vec<String>),
    Map(BTreeMap<String, TargetEntry>),
}

/// `mint = ["HOST=TOKEN_URL"]`, or a `[mint]` table of HOST = TOKEN_URL.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum MintList {
    List(Vec<String>),
    Map(BTreeMap<String, String>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TargetEntry {
    Secret(String),
    Table(TargetTable),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetTable {
    secret: String,
    /// `METHOD PATH` each (the host is the table's).
    #[serde(default)]
    permit: Vec<String>,
}

impl RelayArgs {
    /// Validates everything against the real environment.
    pub fn resolve(&self) -> anyhow::Result<RelaySettings> {
        self.resolve_with(&|k| std::env::var(k).ok())
    }

    /// As `resolve`, with the environment given (tests).
    pub fn resolve_with(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> anyhow::Result<RelaySettings> {
        self.resolve_as(env, Shape::Sidecar)
    }

    /// The settings of `proxypilot run`, through the same validation as
    /// the sidecar's. `sealed` holds the `--secret`s, sealed in memory.
    pub fn resolve_for_run(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
        sealed: SealedInProcess,
    ) -> anyhow::Result<RelaySettings> {
        self.resolve_as(env, Shape::Run(sealed))
    }

    fn resolve_as(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
        shape: Shape,
    ) -> anyhow::Result<RelaySettings> {
        let mut file = match &self.config {
            None => FileConfig::default(),
            Some(path) => read_config(path)?,
        };
        let (in_process, sidecar_env) = match shape {
            Shape::Sidecar => (None, env),
            // The sidecar's environment conventions do not apply to run.
            Shape::Run(sealed) => (Some(sealed), &no_env as &dyn Fn(&str) -> Option<String>),
        };
        let mut errors: Vec<String> = Vec::new();
        if file.kernel.is_some() {
            errors.push(
                "the config file's [kernel] table is not read: give --listen, --intercept-port and \
                 --dns as flags, allow-cidr and allow-unix as top-level keys, and remove the table"
                    .to_string(),
            );
        }

        // Targets: file, then TARGETS, then flags, as (spec, where-from).
        let mut specs: Vec<(String, String)> = Vec::new();
        // Permits as (HOST METHOD PATH, where-from), applied once targets are known.
        let mut permit_specs: Vec<(String, String)> = Vec::new();
        match file.target.take() {
            Some(TargetList::List(l)) => {
                specs.extend(l.into_iter().map(|s| (s, "the config file".to_string())))
            }
            Some(TargetList::Map(m)) => {
                for (h, e) in m {
                    let secret = match e {
                        TargetEntry::Secret(s) => s,
                        TargetEntry::Table(t) => {
                            permit_specs.extend(t.permit.iter().map(|p| {
                                (
                                    format!("{h} {p}"),
                                    format!("permit of target {h:?} in the config file"),
                                )
                            }));
                            t.secret
                        }
                    };
                    specs.push((format!("{h}={secret}"), "the config file".to_string()));
                }
            }
            None => {}
        }
        permit_specs.extend(
            file.permit
                .iter()
                .flatten()
                .map(|p| (p.clone(), "permit in the config file".to_string())),
        );
        permit_specs.extend(
            self.permits
                .iter()
                .map(|p| (p.clone(), "--permit".to_string())),
        );
        if let Some(t) = sidecar_env("TARGETS") {
            specs.extend(
                t.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| (s.to_string(), "TARGETS".to_string())),
            );
        }
        specs.extend(
            self.targets
                .iter()
                .map(|s| (s.clone(), "--target".to_string())),
        );
        let mut targets: BTreeMap<String, Target> = BTreeMap::new();
        for (spec, from) in specs {
            match parse_target(&spec, env) {
                Err(e) => errors.push(format!("{from} {spec:?}: {e}")),
                Ok(t) => match targets.get(&t.host) {
                    Some(prev) if prev.secret_name != t.secret_name => errors.push(format!(
                        "{} is given twice, with secrets {} and {}; keep one",
                        t.host, prev.secret_name, t.secret_name
                    )),
                    _ => {
                        targets.insert(t.host.clone(), t);
                    }
                },
            }
        }

        let (run_key, run_targets) = match in_process {
            Some(SealedInProcess { open_key, targets }) => (Some(open_key), targets),
            None => (None, Vec::new()),
        };
        let sealed_here = !run_targets.is_empty();
        for t in run_targets {
            if targets.contains_key(&t.host) {
                errors.push(format!(
                    "two secrets for {}; give each host one --secret",
                    t.host
                ));
            } else {
                targets.insert(t.host.clone(), t);
            }
        }

        add_permits(&mut targets, &permit_specs, &mut errors);
        let mint = mint_specs(
            file.mint.take(),
            &self.mint,
            &|host| targets.contains_key(host),
            &mut errors,
        );
        let limits = self
            .limits
            .resolve(&file, &|host| targets.contains_key(host), &mut errors);

        let mut allow = Vec::new();
        for a in file.allow.unwrap_or_default().iter().chain(&self.allow) {
            match HostPattern::parse(a) {
                Ok(p) if !allow.contains(&p) => allow.push(p),
                Ok(_) => {}
                Err(e) => errors.push(format!("--allow {a:?}: {e}")),
            }
        }

        let mut allow_dns = Vec::new();
        for a in file.allow_dns.iter().flatten() {
            match HostPattern::parse(a) {
                Ok(p) if !allow_dns.contains(&p) => allow_dns.push(p),
                Ok(_) => {}
                Err(e) => errors.push(format!("allow-dns {a:?} in the config file: {e}")),
            }
        }
        let mut dns = Vec::new();
        for a in file.dns.iter().flatten() {
            match a.parse::<std::net::IpAddr>() {
                Ok(ip) => dns.push(ip),
                Err(_) => errors.push(format!(
                    "dns {a:?} in the config file: not an IP address (write e.g. \"203.0.113.53\" or \"fdaa::3\")"
                )),
            }
        }

        let tokenizer_spec = self
            .tokenizer
            .clone()
            .or(file.tokenizer)
            .or_else(|| sidecar_env("PROXY"))
            .unwrap_or_else(|| match run_key {
                Some(_) => "embedded".to_string(),
                None => DEFAULT_TOKENIZER.to_string(),
            });
        let open_key_file = self.open_key_file.clone().or(file.open_key_file);
        let mut upstream_ca = file.upstream_ca.unwrap_or_default();
        upstream_ca.extend(self.upstream_ca.iter().cloned());
        let tokenizer = if tokenizer_spec == "embedded" {
            let open_key = match (&run_key, &open_key_file) {
                (Some(key), _) => Some(key.clone()),
                (None, None) => {
                    errors.push(
                        "--tokenizer embedded needs --open-key-file FILE (the tokenizer's private key)"
                            .into(),
                    );
                    None
                }
                (None, Some(p)) if !p.is_file() => {
                    errors.push(format!("--open-key-file {}: no such file", p.display()));
                    None
                }
                (None, Some(p)) => match OpenKey::from_file(p) {
                    Ok(key) => Some(key),
                    Err(e) => {
                        errors.push(format!("--open-key-file {}: {e:#}", p.display()));
                        None
                    }
                },
            };
            for ca in &upstream_ca {
                if let Err(e) = check_pem_certs(ca) {
                    errors.push(format!("--upstream-ca {}: {e}", ca.display()));
                }
            }
            TokenizerMode::Embedded {
                // A placeholder only on the way to the error below.
                open_key: open_key.unwrap_or_else(OpenKey::generate),
                upstream_ca: upstream_ca.clone(),
            }
        } else {
            if sealed_here {
                errors.push(
                    "--secret seals the key in this process for the embedded tokenizer; with \
                     --tokenizer URL give each host a secret sealed for that tokenizer (--target)"
                        .into(),
                );
            }
            if open_key_file.is_some() {
                errors.push("--open-key-file only applies to --tokenizer embedded; a remote tokenizer holds its own key".into());
            }
            if !upstream_ca.is_empty() {
                errors.push("--upstream-ca only applies to --tokenizer embedded; a remote tokenizer has its own trust".into());
            }
            let mut ca = file.tokenizer_ca.clone().unwrap_or_default();
            ca.extend(self.tokenizer_ca.iter().cloned());
            for f in &ca {
                if let Err(e) = check_pem_certs(f) {
                    errors.push(format!("--tokenizer-ca {}: {e}", f.display()));
                }
            }
            match parse_tokenizer_url(&tokenizer_spec) {
                Ok(url) => {
                    if !ca.is_empty() && url.scheme_str() != Some("https") {
                        errors.push(format!(
                            "--tokenizer-ca only applies to an https:// tokenizer, not {url}"
                        ));
                    }
                    TokenizerMode::Remote { url, ca }
                }
                Err(e) => {
                    errors.push(e);
                    TokenizerMode::Remote {
                        url: http::Uri::from_static(DEFAULT_TOKENIZER),
                        ca,
                    }
                }
            }
        };

        let proxy_authorization = match self.tokenizer_auth_env.clone().or(file.tokenizer_auth_env)
        {
            None => None,
            Some(var) => match env(&var).filter(|v| !v.trim().is_empty()) {
                None => {
                    errors.push(format!(
                        "--tokenizer-auth-env {var}: the environment variable {var} is not set"
                    ));
                    None
                }
                Some(v) => {
                    let v = v.trim();
                    let value = if v.starts_with("Bearer ") {
                        v.to_string()
                    } else {
                        format!("Bearer {v}")
                    };
                    if http::HeaderValue::from_str(&value).is_err() {
                        errors.push(format!("--tokenizer-auth-env {var}: the token has characters not allowed in a header"));
                    }
                    Some(SecretString::new(value))
                }
            },
        };

        let info_port = self
            .info_port
            .or(file.info_port)
            .unwrap_or(if run_key.is_some() {
                0
            } else {
                DEFAULT_INFO_PORT
            });
        if info_port == 0 && run_key.is_none() {
            errors.push(
                "--info-port must not be 0: the sandbox needs a fixed port to fetch /ca.pem".into(),
            );
        }

        let metrics_listen = match (self.metrics_listen, &file.metrics_listen) {
            (Some(a), _) => Some(a),
            (None, Some(text)) => match text.parse() {
                Ok(a) => Some(a),
                Err(_) => {
                    errors.push(format!(
                        "metrics-listen {text:?} in the config file: write an address and port, e.g. \"127.0.0.1:9464\""
                    ));
                    None
                }
            },
            (None, None) => None,
        };

        let mut file_kernel = FileKernelRules::default();
        for c in file.allow_cidr.iter().flatten() {
            match c.parse() {
                Ok(r) if !file_kernel.allow_cidrs.contains(&r) => file_kernel.allow_cidrs.push(r),
                Ok(_) => {}
                Err(e) => errors.push(format!("allow-cidr {c:?} in the config file: {e}")),
            }
        }
        for u in file.allow_unix.iter().flatten() {
            match u.parse() {
                Ok(p) if !file_kernel.allow_unix.contains(&p) => file_kernel.allow_unix.push(p),
                Ok(_) => {}
                Err(e) => errors.push(format!("allow-unix {u:?} in the config file: {e}")),
            }
        }

        if !errors.is_empty() {
            return Err(anyhow!(
                "invalid relay configuration:\n  - {}",
                errors.join("\n  - ")
            ));
        }
        Ok(RelaySettings {
            targets: targets.into_values().collect(),
            allow,
            allow_dns,
            dns,
            tokenizer,
            proxy_authorization,
            state_dir: self
                .state_dir
                .clone()
                .or(file.state_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            ca_out: self.ca_out.clone().or(file.ca_out),
            info_port,
            metrics_listen,
            limits,
            file_kernel,
            mint,
        })
    }
}

impl LimitArgs {
    /// The limits from these flags, else the config file's keys, else the
    /// defaults; what is wrong goes to `errors`. `intercepted` says which
    /// hosts may have a rate limit.
    fn resolve(
        &self,
        file: &FileConfig,
        intercepted: &dyn Fn(&str) -> bool,
        errors: &mut Vec<String>,
    ) -> Limits {
        let mut limits = Limits::default();
        let l = self;
        if let Some(n) = l.max_connections.or(file.max_connections) {
            if n == 0 {
                errors.push("max-connections must be at least 1".into());
            }
            limits.max_connections = n.max(1);
        }
        limits.max_connections_per_process = match l
            .max_connections_per_process
            .or(file.max_connections_per_process)
        {
            Some(0) => {
                errors.push("max-connections-per-process must be at least 1".into());
                1
            }
            Some(n) if n > limits.max_connections => {
                errors.push(format!(
                    "max-connections-per-process {n} is above max-connections {}; lower it or raise max-connections",
                    limits.max_connections
                ));
                n
            }
            Some(n) => n,
            None => (limits.max_connections / crate::relay::PROCESS_SHARE).max(1),
        };
        if let Some(n) = l.max_header_bytes.or(file.max_header_bytes) {
            if n < 1024 {
                errors.push(format!(
                    "max-header-bytes {n} is too small for real clients; use at least 1024"
                ));
            }
            limits.max_header_bytes = n;
        }
        for (name, flag, from_file, slot) in [
            (
                "handshake-timeout",
                l.handshake_timeout,
                &file.handshake_timeout,
                &mut limits.handshake_timeout,
            ),
            (
                "header-read-timeout",
                l.header_read_timeout,
                &file.header_read_timeout,
                &mut limits.header_read_timeout,
            ),
            (
                "idle-timeout",
                l.idle_timeout,
                &file.idle_timeout,
                &mut limits.idle_timeout,
            ),
            (
                "stream-idle-timeout",
                l.stream_idle_timeout,
                &file.stream_idle_timeout,
                &mut limits.stream_idle_timeout,
            ),
            (
                "response-timeout",
                l.response_timeout,
                &file.response_timeout,
                &mut limits.response_timeout,
            ),
            (
                "stall-timeout",
                l.stall_timeout,
                &file.stall_timeout,
                &mut limits.stall_timeout,
            ),
        ] {
            match (flag, from_file) {
                (Some(d), _) => *slot = d,
                (None, Some(text)) => match parse_duration(text) {
                    Ok(d) => *slot = d,
                    Err(e) => errors.push(format!("{name} in the config file: {e}")),
                },
                (None, None) => {}
            }
        }
        match (l.max_request_body, &file.max_request_body) {
            (Some(n), _) => limits.max_request_body = Some(n),
            (None, Some(v)) => match size_value(v) {
                Ok(n) => limits.max_request_body = Some(n),
                Err(e) => errors.push(format!("max-request-body in the config file: {e}")),
            },
            (None, None) => {}
        }
        limits.rate_limits = rate_limits(&file.rate_limit, &l.rate_limits, intercepted, errors);
        limits
    }
}

/// Attaches each `HOST METHOD PATH` permit (with where it came from) to
/// its target; every HOST must be intercepted.
fn add_permits(
    targets: &mut BTreeMap<String, Target>,
    specs: &[(String, String)],
    errors: &mut Vec<String>,
) {
    for (spec, from) in specs {
        match crate::relay::rules::parse_host_permit(spec) {
            Err(e) => errors.push(format!("{from}: {e}")),
            Ok((host, permit)) => match targets.get_mut(&host) {
                None => errors.push(format!(
                    "{from} {spec:?}: {host} is not an intercepted host; add --target {host}=ENVVAR \
                     (proxypilot run: --secret VAR=HOST) or drop the permit"
                )),
                Some(t) if t.permits.contains(&permit) => {}
                Some(t) => t.permits.push(permit),
            },
        }
    }
}

/// `max-request-body` in the file: an integer or a string with a unit.
fn size_value(v: &toml::Value) -> Result<u64, String> {
    match v {
        toml::Value::Integer(n) if *n > 0 => Ok(*n as u64),
        toml::Value::Integer(n) => Err(format!("{n}: use at least 1")),
        toml::Value::String(s) => parse_size(s),
        other => Err(format!(
            "{other}: write bytes, e.g. 10485760, or a string such as \"10MiB\""
        )),
    }
}

/// Requests per second per host, from the file's `rate-limit` table and
/// the `--rate-limit HOST=N` flags (a flag overrides the file for its
/// host). Every HOST must be intercepted, every N at least 1.
fn rate_limits(
    file: &Option<toml::Table>,
    flags: &[String],
    intercepted: &dyn Fn(&str) -> bool,
    errors: &mut Vec<String>,
) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    let mut add = |from: String, parsed: Result<(&str, u32), String>| {
        let checked = parsed.and_then(|(host, n)| {
            let host = normalize_host(host)?;
            if !intercepted(&host) {
                return Err(format!(
                    "{host} is not an intercepted host; add --target {host}=ENVVAR or drop the limit"
                ));
            }
            Ok((host, n))
        });
        match checked {
            Ok((host, n)) => {
                out.insert(host, n);
            }
            Err(e) => errors.push(format!("{from}: {e}")),
        }
    };
    for (host, n) in file.iter().flatten() {
        let n = match n {
            toml::Value::Integer(n) => u32::try_from(*n)
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("{n} is not a number of requests per second (1 or more)")),
            other => Err(format!("{other} is not a number of requests per second")),
        };
        add(
            format!("rate-limit {host:?} in the config file"),
            n.map(|n| (host.as_str(), n)),
        );
    }
    for spec in flags {
        let parsed = match spec.split_once('=') {
            None => Err("expected HOST=N, e.g. api.openai.com=5".to_string()),
            Some((host, n)) => match n.trim().parse::<u32>() {
                Ok(n) if n > 0 => Ok((host, n)),
                _ => Err(format!(
                    "{n:?} is not a number of requests per second (1 or more)"
                )),
            },
        };
        add(format!("--rate-limit {spec:?}"), parsed);
    }
    out
}

/// The minting targets, from the file's `mint` and the `--mint
/// HOST=TOKEN_URL` flags (a flag overrides the file for its host). Every
/// HOST must be a target, every TOKEN_URL an https:// URL.
fn mint_specs(
    file: Option<MintList>,
    flags: &[String],
    is_target: &dyn Fn(&str) -> bool,
    errors: &mut Vec<String>,
) -> Vec<(String, crate::relay::minted::MintSpec)> {
    let file: Vec<(String, String)> = match file {
        None => Vec::new(),
        Some(MintList::List(l)) => l
            .into_iter()
            .map(|spec| (format!("mint {spec:?} in the config file"), spec))
            .collect(),
        Some(MintList::Map(m)) => m
            .into_iter()
            .map(|(h, url)| {
                (
                    format!("mint {h:?} in the config file"),
                    format!("{h}={url}"),
                )
            })
            .collect(),
    };
    let flags = flags
        .iter()
        .map(|spec| (format!("--mint {spec:?}"), spec.clone()));
    let mut out: BTreeMap<String, crate::relay::minted::MintSpec> = BTreeMap::new();
    for (from, spec) in file.into_iter().chain(flags) {
        let Some((h, url)) = spec.split_once('=') else {
            errors.push(format!(
                "{from}: expected HOST=TOKEN_URL, e.g. api.github.com=https://api.github.com/app/installations/ID/access_tokens"
            ));
            continue;
        };
        let host = match normalize_host(h) {
            Ok(host) => host,
            Err(e) => {
                errors.push(format!("{from}: {e}"));
                continue;
            }
        };
        if !is_target(&host) {
            errors.push(format!(
                "{from}: {host} is not a --target; give it one with its sealed secret"
            ));
            continue;
        }
        match crate::relay::minted::MintSpec::from_url(url.trim()) {
            Ok(s) => {
                out.insert(host, s);
            }
            Err(e) => errors.push(format!("{from}: {e}")),
        }
    }
    out.into_iter().collect()
}

fn read_config(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading --config {}", path.display()))?;
    toml::from_str(&text)
        .map_err(|e| anyhow!("--config {}: {}", path.display(), e.to_string().trim_end()))
}

/// An empty environment: what `proxypilot run` reads of the sidecar's
/// environment variables.
fn no_env(_: &str) -> Option<String> {
    None
}

fn parse_target(spec: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Target, String> {
    let (host, var) = spec
        .split_once('=')
        .ok_or_else(|| "expected HOST=ENVVAR, e.g. api.github.com=GITHUB_SEALED".to_string())?;
    let host = normalize_host(host)?;
    let var = var.trim();
    let var_ok = !var.is_empty()
        && !var.starts_with(|c: char| c.is_ascii_digit())
        && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !var_ok {
        return Err(format!("{var:?} is not an environment variable name"));
    }
    let sealed = env(var)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            format!("the environment variable {var} (the sealed secret for {host}) is not set")
        })?;
    if http::HeaderValue::from_str(&sealed).is_err() {
        return Err(format!(
            "{var} has characters not allowed in a header; is it a sealed secret?"
        ));
    }
    Ok(Target {
        slots: crate::relay::credentials::preset_slots(&host),
        host,
        secret_name: var.to_string(),
        sealed: SecretString::new(sealed),
        permits: Vec::new(),
    })
}

fn parse_tokenizer_url(s: &str) -> Result<http::Uri, String> {
    let url: http::Uri = s.parse().map_err(|e| {
        format!("--tokenizer {s:?}: not a URL ({e}); use http://host:port or `embedded`")
    })?;
    if !matches!(url.scheme_str(), Some("http" | "https")) || url.host().is_none() {
        return Err(format!(
            "--tokenizer {s:?}: use http://host:port or https://host:port (the tokenizer is an HTTP proxy) or `embedded`"
        ));
    }
    if url.path() != "/" && !url.path().is_empty() {
        return Err(format!(
            "--tokenizer {s:?}: give no path, just http(s)://host:port"
        ));
    }
    Ok(url)
}

fn check_pem_certs(path: &Path) -> Result<(), String> {
    let data = std::fs::read(path).map_err(|e| e.to_string())?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("not PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in it (expected PEM)".into());
    }
    Ok(())
}

impl RelaySettings {
    /// The intercepted host names, sorted.
    pub fn intercepted_hosts(&self) -> Vec<String> {
        self.targets.iter().map(|t| t.host.clone()).collect()
    }

    /// Loads or creates the CA in the state dir, writes `--ca-out`, and
    /// logs when the sandbox has to (re-)trust a new certificate.
    pub fn load_ca(&self) -> anyhow::Result<Arc<CertAuthority>> {
        let ca = CertAuthority::load_or_create(&self.state_dir, &self.intercepted_hosts())?;
        let cert_path = ca
            .cert_path()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let fetch = format!("http://127.0.0.1:{}/ca.pem", self.info_port);
        match ca.origin() {
            CaOrigin::Created => {
                tracing::info!(cert = %cert_path, %fetch, "created a new CA; the sandbox must trust it")
            }
            CaOrigin::Reissued { reason } => tracing::warn!(
                %reason, cert = %cert_path, %fetch, ca_out = ?self.ca_out,
                "re-issued the CA with a new key; the sandbox must re-trust the new certificate"
            ),
            _ => tracing::info!(cert = %cert_path, "loaded the CA"),
        }
        if let Some(out) = &self.ca_out {
            std::fs::write(out, ca.ca_pem())
                .with_context(|| format!("writing --ca-out {}", out.display()))?;
        }
        Ok(Arc::new(ca))
    }

    /// Builds the relay, with its own embedded engine for `--tokenizer
    /// embedded`.
    pub fn build_relay(
        &self,
        ca: Arc<CertAuthority>,
        allow_cidrs: Vec<crate::policy::AllowedNet>,
    ) -> anyhow::Result<Relay> {
        let forwarder = match &self.tokenizer {
            TokenizerMode::Remote { url, ca } => Forwarder::Remote(Arc::new(
                RemoteTokenizer::new(url, ca, self.limits.connect_timeout)
                    .map_err(|e| anyhow!(e))?,
            )),
            TokenizerMode::Embedded {
                open_key,
                upstream_ca,
            } => Forwarder::Embedded(EmbeddedTokenizer::new(
                Engine::new(open_key.clone()),
                upstream_ca,
                &self.limits,
            )?),
        };
        let relay = Relay::new(RelayConfig {
            targets: self.targets.clone(),
            allow: self.allow.clone(),
            allow_cidrs,
            ca,
            forwarder,
            proxy_authorization: self
                .proxy_authorization
                .as_ref()
                .map(|s| s.expose().to_string()),
            limits: self.limits.clone(),
            leaf_lifetime: crate::tls::leaf::DEFAULT_LIFETIME,
            leaf_capacity: crate::tls::leaf::DEFAULT_CAPACITY,
        })?;
        let mut relay = relay;
        for (host, spec) in &self.mint {
            relay = relay.minting(host, spec.clone())?;
        }
        if let TokenizerMode::Embedded { open_key, .. } = &self.tokenizer {
            // The engine is ours: open each target's secret to see whether
            // it mints (a remote tokenizer's are named by --mint).
            for (host, spec) in crate::relay::minted::detect(open_key, &self.targets)? {
                if relay.minted(&host).is_none() {
                    relay = relay.minting(&host, spec)?;
                }
            }
        }
        Ok(relay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn mint_names_a_target_and_an_https_token_url() {
        let env = env_of(&[("GH", "sealed-gh")]);
        let args = |mint: &[&str]| RelayArgs {
            targets: vec!["api.github.com=GH".into()],
            mint: mint.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let s = args(&["api.github.com=https://api.github.com/app/installations/1/access_tokens"])
            .resolve_with(&env)
            .unwrap();
        assert_eq!(s.mint.len(), 1);
        assert_eq!(
            s.mint[0].1.token_uri,
            "http://api.github.com/app/installations/1/access_tokens"
        );
        let e = args(&[
            "other.example.com=https://o/token",
            "api.github.com=http://plain/token",
            "x",
        ])
        .resolve_with(&env)
        .unwrap_err()
        .to_string();
        assert!(e.contains("other.example.com is not a --target"), "{e}");
        assert!(e.contains("is not an https:// URL"), "{e}");
        assert!(e.contains("expected HOST=TOKEN_URL"), "{e}");
    }

    #[test]
    fn mint_in_the_config_file_is_checked_like_the_flag_which_wins() {
        let env = env_of(&[("GH", "sealed-gh"), ("AUTH", "sealed-auth")]);
        let dir = std::env::temp_dir().join(format!("pp-mint-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        let args = |flags: &[&str]| RelayArgs {
            config: Some(file.clone()),
            mint: flags.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        std::fs::write(
            &file,
            "mint = [\"API.github.com=https://api.github.com/app/installations/1/access_tokens\"]\n\
             [target]\n\"api.github.com\" = \"GH\"\n\"auth.example.com\" = \"AUTH\"\n",
        )
        .unwrap();
        let s = args(&[]).resolve_with(&env).unwrap();
        assert_eq!(s.mint.len(), 1);
        assert_eq!(s.mint[0].0, "api.github.com");
        assert_eq!(
            s.mint[0].1.token_uri,
            "http://api.github.com/app/installations/1/access_tokens"
        );
        // A flag overrides the file for its host.
        let s = args(&["api.github.com=https://api.github.com/app/installations/2/access_tokens"])
            .resolve_with(&env)
            .unwrap();
        assert_eq!(
            s.mint[0].1.token_uri,
            "http://api.github.com/app/installations/2/access_tokens"
        );
        // The table form, and every error named with where it came from.
        std::fs::write(
            &file,
            "[target]\n\"api.github.com\" = \"GH\"\n\"auth.example.com\" = \"AUTH\"\n\
             [mint]\n\"auth.example.com\" = \"https://auth.example.com/token\"\n\
             \"other.example.com\" = \"https://o/token\"\n\"api.github.com\" = \"http://plain/token\"\n",
        )
        .unwrap();
        let e = args(&[]).resolve_with(&env).unwrap_err().to_string();
        assert!(
            e.contains("mint \"other.example.com\" in the config file: other.example.com is not a --target"),
            "{e}"
        );
        assert!(
            e.contains("mint \"api.github.com\" in the config file: the minting secret's token_url \"http://plain/token\" is not an https:// URL"),
            "{e}"
        );
        std::fs::write(&file, "mint = [\"nothing\"]\n").unwrap();
        let e = args(&[]).resolve_with(&env).unwrap_err().to_string();
        assert!(
            e.contains("mint \"nothing\" in the config file: expected HOST=TOKEN_URL"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn limits_have_safe_defaults_and_come_from_flags_or_the_file() {
        let s = RelayArgs::default().resolve_with(&env_of(&[])).unwrap();
        let d = Limits::default();
        assert_eq!(
            (s.limits.max_connections, s.limits.idle_timeout),
            (d.max_connections, d.idle_timeout)
        );

        let dir = std::env::temp_dir().join(format!("pp-limits-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "max-connections = 7\nidle-timeout = \"5m\"\nheader-read-timeout = \"250ms\"\nstream-idle-timeout = \"2m\"\n",
        )
        .unwrap();
        let args = RelayArgs {
            config: Some(file.clone()),
            limits: LimitArgs {
                max_header_bytes: Some(8192),
                idle_timeout: Some(Duration::from_secs(9)),
                ..Default::default()
            },
            ..Default::default()
        };
        let s = args.resolve_with(&env_of(&[])).unwrap();
        assert_eq!(s.limits.max_connections, 7);
        assert_eq!(s.limits.max_header_bytes, 8192);
        assert_eq!(
            s.limits.idle_timeout,
            Duration::from_secs(9),
            "a flag beats the file"
        );
        assert_eq!(s.limits.header_read_timeout, Duration::from_millis(250));
        assert_eq!(s.limits.stream_idle_timeout, Duration::from_secs(120));

        std::fs::write(&file, "idle-timeout = \"soon\"\nmax-connections = 0\n").unwrap();
        let e = RelayArgs {
            config: Some(file),
            ..Default::default()
        }
        .resolve_with(&env_of(&[]))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("idle-timeout") && e.contains("max-connections"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn request_body_cap_and_rate_limits_from_flags_or_the_file() {
        let env = env_of(&[("GH", "s"), ("OA", "t")]);
        let targets = vec!["api.github.com=GH".to_string(), "api.openai.com=OA".into()];
        let s = RelayArgs {
            targets: targets.clone(),
            ..Default::default()
        }
        .resolve_with(&env)
        .unwrap();
        assert_eq!(s.limits.max_request_body, None, "no cap by default");
        assert!(s.limits.rate_limits.is_empty(), "no rate limit by default");

        let dir = std::env::temp_dir().join(format!(
            "pp-caps-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "max-request-body = \"10MiB\"\nrate-limit = { \"api.github.com\" = 5, \"API.OpenAI.com\" = 7 }\n",
        )
        .unwrap();
        let from_file = RelayArgs {
            targets: targets.clone(),
            config: Some(file.clone()),
            ..Default::default()
        };
        let s = from_file.resolve_with(&env).unwrap();
        assert_eq!(s.limits.max_request_body, Some(10 << 20));
        assert_eq!(
            s.limits.rate_limits,
            BTreeMap::from([("api.github.com".into(), 5), ("api.openai.com".into(), 7)])
        );

        let flags_win = RelayArgs {
            limits: LimitArgs {
                max_request_body: Some(1000),
                rate_limits: vec!["api.github.com=2".into()],
                ..Default::default()
            },
            ..from_file
        };
        let s = flags_win.resolve_with(&env).unwrap();
        assert_eq!(s.limits.max_request_body, Some(1000));
        assert_eq!(s.limits.rate_limits["api.github.com"], 2);
        assert_eq!(
            s.limits.rate_limits["api.openai.com"], 7,
            "kept from the file"
        );

        // Bad values in the file and the flags, all reported together.
        std::fs::write(
            &file,
            "max-request-body = 0\n[rate-limit]\n\"api.github.com\" = 0\n\"other.example.com\" = 2\n\"api.openai.com\" = \"fast\"\n",
        )
        .unwrap();
        let err = RelayArgs {
            targets: targets.clone(),
            config: Some(file.clone()),
            limits: LimitArgs {
                rate_limits: vec![
                    "garbage".into(),
                    "api.github.com=many".into(),
                    "unknown.example.net=3".into(),
                ],
                ..Default::default()
            },
            ..Default::default()
        }
        .resolve_with(&env)
        .unwrap_err()
        .to_string();
        for needle in [
            "max-request-body in the config file",
            "rate-limit \"api.github.com\" in the config file: 0 is not",
            "other.example.com is not an intercepted host",
            "rate-limit \"api.openai.com\" in the config file",
            "--rate-limit \"garbage\": expected HOST=N",
            "--rate-limit \"api.github.com=many\"",
            "unknown.example.net is not an intercepted host",
        ] {
            assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
        }
        std::fs::write(&file, "max-request-body = \"lots\"\n").unwrap();
        let err = RelayArgs {
            config: Some(file),
            ..Default::default()
        }
        .resolve_with(&env)
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("max-request-body") && err.contains("lots"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn request_body_cap_and_rate_limit_flags_parse() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            limits: LimitArgs,
        }
        let cli = Cli::try_parse_from([
            "x",
            "--max-request-body",
            "512KiB",
            "--rate-limit",
            "a.com=1",
            "--rate-limit",
            "b.com=2",
        ])
        .unwrap();
        assert_eq!(cli.limits.max_request_body, Some(512 << 10));
        assert_eq!(cli.limits.rate_limits, ["a.com=1", "b.com=2"]);
        for bad in ["0", "ten", "10MB"] {
            let err = Cli::try_parse_from(["x", "--max-request-body", bad])
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains("--max-request-body"), "{err}");
        }
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("10MiB"), Ok(10 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2 MiB"), Ok(2 << 20));
        assert!(parse_size("0").unwrap_err().contains("zero"));
        assert!(parse_size("0MiB").is_err());
        assert!(parse_size("10MB").unwrap_err().contains("unit"));
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999GiB")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("10 parsecs").unwrap_err().contains("unit"));
    }

    #[test]
    fn flags_and_targets_env_merge() {
        let args = RelayArgs {
            targets: vec!["API.GitHub.com=GH".into()],
            allow: vec!["pypi.org".into(), "*.github.io".into()],
            ..Default::default()
        };
        let env = env_of(&[
            ("GH", "sealed-gh"),
            ("AN", "sealed-an"),
            ("TARGETS", "api.anthropic.com=AN, "),
        ]);
        let s = args.resolve_with(&env).unwrap();
        assert_eq!(
            s.intercepted_hosts(),
            vec!["api.anthropic.com", "api.github.com"]
        );
        assert_eq!(s.targets[1].secret_name, "GH");
        assert_eq!(s.targets[1].sealed.expose(), "sealed-gh");
        assert_eq!(
            s.tokenizer,
            TokenizerMode::Remote {
                url: DEFAULT_TOKENIZER.parse().unwrap(),
                ca: vec![],
            }
        );
        assert_eq!(s.info_port, DEFAULT_INFO_PORT);
        assert_eq!(s.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert!(
            !format!("{s:?}").contains("sealed-gh"),
            "Debug must not show secrets"
        );
    }

    #[test]
    fn proxy_env_and_auth() {
        let args = RelayArgs {
            tokenizer_auth_env: Some("TOK".into()),
            ..Default::default()
        };
        let s = args
            .resolve_with(&env_of(&[
                ("PROXY", "http://127.0.0.1:9999"),
                ("TOK", "abc"),
            ]))
            .unwrap();
        assert_eq!(
            s.tokenizer,
            TokenizerMode::Remote {
                url: "http://127.0.0.1:9999".parse().unwrap(),
                ca: vec![],
            }
        );
        assert_eq!(s.proxy_authorization.unwrap().expose(), "Bearer abc");

        // https:// with its own CA; a CA for a plain-HTTP tokenizer is refused.
        let ca = std::env::temp_dir().join(format!("pp-tokca-{}.pem", std::process::id()));
        std::fs::write(&ca, proxypilot_tokenizer_test_ca_pem()).unwrap();
        let args = RelayArgs {
            tokenizer: Some("https://tokenizer.example:8443".into()),
            tokenizer_ca: vec![ca.clone()],
            ..Default::default()
        };
        let s = args.resolve_with(&env_of(&[])).unwrap();
        assert_eq!(
            s.tokenizer,
            TokenizerMode::Remote {
                url: "https://tokenizer.example:8443".parse().unwrap(),
                ca: vec![ca.clone()],
            }
        );
        let err = RelayArgs {
            tokenizer: Some("http://127.0.0.1:9999".into()),
            tokenizer_ca: vec![ca.clone()],
            ..Default::default()
        }
        .resolve_with(&env_of(&[]))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("--tokenizer-ca only applies to an https://"),
            "{err}"
        );
        let _ = std::fs::remove_file(&ca);
    }

    /// A CA certificate, PEM (any will do: only its parsing is checked).
    fn proxypilot_tokenizer_test_ca_pem() -> String {
        CertAuthority::ephemeral(&["x.example".to_string()])
            .unwrap()
            .ca_pem()
            .to_string()
    }

    #[test]
    fn all_errors_reported_together() {
        let args = RelayArgs {
            targets: vec![
                "api.github.com=MISSING_VAR".into(),
                "nohost".into(),
                "a.com=GH".into(),
                "a.com=OTHER".into(),
            ],
            allow: vec!["1.2.3.4".into()],
            tokenizer: Some("ftp://tok".into()),
            open_key_file: Some("/nonexistent".into()),
            tokenizer_auth_env: Some("NOPE".into()),
            info_port: Some(0),
            ..Default::default()
        };
        let err = args
            .resolve_with(&env_of(&[("GH", "x"), ("OTHER", "y")]))
            .unwrap_err()
            .to_string();
        for needle in [
            "MISSING_VAR",
            "HOST=ENVVAR",
            "given twice",
            "1.2.3.4",
            "ftp://tok",
            "--open-key-file",
            "NOPE",
            "--info-port",
        ] {
            assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
        }
    }

    #[test]
    fn embedded_needs_open_key() {
        let args = RelayArgs {
            tokenizer: Some("embedded".into()),
            ..Default::default()
        };
        let err = args.resolve_with(&env_of(&[])).unwrap_err().to_string();
        assert!(err.contains("--open-key-file"), "{err}");
    }

    #[test]
    fn an_open_key_file_that_is_not_a_key_is_refused_when_resolving() {
        let path = std::env::temp_dir().join(format!("pp-badkey-{}", std::process::id()));
        std::fs::write(&path, "not a key\n").unwrap();
        let args = RelayArgs {
            tokenizer: Some("embedded".into()),
            open_key_file: Some(path.clone()),
            ..Default::default()
        };
        let err = args.resolve_with(&env_of(&[])).unwrap_err().to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(err.contains("--open-key-file"), "{err}");
        assert!(
            !err.contains("not a key"),
            "the file's content is not echoed: {err}"
        );
    }

    fn sealed_for(host: &str, var: &str) -> (OpenKey, Target) {
        let key = OpenKey::generate();
        let target = Target {
            host: host.into(),
            secret_name: var.into(),
            sealed: SecretString::new("sealed-in-memory"),
            slots: Vec::new(),
            permits: Vec::new(),
        };
        (key, target)
    }

    #[test]
    fn run_resolves_through_the_same_validation_with_its_own_defaults() {
        let (key, target) = sealed_for("api.openai.com", "OPENAI_API_KEY");
        let args = RelayArgs {
            permits: vec!["api.openai.com GET /v1/models".into()],
            allow: vec!["pypi.org".into()],
            ..Default::default()
        };
        // TARGETS and PROXY are the sidecar's conventions, not run's.
        let env = env_of(&[
            ("TARGETS", "api.github.com=GH"),
            ("GH", "x"),
            ("PROXY", "http://t:1"),
        ]);
        let s = args
            .resolve_for_run(
                &env,
                SealedInProcess {
                    open_key: key.clone(),
                    targets: vec![target],
                },
            )
            .unwrap();
        assert_eq!(s.intercepted_hosts(), vec!["api.openai.com".to_string()]);
        assert_eq!(s.targets[0].permits.len(), 1);
        assert_eq!(s.allow.len(), 1);
        assert_eq!(
            s.tokenizer,
            TokenizerMode::Embedded {
                open_key: key,
                upstream_ca: Vec::new()
            }
        );
        assert_eq!(s.info_port, 0, "run serves /ca.pem on any free port");

        // The same checks as the sidecar's: a permit for a host not
        // intercepted, and a bad limit, are refused together.
        let (key, target) = sealed_for("api.openai.com", "OPENAI_API_KEY");
        let mut bad = RelayArgs {
            permits: vec!["api.github.com GET /user".into()],
            ..Default::default()
        };
        bad.limits.max_connections = Some(0);
        let err = bad
            .resolve_for_run(
                &env_of(&[]),
                SealedInProcess {
                    open_key: key,
                    targets: vec![target],
                },
            )
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("api.github.com is not an intercepted host"),
            "{err}"
        );
        assert!(err.contains("max-connections"), "{err}");
    }

    #[test]
    fn run_refuses_in_memory_secrets_with_a_remote_tokenizer_and_a_host_twice() {
        let (key, target) = sealed_for("api.openai.com", "OPENAI_API_KEY");
        let args = RelayArgs {
            tokenizer: Some("http://127.0.0.1:9999".into()),
            ..Default::default()
        };
        let err = args
            .resolve_for_run(
                &env_of(&[]),
                SealedInProcess {
                    open_key: key,
                    targets: vec![target.clone()],
                },
            )
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--secret seals the key in this process"),
            "{err}"
        );

        let mut second = target.clone();
        second.secret_name = "OTHER".into();
        let err = RelayArgs::default()
            .resolve_for_run(
                &env_of(&[]),
                SealedInProcess {
                    open_key: OpenKey::generate(),
                    targets: vec![target, second],
                },
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("two secrets for api.openai.com"), "{err}");
    }

    #[test]
    fn permits_from_flags_and_both_file_forms() {
        let dir = std::env::temp_dir().join(format!(
            "pp-permits-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("p.toml");
        std::fs::write(
            &file,
            r#"
permit = ["api.openai.com POST /v1/chat/completions"]
[target]
"api.openai.com" = "OA"
"api.github.com" = { secret = "GH", permit = ["GET /repos/acme/**"] }
"#,
        )
        .unwrap();
        let args = RelayArgs {
            config: Some(file.clone()),
            permits: vec!["API.github.com post /repos/acme/*/issues".into()],
            ..Default::default()
        };
        let s = args
            .resolve_with(&env_of(&[("GH", "s"), ("OA", "t")]))
            .unwrap();
        let permits = |h: &str| -> Vec<String> {
            let t = s.targets.iter().find(|t| t.host == h).unwrap();
            t.permits.iter().map(|p| p.to_string()).collect()
        };
        assert_eq!(
            permits("api.github.com"),
            ["GET /repos/acme/**", "POST /repos/acme/*/issues"]
        );
        assert_eq!(permits("api.openai.com"), ["POST /v1/chat/completions"]);

        let err = RelayArgs {
            config: Some(file),
            permits: vec![
                "api.example.com GET /x".into(),
                "api.github.com GET /a/../b".into(),
                "api.github.com".into(),
            ],
            ..Default::default()
        }
        .resolve_with(&env_of(&[("GH", "s"), ("OA", "t")]))
        .unwrap_err()
        .to_string();
        for says in [
            "api.example.com is not an intercepted host",
            "resolve differently",
            "expected HOST METHOD PATH",
        ] {
            assert!(err.contains(says), "{says}: {err}");
        }
    }

    #[test]
    fn dns_and_allow_dns_from_the_file() {
        let dir = std::env::temp_dir().join(format!(
            "pp-settings-dns-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("dns.toml");
        std::fs::write(
            &good,
            "dns = [\"203.0.113.53\", \"fdaa::3\"]\nallow-dns = [\"*.pythonhosted.org\", \"Pypi.org.\"]\n",
        )
        .unwrap();
        let args = RelayArgs {
            config: Some(good),
            ..Default::default()
        };
        let s = args.resolve_with(&env_of(&[])).unwrap();
        assert_eq!(
            s.dns,
            vec![
                "203.0.113.53".parse::<std::net::IpAddr>().unwrap(),
                "fdaa::3".parse().unwrap()
            ]
        );
        let names: Vec<String> = s.allow_dns.iter().map(ToString::to_string).collect();
        assert_eq!(names, ["*.pythonhosted.org", "pypi.org"]);
        let bad = dir.join("bad.toml");
        std::fs::write(
            &bad,
            "dns = [\"resolver.example\"]\nallow-dns = [\"1.2.3.4\"]\n",
        )
        .unwrap();
        let err = RelayArgs {
            config: Some(bad),
            ..Default::default()
        }
        .resolve_with(&env_of(&[]))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("resolver.example") && err.contains("not an IP address"),
            "{err}"
        );
        assert!(err.contains("allow-dns \"1.2.3.4\""), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn toml_config_and_unknown_key() {
        let dir = std::env::temp_dir().join(format!(
            "pp-settings-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(
            &good,
            r#"
allow = ["pypi.org"]
tokenizer = "http://10.0.0.1:8080"
info-port = 15999
state-dir = "/tmp/x"
[target]
"api.github.com" = "GH"
"#,
        )
        .unwrap();
        let args = RelayArgs {
            config: Some(good),
            info_port: Some(16000),
            ..Default::default()
        };
        let s = args.resolve_with(&env_of(&[("GH", "s")])).unwrap();
        assert_eq!(s.intercepted_hosts(), vec!["api.github.com"]);
        assert_eq!(s.info_port, 16000, "flag wins over file");
        assert_eq!(s.state_dir, PathBuf::from("/tmp/x"));

        // A [kernel] table used to be accepted and ignored: now it is refused by name.
        let kernel = dir.join("kernel.toml");
        std::fs::write(&kernel, "[kernel]\nallow-cidr = [\"198.51.100.0/24\"]\n").unwrap();
        let err = RelayArgs {
            config: Some(kernel),
            ..Default::default()
        }
        .resolve_with(&env_of(&[]))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("[kernel] table is not read")
                && err.contains("allow-cidr and allow-unix as top-level keys"),
            "{err}"
        );

        // The kernel's allow lists as top-level keys (a reload can change these).
        let rules = dir.join("rules.toml");
        std::fs::write(
            &rules,
            "allow-cidr = [\"10.1.2.3:5432\", \"10.1.2.3:5432\"]\nallow-unix = [\"/run/agent.sock\"]\n",
        )
        .unwrap();
        let s = RelayArgs {
            config: Some(rules.clone()),
            ..Default::default()
        }
        .resolve_with(&env_of(&[]))
        .unwrap();
        assert_eq!(
            s.file_kernel.allow_cidrs,
            vec!["10.1.2.3:5432".parse().unwrap()],
            "parsed once, duplicates dropped"
        );
        assert_eq!(s.file_kernel.allow_unix.len(), 1);
        std::fs::write(
            &rules,
            "allow-cidr = [\"10.1.2.3/99\"]\nallow-unix = [\"agent.sock\"]\n",
        )
        .unwrap();
        let err = RelayArgs {
            config: Some(rules),
            ..Default::default()
        }
        .resolve_with(&env_of(&[]))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("allow-cidr \"10.1.2.3/99\" in the config file")
                && err.contains("allow-unix \"agent.sock\" in the config file"),
            "{err}"
        );

        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "allow = []\nintercept-hosts = [\"x\"]\n").unwrap();
        let err = RelayArgs {
            config: Some(bad),
            ..Default::default()
        }
        .resolve_with(&env_of(&[]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("intercept-hosts"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
