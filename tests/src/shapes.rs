//! The two ways proxypilot is deployed, set up for tests inside a
//! [`FakeInternet`]:
//!
//! - the Fly shape ([`FlyShape`]): a sandbox cgroup made separately,
//!   `proxypilot sidecar` attached to it with sealed secrets, and either the
//!   standalone `proxypilot tokenizer` (remote) or the embedded engine;
//! - the local shape: `proxypilot run` (see [`local_run`]).
//!
//! Both run every client command the same way, so scenarios are written
//! once and run in both shapes.

use std::{
    fs,
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use crate::{
    proxypilot_bin, run_ok,
    sandbox::SandboxCommand,
    upstream::{FakeInternet, ANTHROPIC, DNS_IP, GITHUB, OPENAI},
    Proxypilot, TestCgroup,
};

/// Where the sidecar relays intercepted requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tokenizer {
    /// `proxypilot tokenizer` on loopback, as Fly's tokenizer would be.
    Remote,
    /// The engine inside the sidecar.
    Embedded,
}

/// The port the standalone tokenizer listens on (loopback, in the test's
/// network namespace).
pub const TOKENIZER_PORT: u16 = 18080;

/// How each API's key is sealed: the hosts' credential headers and formats.
pub fn seal_args(host: &str) -> Vec<&'static str> {
    match host {
        ANTHROPIC => vec![
            "--allowed-header",
            "x-api-key",
            "--allowed-header",
            "authorization",
            "--allowed-format",
            "%s",
            "--allowed-format",
            "Bearer %s",
        ],
        OPENAI => vec![
            "--allowed-header",
            "authorization",
            "--allowed-format",
            "Bearer %s",
        ],
        GITHUB => vec![
            "--allowed-header",
            "authorization",
            "--allowed-format",
            "token %s",
            "--allowed-format",
            "Bearer %s",
        ],
        _ => vec![],
    }
}

/// A sandbox cgroup served by `proxypilot sidecar`.
pub struct FlyShape {
    pub cgroup: TestCgroup,
    pub sidecar: Proxypilot,
    pub tokenizer: Option<Proxypilot>,
    /// The CA the sandbox trusts (`--ca-out`).
    pub ca: PathBuf,
    pub dir: PathBuf,
}

impl FlyShape {
    /// Seals the three API keys with `proxypilot seal`, starts the tokenizer
    /// (remote mode) and the sidecar, and waits until both are ready.
    /// `extra` goes on the sidecar's command line.
    pub fn start(net: &FakeInternet, name: &str, mode: Tokenizer, extra: &[&str]) -> FlyShape {
        FlyShape::start_with_targets(net, name, mode, extra, &[ANTHROPIC, OPENAI, GITHUB])
    }

    /// As [`FlyShape::start`], with `--target` flags for `flag_targets`
    /// only (the sealed secrets of all three are in the environment, for a
    /// config file to name).
    pub fn start_with_targets(
        net: &FakeInternet,
        name: &str,
        mode: Tokenizer,
        extra: &[&str],
        flag_targets: &[&str],
    ) -> FlyShape {
        FlyShape::start_inner(net, name, mode, extra, flag_targets, None, None)
    }

    /// As [`FlyShape::start`], with the sidecar run from `sidecar_bin`
    /// instead of this build's binary (the relay bench's A/B column,
    /// `PROXYPILOT_BENCH_AGAINST`). Keys and sealed secrets still come
    /// from this build: their formats do not change between builds.
    pub fn start_with_sidecar_binary(
        net: &FakeInternet,
        name: &str,
        mode: Tokenizer,
        extra: &[&str],
        sidecar_bin: &std::path::Path,
    ) -> FlyShape {
        FlyShape::start_inner(
            net,
            name,
            mode,
            extra,
            &[ANTHROPIC, OPENAI, GITHUB],
            None,
            Some(sidecar_bin),
        )
    }

    /// As [`FlyShape::start`], with api.github.com's secret a
    /// `github_app_processor` one (`proxypilot seal --github-app-id`) for
    /// the app `app_id`, installation `installation_id`, key `key_file`.
    pub fn start_with_github_app(
        net: &FakeInternet,
        name: &str,
        mode: Tokenizer,
        (app_id, installation_id, key_file): (&str, &str, &std::path::Path),
        extra: &[&str],
    ) -> FlyShape {
        FlyShape::start_inner(
            net,
            name,
            mode,
            extra,
            &[ANTHROPIC, OPENAI, GITHUB],
            Some((app_id, installation_id, key_file)),
            None,
        )
    }

    /// As [`FlyShape::start_with_github_app`], with no `--target` flag (a
    /// config file in `extra` names the targets). Besides `GH_SEALED`, the
    /// environment holds `GH_SEALED_ALT`: the same github_app secret sealed
    /// again (other bytes), for a reload that changes the sealed secret.
    pub fn start_with_github_app_from_config(
        net: &FakeInternet,
        name: &str,
        mode: Tokenizer,
        app: (&str, &str, &std::path::Path),
        extra: &[&str],
    ) -> FlyShape {
        FlyShape::start_inner(net, name, mode, extra, &[], Some(app), None)
    }

