//! The Fly shape on a real container runtime (issue 15): deploy/'s two
//! images built offline and run as the two containers of
//! deploy/machine-config.json, by a dockerd this test starts for itself.
//!
//! - dockerd: Debian's, with a private daemon.json (no bridge, no iptables,
//!   no forwarding or masquerading, its own data-root, exec-root, pidfile and
//!   socket), in a network namespace of its own, stopped by pid at the end.
//! - images: base images from deploy/base-image.sh (mmdebstrap + `docker
//!   import`, cached in target/containers), then deploy/Dockerfile with this
//!   build's target/debug/proxypilot and deploy/Dockerfile.shell with the
//!   pinned SDKs `cargo xtask setup` put in target/containers/sdk-cache;
//!   `docker build --network none`.
//! - network: the shell container gets `--network none` (a namespace with
//!   only `lo`); the test enters it and puts the fake APIs, the stub DNS, a
//!   stand-in for Fly's proxy on `tokenizer.flycast` and `proxypilot
//!   tokenizer` behind it on documentation addresses on that `lo`. Nothing
//!   in it routes anywhere else. The sidecar joins that namespace and the
//!   shell's PID namespace, as on a Fly machine.
//! - secrets: sealed by deploy/seal-secrets.sh (fly_src_auth for the test's
//!   org/app); the tokenizer opens them only for requests the flycast
//!   stand-in signed.

use std::{
    collections::BTreeSet,
    fs,
    io::Read,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use proxypilot::kernel::cgroup;
use proxypilot_tests::{
    dns::StubDns,
    run_ok,
    sandbox::SandboxCommand,
    support_dir,
    upstream::{
        netns_addrs, standard_hosts, FakeApis, RealKeys, ANTHROPIC, DNS_IP, GITHUB, OPENAI,
        REPLY_TEXT,
    },
    Proxypilot,
};
use serde_json::Value;

/// Debian's docker client and daemon (another client may come first on PATH).
const DOCKER: &str = "/usr/bin/docker";
const DOCKERD: &str = "/usr/sbin/dockerd";
const SHELL_IMAGE: &str = "local/proxypilot:shell";
const SIDECAR_IMAGE: &str = "local/proxypilot:sidecar";

/// `tokenizer.flycast` (the stand-in for Fly's proxy) and the tokenizer.
const FLYCAST_IP: &str = "198.51.100.80";
const FLYCAST: &str = "198.51.100.80:8080";
const TOKENIZER: &str = "198.51.100.81:8080";
/// An address with TCP and UDP servers the shell must not reach.
const OTHER_IP: &str = "198.51.100.7";
const OTHER_IP6: &str = "2001:db8::7";
const OTHER_TCP_PORT: u16 = 8000;
const OTHER_UDP_PORT: u16 = 9000;
/// What the sealed secrets are bound to (fly_src_auth).
const FLY_ORG: &str = "proxypilot-test-org";
const FLY_APP: &str = "proxypilot-test-app";

/// What makes the sidecar container a Fly sidecar under Docker; compose.yaml
/// says the same (see `compose_yaml_describes_the_machine_config`).
const SIDECAR_CAP_ADD: &str = "ALL";
const SIDECAR_CAP_DROP: &str = "SYS_RESOURCE";
const SIDECAR_SECURITY_OPT: &str = "seccomp=unconfined";
const HOST_CGROUP_FS: &str = "/sys/fs/cgroup";
const BPFFS: &str = "/sys/fs/bpf";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn deploy_dir() -> PathBuf {
    repo_root().join("deploy")
}

/// target/containers: the root filesystems and the SDK cache.
fn cache_dir() -> PathBuf {
    let bin = proxypilot_tests::proxypilot_bin();
    bin.parent().unwrap().parent().unwrap().join("containers")
}

fn sdk_cache() -> PathBuf {
    cache_dir().join("sdk-cache")
}

fn machine_config() -> Value {
    serde_json::from_str(&fs::read_to_string(deploy_dir().join("machine-config.json")).unwrap())
        .unwrap()
}

fn container<'a>(cfg: &'a Value, name: &str) -> &'a Value {
    cfg["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("machine-config.json has no container {name}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// Why this machine cannot run the containers, if it cannot.
fn docker_unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("the container test needs root (it starts dockerd)".into());
    }
    for (tool, package) in [
        (DOCKER, "docker.io"),
        (DOCKERD, "docker.io"),
        ("/usr/bin/mmdebstrap", "mmdebstrap"),
    ] {
        if !Path::new(tool).exists() {
            return Some(format!(
                "{tool} is missing: install {package} (`cargo xtask setup` does)"
            ));
        }
    }
    if cgroup::cgroup2_mount().is_err() {
        return Some("no cgroup v2 hierarchy is mounted (see /proc/self/mountinfo); runc and the sidecar need one".into());
    }
    let filesystems = fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !filesystems.contains("overlay") {
        let _ = Command::new("modprobe").arg("overlay").status();
        if !fs::read_to_string("/proc/filesystems")
            .unwrap_or_default()
            .contains("overlay")
        {
            return Some("the kernel has no overlay filesystem (dockerd's overlay2 needs it; modprobe overlay failed)".into());
        }
    }
    if !sdk_cache().join("wheels").is_dir() || !sdk_cache().join("node_modules").is_dir() {
        return Some(format!(
            "{} lacks the shell image's SDKs: run `cargo xtask setup` (it runs deploy/fetch-shell-sdks.sh)",
            sdk_cache().display()
        ));
    }
    None
}

