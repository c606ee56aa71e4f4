//! `proxypilot run` end to end: fake APIs and a stub DNS in a private
//! network namespace, real curl inside the sandbox, proxypilot resolving
//! and dialling the upstreams itself.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use proxypilot::kernel::cgroup;
use proxypilot_tests::{
    sandbox::SandboxCommand,
    upstream::{FakeInternet, ANTHROPIC, OPENAI, REPLY_TEXT},
    *,
};

use proxypilot_tests::shapes::local_run_with as proxypilot_run;

fn output(cmd: SandboxCommand) -> Output {
    let out = cmd
        .command()
        .stdin(Stdio::null())
        .output()
        .expect("start proxypilot run");
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn clients() -> PathBuf {
    support_dir().join("clients")
}

/// The sandbox cgroup `proxypilot run` (pid) creates, under this test's own.
fn run_cgroup(pid: u32) -> PathBuf {
    cgroup::cgroup_of("self")
        .unwrap()
        .join(format!("proxypilot-run-{pid}"))
}

#[test]
fn injects_the_keys_while_the_command_sees_only_dummies() {
    require_root!();
    let net = FakeInternet::start();
    let script = format!(
        "echo seen=$ANTHROPIC_API_KEY/$OPENAI_API_KEY; sh {a}; echo; sh {o}",
        a = clients().join("anthropic.sh").display(),
        o = clients().join("openai.sh").display()
    );
    let out = output(proxypilot_run(
        &net,
        &[
            "--secret",
            "ANTHROPIC_API_KEY",
            "--secret",
            "OPENAI_API_KEY",
        ],
        &["sh", "-c", &script],
    ));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("seen=dummy/dummy"), "{stdout}");
    assert!(
        stdout.contains(r#""type":"message""#) && stdout.contains(REPLY_TEXT),
        "{stdout}"
    );
    assert!(stdout.contains(r#""object":"response""#), "{stdout}");

    let keys = net.apis.keys();
    let a = net.apis.requests_to(ANTHROPIC);
    assert_eq!(a.len(), 1, "{a:?}");
    assert_eq!(a[0].header("x-api-key"), Some(keys.anthropic.as_str()));
    assert!(
        a[0].headers_starting_with("proxy-").is_empty(),
        "{:?}",
        a[0].headers
    );
    let o = net.apis.requests_to(OPENAI);
    assert_eq!(
        o[0].header("authorization"),
        Some(format!("Bearer {}", keys.openai).as_str())
    );
    for secret in [&keys.anthropic, &keys.openai] {
        assert!(
            !stdout.contains(secret.as_str()) && !stderr.contains(secret.as_str()),
            "a real key leaked"
        );
    }
}

#[test]
fn propagates_the_exit_status_and_cleans_up() {
    require_root!();
    let net = FakeInternet::start();
    let mut child = proxypilot_run(&net, &["--secret", "GH_TOKEN"], &["sh", "-c", "exit 42"])
        .command()
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(42));
    assert!(
        !run_cgroup(pid).exists(),
        "the sandbox cgroup was left behind"
    );
    assert_no_run_dirs(&net.dir.0);
}

/// Waits until `path` holds a whole line and returns it, or panics with
/// the process's stderr.
fn wait_for_file(path: &Path, child: &mut Child) -> String {
    wait_while_running(path, child, || {
        fs::read_to_string(path).ok().filter(|s| s.ends_with('\n'))
    })
}

/// Waits until `path` exists, or panics with the process's stderr.
fn wait_for_path(path: &Path, child: &mut Child) {
    wait_while_running(path, child, || path.exists().then_some(()))
}

/// Polls `ready` while `proxypilot run` is alive, for up to 30 s. On a
/// timeout the run gets SIGTERM (it passes it on and cleans up) so no
/// sandbox is left behind.
fn wait_while_running<T>(
    path: &Path,
    child: &mut Child,
    mut ready: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = ready() {
            return v;
        }
        if let Some(st) = child.try_wait().unwrap() {
            let stderr = child.stderr.take().map(read_all).unwrap_or_default();
            panic!("proxypilot run exited early ({st}): {stderr}");
        }
        if Instant::now() > deadline {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::SIGTERM,
            );
            panic!("timed out waiting for {}", path.display());
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn spawn_waiting(net: &FakeInternet, marker: &Path) -> (Child, String) {
    let cmd = waiting_command(marker);
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let mut child = proxypilot_run(net, &["--secret", "ANTHROPIC_API_KEY"], &cmd)
        .command()
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let info = wait_for_file(marker, &mut child);
    (child, info)
}

/// A command that records its pid and cgroup id, then waits for a signal.
fn waiting_command(marker: &Path) -> Vec<String> {
    let script = format!(
        "trap 'echo got-int >> {m}.log; exit 5' INT; \
         echo \"$$ $(stat -c %i \"$(grep -m1 ^0:: /proc/self/cgroup | cut -d: -f3- | sed 's|^|{root}|')\")\" > {m}; \
         while :; do sleep 0.05; done",
        m = marker.display(),
        root = cgroup::cgroup2_mount().unwrap().display()
    );
    vec!["sh".into(), "-c".into(), script]
}

#[test]
fn sigint_reaches_the_command_and_everything_is_cleaned_up() {
    require_root!();
    let net = FakeInternet::start();
    let marker = shared_dir(&net).join("marker");
    let (mut child, info) = spawn_waiting(&net, &marker);
    let cgroup_id: u64 = info.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(Path::new(&format!("/sys/fs/bpf/proxypilot/cgroup-{cgroup_id}")).exists());

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(5),
        "the command's own exit status after its INT trap"
    );
    assert_eq!(
        fs::read_to_string(marker.with_extension("log")).unwrap(),
        "got-int\n"
    );
    assert!(!run_cgroup(child.id()).exists(), "cgroup left behind");
    assert!(
        !Path::new(&format!("/sys/fs/bpf/proxypilot/cgroup-{cgroup_id}")).exists(),
        "programs left pinned"
    );
    assert_no_run_dirs(&net.dir.0);
}

#[test]
fn sigkill_of_the_command_still_cleans_up() {
    require_root!();
    let net = FakeInternet::start();
    let marker = shared_dir(&net).join("marker");
    let (mut child, info) = spawn_waiting(&net, &marker);
    let mut parts = info.split_whitespace();
    let shell_pid: i32 = parts.next().unwrap().parse().unwrap();
    let cgroup_id: u64 = parts.next().unwrap().parse().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shell_pid),
        nix::sys::signal::SIGKILL,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + 9));
    assert!(!run_cgroup(child.id()).exists(), "cgroup left behind");
    assert!(!Path::new(&format!("/sys/fs/bpf/proxypilot/cgroup-{cgroup_id}")).exists());
    assert_no_run_dirs(&net.dir.0);
}

