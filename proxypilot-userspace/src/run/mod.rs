//! `proxypilot run`: sandbox one command. A fresh cgroup, the kernel
//! programs attached to it, the relay with the embedded tokenizer under an
//! ephemeral key pair (secrets sealed in memory, so the production code
//! path runs), and the command started inside with dummy keys.

pub mod child;
pub mod secrets;
pub mod trust;

use std::{
    ffi::OsString,
    fs,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use anyhow::{bail, Context, Result};

use self::{child::RunAs, secrets::SecretSpec};
use crate::{
    cli::kernel_args::KernelArgs,
    kernel::{cgroup, cgroup::OwnedCgroup, denials::Denial},
    policy::HostPattern,
    relay::{embedded::EmbeddedTokenizer, Forward, Limits},
    settings::{RelayArgs, RelaySettings, SecretString, Target, TokenizerMode},
    sidecar::Sidecar,
    tokenizer::{seal, Engine, OpenKey, UpstreamClientConfig},
};

/// The value secret variables hold inside the sandbox.
pub const DUMMY: &str = "dummy";

/// Everything `proxypilot run` was asked to do, validated by the CLI.
pub struct RunOptions {
    pub secrets: Vec<SecretSpec>,
    /// `--tokenizer URL` with `--target HOST=ENVVAR` (pre-sealed secrets).
    pub remote: Option<RelayArgs>,
    pub allow: Vec<String>,
    pub kernel: KernelArgs,
    pub upstream_ca: Vec<PathBuf>,
    pub user: Option<String>,
    pub command: Vec<OsString>,
}

pub async fn run(opts: RunOptions) -> Result<ExitCode> {
    // Everything that can be wrong with the request is found before
    // anything is created.
    let (program, args) = opts.command.split_first().ok_or_else(|| {
        anyhow::anyhow!("no command given: proxypilot run [OPTIONS] -- CMD [ARGS...]")
    })?;
    let tokens = read_secret_values(&opts.secrets)?;
    let run_as = opts.user.as_deref().map(RunAs::lookup).transpose()?;

    let dirs = RunDirs::create()?;
    let (mut settings, embedded) = match &opts.remote {
        Some(remote) => {
            let mut args = remote.clone();
            args.state_dir = Some(dirs.private.clone());
            (args.resolve()?, None)
        }
        None => embedded_settings(&opts, &tokens, &dirs.private)?,
    };
    for a in &opts.allow {
        let p = HostPattern::parse(a).map_err(|e| anyhow::anyhow!("--allow {a:?}: {e}"))?;
        if !settings.allow.contains(&p) {
            settings.allow.push(p);
        }
    }

    let parent = cgroup::cgroup_of("self")?;
    let sandbox = OwnedCgroup::create(&parent, &format!("proxypilot-run-{}", std::process::id()))?;
    let mut cleanup = Cleanup {
        sidecar: None,
        cgroup: Some(sandbox),
        dirs: Some(dirs),
    };
    let cgroup_path = cleanup.cgroup.as_ref().unwrap().path().to_path_buf();

    let hinted = Arc::new(AtomicBool::new(false));
    let sidecar = Sidecar::start(
        &cgroup_path,
        &opts.kernel,
        &settings,
        embedded,
        move |denial| match hint_for(&denial) {
            Some(hint) if !hinted.swap(true, Ordering::Relaxed) => {
                eprintln!("proxypilot: blocked {denial}. {hint}")
            }
            _ => tracing::info!(target: "denied", "{denial}"),
        },
    )
    .await?;
    let bundle = trust::write_bundle(&cleanup.dirs.as_ref().unwrap().public, sidecar.ca.ca_pem())?;
    cleanup.sidecar = Some(sidecar);

    let env = child_env(&opts.secrets, &bundle, run_as.as_ref());
    let mut child = child::spawn(child::Spawn {
        program,
        args,
        env,
        cgroup: &cgroup_path,
        run_as: run_as.as_ref(),
    })?;
    let status = child::wait_forwarding_signals(&mut child).await;
    child::reclaim_terminal();
    drop(cleanup);
    Ok(ExitCode::from(child::exit_code(status?)))
}

/// The one-line advice printed the first time something is denied, or
/// `None` for denials that are not worth a line: a UDP connect() that is not
/// DNS is usually an address probe (glibc and Go connect a UDP socket to
/// each candidate address to sort them, sending nothing).
fn hint_for(denial: &Denial) -> Option<String> {
    let port = denial.origin.addr.port();
    match (denial.protocol.as_str(), denial.hook.starts_with("connect")) {
        ("tcp", _) => Some(format!(
            "Allow it with --allow-cidr {}, or --allow HOST for an HTTPS host",
            denial.origin.addr
        )),
        ("udp", true) if port != 53 => None,
        ("udp", _) if port == 53 => Some(format!(
            "Allow this DNS server with --dns {}",
            denial.origin.addr.ip()
        )),
        ("udp", _) if port == proxypilot_common::QUIC_PORT => {
            Some("QUIC is always refused; clients fall back to HTTPS over TCP".to_string())
        }
        _ => Some("only DNS (--dns) may use UDP".to_string()),
    }
}

/// Reads every secret's real value; all missing variables are named at once.
fn read_secret_values(specs: &[SecretSpec]) -> Result<Vec<SecretString>> {
    let mut missing = Vec::new();
    let mut values = Vec::new();
    for s in specs {
        match std::env::var(&s.var) {
            Ok(v) if !v.trim().is_empty() && v != DUMMY => {
                values.push(SecretString::new(v.trim().to_string()))
            }
            Ok(v) if v == DUMMY => bail!(
                "{} holds the dummy value; set it to the real key in proxypilot's environment",
                s.var
            ),
            _ => missing.push(s.var.as_str()),
        }
    }
    if !missing.is_empty() {
        bail!(
            "the secret variable(s) {} are not set; export the real key(s) in the environment \
             proxypilot runs in (the command itself will only see a dummy)",
            missing.join(", ")
        );
    }
    Ok(values)
}

/// Seals each secret in memory to a fresh key pair whose private half never
/// leaves this process, and builds the embedded tokenizer that opens them.
fn embedded_settings(
    opts: &RunOptions,
    tokens: &[SecretString],
    state_dir: &Path,
) -> Result<(RelaySettings, Option<Arc<dyn Forward>>)> {
    let open_key = OpenKey::generate();
    let seal_key = open_key.seal_key();
    let mut targets: Vec<Target> = Vec::new();
    for (spec, token) in opts.secrets.iter().zip(tokens) {
        if targets.iter().any(|t| t.host == spec.host) {
            bail!("two secrets for {}; give each host one --secret", spec.host);
        }
        targets.push(Target {
            host: spec.host.clone(),
            secret_name: spec.var.clone(),
            sealed: SecretString::new(seal(&seal_key, &spec.to_secret(token.expose()))),
            slots: spec.slots.clone(),
        });
    }
    let upstream = UpstreamClientConfig {
        extra_ca_files: opts.upstream_ca.clone(),
        ..Default::default()
    };
    let embedded: Arc<dyn Forward> = EmbeddedTokenizer::new(Engine::new(open_key), &upstream)?;
    let settings = RelaySettings {
        targets,
        allow: Vec::new(),
        tokenizer: TokenizerMode::Embedded {
            open_key_file: PathBuf::new(),
            upstream_ca: opts.upstream_ca.clone(),
        },
        proxy_authorization: None,
        state_dir: state_dir.to_path_buf(),
        ca_out: None,
        info_port: 0,
        kernel_config: None,
        limits: Limits::default(),
    };
    Ok((settings, Some(embedded)))
}

/// The command's environment: proxypilot's own, with every secret variable
/// replaced by a dummy and CA trust pointed at the bundle.
fn child_env(
    secrets: &[SecretSpec],
    bundle: &Path,
    run_as: Option<&RunAs>,
) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| {
            let k = k.to_string_lossy();
            !trust::CA_VARS.contains(&k.as_ref()) && !secrets.iter().any(|s| s.var == k)
        })
        .collect();
    env.extend(
        secrets
            .iter()
            .map(|s| (OsString::from(&s.var), OsString::from(DUMMY))),
    );
    env.extend(trust::env_for(bundle));
    if let Some(r) = run_as {
        env.retain(|(k, _)| !matches!(k.to_str(), Some("HOME" | "USER" | "LOGNAME")));
        env.push(("HOME".into(), r.home.clone().into_os_string()));
        env.push(("USER".into(), r.name.clone().into()));
        env.push(("LOGNAME".into(), r.name.clone().into()));
    }
    env
}