    fn start_inner(
        net: &FakeInternet,
        name: &str,
        mode: Tokenizer,
        extra: &[&str],
        flag_targets: &[&str],
        github_app: Option<(&str, &str, &std::path::Path)>,
        sidecar_bin: Option<&std::path::Path>,
    ) -> FlyShape {
        let dir = net.dir.0.join(format!("fly-{name}"));
        fs::create_dir_all(&dir).unwrap();
        let open_key = dir.join("open.key");
        let out = run_ok(
            Command::new(proxypilot_bin())
                .arg("keygen")
                .arg("--out")
                .arg(&open_key),
        );
        let seal_key = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let keys = net.apis.keys();
        let mut sealed = Vec::new();
        for (host, var, real) in [
            (ANTHROPIC, "ANTHROPIC_SEALED", &keys.anthropic),
            (OPENAI, "OPENAI_SEALED", &keys.openai),
            (GITHUB, "GH_SEALED", &keys.github),
        ] {
            let out = match github_app.filter(|_| host == GITHUB) {
                Some(app) => run_ok(&mut seal_github_app(&seal_key, app)),
                None => run_ok(
                    Command::new(proxypilot_bin())
                        .args(["seal", "--no-auth", "--host", host, "--seal-key", &seal_key])
                        .args(["--token-env", "REAL"])
                        .args(seal_args(host))
                        .env("REAL", real),
                ),
            };
            sealed.push((
                host,
                var,
                String::from_utf8(out.stdout).unwrap().trim().to_string(),
            ));
        }
        if let Some(app) = github_app {
            let out = run_ok(&mut seal_github_app(&seal_key, app));
            sealed.push((
                "",
                "GH_SEALED_ALT",
                String::from_utf8(out.stdout).unwrap().trim().to_string(),
            ));
        }

        let cgroup = TestCgroup::new(&format!("fly-{name}"));
        let tokenizer = (mode == Tokenizer::Remote).then(|| start_tokenizer(net, &dir, &open_key));

        let ca = dir.join("ca.pem");
        let ready = dir.join("ready");
        let mut sidecar = net
            .command(sidecar_bin.map_or_else(proxypilot_bin, std::path::Path::to_path_buf))
            .inherit_env()
            .arg("sidecar")
            .arg("--cgroup")
            .arg(cgroup.path())
            // The stub DNS unless `extra` names other servers.
            .args(if extra.contains(&"--dns") {
                vec![]
            } else {
                vec!["--dns", DNS_IP]
            })
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--ca-out")
            .arg(&ca)
            .arg("--ready-file")
            .arg(&ready)
            .args(extra);
        for (host, var, value) in &sealed {
            sidecar = sidecar.env(var, value);
            if flag_targets.contains(host) {
                sidecar = sidecar.arg("--target").arg(format!("{host}={var}"));
            }
        }
        sidecar = match mode {
            Tokenizer::Remote => {
                sidecar.args(["--tokenizer", &format!("http://127.0.0.1:{TOKENIZER_PORT}")])
            }
            Tokenizer::Embedded => sidecar
                .args(["--tokenizer", "embedded", "--open-key-file"])
                .arg(&open_key)
                .arg("--upstream-ca")
                .arg(net.apis.ca_pem_path()),
        };
        let sidecar = Proxypilot::start(sidecar.command(), &ready, dir.join("sidecar.log"));
        FlyShape {
            cgroup,
            sidecar,
            tokenizer,
            ca,
            dir,
        }
    }

    /// A command in the sandbox: in the cgroup, resolving through the stub
    /// DNS, with dummy keys and the proxypilot CA as its only extra trust.
    pub fn sandbox(
        &self,
        net: &FakeInternet,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> SandboxCommand {
        let mut cmd = net.command(program).cgroup(self.cgroup.path());
        for (k, v) in sandbox_env(&self.ca) {
            cmd = cmd.env(k, v);
        }
        cmd
    }

    /// The sidecar's `/stats` (info port 15480, as the sandbox reaches it).
    pub fn stats(&self, net: &FakeInternet) -> serde_json::Value {
        let out = self
            .sandbox(net, "curl")
            .args(["-sS", "--max-time", "10", "http://127.0.0.1:15480/stats"])
            .command()
            .stdin(std::process::Stdio::null())
            .output()
            .expect("running curl");
        let body = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/stats: {e}: {body}"))
    }

    /// The sidecar's log so far. The sidecar writes through a writer
    /// thread, so the line for something the test just saw happen can land
    /// a moment later: this returns once the log has stopped growing
    /// (100 ms without a new byte, 3 s at most).
    pub fn sidecar_log(&self) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        let mut log = self.sidecar.stderr();
        loop {
            std::thread::sleep(std::time::Duration::from_millis(100));
            let now = self.sidecar.stderr();
            if now.len() == log.len() || std::time::Instant::now() > deadline {
                return now;
            }
            log = now;
        }
    }