#[test]
fn a_missing_secret_variable_is_a_clear_error_before_anything_starts() {
    require_root!();
    let net = FakeInternet::start();
    let mut cmd = proxypilot_run(
        &net,
        &["--secret", "MY_KEY=api.example.com"],
        &["sh", "-c", "echo started"],
    )
    .command();
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(!text(&out.stdout).contains("started"));
    let err = text(&out.stderr);
    assert!(err.contains("MY_KEY") && err.contains("not set"), "{err}");
    assert!(!run_cgroup(pid).exists());
    assert_no_run_dirs(&net.dir.0);
}

#[test]
fn a_denied_destination_is_eperm_with_a_hint_on_stderr() {
    require_root!();
    let net = FakeInternet::start_with(
        Default::default(),
        proxypilot_tests::upstream::standard_hosts(),
        &["203.0.113.99/32"],
    );
    let _real = real_server("203.0.113.99:80");
    let probe = support_dir().join("netprobe.py");
    let out = output(proxypilot_run(
        &net,
        &["--secret", "ANTHROPIC_API_KEY"],
        &[
            "python3",
            probe.to_str().unwrap(),
            "tcp",
            "203.0.113.99",
            "80",
        ],
    ));
    let stdout = text(&out.stdout);
    let r: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{e}: {stdout} {}", text(&out.stderr)));
    assert_eq!(r["errno"], "EPERM", "{r}");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("proxypilot: blocked tcp 203.0.113.99:80"),
        "{stderr}"
    );
    assert!(stderr.contains("--allow-cidr"), "{stderr}");
    assert_eq!(stderr.matches("proxypilot: blocked").count(), 1);
}

