//! The one test harness of proxypilot: network namespaces with
//! documentation-range addresses on their own `lo`, throwaway cgroups and
//! commands run inside a cgroup (the privileged tests), the test CA
//! ([`testca`]), the fake upstreams and tokenizers (in a namespace,
//! [`upstream`]; on loopback, [`loopback`]) and the log capture ([`logs`]).
//!
//! Network safety: every test calls [`NetNs::enter_new`] before it touches a
//! non-loopback address, so nothing it sends can leave the machine even if a
//! program failed to attach.

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use proxypilot::kernel::{cgroup, Attachment};

/// True when the privileged tests can run. Outside CI, without root, they
/// skip with a message; in CI (env `CI` set) not being root is a failure.
pub fn privileged() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("privileged tests must run as root in CI (BPF, cgroups and netns are needed)");
    }
    eprintln!("skipping: this test needs root (BPF, cgroup v2 and network namespaces)");
    false
}

/// Skips the calling test unless [`privileged`].
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::privileged() {
            return;
        }
    };
}

/// A network namespace private to the calling thread and everything it
/// spawns afterwards.
pub struct NetNs(());

impl NetNs {
    /// Moves the calling thread into a new network namespace with `lo` up
    /// and `addrs` (e.g. "203.0.113.10/32", "2001:db8::10/128") on it.
    pub fn enter_new(addrs: &[&str]) -> NetNs {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        run_ok(Command::new("ip").args(["link", "set", "lo", "up"]));
        for a in addrs {
            // nodad: IPv6 addresses are usable at once.
            let mut cmd = Command::new("ip");
            cmd.args(["addr", "add", a, "dev", "lo"]);
            if a.contains(':') {
                cmd.arg("nodad");
            }
            run_ok(&mut cmd);
        }
        NetNs(())
    }
}

/// Runs a command and panics with its output unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A cgroup made for one test; on drop, its members are killed, anything
/// proxypilot pinned for it is detached, and it is removed.
pub struct TestCgroup {
    path: PathBuf,
    id: u64,
}

impl TestCgroup {
    pub fn new(name: &str) -> TestCgroup {
        // Unique per call: tests in one process run in parallel.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let root = cgroup::cgroup2_mount().expect("cgroup v2 mount");
        let path = root.join(format!("proxypilot-test-{name}-{}-{n}", std::process::id()));
        let _ = cgroup::remove_tree(&path);
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        let id = cgroup::cgroup_id(&path).unwrap();
        TestCgroup { path, id }
    }

    /// A child cgroup below this one (removed with it).
    pub fn child(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        fs::create_dir(&p).unwrap();
        p
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = proxypilot::kernel::attach::detach_by_id(self.id);
        if let Err(e) = cgroup::remove_tree(&self.path) {
            eprintln!("warning: could not remove {}: {e}", self.path.display());
        }
    }
}

/// A command that joins `cgroup` before it execs `program`, so nothing it
/// does happens outside the cgroup.
pub fn in_cgroup(cgroup: &Path, program: &str) -> Command {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
        .arg(cgroup)
        .arg(program);
    cmd
}

/// The network probe run inside sandboxes (tests/support/netprobe.py).
pub fn netprobe(cgroup: &Path) -> Command {
    let mut cmd = in_cgroup(cgroup, "python3");
    cmd.arg(support_dir().join("netprobe.py"));
    cmd
}

/// Runs the probe and parses its JSON lines.
pub fn probe(cgroup: &Path, args: &[&str]) -> Vec<serde_json::Value> {
    let out = run_ok(netprobe(cgroup).args(args));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad probe line {l:?}: {e}")))
        .collect()
}

/// Runs the probe for a single attempt.
pub fn probe_one(cgroup: &Path, args: &[&str]) -> serde_json::Value {
    let mut v = probe(cgroup, args);
    assert_eq!(v.len(), 1, "{v:?}");
    v.remove(0)
}

/// The probes and client scripts the sandbox runs (tests/support).
///
/// The sandbox runs as a uid of its own (or `nobody`), so it must be able
/// to reach them. When some directory above the checkout is closed to
/// others (a clone in a `mktemp -d` directory is 0700), they are copied
/// once per test process to a world-readable directory under the temp
/// dir; copies left by earlier runs whose process is gone are removed.
pub fn support_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("support");
        if traversable_by_others(&src) {
            return src;
        }
        let tmp = std::env::temp_dir();
        const PREFIX: &str = "proxypilot-test-support-";
        for e in fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix(PREFIX) {
                if !Path::new("/proc").join(pid).exists() {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        let dst = tmp.join(format!("{PREFIX}{}", std::process::id()));
        let _ = fs::remove_dir_all(&dst);
        run_ok(Command::new("cp").arg("-a").arg(&src).arg(&dst));
        run_ok(Command::new("chmod").args(["-R", "a+rX"]).arg(&dst));
        dst
    })
    .clone()
}