    /// The sidecar's log once it holds every one of `needles` (denials
    /// and audit lines are written when their event has ended, which may
    /// be just after the test saw it), or as it is after 10 s.
    pub fn log_with(&self, needles: &[&str]) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let log = self.sidecar_log();
            if needles.iter().all(|n| log.contains(n)) || std::time::Instant::now() > deadline {
                return log;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

/// Starts `proxypilot tokenizer` on 127.0.0.1:[`TOKENIZER_PORT`], trusting
/// the test CA for the upstreams, and waits until it accepts connections.
pub fn start_tokenizer(
    net: &FakeInternet,
    dir: &std::path::Path,
    open_key: &std::path::Path,
) -> Proxypilot {
    let log = dir.join("tokenizer.log");
    let mut cmd = net
        .command(proxypilot_bin())
        .inherit_env()
        .arg("tokenizer")
        .args([
            "--listen",
            &format!("127.0.0.1:{TOKENIZER_PORT}"),
            "--open-key-file",
        ])
        .arg(open_key)
        .arg("--upstream-ca")
        .arg(net.apis.ca_pem_path())
        .command();
    let stderr = fs::File::create(&log).unwrap();
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(stderr);
    let child = cmd.spawn().expect("start proxypilot tokenizer");
    let addr = SocketAddr::from(([127, 0, 0, 1], TOKENIZER_PORT));
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "the tokenizer did not listen in 20s:\n{}",
            fs::read_to_string(&log).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(20));
    }
    Proxypilot {
        child,
        stderr_path: log,
    }
}

/// What the sandbox's environment holds: dummy keys, and every runtime's
/// CA variable pointing at proxypilot's CA (the shell container's entry
/// point does the same with the CA it fetches from the sidecar).
pub fn sandbox_env(ca: &std::path::Path) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = ["ANTHROPIC_API_KEY", "OPENAI_API_KEY", "GH_TOKEN"]
        .iter()
        .map(|k| (k.to_string(), "dummy".to_string()))
        .collect();
    for var in [
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "NODE_EXTRA_CA_CERTS",
        "GIT_SSL_CAINFO",
    ] {
        env.push((var.to_string(), ca.display().to_string()));
    }
    env
}

/// The installation prefix of the tests' `python3` when it lives in /root
/// (pyenv), which only root may enter.
pub fn python_prefix_in_root_home() -> Option<PathBuf> {
    static PREFIX: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    PREFIX
        .get_or_init(|| {
            let out = Command::new("python3")
                .args(["-c", "import sys; print(sys.base_prefix)"])
                .output()
                .ok()?;
            let prefix = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
            prefix.starts_with("/root/").then_some(prefix)
        })
        .clone()
}

/// `proxypilot run` (the local shape) with the real keys in its own
/// environment and `--secret` for each API, running `cmd`.
pub fn local_run(net: &FakeInternet, extra: &[&str], cmd: &[&str]) -> SandboxCommand {
    let mut args = vec![
        "--secret",
        "ANTHROPIC_API_KEY",
        "--secret",
        "OPENAI_API_KEY",
        "--secret",
        "GH_TOKEN",
    ];
    args.extend_from_slice(extra);
    local_run_with(net, &args, cmd)
}

/// `proxypilot run` with the real keys in its environment, trusting the
/// test CA for the upstreams only, the stub DNS allowed, and `run_args`
/// (the `--secret`s among them) as given.
pub fn local_run_with(net: &FakeInternet, run_args: &[&str], cmd: &[&str]) -> SandboxCommand {
    let keys = net.apis.keys();
    let mut run = net.command(proxypilot_bin());
    // The command runs as a uid of its own, which cannot enter /root.
    if let Some(prefix) = python_prefix_in_root_home() {
        run = run.from_root_home(prefix);
    }
    run.env("ANTHROPIC_API_KEY", &keys.anthropic)
        .env("OPENAI_API_KEY", &keys.openai)
        .env("GH_TOKEN", &keys.github)
        .env("TMPDIR", &net.dir.0)
        .arg("run")
        .args(["--dns", DNS_IP, "--upstream-ca"])
        .arg(net.apis.ca_pem_path())
        .args(run_args)
        .arg("--")
        .args(cmd)
}

/// `proxypilot seal` of api.github.com's github_app secret for the app
/// `(app_id, installation_id, key_file)`.
fn seal_github_app(
    seal_key: &str,
    (app_id, installation_id, key_file): (&str, &str, &std::path::Path),
) -> Command {
    let mut cmd = Command::new(proxypilot_bin());
    cmd.args([
        "seal",
        "--no-auth",
        "--host",
        GITHUB,
        "--seal-key",
        seal_key,
    ])
    .args([
        "--github-app-id",
        app_id,
        "--installation-id",
        installation_id,
    ])
    .arg("--private-key-file")
    .arg(key_file);
    cmd
}