#[test]
fn with_user_nobody_the_command_cannot_read_proxypilots_environment_memory_or_keys() {
    require_root!();
    let net = FakeInternet::start();
    // World-readable copies: the command runs as nobody.
    let scripts = net.dir.0.join("clients");
    fs::create_dir_all(&scripts).unwrap();
    fs::copy(clients().join("anthropic.sh"), scripts.join("anthropic.sh")).unwrap();
    set_mode(&net.dir.0, 0o755);
    set_mode(&scripts, 0o755);
    let script = format!(
        "id -un; \
         cat /proc/$PPID/environ >/dev/null 2>&1 && echo environ=readable || echo environ=denied; \
         head -c1 /proc/$PPID/mem >/dev/null 2>&1 && echo mem=readable || echo mem=denied; \
         ls \"$TMPDIR\"/proxypilot-run-$PPID/private >/dev/null 2>&1 && echo keys=readable || echo keys=denied; \
         sh {}",
        scripts.join("anthropic.sh").display()
    );
    let out = output(proxypilot_run(
        &net,
        &["--secret", "ANTHROPIC_API_KEY", "--user", "nobody"],
        &["sh", "-c", &script],
    ));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.starts_with("nobody\n"), "{stdout}");
    for line in ["environ=denied", "mem=denied", "keys=denied"] {
        assert!(stdout.contains(line), "{line}: {stdout}");
    }
    // And the key still works for it.
    assert!(stdout.contains(REPLY_TEXT), "{stdout}");
}

/// A directory every uid may write (sticky, like /tmp): the sandbox runs
/// as a uid of its own and reports back through it.
fn shared_dir(net: &FakeInternet) -> PathBuf {
    let dir = net.dir.0.join("shared");
    fs::create_dir_all(&dir).unwrap();
    set_mode(&dir, 0o1777);
    dir
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

/// No `proxypilot-run-*` directory (CA key, bundle) is left in TMPDIR.
fn assert_no_run_dirs(tmp: &Path) {
    let left: Vec<_> = fs::read_dir(tmp)
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("proxypilot-run-")
        })
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

// ---- No privilege in the sandbox (issue 13) ----

fn json_line(out: &Output) -> serde_json::Value {
    let stdout = text(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or("");
    serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("{e}: stdout {stdout:?}, stderr {}", text(&out.stderr)))
}

