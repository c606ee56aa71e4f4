//! `proxypilot run`: sandbox one command. A fresh cgroup, the kernel
//! programs attached to it, the relay with the embedded tokenizer under an
//! ephemeral key pair (secrets sealed in memory, so the production code
//! path runs), and the command started inside with dummy keys, as an
//! identity with no privilege on the host, in its own session and pty.

pub mod child;
pub mod env;
pub mod identity;
pub mod secrets;
pub mod terminal;
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
use proxypilot_common::{DenyReason, Hook};

use self::{
    identity::{Identity, RunAs},
    secrets::SecretSpec,
};
use crate::{
    kernel::{cgroup, cgroup::OwnedCgroup, denials::Denial},
    policy::HostPattern,
    relay::{embedded::EmbeddedTokenizer, Forward, Limits},
    settings::{LimitArgs, RelayArgs, RelaySettings, SecretString, Target, TokenizerMode},
    sidecar::{KernelOptions, Sidecar},
    tokenizer::{seal, Engine, OpenKey},
};

/// The value secret variables hold inside the sandbox.
pub const DUMMY: &str = "dummy";

/// Everything `proxypilot run` was asked to do, validated by the CLI.
pub struct RunOptions {
    pub secrets: Vec<SecretSpec>,
    /// `--tokenizer URL` with `--target HOST=ENVVAR` (pre-sealed secrets).
    pub remote: Option<RelayArgs>,
    /// `--permit HOST METHOD PATH`, for the hosts of the secrets or targets.
    pub permits: Vec<String>,
    pub allow: Vec<String>,
    pub kernel: KernelOptions,
    pub upstream_ca: Vec<PathBuf>,
    pub user: Option<String>,
    /// Caps and timeouts, as for the sidecar.
    pub limits: LimitArgs,
    /// `--metrics-listen`, as for the sidecar.
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub command: Vec<OsString>,
}

pub async fn run(opts: RunOptions) -> Result<ExitCode> {
    // Everything that can be wrong with the request is found before
    // anything is created.
    let (program, args) = opts.command.split_first().ok_or_else(|| {
        anyhow::anyhow!("no command given: proxypilot run [OPTIONS] -- CMD [ARGS...]")
    })?;
    let tokens = read_secret_values(&opts.secrets)?;
    // (With a remote tokenizer, `RelayArgs::resolve` checks them.)
    let limits = opts
        .limits
        .resolve_for_run(&|host| opts.secrets.iter().any(|s| s.host == host))?;
    let identity = match opts.user.as_deref() {
        Some(name) => Identity::User(RunAs::lookup(name)?),
        None => identity::pick_fresh()?,
    };

    // Owns the directories from here on, so a refused setting removes them.
    let mut cleanup = Cleanup {
        sidecar: None,
        cgroup: None,
        dirs: Some(RunDirs::create(&identity)?),
    };
    let private = cleanup.dirs.as_ref().unwrap().private.clone();
    let (mut settings, embedded) = match &opts.remote {
        Some(remote) => {
            let mut args = remote.clone();
            args.state_dir = Some(private);
            (args.resolve()?, None)
        }
        None => embedded_settings(&opts, &tokens, limits, &private)?,
    };
    settings.add_permits(&opts.permits)?;
    for a in &opts.allow {
        let p = HostPattern::parse(a).map_err(|e| anyhow::anyhow!("--allow {a:?}: {e}"))?;
        if !settings.allow.contains(&p) {
            settings.allow.push(p);
        }
    }

    let parent = cgroup::cgroup_of("self")?;
    let sandbox = OwnedCgroup::create(&parent, &format!("proxypilot-run-{}", std::process::id()))?;
    cleanup.cgroup = Some(sandbox);
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
            _ if denial.is_address_probe() => tracing::debug!(target: "denied", "{denial}"),
            _ => {
                let budget = crate::logbudget::refusals();
                if budget.admit(denial.why(), denial.origin.pid, &denial.origin.comm) {
                    tracing::info!(target: "denied", "{denial}")
                }
            }
        },
    )
    .await?;
    let bundle = trust::write_bundle(
        &cleanup.dirs.as_ref().unwrap().public,
        sidecar.ca().ca_pem(),
    )?;
    cleanup.sidecar = Some(sidecar);

    check_reachable(&identity, &bundle)?;

    let withheld = withheld(&opts, &tokens, &settings);
    let env = env::for_command(
        std::env::vars_os(),
        &withheld,
        &bundle,
        &identity,
        &cleanup.dirs.as_ref().unwrap().home,
    );
    let pty = terminal::Pty::open_if_terminal(identity.host_uid())?;
    let waiter = child::Waiter::new()?;
    let pid = child::spawn(child::Spawn {
        program,
        args,
        env,
        cgroup: &cgroup_path,
        identity: &identity,
        pty: pty.as_ref(),
    })?;
    tracing::debug!(%pid, uid = identity.host_uid(), "command started");
    let mut relay = pty.map(terminal::Pty::start_relay).transpose()?;
    let code = waiter.wait(pid, relay.as_mut()).await;
    // The caller's terminal is restored before anything else is said.
    drop(relay);
    drop(cleanup);
    Ok(ExitCode::from(code?))
}

