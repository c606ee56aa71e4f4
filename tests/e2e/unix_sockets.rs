//! Unix sockets from inside a real sandbox cgroup, with the programs
//! attached: listeners outside the sandbox (path and abstract, stream and
//! datagram) are unreachable unless `--allow-unix` names them, the refusals
//! are reported, and nothing is left behind when the programs go.

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead, BufReader, Write},
    os::{
        linux::net::SocketAddrExt,
        unix::fs::PermissionsExt,
        unix::net::{SocketAddr, UnixDatagram, UnixListener, UnixStream},
    },
    path::Path,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use proxypilot::kernel::{
    unix::{self, UnixDenial},
    Attachment, UnixPath,
};
use proxypilot_tests::{
    shapes::{self, FlyShape, Tokenizer},
    upstream::FakeInternet,
    *,
};
use serde_json::Value;

/// A unix listener outside the sandbox that counts what reaches it.
struct Listener {
    /// A path, or `@name` for an abstract name (as unixprobe.py takes it).
    name: String,
    hits: Arc<AtomicUsize>,
}

#[derive(Clone, Copy)]
enum Kind {
    Stream,
    Dgram,
}

impl Listener {
    fn bind(name: &str, kind: Kind) -> Listener {
        let addr = match name.strip_prefix('@') {
            Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name).unwrap(),
            None => SocketAddr::from_pathname(name).unwrap(),
        };
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        match kind {
            Kind::Stream => {
                let l = UnixListener::bind_addr(&addr).unwrap();
                thread::spawn(move || {
                    for mut conn in l.incoming().map_while(Result::ok) {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let mut line = String::new();
                        let _ = BufReader::new(&conn).read_line(&mut line);
                        let _ = conn.write_all(b"served\n");
                    }
                });
            }
            Kind::Dgram => {
                let d = UnixDatagram::bind_addr(&addr).unwrap();
                thread::spawn(move || {
                    let mut buf = [0u8; 64];
                    while d.recv(&mut buf).is_ok() {
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        }
        Listener {
            name: name.to_string(),
            hits,
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// A scratch directory for socket files, and a prefix for abstract names,
/// both unique to this test.
struct Names {
    dir: TempDir,
    tag: String,
}

impl Names {
    fn new(test: &str) -> Names {
        let dir = TempDir::new(&format!("unix-{test}"));
        Names {
            tag: format!("proxypilot-test-{test}-{}", std::process::id()),
            dir,
        }
    }
    fn path(&self, name: &str) -> String {
        self.dir.0.join(name).to_str().unwrap().to_string()
    }
    fn abstract_name(&self, name: &str) -> String {
        format!("@{}-{name}", self.tag)
    }
}

fn unixprobe(cgroup: &Path, args: &[&str]) -> Command {
    let mut cmd = in_cgroup(cgroup, "python3");
    cmd.arg(support_dir().join("unixprobe.py")).args(args);
    cmd
}

fn probe(cgroup: &Path, args: &[&str]) -> Value {
    let out = run_ok(&mut unixprobe(cgroup, args));
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("bad probe output {text:?}: {e}"))
}

fn assert_eperm(r: &Value) {
    assert_eq!(
        (r["ok"].as_bool(), r["errno"].as_str()),
        (Some(false), Some("EPERM")),
        "{r}"
    );
}

fn assert_reached(r: &Value) {
    assert_eq!(r["ok"], true, "{r}");
    if r.get("reply").is_some() {
        assert_eq!(r["reply"], "served", "{r}");
    }
}

/// Attaches with `allowed` as the unix list (the test process is exempt).
fn attach(cg: &TestCgroup, allowed: &[&str]) -> Attachment {
    let mut policy = test_policy(&[], vec![]);
    policy.allowed_unix = allowed
        .iter()
        .map(|p| p.parse::<UnixPath>().unwrap())
        .collect();
    let a = Attachment::attach(cg.path(), &policy).expect("attach");
    assert!(
        a.filters_unix(),
        "this kernel must have the unix hooks (Linux 6.7+)"
    );
    a
}

/// Reads the unix denials the kernel reported, as (name, hook, comm), until
/// `done` holds for those that `relevant` keeps (or 5 s passed). Records
/// the test did not cause (glibc trying nscd, from any process in the
/// cgroup) are left out of the result but shown if the test fails.
fn denials(
    attachment: &Attachment,
    relevant: impl Fn(&UnixDenial) -> bool,
    done: impl Fn(&BTreeSet<(String, String, String)>) -> bool,
) -> (BTreeSet<(String, String, String)>, Vec<String>) {
    let mut ring = attachment.take_unix_denials().expect("unix denial ring");
    let mut seen = BTreeSet::new();
    let mut all = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done(&seen) && Instant::now() < deadline {
        match ring.next() {
            Some(item) => record(&item, &relevant, &mut seen, &mut all),
            None => thread::sleep(Duration::from_millis(10)),
        }
    }
    // And whatever else is already there, so an extra record is seen too.
    while let Some(item) = ring.next() {
        record(&item, &relevant, &mut seen, &mut all);
    }
    (seen, all)
}

fn record(
    item: &[u8],
    relevant: impl Fn(&UnixDenial) -> bool,
    seen: &mut BTreeSet<(String, String, String)>,
    all: &mut Vec<String>,
) {
    let d = UnixDenial::parse(item).expect("a whole denial record");
    all.push(format!("{} {} {} pid {}", d.name, d.hook, d.comm, d.pid));
    if relevant(&d) {
        seen.insert((d.name, d.hook.to_string(), d.comm));
    }
}

fn entry(name: &str, hook: &str, comm: &str) -> (String, String, String) {
    (name.to_string(), hook.to_string(), comm.to_string())
}

#[test]
fn abstract_and_path_listeners_outside_the_sandbox_are_unreachable() {
    require_root!();
    // Abstract names live in the network namespace: use one of our own.
    let _ns = NetNs::enter_new(&[]);
    let names = Names::new("deny");
    let stream_path = Listener::bind(&names.path("stream.sock"), Kind::Stream);
    let dgram_path = Listener::bind(&names.path("dgram.sock"), Kind::Dgram);
    let stream_abstract = Listener::bind(&names.abstract_name("stream"), Kind::Stream);
    let dgram_abstract = Listener::bind(&names.abstract_name("dgram"), Kind::Dgram);
    let attempts: [(&str, &Listener); 6] = [
        ("stream", &stream_path),
        ("stream", &stream_abstract),
        ("dgram", &dgram_path),
        ("dgram", &dgram_abstract),
        ("dgram-connect", &dgram_path),
        ("dgram-connect", &dgram_abstract),
    ];
    let cg = TestCgroup::new("unix-deny");
    let attachment = attach(&cg, &[]);

    for (mode, l) in attempts {
        assert_eperm(&probe(cg.path(), &[mode, &l.name]));
    }
    for l in [&stream_path, &dgram_path, &stream_abstract, &dgram_abstract] {
        assert_eq!(l.hits(), 0, "{} was reached", l.name);
    }
    let expected: BTreeSet<_> = [
        entry(&stream_path.name, "connect_unix", "python3"),
        entry(&stream_abstract.name, "connect_unix", "python3"),
        entry(&dgram_path.name, "sendmsg_unix", "python3"),
        entry(&dgram_abstract.name, "sendmsg_unix", "python3"),
        entry(&dgram_path.name, "connect_unix", "python3"),
        entry(&dgram_abstract.name, "connect_unix", "python3"),
    ]
    .into();
    let ours = |d: &UnixDenial| {
        d.name.starts_with(&format!("@{}", names.tag))
            || Path::new(&d.name).starts_with(&names.dir.0)
    };
    let (seen, all) = denials(&attachment, ours, |seen| seen.is_superset(&expected));
    assert_eq!(seen, expected, "every record read: {all:#?}");

    attachment.detach().unwrap();
    for (mode, l) in attempts {
        assert_reached(&probe(cg.path(), &[mode, &l.name]));
    }
    wait_until("the datagrams arrive", || {
        dgram_path.hits() == 2 && dgram_abstract.hits() == 2
    });
    assert_eq!((stream_path.hits(), stream_abstract.hits()), (1, 1));
}

#[test]
fn an_allowed_path_is_reachable_and_only_by_that_exact_name() {
    require_root!();
    let _ns = NetNs::enter_new(&[]);
    let names = Names::new("allow");
    let allowed = Listener::bind(&names.path("allowed.sock"), Kind::Stream);
    let allowed_dgram = Listener::bind(&names.path("allowed-dgram.sock"), Kind::Dgram);
    let other = Listener::bind(&names.path("other.sock"), Kind::Stream);
    // The same socket by its abstract twin name is still refused.
    let twin = Listener::bind(&format!("@{}", allowed.name), Kind::Stream);
    let cg = TestCgroup::new("unix-allow");
    let attachment = attach(&cg, &[&allowed.name, &allowed_dgram.name]);

    assert_reached(&probe(cg.path(), &["stream", &allowed.name]));
    assert_reached(&probe(cg.path(), &["dgram", &allowed_dgram.name]));
    assert_reached(&probe(cg.path(), &["dgram-connect", &allowed_dgram.name]));
    assert_eperm(&probe(cg.path(), &["stream", &other.name]));
    assert_eperm(&probe(cg.path(), &["stream", &twin.name]));
    // The kernel compares the name the caller passes, not the file: the
    // allowed socket under another spelling is refused.
    let dir = names.dir.0.file_name().unwrap().to_str().unwrap();
    let dotted = format!("{}/../{dir}/allowed.sock", names.dir.0.display());
    assert_eperm(&probe(cg.path(), &["stream", &dotted]));
    let relative =
        run_ok(unixprobe(cg.path(), &["stream", "allowed.sock"]).current_dir(&names.dir.0));
    assert_eperm(&serde_json::from_slice(relative.stdout.trim_ascii()).unwrap());
    wait_until("the datagrams arrive", || allowed_dgram.hits() == 2);
    assert_eq!((allowed.hits(), other.hits(), twin.hits()), (1, 0, 0));

    // The list changes while the programs run.
    let mut policy = test_policy(&[], vec![]);
    policy.allowed_unix = vec![other.name.parse().unwrap()];
    attachment.set_policy(&policy).unwrap();
    assert_eperm(&probe(cg.path(), &["stream", &allowed.name]));
    assert_reached(&probe(cg.path(), &["stream", &other.name]));
}

#[test]
fn glibc_falls_back_when_nscd_is_refused() {
    require_root!();
    let cg = TestCgroup::new("unix-nscd");
    let attachment = attach(&cg, &[]);
    let out = run_ok(in_cgroup(cg.path(), "getent").args(["passwd", "root"]));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("root:x:0:0:"),
        "{out:?}"
    );
    // glibc did try nscd first, and was refused.
    let nscd = entry("/var/run/nscd/socket", "connect_unix", "getent");
    let (seen, all) = denials(&attachment, |_| true, |seen| seen.contains(&nscd));
    assert!(
        seen.contains(&nscd),
        "getent's nscd connect was not refused; every record read: {all:#?}"
    );
}

#[test]
fn sandbox_internal_sockets_need_allow_unix_but_socketpairs_and_inherited_ones_pass() {
    require_root!();
    let _ns = NetNs::enter_new(&[]);
    let names = Names::new("inherit");
    let outside = Listener::bind(&names.path("outside.sock"), Kind::Stream);
    let cg = TestCgroup::new("unix-inherit");
    let _attachment = attach(&cg, &[]);
    assert_eperm(&probe(cg.path(), &["stream", &outside.name]));
    // The hook cannot tell a listener inside the sandbox from one outside.
    assert_eperm(&probe(cg.path(), &["own", &names.path("own.sock")]));
    assert_eperm(&probe(cg.path(), &["own", &names.abstract_name("own")]));
    let pair = probe(cg.path(), &["socketpair"]);
    assert_eq!(
        (pair["ok"].as_bool(), pair["reply"].as_str()),
        (Some(true), Some("ping")),
        "{pair}"
    );
    // A socket connected outside the sandbox and handed in keeps working:
    // the hooks decide connect() and sendto(), nothing later.
    let conn = UnixStream::connect(&outside.name).unwrap();
    let mut cmd = unixprobe(cg.path(), &["inherited"]);
    cmd.stdin(std::os::fd::OwnedFd::from(conn));
    let out = run_ok(&mut cmd);
    assert_reached(&serde_json::from_slice(out.stdout.trim_ascii()).unwrap());
    assert_eq!(outside.hits(), 1);
}

#[test]
fn a_second_attach_takes_the_unix_hooks_over_without_a_gap() {
    require_root!();
    let _ns = NetNs::enter_new(&[]);
    let names = Names::new("takeover");
    let first = Listener::bind(&names.path("first.sock"), Kind::Stream);
    let second = Listener::bind(&names.path("second.sock"), Kind::Stream);
    let never = Listener::bind(&names.abstract_name("never"), Kind::Dgram);
    let steady = Listener::bind(&names.path("steady.sock"), Kind::Dgram);
    let cg = TestCgroup::new("unix-takeover");
    let old = attach(&cg, &[&first.name, &steady.name]);
    assert_reached(&probe(cg.path(), &["stream", &first.name]));

    // All through the takeover, a sandbox process sends to a name both
    // lists refuse and to one both allow: neither may change its answer.
    let script = "import socket, sys, time\n\
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
        end = time.time() + float(sys.argv[3])\n\
        counts = {'sent': 0, 'refused': 0}\n\
        wrong = {'sent': 0, 'refused': 0}\n\
        while time.time() < end:\n\
        \x20   for name, want in ((sys.argv[1], 'refused'), (sys.argv[2], 'sent')):\n\
        \x20       try:\n\
        \x20           s.sendto(b'x', '\\0' + name[1:] if name[0] == '@' else name); got = 'sent'\n\
        \x20       except PermissionError:\n\
        \x20           got = 'refused'\n\
        \x20       counts[got] += 1\n\
        \x20       wrong[got] += got != want\n\
        print(counts['refused'], wrong['sent'], wrong['refused'])\n";
    let hammer = in_cgroup(cg.path(), "python3")
        .args(["-c", script, &never.name, &steady.name, "1.5"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(500));
    let new = attach(&cg, &[&second.name, &steady.name]);
    let out = hammer.wait_with_output().unwrap();
    let counts = String::from_utf8_lossy(&out.stdout);
    let counts: Vec<u32> = counts
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    let [refused, leaked, blocked] = counts[..] else {
        panic!("hammer counts: {counts:?}");
    };
    assert_eq!(
        (leaked, blocked),
        (0, 0),
        "refused name sent / allowed name refused during the takeover"
    );
    assert!(refused > 100, "{refused} sends refused");
    assert_eq!(never.hits(), 0);

    // Replacing a pin releases the old link once an RCU grace period has
    // passed. Then only the new program runs: the old one (which allowed
    // only `first`) would refuse `second`.
    wait_until("the old links are released", || {
        unix::attached_programs(cg.path()).unwrap() == (1, 1)
    });
    assert_eperm(&probe(cg.path(), &["stream", &first.name]));
    assert_reached(&probe(cg.path(), &["stream", &second.name]));
    drop(old);
    new.detach().unwrap();
    wait_until("the links are released", || {
        unix::attached_programs(cg.path()).unwrap() == (0, 0)
    });
    assert_reached(&probe(cg.path(), &["stream", &first.name]));
}

#[test]
fn allow_unix_refuses_the_fly_machine_api() {
    let out = Command::new(proxypilot_bin())
        .args([
            "sidecar",
            "--cgroup",
            "/nonexistent",
            "--allow-unix",
            "/.fly/api",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/.fly/api") && stderr.contains("secrets"),
        "{stderr}"
    );
}

#[test]
fn the_sidecar_filters_unix_sockets_and_logs_each_refusal() {
    require_root!();
    let net = FakeInternet::start();
    let names = Names::new("fly");
    let allowed = Listener::bind(&names.path("agent.sock"), Kind::Stream);
    let refused = Listener::bind(&names.path("fly-api.sock"), Kind::Stream);
    let refused_abstract = Listener::bind(&names.abstract_name("x"), Kind::Stream);
    let mut fly = FlyShape::start(
        &net,
        "unix",
        Tokenizer::Embedded,
        &["--allow-unix", &allowed.name],
    );
    let run = |fly: &FlyShape, name: &str| sandbox_probe(&net, fly, name);
    assert_reached(&run(&fly, &allowed.name));
    assert_eperm(&run(&fly, &refused.name));
    assert_eperm(&run(&fly, &refused_abstract.name));
    assert_eq!((refused.hits(), refused_abstract.hits()), (0, 0));
    wait_until("the sidecar logs both refusals", || {
        let log = fly.sidecar_log();
        log.contains(&format!("unix {} (connect_unix)", refused.name))
            && log.contains(&format!("unix {} (connect_unix)", refused_abstract.name))
    });

    // With the sidecar gone the pinned programs keep deciding.
    fly.sidecar.kill9();
    assert_eperm(&run(&fly, &refused.name));
    assert_reached(&run(&fly, &allowed.name));
    assert_eq!(unix::attached_programs(fly.cgroup.path()).unwrap(), (1, 1));
    run_ok(
        Command::new(proxypilot_bin())
            .args(["detach", "--cgroup"])
            .arg(fly.cgroup.path()),
    );
    wait_until("the links are released", || {
        unix::attached_programs(fly.cgroup.path()).unwrap() == (0, 0)
    });
    assert_reached(&run(&fly, &refused.name));
}

#[test]
fn proxypilot_run_allows_only_allow_unix_paths_and_says_why() {
    require_root!();
    let net = FakeInternet::start();
    let names = Names::new("run");
    let allowed = Listener::bind(&names.path("agent.sock"), Kind::Stream);
    let refused = Listener::bind(&names.path("docker.sock"), Kind::Stream);
    // Whatever uid `run` gives the command may use both sockets.
    for path in [
        &names.dir.0,
        Path::new(&allowed.name),
        Path::new(&refused.name),
    ] {
        fs::set_permissions(path, fs::Permissions::from_mode(0o777)).unwrap();
    }
    let probe = support_dir().join("unixprobe.py");
    let script = format!(
        "getent passwd root >/dev/null && python3 {p} stream {a} && python3 {p} stream {r}; sleep 1",
        p = probe.display(),
        a = allowed.name,
        r = refused.name
    );
    let out = shapes::local_run_with(
        &net,
        &["--allow-unix", &allowed.name],
        &["/bin/sh", "-c", &script],
    )
    .command()
    .stdin(Stdio::null())
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l} {stderr}")))
        .collect();
    assert_eq!(lines.len(), 2, "{stdout} {stderr}");
    assert_reached(&lines[0]);
    assert_eperm(&lines[1]);
    assert_eq!((allowed.hits(), refused.hits()), (1, 0));
    assert!(
        stderr.contains(&format!("unix {} (connect_unix)", refused.name))
            && stderr.contains(&format!("--allow-unix {}", refused.name)),
        "{stderr}"
    );
    // glibc's try of nscd is refused too, but is not worth a line.
    assert!(!stderr.contains("nscd"), "{stderr}");
}

/// Runs unixprobe.py `stream NAME` in the sidecar's sandbox.
fn sandbox_probe(net: &FakeInternet, fly: &FlyShape, name: &str) -> Value {
    let out = fly
        .sandbox(net, "python3")
        .arg(support_dir().join("unixprobe.py"))
        .args(["stream", name])
        .command()
        .stdin(Stdio::null())
        .output()
        .unwrap();
    serde_json::from_slice(out.stdout.trim_ascii())
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)))
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(20));
    }
}