#[test]
fn the_default_sandbox_has_no_privilege_on_the_host() {
    require_root!();
    let net = FakeInternet::start();
    let shared = shared_dir(&net);
    let probe = support_dir().join("privilege_probe.py");
    let root = cgroup::cgroup2_mount().unwrap();
    // A cgroup beside the sandbox, so one sibling is always tried.
    let sibling = TestCgroup::new("run-sibling");
    let mut child = proxypilot_run(
        &net,
        &["--secret", "ANTHROPIC_API_KEY"],
        &[
            "/usr/bin/python3",
            probe.to_str().unwrap(),
            root.to_str().unwrap(),
            shared.to_str().unwrap(),
        ],
    )
    .command()
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();

    // From the host, while it runs: a uid nothing else has, in a user
    // namespace of its own that maps only that uid.
    wait_for_path(&shared.join("pid"), &mut child);
    let pid: u32 = fs::read_to_string(shared.join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let ids = |key: &str| -> Vec<u32> {
        let line = status.lines().find(|l| l.starts_with(key)).unwrap();
        line[key.len()..]
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect()
    };
    let uid = ids("Uid:")[0];
    assert_eq!(ids("Uid:"), [uid; 4], "{status}");
    assert_eq!(ids("Gid:"), [uid; 4], "{status}");
    assert!(
        proxypilot::run::identity::FRESH_IDS.contains(&uid),
        "uid {uid} is not a fresh one"
    );
    assert!(nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .unwrap()
        .is_none());
    let others: Vec<_> = proxypilot::run::identity::processes_of(uid)
        .into_iter()
        .filter(|(p, _)| *p != pid)
        .collect();
    assert!(
        others.is_empty(),
        "another process has uid {uid}: {others:?}"
    );
    assert_ne!(
        fs::read_link(format!("/proc/{pid}/ns/user")).unwrap(),
        fs::read_link("/proc/self/ns/user").unwrap(),
        "the command is in the host's user namespace"
    );
    let map = fs::read_to_string(format!("/proc/{pid}/uid_map")).unwrap();
    assert_eq!(
        map.split_whitespace().collect::<Vec<_>>(),
        ["0", &uid.to_string(), "1"]
    );
    fs::write(shared.join("go"), "").unwrap();

    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let r = json_line(&out);
    for (attempt, errno) in [
        ("environ", "EACCES"),
        ("mem", "EACCES"),
        ("ca_key", "EACCES"),
        ("private_dir", "EACCES"),
        ("bpf_prog_get_next_id", "EPERM"),
        ("bpf_map_create", "EPERM"),
        ("sethostname", "EPERM"),
        ("kill_proxypilot", "EPERM"),
        ("chown_root_file", "EPERM"),
        ("read_bundle", "ok"),
        ("write_home", "ok"),
    ] {
        assert_eq!(r[attempt], errno, "{attempt}: {r}");
    }
    let cgroups = r["cgroups"].as_object().unwrap();
    assert!(cgroups.contains_key(root.to_str().unwrap()), "{r}");
    assert!(
        cgroups.contains_key(sibling.path().to_str().unwrap()),
        "{r}"
    );
    for (cg, result) in cgroups {
        assert_eq!(result, "EACCES", "joining {cg}: {r}");
    }
    assert_eq!(r["still_in_sandbox"], true, "{r}");
    // Root of its own namespace (full capabilities there, none on the host).
    assert_eq!(r["status"]["Uid"], "0\t0\t0\t0", "{r}");
    assert_eq!(r["status"]["NoNewPrivs"], "1", "{r}");
}

#[test]
fn a_setuid_root_binary_gains_nothing_in_the_sandbox() {
    require_root!();
    let net = FakeInternet::start();
    let shared = shared_dir(&net);
    // A setuid-root copy of a real interpreter: without no_new_privs, a
    // --user sandbox running it would be root.
    let suid = shared.join("python-suid");
    fs::copy(fs::canonicalize("/usr/bin/python3").unwrap(), &suid).unwrap();
    set_mode(&suid, 0o4755);
    // Root's files are root's by owner, no capability needed: the CA key.
    // (TMPDIR comes as an argument: glibc drops it for a setuid binary.)
    let script = "import os, json, sys\n\
                  def attempt(path):\n\
                  \x20   try:\n        open(path, 'rb').read(1); return 'ok'\n\
                  \x20   except OSError as e:\n        return e.errno\n\
                  pp = os.getppid()\n\
                  key = '%s/proxypilot-run-%d/private/ca-key.pem' % (sys.argv[1], pp)\n\
                  print(json.dumps({'euid': os.geteuid(), 'environ': attempt('/proc/%d/environ' % pp), 'ca_key': attempt(key)}))";
    let bin_uid = nix::unistd::User::from_name("bin")
        .unwrap()
        .unwrap()
        .uid
        .as_raw();
    for (user, euid) in [(None, 0), (Some("bin"), bin_uid)] {
        let mut args = vec!["--secret", "ANTHROPIC_API_KEY"];
        if let Some(u) = user {
            args.extend(["--user", u]);
        }
        let tmp = net.dir.0.to_str().unwrap();
        let out = output(proxypilot_run(
            &net,
            &args,
            &[suid.to_str().unwrap(), "-c", script, tmp],
        ));
        assert!(out.status.success(), "{user:?}: {}", text(&out.stderr));
        let r = json_line(&out);
        // The default's euid 0 is root of its own namespace.
        assert_eq!(r["euid"], euid, "{user:?}: {r}");
        assert_eq!(r["environ"], libc_eacces(), "{user:?}: {r}");
        assert_eq!(r["ca_key"], libc_eacces(), "{user:?}: {r}");
    }
}

fn libc_eacces() -> i64 {
    nix::errno::Errno::EACCES as i64
}

#[test]
fn user_is_refused_for_root_and_for_a_uid_other_processes_run_as() {
    require_root!();
    let net = FakeInternet::start();
    let refused = |user: &str| {
        let marker = net.dir.0.join(format!("started-{user}"));
        let out = output(proxypilot_run(
            &net,
            &["--secret", "ANTHROPIC_API_KEY", "--user", user],
            &["touch", marker.to_str().unwrap()],
        ));
        assert_eq!(out.status.code(), Some(1), "--user {user}");
        assert!(!marker.exists(), "--user {user}: the command ran");
        text(&out.stderr)
    };
    let err = refused("root");
    assert!(
        err.contains("--user root: uid 0 is root, and root is never a sandbox user"),
        "{err}"
    );

    // Something else running as daemon (uid 1): sharing it would let the
    // sandbox signal and trace it.
    let mut other = std::process::Command::new("setpriv")
        .args([
            "--reuid=daemon",
            "--regid=daemon",
            "--clear-groups",
            "sleep",
            "30",
        ])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !proxypilot::run::identity::processes_of(1)
        .iter()
        .any(|(p, _)| *p == other.id())
    {
        assert!(Instant::now() < deadline, "the sleep never became uid 1");
        thread::sleep(Duration::from_millis(10));
    }
    let err = refused("daemon");
    other.kill().unwrap();
    other.wait().unwrap();
    assert!(
        err.contains("--user daemon: uid 1 is in use by")
            && err.contains(&format!("pid {} sleep", other.id()))
            && err.contains("Leave out --user"),
        "{err}"
    );
}

/// A shell script that runs `cmd` exactly as the harness would: its
/// environment only, each argument quoted.
fn as_script(cmd: &std::process::Command) -> String {
    let q = |s: &std::ffi::OsStr| format!("'{}'", s.to_string_lossy().replace('\'', r"'\''"));
    let mut line = String::from("exec env -i");
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            let pair = format!("{}={}", k.to_string_lossy(), v.to_string_lossy());
            line += &format!(" {}", q(pair.as_ref()));
        }
    }
    line += &format!(" {}", q(cmd.get_program()));
    for a in cmd.get_args() {
        line += &format!(" {}", q(a));
    }
    line + "\n"
}

