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

/// Waits until `path` has content, or panics with the process's stderr.
fn wait_for_file(path: &Path, child: &mut Child) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = fs::read_to_string(path) {
            if s.ends_with('\n') {
                return s;
            }
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!(
                "proxypilot run exited early ({st}): {}",
                read_all(child.stderr.take().unwrap())
            );
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {}",
            path.display()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `proxypilot run` with [`waiting_command`]; returns it and the
/// command's "pid cgroup-id" line once written.
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
    let marker = net.dir.0.join("marker");
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
    let marker = net.dir.0.join("marker");
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