/// A private directory (0700: the CA key) and a public one (0755: the CA
/// bundle the command reads), both removed at exit.
struct RunDirs {
    private: PathBuf,
    public: PathBuf,
}

impl RunDirs {
    fn create() -> Result<RunDirs> {
        let base = std::env::temp_dir().join(format!("proxypilot-run-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&base)
            .with_context(|| format!("creating {}", base.display()))?;
        // Mode bits from mkdir are masked by the umask; set them exactly.
        fs::set_permissions(&base, fs::Permissions::from_mode(0o755))?;
        let private = base.join("private");
        fs::DirBuilder::new().mode(0o700).create(&private)?;
        fs::set_permissions(&private, fs::Permissions::from_mode(0o700))?;
        Ok(RunDirs {
            private,
            public: base,
        })
    }
}

/// Undoes everything on every way out: the cgroup's processes are killed
/// and it is removed, the programs detached, the directories deleted.
struct Cleanup {
    sidecar: Option<Sidecar>,
    cgroup: Option<OwnedCgroup>,
    dirs: Option<RunDirs>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        // Processes first, so none runs unfiltered after the detach.
        let mut cgroup_id = None;
        if let Some(cg) = self.cgroup.take() {
            cgroup_id = cgroup::cgroup_id(cg.path()).ok();
            if let Err(e) = cg.remove() {
                tracing::warn!(cgroup = %cg.path().display(), error = %e, "could not remove the sandbox cgroup");
            }
        }
        let detached = match self.sidecar.take() {
            Some(s) => s.detach(),
            // A start that failed half-way may have pinned some programs.
            None => cgroup_id
                .map_or(Ok(false), crate::kernel::attach::detach_by_id)
                .map(|_| ()),
        };
        if let Err(e) = detached {
            tracing::warn!(error = %e, "could not detach the kernel programs");
        }
        if let Some(d) = self.dirs.take() {
            let _ = fs::remove_dir_all(&d.public);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::OriginalDestination;

    fn denial(protocol: &str, hook: &'static str, addr: &str) -> Denial {
        Denial {
            origin: OriginalDestination {
                addr: addr.parse().unwrap(),
                pid: 1,
                uid: 0,
                cgroup_id: 1,
                comm: "curl".into(),
            },
            protocol: protocol.into(),
            reason: "not on the allow list",
            hook,
        }
    }

    #[test]
    fn hints_say_what_to_allow_and_skip_address_probes() {
        let tcp = hint_for(&denial("tcp", "connect4", "203.0.113.9:5432")).unwrap();
        assert!(tcp.contains("--allow-cidr 203.0.113.9:5432"), "{tcp}");
        let dns = hint_for(&denial("udp", "sendmsg4", "198.51.100.1:53")).unwrap();
        assert!(dns.contains("--dns 198.51.100.1"), "{dns}");
        let dns = hint_for(&denial("udp", "connect6", "[2001:db8::1]:53")).unwrap();
        assert!(dns.contains("--dns 2001:db8::1"), "{dns}");
        // glibc's RFC 6724 sorting connects UDP sockets to port 443 and sends nothing.
        assert_eq!(
            hint_for(&denial("udp", "connect4", "203.0.113.11:443")),
            None
        );
        let quic = hint_for(&denial("udp", "sendmsg4", "203.0.113.11:443")).unwrap();
        assert!(quic.contains("QUIC"), "{quic}");
    }
}