/// `proxypilot run` with `run_args` and no real key in its environment,
/// running `cmd`.
fn run_without_keys(net: &FakeInternet, run_args: &[&str], cmd: &[&str]) -> SandboxCommand {
    let mut run = net.command(proxypilot_bin());
    if let Some(prefix) = proxypilot_tests::shapes::python_prefix_in_root_home() {
        run = run.from_root_home(prefix);
    }
    run.env("TMPDIR", &net.dir.0)
        .arg("run")
        .args(["--dns", proxypilot_tests::upstream::DNS_IP])
        .args(run_args)
        .arg("--")
        .args(cmd)
}

fn pty_caller(mode: &str, script: &Path) -> serde_json::Value {
    pty_caller_with(mode, script, &[])
}

fn pty_caller_with(mode: &str, script: &Path, extra: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new("/usr/bin/python3")
        .arg(support_dir().join("pty_caller.py"))
        .arg(mode)
        .arg(script)
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{e}: {stdout} {}", text(&out.stderr)))
}

#[test]
fn tiocsti_from_the_command_never_reaches_the_callers_shell() {
    require_root!();
    let net = FakeInternet::start();
    let marker = net.dir.0.join("injected");
    // Push "touch MARKER" into every terminal the command can reach: its
    // stdin, stdout, stderr and /dev/tty.
    let attack = format!(
        "import errno, fcntl, json, os, termios\n\
         res = {{}}\n\
         fds = {{'0': 0, '1': 1, '2': 2}}\n\
         try:\n    fds['tty'] = os.open('/dev/tty', os.O_RDWR)\n\
         except OSError as e:\n    res['open_tty'] = errno.errorcode[e.errno]\n\
         for name, fd in fds.items():\n\
         \x20   try:\n\
         \x20       for c in 'touch {m}\\n':\n\
         \x20           fcntl.ioctl(fd, termios.TIOCSTI, c.encode())\n\
         \x20       res[name] = 'pushed'\n\
         \x20   except OSError as e:\n\
         \x20       res[name] = errno.errorcode[e.errno]\n\
         print('ATTACK', json.dumps(res))\n",
        m = marker.display()
    );
    let cmd = run_without_keys(&net, &[], &["/usr/bin/python3", "-c", &attack]).command();
    let script = net.dir.0.join("caller.sh");
    fs::write(&script, as_script(&cmd)).unwrap();
    let r = pty_caller("shell", &script);
    let transcript = r["transcript"].as_str().unwrap();
    // It ran, and its pushes landed in its own terminal only.
    assert!(
        transcript.contains(r#"ATTACK {"0": "pushed""#),
        "{transcript}"
    );
    assert!(transcript.contains("CALLER-DONE-0"), "{transcript}");
    assert_eq!(r["rc"], 0, "{transcript}");
    assert!(
        !marker.exists(),
        "the caller's shell ran injected input:\n{transcript}"
    );

    // stdin not a terminal, stdout and stderr the caller's: they become a
    // pty all the same, so no descriptor of the caller's terminal is given.
    let r = pty_caller_with("shell", &script, &["</dev/null"]);
    let transcript = r["transcript"].as_str().unwrap();
    assert!(
        transcript
            .contains(r#"ATTACK {"0": "ENOTTY", "1": "pushed", "2": "pushed", "tty": "pushed"}"#),
        "{transcript}"
    );
    assert!(transcript.contains("CALLER-DONE-0"), "{transcript}");
    assert!(
        !marker.exists(),
        "the caller's shell ran injected input:\n{transcript}"
    );
}

#[test]
fn with_a_terminal_the_command_gets_its_own_pty_with_size_ctrl_c_and_status() {
    require_root!();
    let net = FakeInternet::start();
    let inner = "trap 'echo size=$(stty size)' WINCH; \
                 echo size=$(stty size); \
                 ls -l /proc/self/fd/0 | grep -q /dev/pts/ && echo stdin=pty; \
                 echo READY; while :; do sleep 0.1; done";
    let cmd = run_without_keys(&net, &[], &["sh", "-c", inner]).command();
    let script = net.dir.0.join("smoke.sh");
    fs::write(&script, as_script(&cmd)).unwrap();
    let started = Instant::now();
    let r = pty_caller("smoke", &script);
    let transcript = r["transcript"].as_str().unwrap();
    assert!(transcript.contains("size=33 77"), "{transcript}");
    assert!(transcript.contains("stdin=pty"), "{transcript}");
    assert!(transcript.contains("size=40 100"), "{transcript}");
    // Ctrl-C typed at the caller's terminal killed the command with SIGINT.
    assert_eq!(r["rc"], 128 + 2, "{transcript}");
    assert_eq!(r["restored"], true, "the caller's terminal stayed raw");
    assert!(started.elapsed() < Duration::from_secs(30));

    // Ctrl-Z stops it and gives the caller's shell its terminal back; `fg`
    // continues it where it was. The command forks nothing once READY:
    // dash vforks, and a Ctrl-Z that lands between its vfork and the
    // child's exec stops the child while dash waits for that exec, so
    // dash never stops (the same hang a plain terminal would show).
    let inner = "trap 'echo CONTINUED' CONT; sleep 1000 & echo READY; while :; do wait; done";
    let cmd = run_without_keys(&net, &[], &["sh", "-c", inner]).command();
    fs::write(&script, as_script(&cmd)).unwrap();
    let r = pty_caller("suspend", &script);
    let transcript = r["transcript"].as_str().unwrap();
    assert!(transcript.contains("Stopped"), "{transcript}");
    assert!(transcript.contains("CONTINUED"), "{transcript}");
    assert_eq!(r["rc"], 128 + 2, "{transcript}");

    // And its exit status comes through the pty unchanged.
    let cmd = run_without_keys(&net, &[], &["sh", "-c", "exit 3"]).command();
    fs::write(&script, as_script(&cmd)).unwrap();
    let r = pty_caller("shell", &script);
    let transcript = r["transcript"].as_str().unwrap();
    assert!(transcript.contains("CALLER-DONE-3"), "{transcript}");
}

#[test]
fn remote_tokenizer_mode_keeps_sealed_secrets_and_the_token_out_of_the_command() {
    require_root!();
    use proxypilot_tests::shapes::{seal_args, start_tokenizer, TOKENIZER_PORT};
    let net = FakeInternet::start();
    let dir = net.dir.0.join("remote");
    fs::create_dir_all(&dir).unwrap();
    let open_key = dir.join("open.key");
    let out = run_ok(
        std::process::Command::new(proxypilot_bin())
            .args(["keygen", "--out"])
            .arg(&open_key),
    );
    let seal_key = text(&out.stdout).trim().to_string();
    let out = run_ok(
        std::process::Command::new(proxypilot_bin())
            .args([
                "seal",
                "--no-auth",
                "--host",
                ANTHROPIC,
                "--seal-key",
                &seal_key,
                "--token-env",
                "REAL",
            ])
            .args(seal_args(ANTHROPIC))
            .env("REAL", &net.apis.keys().anthropic),
    );
    let sealed = text(&out.stdout).trim().to_string();
    let token = "tokenizer-bearer-token-0123456789";
    let _tokenizer = start_tokenizer(&net, &dir, &open_key);

    let shared = shared_dir(&net);
    let env_dump = shared.join("environ");
    let script = format!(
        "cat /proc/self/environ > {e}; sh {a}",
        e = env_dump.display(),
        a = clients().join("anthropic.sh").display()
    );
    let out = output(
        run_without_keys(
            &net,
            &[
                "--tokenizer",
                &format!("http://127.0.0.1:{TOKENIZER_PORT}"),
                "--target",
                &format!("{ANTHROPIC}=ANTHROPIC_SEALED"),
                "--tokenizer-auth-env",
                "TOKENIZER_TOKEN",
            ],
            &["sh", "-c", &script],
        )
        // Remote mode has no --secret: the command's key is a dummy.
        .env("ANTHROPIC_API_KEY", "dummy")
        .env("ANTHROPIC_SEALED", &sealed)
        .env("TOKENIZER_TOKEN", token)
        // The same credential under another name is withheld too.
        .env("SEALED_COPY", &sealed),
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Remote mode works: the request went through the tokenizer.
    assert!(stdout.contains(REPLY_TEXT), "{stdout}");
    let environ = fs::read(&env_dump).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    let names: Vec<&str> = environ
        .split('\0')
        .filter_map(|kv| kv.split_once('=').map(|(k, _)| k))
        .collect();
    assert!(names.contains(&"PATH"), "{names:?}");
    for var in ["ANTHROPIC_SEALED", "TOKENIZER_TOKEN", "SEALED_COPY"] {
        assert!(
            !names.contains(&var),
            "{var} reached the command: {names:?}"
        );
    }
    assert!(
        !environ.contains(&sealed),
        "a sealed secret reached the command"
    );
    assert!(
        !environ.contains(token),
        "the tokenizer token reached the command"
    );
}

/// `--response-timeout` bounds the wait for the upstream's answer with the
/// embedded tokenizer too (issue 21): a stuck upstream costs the client a
/// 504 it can act on, and the next request on the same relay still works.
#[test]
fn the_response_timeout_holds_with_the_embedded_tokenizer() {
    require_root!();
    let net = FakeInternet::start();
    let request = |delay_ms: u32| {
        format!(
            "curl -sS -w '\\nstatus=%{{http_code}}\\n' -H \"x-api-key: $ANTHROPIC_API_KEY\" \
             'https://{ANTHROPIC}/reply?delay_ms={delay_ms}'"
        )
    };
    // The slow answer would come after 8 s; the limit is 2 s.
    let script = format!("{}; {}", request(8000), request(0));
    let out = output(proxypilot_run(
        &net,
        &["--secret", "ANTHROPIC_API_KEY", "--response-timeout", "2s"],
        &["sh", "-c", &script],
    ));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.is_empty()).collect();
    let [slow, "status=504", _, "status=200"] = lines[..] else {
        panic!("stdout:\n{stdout}\nstderr:\n{stderr}");
    };
    let slow: serde_json::Value = serde_json::from_str(slow).unwrap();
    assert_eq!(
        slow["error"],
        "the upstream API (through the embedded tokenizer) did not send response headers within 2s"
    );
    assert!(
        slow["hint"].as_str().unwrap().contains("slow or stuck"),
        "{slow}"
    );
    // The fast request after it was served with the real key.
    let real = net.apis.keys().anthropic.clone();
    assert!(net.apis.requests_to(ANTHROPIC).iter().any(|r| {
        r.path == "/reply?delay_ms=0" && r.header("x-api-key") == Some(real.as_str())
    }));
}

/// proxypilot raises its own soft open-files limit to the hard one (a host's
/// 1,024 default took the relay down at eight client sockets, issue 21),
/// and the command gets back the soft limit it would have had.
#[test]
fn the_open_files_limit_is_raised_for_proxypilot_and_kept_for_the_command() {
    use std::os::unix::process::CommandExt;
    require_root!();
    let net = FakeInternet::start();
    let seen = shared_dir(&net).join("ulimit");
    let script = format!(
        "ulimit -n > {}.tmp; mv {0}.tmp {0}; sleep 30",
        seen.display()
    );
    let mut cmd = proxypilot_run(&net, &[], &["sh", "-c", &script]).command();
    // SAFETY: setrlimit is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            use nix::sys::resource::{setrlimit, Resource};
            setrlimit(Resource::RLIMIT_NOFILE, 256, 8192).map_err(std::io::Error::from)
        });
    }
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let command_limit = wait_for_file(&seen, &mut child);
    let limits = fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::SIGTERM,
    )
    .unwrap();
    child.wait().unwrap();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert_eq!(
        open_files.split_whitespace().collect::<Vec<_>>()[3..5],
        ["8192", "8192"],
        "{limits}"
    );
    assert_eq!(command_limit.trim(), "256");
}