/// Runs `cmd` and returns its output, killing it after `timeout`.
fn output_within(mut cmd: Command, timeout: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A dockerd of the test's own; on drop it removes every container,
/// volume and dangling image it has, stops by pid, and its runtime
/// directory goes. Its data root (images and build cache) is kept in
/// target/containers/docker-data, locked while in use, so a rerun rebuilds
/// only what changed (deleting it took longer than building).
struct Dockerd {
    dir: PathBuf,
    _data_lock: fs::File,
    socket: PathBuf,
    child: Child,
    /// The parent cgroups dockerd makes (`docker`, `docker/buildkit` in
    /// every hierarchy) that did not exist before it: removed at the end.
    new_cgroups: Vec<PathBuf>,
}

/// `docker/buildkit` and `docker` under every cgroup hierarchy mounted.
fn docker_parent_cgroups() -> Vec<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.starts_with("cgroup ") || right.starts_with("cgroup2 ") {
            if let Some(mp) = left.split(' ').nth(4) {
                out.push(Path::new(mp).join("docker/buildkit"));
                out.push(Path::new(mp).join("docker"));
            }
        }
    }
    out
}

impl Dockerd {
    fn start() -> Dockerd {
        // Short: the socket path must fit in sun_path.
        let dir = PathBuf::from(format!("/tmp/pp-dockerd-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("docker.sock");
        fs::create_dir_all(cache_dir()).unwrap();
        let lock_path = cache_dir().join("docker-data.lock");
        let data_lock = fs::File::create(&lock_path).unwrap();
        if data_lock.try_lock().is_err() {
            panic!(
                "another container test holds {}; wait for it to finish",
                lock_path.display()
            );
        }
        let config = serde_json::json!({
            "bridge": "none",
            "iptables": false,
            "ip6tables": false,
            "ip-forward": false,
            "ip-masq": false,
            "data-root": cache_dir().join("docker-data"),
            "exec-root": dir.join("exec"),
            "pidfile": dir.join("dockerd.pid"),
            "hosts": [format!("unix://{}", socket.display())],
        });
        fs::write(dir.join("daemon.json"), config.to_string()).unwrap();
        let log = fs::File::create(dir.join("dockerd.log")).unwrap();
        // In a network namespace of its own: dockerd has nothing to reach.
        let child = Command::new("unshare")
            .args(["--net", "--", DOCKERD, "--config-file"])
            .arg(dir.join("daemon.json"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting dockerd");
        let new_cgroups = docker_parent_cgroups()
            .into_iter()
            .filter(|p| !p.exists())
            .collect();
        let mut d = Dockerd {
            dir,
            _data_lock: data_lock,
            socket,
            child,
            new_cgroups,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if d.docker().arg("version").output().unwrap().status.success() {
                return d;
            }
            if let Some(status) = d.child.try_wait().unwrap() {
                panic!("dockerd exited ({status}):\n{}", d.log());
            }
            assert!(
                Instant::now() < deadline,
                "dockerd did not answer in 60 s:\n{}",
                d.log()
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
    }

    fn host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Debian's docker client, talking to this daemon only.
    fn docker(&self) -> Command {
        let mut cmd = Command::new(DOCKER);
        cmd.env("DOCKER_HOST", self.host())
            .env("DOCKER_BUILDKIT", "1")
            .env("DOCKER_CONFIG", self.dir.join("client"));
        cmd
    }

    fn run<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> String {
        let out = output_within(
            {
                let mut c = self.docker();
                c.args(args);
                c
            },
            Duration::from_secs(300),
        );
        assert!(
            out.status.success(),
            "docker {:?} failed: {}",
            args.iter().map(|a| a.as_ref()).collect::<Vec<_>>(),
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `docker exec CONTAINER ARGS...`, within 90 s.
    fn exec(&self, container: &str, args: &[&str]) -> Output {
        let mut c = self.docker();
        c.args(["exec", "-w", "/root", container]).args(args);
        output_within(c, Duration::from_secs(90))
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let t = Instant::now();
        let ids = self
            .docker()
            .args(["ps", "-aq"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let _ = self.docker().args(["rm", "-f", "-v"]).args(&ids).output();
        }
        eprintln!("teardown: containers removed in {:?}", t.elapsed());
        let _ = self.docker().args(["volume", "prune", "-f"]).output();
        let _ = self.docker().args(["image", "prune", "-f"]).output();
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                eprintln!("warning: dockerd ignored SIGTERM for 30 s; killing it");
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        eprintln!("teardown: dockerd stopped after {:?}", t.elapsed());
        for cg in &self.new_cgroups {
            // Children first (buildkit before docker); empty ones only.
            if cg.exists() {
                if let Err(e) = fs::remove_dir(cg) {
                    eprintln!("warning: could not remove {}: {e}", cg.display());
                }
            }
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("warning: could not remove {}: {e}", self.dir.display());
        }
        eprintln!("teardown: done after {:?}", t.elapsed());
    }
}

/// A bpffs of the test's own, given to the sidecar as /sys/fs/bpf so that
/// its pins outlive the sidecar container; unmounting it at the end
/// detaches whatever is still pinned there.
struct BpfFs(PathBuf);

impl BpfFs {
    fn mount() -> BpfFs {
        let p = PathBuf::from(format!("/tmp/pp-bpffs-{}", std::process::id()));
        fs::create_dir_all(&p).unwrap();
        run_ok(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&p));
        BpfFs(p)
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = fs::remove_dir(&self.0);
    }
}

/// Builds both images offline: the base images, then deploy/'s Dockerfiles
/// with this build's binary and the cached SDKs in their contexts.
fn build_images(d: &Dockerd) {
    let started = Instant::now();
    let mut bases = Vec::new();
    for (tag, list) in [
        ("local/proxypilot-base:sidecar", "sidecar.txt"),
        ("local/proxypilot-base:shell", "shell.txt"),
    ] {
        let mut base = Command::new("bash");
        base.arg(deploy_dir().join("base-image.sh"))
            .env("DOCKER", DOCKER)
            .env("DOCKER_HOST", d.host())
            .arg(tag)
            .arg(cache_dir())
            .arg(deploy_dir().join("packages").join(list));
        bases.push((tag, output_within(base, Duration::from_secs(600))));
    }
    for (tag, out) in &bases {
        assert!(out.status.success(), "base image {tag}: {}", text(out));
    }
    eprintln!("base images ready after {:?}", started.elapsed());

    // The sidecar: deploy/ as in the repository, plus prebuilt/proxypilot.
    let ctx = d.dir.join("ctx-sidecar");
    fs::create_dir_all(ctx.join("prebuilt")).unwrap();
    run_ok(Command::new("cp").arg("-a").arg(deploy_dir()).arg(&ctx));
    let bin = ctx.join("prebuilt/proxypilot");
    if fs::hard_link(proxypilot_tests::proxypilot_bin(), &bin).is_err() {
        fs::copy(proxypilot_tests::proxypilot_bin(), &bin).unwrap();
    }
    d.run(&[
        "build".as_ref(),
        "--network".as_ref(),
        "none".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        ctx.join("deploy/Dockerfile").as_os_str(),
        "--build-arg".as_ref(),
        "RUNTIME_BASE=local/proxypilot-base:sidecar".as_ref(),
        "--build-arg".as_ref(),
        "PROXYPILOT_FROM=context".as_ref(),
        "-t".as_ref(),
        SIDECAR_IMAGE.as_ref(),
        ctx.as_os_str(),
    ]);
    // The shell: deploy/ as its context, plus sdk-cache/.
    let ctx = d.dir.join("ctx-shell");
    fs::create_dir_all(&ctx).unwrap();
    run_ok(
        Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", deploy_dir().display()))
            .arg(&ctx),
    );
    run_ok(Command::new("cp").arg("-a").arg(sdk_cache()).arg(&ctx));
    d.run(&[
        "build".as_ref(),
        "--network".as_ref(),
        "none".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        ctx.join("Dockerfile.shell").as_os_str(),
        "--build-arg".as_ref(),
        "BASE=local/proxypilot-base:shell".as_ref(),
        "--build-arg".as_ref(),
        "SDKS_FROM=context".as_ref(),
        "-t".as_ref(),
        SHELL_IMAGE.as_ref(),
        ctx.as_os_str(),
    ]);
    eprintln!("images built after {:?}", started.elapsed());
}

/// Moves the calling thread (and what it spawns) into the network
/// namespace of process `pid`.
fn enter_netns_of(pid: u32) {
    let f = fs::File::open(format!("/proc/{pid}/ns/net")).unwrap();
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
        .expect("setns into the shell's netns");
}

/// The servers in the shell's network namespace.
struct Upstreams {
    apis: FakeApis,
    _dns: StubDns,
    _flycast: Proxypilot,
    _tokenizer: Proxypilot,
    udp_seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    seal_key: String,
}

/// Puts the fake APIs, the stub DNS (which also answers `tokenizer.flycast`),
/// the flycast stand-in, the tokenizer and the forbidden servers on `lo` of
/// the current network namespace.
fn start_upstreams(dir: &Path) -> Upstreams {
    let hosts = standard_hosts();
    let mut addrs = netns_addrs(&hosts);
    for a in [FLYCAST_IP, "198.51.100.81", OTHER_IP] {
        addrs.push(format!("{a}/32"));
    }
    addrs.push(format!("{OTHER_IP6}/128"));
    for a in &addrs {
        let mut cmd = Command::new("ip");
        cmd.args(["addr", "add", a, "dev", "lo"]);
        if a.contains(':') {
            cmd.arg("nodad");
        }
        run_ok(&mut cmd);
    }
    let apis = FakeApis::start(RealKeys::default(), hosts);
    let dns = StubDns::start(format!("{DNS_IP}:53").parse().unwrap(), apis.dns_records());
    dns.set("tokenizer.flycast", vec![FLYCAST_IP.parse().unwrap()]);
    let resolv = proxypilot_tests::sandbox::write_resolv_conf(dir, DNS_IP.parse().unwrap());
    for addr in [
        format!("{OTHER_IP}:{OTHER_TCP_PORT}"),
        format!("[{OTHER_IP6}]:{OTHER_TCP_PORT}"),
    ] {
        proxypilot_tests::real_server(&addr);
    }
    let udp_seen = proxypilot_tests::udp_sink(&format!("{OTHER_IP}:{OTHER_UDP_PORT}"));

    let pubkey = dir.join("fly-src.pub");
    let flycast = spawn_logged(
        Command::new("python3")
            .arg(support_dir().join("containers/flycast.py"))
            .args(["--listen", FLYCAST, "--upstream", TOKENIZER])
            .args([
                "--org",
                FLY_ORG,
                "--app",
                FLY_APP,
                "--instance",
                "test-machine",
            ])
            .arg("--pubkey-out")
            .arg(&pubkey),
        dir.join("flycast.log"),
    );
    wait_for(
        || pubkey.exists(),
        "the flycast stand-in to listen",
        &flycast,
    );

    let open_key = dir.join("open.key");
    let out = run_ok(
        Command::new(proxypilot_tests::proxypilot_bin())
            .arg("keygen")
            .arg("--out")
            .arg(&open_key),
    );
    let seal_key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let tokenizer = spawn_logged(
        &mut SandboxCommand::new(proxypilot_tests::proxypilot_bin())
            .inherit_env()
            .resolv_conf(&resolv)
            .args(["tokenizer", "--listen", TOKENIZER, "--open-key-file"])
            .arg(&open_key)
            .arg("--upstream-ca")
            .arg(apis.ca_pem_path())
            .arg("--fly-src-pubkey")
            .arg(&pubkey)
            .command(),
        dir.join("tokenizer.log"),
    );
    wait_for(
        || std::net::TcpStream::connect(TOKENIZER).is_ok(),
        "the tokenizer to listen",
        &tokenizer,
    );
    Upstreams {
        apis,
        _dns: dns,
        _flycast: flycast,
        _tokenizer: tokenizer,
        udp_seen,
        seal_key,
    }
}

fn spawn_logged(cmd: &mut Command, log: PathBuf) -> Proxypilot {
    let f = fs::File::create(&log).unwrap();
    cmd.stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    Proxypilot {
        child,
        stderr_path: log,
    }
}

fn wait_for(mut done: impl FnMut() -> bool, what: &str, proc_: &Proxypilot) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{}",
            proc_.stderr()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// The sealed secrets, as deploy/seal-secrets.sh --print-env prints them.
fn seal_secrets(seal_key: &str) -> Vec<(String, String)> {
    let keys = RealKeys::default();
    // Not run_ok: its panic would print the environment, real keys included.
    let out = Command::new("bash")
        .arg(deploy_dir().join("seal-secrets.sh"))
        .arg("--print-env")
        .env("SEAL_KEY", seal_key)
        .env("FLY_ORG", FLY_ORG)
        .env("FLY_APP", FLY_APP)
        .env("ANTHROPIC_API_KEY", &keys.anthropic)
        .env("OPENAI_API_KEY", &keys.openai)
        .env("GH_TOKEN", &keys.github)
        .env("PROXYPILOT", proxypilot_tests::proxypilot_bin())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "deploy/seal-secrets.sh --print-env failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (k, v) = l.split_once('=').expect("NAME=VALUE");
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// `docker run` arguments for the machine config's shell container: its
/// env, and (for the test) a namespace with only `lo`, resolving through
/// the stub DNS, with IPv6 on.
fn shell_run_args(name: &str) -> Vec<String> {
    let cfg = machine_config();
    let shell = container(&cfg, "shell");
    let mut args: Vec<String> = ["run", "-d", "--name", name, "--hostname", "shell"]
        .map(String::from)
        .to_vec();
    for (k, v) in shell["env"].as_object().unwrap() {
        args.push("-e".into());
        args.push(format!("{k}={}", v.as_str().unwrap()));
    }
    args.extend(
        [
            "--network",
            "none",
            "--dns",
            DNS_IP,
            "--sysctl",
            "net.ipv6.conf.all.disable_ipv6=0",
            "--sysctl",
            "net.ipv6.conf.lo.disable_ipv6=0",
        ]
        .map(String::from),
    );
    // The probes, read-only.
    args.push("-v".into());
    args.push(format!(
        "{}:/opt/proxypilot-tests:ro",
        support_dir().display()
    ));
    args.push(SHELL_IMAGE.into());
    args
}

/// `docker run` arguments for the machine config's sidecar container:
/// entrypoint, command (with the stub DNS for Fly's resolver), env, secrets
/// and volume from the config; the namespaces and privileges compose.yaml
/// gives it.
fn sidecar_run_args(
    name: &str,
    shell: &str,
    bpffs: &Path,
    secrets: &[(String, String)],
    secrets_dir: &Path,
) -> Vec<String> {
    let cfg = machine_config();
    let side = container(&cfg, "sidecar");
    let mut args: Vec<String> = ["run", "-d", "--name", name].map(String::from).to_vec();
    for opt in ["--network", "--pid"] {
        args.push(opt.into());
        args.push(format!("container:{shell}"));
    }
    args.extend(
        [
            "--cgroupns",
            "host",
            "--cap-add",
            SIDECAR_CAP_ADD,
            "--cap-drop",
            SIDECAR_CAP_DROP,
            "--security-opt",
            SIDECAR_SECURITY_OPT,
            "-v",
            &format!("{HOST_CGROUP_FS}:{HOST_CGROUP_FS}"),
            "-v",
            &format!("{}:{BPFFS}", bpffs.display()),
        ]
        .map(String::from),
    );
    for m in side["mounts"].as_array().unwrap() {
        args.push("-v".into());
        args.push(format!(
            "{}-{}:{}",
            m["name"].as_str().unwrap(),
            std::process::id(),
            m["path"].as_str().unwrap()
        ));
    }
    for (k, v) in side["env"].as_object().unwrap() {
        args.push("-e".into());
        args.push(format!("{k}={}", v.as_str().unwrap()));
    }
    // The secrets go in an env file (0600), as for compose.yaml, so that
    // no command line or panic message carries a sealed blob.
    let mut env_file = String::new();
    for s in side["secrets"].as_array().unwrap() {
        let var = s["env_var"].as_str().unwrap();
        let (_, value) = secrets
            .iter()
            .find(|(k, _)| k == s["name"].as_str().unwrap())
            .unwrap_or_else(|| panic!("seal-secrets.sh did not print {var}"));
        env_file += &format!("{var}={value}\n");
    }
    let path = secrets_dir.join("sealed.env");
    fs::write(&path, env_file).unwrap();
    fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    args.push("--env-file".into());
    args.push(path.display().to_string());
    args.push("--entrypoint".into());
    args.extend(strings(&side["entrypoint"]));
    args.push(SIDECAR_IMAGE.into());
    let cmd = strings(&side["cmd"]);
    let mut i = 0;
    while i < cmd.len() {
        args.push(cmd[i].clone());
        if cmd[i] == "--dns" {
            args.push(DNS_IP.into());
            i += 1;
        }
        i += 1;
    }
    args
}

/// The programs attached to `cgroup` (bpftool's ids and attach types).
fn attached(cgroup: &Path) -> BTreeSet<(u64, String)> {
    let out = run_ok(
        Command::new("bpftool")
            .args(["-j", "cgroup", "show"])
            .arg(cgroup),
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    (
                        p["id"].as_u64().unwrap(),
                        p["attach_type"].as_str().unwrap_or("?").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

struct Machine<'a> {
    d: &'a Dockerd,
    shell: String,
    sidecar: String,
}

impl Machine<'_> {
    fn sh(&self, script: &str) -> Output {
        self.d.exec(&self.shell, &["sh", "-c", script])
    }

    /// One JSON line from a probe run in the shell.
    fn probe(&self, script: &str, args: &[&str]) -> Vec<Value> {
        let mut a = vec!["python3", script];
        a.extend_from_slice(args);
        let out = self.d.exec(&self.shell, &a);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}: {}", text(&out))))
            .collect()
    }

    fn netprobe(&self, args: &[&str]) -> Value {
        let mut v = self.probe("/opt/proxypilot-tests/netprobe.py", args);
        assert_eq!(v.len(), 1, "{v:?}");
        v.remove(0)
    }

    fn shellprobe(&self, args: &[&str]) -> Vec<Value> {
        self.probe("/opt/proxypilot-tests/containers/shellprobe.py", args)
    }

    fn logs(&self, name: &str) -> String {
        let out = self.d.docker().args(["logs", name]).output().unwrap();
        text(&out)
    }

    /// Waits for the shell's readiness signal (the info port serves the CA)
    /// and the sidecar's health check (its ready file), as Fly would.
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let info = self.sh("curl -fsS --max-time 5 -o /dev/null http://127.0.0.1:15480/ca.pem");
            let health = self
                .d
                .exec(&self.sidecar, &["test", "-s", "/run/proxypilot/ready"]);
            if info.status.success()
                && health.status.success()
                && self
                    .logs(&self.shell)
                    .contains("proxypilot-shell-init: ready")
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the machine did not get ready in 120 s.\nsidecar:\n{}\nshell:\n{}",
                self.logs(&self.sidecar),
                self.logs(&self.shell)
            );
            thread::sleep(Duration::from_millis(300));
        }
    }
}

/// The original's transcript, each command with `docker exec` in the shell
/// (as `fly ssh console --container shell` would run it).
const TRANSCRIPT: &[(&str, &str, &str)] = &[
    ("./anthropic.sh", ANTHROPIC, REPLY_TEXT),
    ("node anthropic.mjs", ANTHROPIC, REPLY_TEXT),
    ("./xanthropic.py", ANTHROPIC, REPLY_TEXT),
    ("./openai.sh", OPENAI, REPLY_TEXT),
    ("./xopenai.py", OPENAI, REPLY_TEXT),
    ("node openai.mjs", OPENAI, REPLY_TEXT),
    (
        "gh auth status 2>&1",
        GITHUB,
        "Logged in to github.com as proxypilot-test",
    ),
];

fn run_transcript(m: &Machine, up: &Upstreams) {
    let keys = RealKeys::default();
    for (cmd, host, expected) in TRANSCRIPT {
        up.apis.clear_requests();
        let out = m.sh(cmd);
        let shown = text(&out);
        assert!(
            out.status.success() && shown.contains(expected),
            "`{cmd}` in the shell container: {shown}\nsidecar log:\n{}",
            m.logs(&m.sidecar)
        );
        let reqs = up.apis.requests_to(host);
        assert!(!reqs.is_empty(), "`{cmd}` reached no upstream");
        let real = match *host {
            ANTHROPIC => &keys.anthropic,
            OPENAI => &keys.openai,
            _ => &keys.github,
        };
        for r in &reqs {
            let cred = r
                .header("x-api-key")
                .or(r.header("authorization"))
                .unwrap_or_default();
            assert!(
                cred.ends_with(real.as_str()) && r.status == 200,
                "`{cmd}`: {host} got status {} without the real key in its credential header",
                r.status
            );
        }
        assert!(!shown.contains(real.as_str()), "`{cmd}` printed a real key");
    }
}

/// Records every attempt in `results` that got through.
fn note_escapes(escapes: &mut Vec<String>, results: &[Value], what: &str) {
    if results.is_empty() {
        escapes.push(format!("{what}: the probe made no attempt"));
    }
    for r in results {
        if r["ok"] != false {
            escapes.push(format!("{what}: {r}"));
        }
    }
}

/// Records `r` unless it is a connect or send refused with EPERM.
fn note_unless_eperm(escapes: &mut Vec<String>, r: &Value, what: &str) {
    if r["ok"] != false || r["errno"] != "EPERM" {
        escapes.push(format!("{what}: {r} (expected EPERM)"));
    }
}

#[test]
fn fly_shape_in_two_containers() {
    if let Some(why) = docker_unavailable() {
        if std::env::var_os("CI").is_some() {
            panic!("the container test cannot run here: {why}");
        }
        eprintln!("skipping the container test: {why}");
        return;
    }
    let started = Instant::now();
    let bpffs = BpfFs::mount();
    let d = Dockerd::start();
    build_images(&d);
    let build_time = started.elapsed();

    let pid = std::process::id();
    let m = Machine {
        d: &d,
        shell: format!("pp-shell-{pid}"),
        sidecar: format!("pp-sidecar-{pid}"),
    };
    d.run(&shell_run_args(&m.shell));
    let shell_pid: u32 = d
        .run(&["inspect", "-f", "{{.State.Pid}}", &m.shell])
        .parse()
        .unwrap();
    let shell_cgroup = cgroup::cgroup_of(&shell_pid.to_string()).unwrap();

    // From here on this thread, and what it starts, is in the shell's
    // network namespace, which has nothing but `lo`.
    enter_netns_of(shell_pid);
    let up = start_upstreams(&d.dir);
    let secrets = seal_secrets(&up.seal_key);
    d.run(&sidecar_run_args(
        &m.sidecar, &m.shell, &bpffs.0, &secrets, &d.dir,
    ));
    m.wait_ready();
    eprintln!("machine ready after {:?}", started.elapsed());
    assert!(
        m.logs(&m.sidecar).contains(&format!(
            "sandbox 'shell' is cgroup {}",
            shell_cgroup.display()
        )),
        "the sidecar's entrypoint did not find the shell's cgroup {}:\n{}",
        shell_cgroup.display(),
        m.logs(&m.sidecar)
    );

    // The transcript: every upstream sees the real key, the shell dummies.
    run_transcript(&m, &up);
    let env = text(&m.sh("env"));
    for var in ["ANTHROPIC_API_KEY", "OPENAI_API_KEY", "GH_TOKEN"] {
        assert!(env.contains(&format!("{var}=dummy")), "{env}");
    }
    let keys = RealKeys::default();
    for secret in [&keys.anthropic, &keys.openai, &keys.github]
        .into_iter()
        .chain(secrets.iter().map(|(_, v)| v))
    {
        assert!(
            !env.contains(secret.as_str()),
            "the shell's env holds a secret"
        );
    }

    eprintln!("transcript done after {:?}", started.elapsed());

    // What the shell's root (Docker's default capabilities) must not do.
    // Every breach is collected, so one run reports them all.
    let mut escapes = Vec::new();
    let (tcp_port, udp_port) = (OTHER_TCP_PORT.to_string(), OTHER_UDP_PORT.to_string());
    for (host, port) in [
        (OTHER_IP, tcp_port.as_str()),
        (OTHER_IP6, tcp_port.as_str()),
        (FLYCAST_IP, "8080"),
        ("198.51.100.81", "8080"),
    ] {
        let r = m.netprobe(&["tcp", host, port]);
        note_unless_eperm(&mut escapes, &r, &format!("TCP to {host}:{port}"));
    }
    let r = m.netprobe(&["udp", OTHER_IP, &udp_port]);
    note_unless_eperm(&mut escapes, &r, &format!("UDP to {OTHER_IP}:{udp_port}"));
    let out = m.sh("curl -sS --max-time 10 http://tokenizer.flycast:8080/");
    if out.status.success() {
        escapes.push(format!("curl reached tokenizer.flycast: {}", text(&out)));
    }
    for args in [
        vec!["raw-udp", OTHER_IP, &udp_port],
        vec!["raw-ip", OTHER_IP, &udp_port],
        vec!["ping", OTHER_IP],
        vec!["packet", OTHER_IP, &udp_port],
    ] {
        note_escapes(
            &mut escapes,
            &m.shellprobe(&args),
            &format!("raw socket {args:?}"),
        );
    }
    thread::sleep(Duration::from_millis(500));
    let seen = up.udp_seen.lock().unwrap().clone();
    if !seen.is_empty() {
        escapes.push(format!("{OTHER_IP}:{udp_port} received {seen:?}"));
    }
    // The sealed secrets (the sidecar's environ) and the CA key.
    let r = m.shellprobe(&["environ", "proxypilot"]);
    note_escapes(&mut escapes, &r, "reading the sidecar's process");
    assert!(
        r.iter()
            .any(|a| a["try"].as_str().unwrap().ends_with("environ (proxypilot)")),
        "the shell did not see the sidecar's process, so nothing was tried: {r:?}"
    );
    let r = m.shellprobe(&[
        "read",
        "/var/lib/proxypilot/ca-key.pem",
        "/run/proxypilot/ready",
    ]);
    note_escapes(&mut escapes, &r, "reading the sidecar's files");
    // The programs.
    let before = attached(&shell_cgroup);
    assert!(
        !before.is_empty(),
        "no programs on {}",
        shell_cgroup.display()
    );
    for mode in ["bpf", "unpin", "leave-cgroup"] {
        note_escapes(&mut escapes, &m.shellprobe(&[mode]), mode);
    }
    assert_eq!(attached(&shell_cgroup), before, "the programs changed");
    let r = m.netprobe(&["tcp", OTHER_IP, &tcp_port]);
    note_unless_eperm(&mut escapes, &r, "TCP after the attempts to detach");

    eprintln!("escapes tried after {:?}", started.elapsed());

    // Kill the sidecar: the pinned programs stay, intercepted connects are
    // refused, everything else still EPERM.
    d.run(&["kill", &m.sidecar]);
    assert_eq!(
        attached(&shell_cgroup),
        before,
        "killing the sidecar detached the programs"
    );
    up.apis.clear_requests();
    let r = m.netprobe(&["tcp", "203.0.113.11", "443"]);
    assert_eq!(
        r["errno"], "ECONNREFUSED",
        "intercepted connect with the sidecar dead: {r}"
    );
    let r = m.netprobe(&["tcp", OTHER_IP, &tcp_port]);
    note_unless_eperm(&mut escapes, &r, "TCP with the sidecar dead");
    let out = m.sh("./anthropic.sh");
    assert!(
        !out.status.success(),
        "anthropic.sh with the sidecar dead: {}",
        text(&out)
    );
    assert!(
        up.apis.requests().is_empty(),
        "an upstream was reached with the sidecar dead"
    );

    eprintln!("fail closed checked after {:?}", started.elapsed());

    // Restart it: the new programs take over (same attach points, new
    // programs, nothing left of the old ones), and the transcript works
    // with the CA the shell already trusts.
    d.run(&["start", &m.sidecar]);
    m.wait_ready();
    let after = attached(&shell_cgroup);
    let types = |s: &BTreeSet<(u64, String)>| s.iter().map(|(_, t)| t.clone()).collect::<Vec<_>>();
    assert_eq!(
        types(&after),
        types(&before),
        "takeover changed the attach points"
    );
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "old programs are still attached after the takeover: {before:?} {after:?}"
    );
    run_transcript(&m, &up);

    assert!(
        escapes.is_empty(),
        "the shell container got through:\n  {}",
        escapes.join("\n  ")
    );
    eprintln!(
        "container test: images in {build_time:?}, checks done in {:?}",
        started.elapsed()
    );
    drop(up);
    eprintln!("teardown: upstreams stopped after {:?}", started.elapsed());
}

/// deploy/compose.yaml runs the containers of machine-config.json: the same
/// env, entrypoint, command, secrets, start order, health check, restart
/// policy and volume, differing only where Docker is not Fly (the resolver,
/// the tokenizer's address); and its Docker options for the sidecar are the
/// ones the container test runs it with.
#[test]
fn compose_yaml_describes_the_machine_config() {
    let compose: Value =
        serde_yaml::from_str(&fs::read_to_string(deploy_dir().join("compose.yaml")).unwrap())
            .expect("deploy/compose.yaml parses");
    let cfg = machine_config();
    let services = compose["services"].as_object().unwrap();
    assert_eq!(
        services.keys().collect::<Vec<_>>(),
        ["shell", "sidecar"],
        "compose.yaml's services"
    );
    let (shell, side) = (
        &compose["services"]["shell"],
        &compose["services"]["sidecar"],
    );
    let (m_shell, m_side) = (container(&cfg, "shell"), container(&cfg, "sidecar"));

    assert_eq!(
        shell["environment"], m_shell["env"],
        "the shell's environment"
    );
    for (svc, dockerfile) in [(shell, "Dockerfile.shell"), (side, "deploy/Dockerfile")] {
        let context = deploy_dir().join(svc["build"]["context"].as_str().unwrap());
        assert_eq!(svc["build"]["dockerfile"], dockerfile);
        assert!(
            context.join(dockerfile).is_file(),
            "{dockerfile} from {}",
            context.display()
        );
    }

    assert_eq!(
        side["entrypoint"], m_side["entrypoint"],
        "the sidecar's entrypoint"
    );
    let (cmd, m_cmd) = (strings(&side["command"]), strings(&m_side["cmd"]));
    assert_eq!(cmd.len(), m_cmd.len(), "{cmd:?} vs {m_cmd:?}");
    for (i, (c, m)) in cmd.iter().zip(&m_cmd).enumerate() {
        let expected = match m_cmd.get(i.wrapping_sub(1)).map(String::as_str) {
            Some("--dns") => "127.0.0.11".to_string(),
            Some("--tokenizer") => format!("${{PROXYPILOT_TOKENIZER:-{m}}}"),
            _ => m.clone(),
        };
        assert_eq!(*c, expected, "compose.yaml's command, argument {i}");
    }

    let mut env = m_side["env"].as_object().unwrap().clone();
    for s in m_side["secrets"].as_array().unwrap() {
        let var = s["env_var"].as_str().unwrap();
        let value = side["environment"][var].as_str().unwrap_or_default();
        assert!(
            value.starts_with(&format!("${{{}:?", s["name"].as_str().unwrap())),
            "compose.yaml must take {var} from the environment, required: {value:?}"
        );
        env.insert(var.into(), value.into());
    }
    assert_eq!(
        side["environment"],
        Value::Object(env),
        "the sidecar's environment"
    );

    let dep = &m_side["depends_on"][0];
    assert_eq!(
        side["depends_on"][dep["name"].as_str().unwrap()]["condition"],
        format!("service_{}", dep["condition"].as_str().unwrap())
    );
    let (hc, m_hc) = (&side["healthcheck"], &m_side["healthchecks"][0]);
    let mut test = vec!["CMD".to_string()];
    test.extend(strings(&m_hc["exec"]["command"]));
    assert_eq!(strings(&hc["test"]), test, "the health check");
    for (key, m_key) in [
        ("start_period", "grace_period"),
        ("interval", "interval"),
        ("timeout", "timeout"),
    ] {
        assert_eq!(hc[key], format!("{}s", m_hc[m_key]), "healthcheck.{key}");
    }
    assert_eq!(hc["retries"], m_hc["failure_threshold"]);
    assert_eq!(side["restart"], m_side["restart"]["policy"]);

    let volumes = strings(&side["volumes"]);
    for m in m_side["mounts"].as_array().unwrap() {
        let name = m["name"].as_str().unwrap();
        assert!(
            volumes.contains(&format!("{name}:{}", m["path"].as_str().unwrap())),
            "{volumes:?}"
        );
        let size = cfg["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap()["temp_dir"]["size_mb"]
            .clone();
        let opts = &compose["volumes"][name]["driver_opts"];
        assert_eq!(opts["type"], "tmpfs", "{name} is a temp_dir on Fly");
        assert_eq!(opts["o"], format!("size={size}m"), "{name}'s size");
    }

    // The sidecar's Docker options are the ones the container test uses.
    assert_eq!(strings(&side["cap_add"]), [SIDECAR_CAP_ADD]);
    assert_eq!(strings(&side["cap_drop"]), [SIDECAR_CAP_DROP]);
    assert_eq!(strings(&side["security_opt"]), [SIDECAR_SECURITY_OPT]);
    assert_eq!(side["cgroup"], "host");
    assert_eq!(side["pid"], "service:shell");
    assert_eq!(side["network_mode"], "service:shell");
    for host_dir in [HOST_CGROUP_FS, BPFFS] {
        assert!(
            volumes.contains(&format!("{host_dir}:{host_dir}")),
            "{volumes:?}"
        );
    }
    assert!(
        shell.get("cap_drop").is_none() && shell.get("cap_add").is_none(),
        "the shell keeps Docker's default capabilities, as the container test runs it"
    );
}