/// The credentials the command's environment must not hold: the real
/// values of the `--secret`s (their variables become dummies), and in
/// remote-tokenizer mode the sealed secrets and the tokenizer's token.
fn withheld(opts: &RunOptions, tokens: &[SecretString], settings: &RelaySettings) -> env::Withheld {
    let mut w = env::Withheld {
        dummies: opts.secrets.iter().map(|s| s.var.clone()).collect(),
        ..Default::default()
    };
    w.values
        .extend(tokens.iter().map(|t| t.expose().to_string()));
    if opts.remote.is_some() {
        for t in &settings.targets {
            w.names.push(t.secret_name.clone());
            w.values.push(t.sealed.expose().to_string());
        }
    }
    if let Some(var) = opts
        .remote
        .as_ref()
        .and_then(|r| r.tokenizer_auth_env.clone())
    {
        w.names.push(var);
    }
    if let Some(auth) = &settings.proxy_authorization {
        let token = auth.expose();
        w.values
            .push(token.strip_prefix("Bearer ").unwrap_or(token).to_string());
    }
    w
}

/// The command must be able to read the CA bundle; say so now rather than
/// leave it with TLS errors. A working directory it cannot enter is only
/// worth a warning: plenty of commands never look at it.
fn check_reachable(identity: &Identity, bundle: &Path) -> Result<()> {
    let (uid, gids) = (identity.host_uid(), identity.host_gids());
    if let Some(blocker) = identity::first_denial(bundle, 4, uid, &gids) {
        bail!(
            "the command's uid {uid} cannot read the CA bundle {}: {} is closed to it. \
             Point TMPDIR at a directory others may enter (e.g. TMPDIR=/tmp)",
            bundle.display(),
            blocker.display()
        );
    }
    if let Ok(cwd) = std::env::current_dir() {
        if let Some(blocker) = identity::first_denial(&cwd, 1, uid, &gids) {
            tracing::warn!(
                "the command runs as uid {uid}, which cannot enter the working directory {} \
                 ({} is closed to it); it can use only what others may read",
                cwd.display(),
                blocker.display()
            );
        }
    }
    Ok(())
}

/// The one-line advice printed the first time something is denied, or
/// `None` for denials that are not worth a line: a UDP connect() that is not
/// DNS is usually an address probe (glibc and Go connect a UDP socket to
/// each candidate address to sort them, sending nothing).
fn hint_for(denial: &Denial) -> Option<String> {
    let port = denial.origin.addr.port();
    match denial.hook {
        // Never allowed in a sandbox, whatever the flags: say so rather
        // than suggest a flag that would not help.
        Hook::SockCreate | Hook::Setsockopt | Hook::Frame => {
            return Some(
                "the sandbox may only use TCP and UDP sockets, unchanged by options that \
                 reroute packets (SECURITY.md, \"Only allowed egress\")"
                    .to_string(),
            )
        }
        Hook::Ingress => {
            return Some(format!(
                "connections into the sandbox come only from allowed peers; allow this one \
                 with --allow-cidr {}",
                denial.origin.addr
            ))
        }
        Hook::Egress if !matches!(denial.protocol.as_str(), "tcp" | "udp") => {
            return Some("only TCP and UDP packets leave the sandbox".to_string())
        }
        Hook::Egress if denial.reason != DenyReason::NotAllowed => {
            return Some(
                "IP options, IPv6 extension headers and fragments never leave the sandbox"
                    .to_string(),
            )
        }
        Hook::Egress | Hook::Connect4 | Hook::Connect6 | Hook::Sendmsg4 | Hook::Sendmsg6 => {}
    }
    let is_connect = matches!(denial.hook, Hook::Connect4 | Hook::Connect6);
    match (denial.protocol.as_str(), is_connect) {
        // DNS to any address goes to proxypilot's resolver: refused only for
        // a family the resolver does not listen on, or by the backstop.
        ("tcp" | "udp", _) if port == proxypilot_common::DNS_PORT => Some(
            "DNS is answered by proxypilot only (here it has no resolver for this address \
             family, or the packet bypassed the socket hooks); to resolve a name the command \
             may not reach otherwise, give --allow-dns NAME"
                .to_string(),
        ),
        ("tcp", _) => Some(format!(
            "Allow it with --allow-cidr {}, or --allow HOST for an HTTPS host",
            denial.origin.addr
        )),
        ("udp", true) if port != 53 => None,
        ("udp", _) if port == proxypilot_common::QUIC_PORT => {
            Some("QUIC is always refused; clients fall back to HTTPS over TCP".to_string())
        }
        _ => Some("only DNS may use UDP (proxypilot answers it)".to_string()),
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
    limits: Limits,
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
            permits: Vec::new(),
        });
    }
    let embedded: Arc<dyn Forward> =
        EmbeddedTokenizer::new(Engine::new(open_key), &opts.upstream_ca, &limits)?;
    let settings = RelaySettings {
        mint: Vec::new(),
        targets,
        allow: Vec::new(),
        allow_dns: Vec::new(),
        dns: Vec::new(),
        tokenizer: TokenizerMode::Embedded {
            open_key_file: PathBuf::new(),
            upstream_ca: opts.upstream_ca.clone(),
        },
        proxy_authorization: None,
        state_dir: state_dir.to_path_buf(),
        ca_out: None,
        info_port: 0,
        metrics_listen: opts.metrics_listen,
        limits,
        file_kernel: Default::default(),
    };
    Ok((settings, Some(embedded)))
}