/// `proxypilot run --metrics-listen` serves the same metrics as the
/// sidecar (issue 19 gave only the sidecar the flag), to a scraper outside
/// the sandbox.
#[test]
fn run_serves_metrics_outside_the_sandbox() {
    require_root!();
    let net = FakeInternet::start();
    let seen = shared_dir(&net).join("requested");
    let script = format!(
        "sh {a} >/dev/null; echo done > {s}.tmp; mv {s}.tmp {s}; sleep 30",
        a = clients().join("anthropic.sh").display(),
        s = seen.display()
    );
    let mut child = proxypilot_run(
        &net,
        &[
            "--secret",
            "ANTHROPIC_API_KEY",
            "--metrics-listen",
            "127.0.0.1:19466",
        ],
        &["sh", "-c", &script],
    )
    .command()
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    wait_for_file(&seen, &mut child);
    // The scraper is in the network namespace, outside the sandbox cgroup.
    let out = net
        .command("curl")
        .args(["-sS", "--max-time", "10", "http://127.0.0.1:19466/metrics"])
        .command()
        .output()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::SIGTERM,
    )
    .unwrap();
    child.wait().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("proxypilot_requests_total{")
                && l.contains("host=\"api.anthropic.com\"")
                && l.contains("status=\"200\"")
                && l.ends_with(" 1")),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