/// True when every directory from `/` down to `path` lets others pass.
fn traversable_by_others(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.ancestors()
        .all(|d| fs::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
}

/// The `proxypilot` binary of this build (target/<profile>/proxypilot).
pub fn proxypilot_bin() -> PathBuf {
    // Test executables live in target/<profile>/deps, binaries one level up.
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    let profile_dir = if dir.ends_with("deps") {
        dir.parent().unwrap()
    } else {
        dir
    };
    let bin = profile_dir.join("proxypilot");
    assert!(
        bin.exists(),
        "{} is missing; build it first (`cargo build --bins`, which `cargo xtask test` does)",
        bin.display()
    );
    bin
}

/// The kernel policy the tests use: port 443 intercepted to `listeners`,
/// `allowed` passing, and this test process (outside the sandbox) exempt.
pub fn test_policy(
    listeners: &[SocketAddr],
    allowed: Vec<proxypilot::kernel::AllowRule>,
) -> proxypilot::kernel::KernelPolicy {
    let own = cgroup::cgroup_of("self").unwrap();
    let mut policy = proxypilot::kernel::KernelPolicy {
        intercept_ports: vec![443],
        listen_v4: None,
        listen_v6: None,
        allowed,
        exempt_cgroup_id: cgroup::cgroup_id(&own).unwrap(),
        allowed_unix: vec![],
        resolver: Default::default(),
    };
    policy.set_listeners(listeners).unwrap();
    policy
}

/// A loopback listener that answers each line it receives with what the
/// kernel recorded for that connection: `{"orig": .., "pid": .., "comm": ..}`
/// (or `{"orig": null}`), as the proxy will see it.
pub struct OriginEcho {
    pub v4: SocketAddr,
    pub v6: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl OriginEcho {
    /// Binds 127.0.0.1:0 and [::1]:0. Call [`OriginEcho::serve`] once the
    /// attachment exists.
    pub fn bind() -> (TcpListener, TcpListener) {
        (
            TcpListener::bind("127.0.0.1:0").unwrap(),
            TcpListener::bind("[::1]:0").unwrap(),
        )
    }

    pub fn serve(listeners: (TcpListener, TcpListener), attachment: Arc<Attachment>) -> OriginEcho {
        let stop = Arc::new(AtomicBool::new(false));
        let v4 = listeners.0.local_addr().unwrap();
        let v6 = listeners.1.local_addr().unwrap();
        for l in [listeners.0, listeners.1] {
            let attachment = attachment.clone();
            let stop = stop.clone();
            thread::spawn(move || {
                for conn in l.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    // Look up at accept time, as the proxy does.
                    let peer = conn.peer_addr().unwrap();
                    let origin = attachment.original_destination(peer);
                    thread::spawn(move || answer_origin(conn, origin));
                }
            });
        }
        OriginEcho { v4, v6, stop }
    }
}

impl Drop for OriginEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.v4);
        let _ = TcpStream::connect(self.v6);
    }
}

fn answer_origin(conn: TcpStream, origin: Option<proxypilot::kernel::OriginalDestination>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    let _ = reader.read_line(&mut line);
    let reply = match origin {
        Some(o) => serde_json::json!({"orig": o.addr.to_string(), "pid": o.pid, "comm": o.comm}),
        None => serde_json::json!({"orig": null}),
    };
    let mut conn = conn;
    let _ = writeln!(conn, "{reply}");
}

/// A plain TCP server on `addr` that answers each line with `{"real": addr}`,
/// standing for a real destination.
pub fn real_server(addr: &str) -> SocketAddr {
    let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let local = l.local_addr().unwrap();
    thread::spawn(move || {
        for conn in l.incoming().flatten() {
            thread::spawn(move || {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                let _ = r.read_line(&mut line);
                let mut conn = conn;
                let _ = writeln!(conn, "{}", serde_json::json!({"real": local.to_string()}));
            });
        }
    });
    local
}

/// A UDP server on `addr` that records what it receives.
pub fn udp_sink(addr: &str) -> Arc<std::sync::Mutex<Vec<String>>> {
    let s = std::net::UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
    let got = Arc::new(std::sync::Mutex::new(Vec::new()));
    let g = got.clone();
    thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, _)) = s.recv_from(&mut buf) {
            g.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    });
    got
}

/// A running `proxypilot` process; killed on drop.
pub struct Proxypilot {
    pub child: std::process::Child,
    pub stderr_path: PathBuf,
}

impl Proxypilot {
    /// Starts `proxypilot ARGS...` in the current network namespace, with
    /// stderr going to a file, and waits for `ready_file` to appear.
    pub fn start(mut cmd: Command, ready_file: &Path, stderr_path: PathBuf) -> Proxypilot {
        let _ = fs::remove_file(ready_file);
        let stderr = fs::File::create(&stderr_path).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready_file.exists() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "proxypilot exited ({status}) before it was ready:\n{}",
                    fs::read_to_string(&stderr_path).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "proxypilot did not get ready in 20s"
            );
            thread::sleep(Duration::from_millis(20));
        }
        Proxypilot { child, stderr_path }
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proxypilot {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Programs `bpftool cgroup show` lists on each sandbox cgroup:
/// connect4/6, sendmsg4/6, recvmsg4/6, getpeername4/6, sock_ops, sock_create,
/// setsockopt, cgroup_skb egress and ingress. (bpftool does not list the
/// unix socket hooks; `proxypilot::kernel::unix` counts those.)
pub const ATTACHED_PROGRAMS: usize = 13;

/// The programs attached to `cgroup` as `bpftool cgroup show` lists them
/// (attach type and program name per line).
pub fn attached_programs(cgroup: &Path) -> Vec<String> {
    let out = run_ok(
        Command::new("bpftool")
            .arg("cgroup")
            .arg("show")
            .arg(cgroup),
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("ID"))
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
        .collect()
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        // Plain characters only: tests put these paths in shell scripts.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("proxypilot-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Reads everything from a stream (for small test replies).
pub fn read_all(mut s: impl Read) -> String {
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

pub mod dns;
pub mod fake_s3;
pub mod faults_support;
pub mod goaway;
pub mod loadgen;
pub mod logs;
pub mod loopback;
pub mod peers;
pub mod sandbox;
pub mod shapes;
pub mod testca;
pub mod upstream;