/// A private directory (0700: the CA key), a public one (0755: the CA
/// bundle the command reads) and, for a fresh identity, the command's HOME
/// (0700, its own), all removed at exit.
struct RunDirs {
    private: PathBuf,
    public: PathBuf,
    home: PathBuf,
}

impl RunDirs {
    fn create(identity: &Identity) -> Result<RunDirs> {
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
        let home = base.join("home");
        if let Identity::Fresh { uid, gid } = identity {
            fs::DirBuilder::new().mode(0o700).create(&home)?;
            std::os::unix::fs::chown(&home, Some(*uid), Some(*gid))
                .with_context(|| format!("giving {} to the command's uid", home.display()))?;
        }
        Ok(RunDirs {
            private,
            public: base,
            home,
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

    fn denial(protocol: &str, hook: Hook, addr: &str) -> Denial {
        Denial {
            origin: OriginalDestination {
                addr: addr.parse().unwrap(),
                pid: 1,
                uid: 0,
                cgroup_id: 1,
                comm: "curl".into(),
            },
            protocol: protocol.into(),
            hook,
            reason: DenyReason::NotAllowed,
            detail: 0,
        }
    }

    #[test]
    fn hints_say_what_to_allow_and_skip_address_probes() {
        let tcp = hint_for(&denial("tcp", Hook::Connect4, "203.0.113.9:5432")).unwrap();
        assert!(tcp.contains("--allow-cidr 203.0.113.9:5432"), "{tcp}");
        let dns = hint_for(&denial("udp", Hook::Sendmsg4, "198.51.100.1:53")).unwrap();
        assert!(dns.contains("answered by proxypilot"), "{dns}");
        let dns = hint_for(&denial("tcp", Hook::Connect6, "[2001:db8::1]:53")).unwrap();
        assert!(dns.contains("--allow-dns"), "{dns}");
        // glibc's RFC 6724 sorting connects UDP sockets to port 443 and sends nothing.
        assert_eq!(
            hint_for(&denial("udp", Hook::Connect4, "203.0.113.11:443")),
            None
        );
        let quic = hint_for(&denial("udp", Hook::Sendmsg4, "203.0.113.11:443")).unwrap();
        assert!(quic.contains("QUIC"), "{quic}");
        // The socket-level refusals and the backstop name no flag that
        // would not help.
        for hook in [Hook::SockCreate, Hook::Setsockopt, Hook::Frame] {
            let h = hint_for(&denial("icmp", hook, "0.0.0.0:0")).unwrap();
            assert!(
                h.contains("only use TCP and UDP") && !h.contains("--"),
                "{hook:?}: {h}"
            );
        }
        let raw = hint_for(&denial("icmp", Hook::Egress, "203.0.113.9:0")).unwrap();
        assert!(raw.contains("only TCP and UDP packets"), "{raw}");
        let inbound = hint_for(&denial("tcp", Hook::Ingress, "203.0.113.9:40000")).unwrap();
        assert!(
            inbound.contains("--allow-cidr 203.0.113.9:40000"),
            "{inbound}"
        );
    }
}
