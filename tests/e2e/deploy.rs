//! What can be checked of `deploy/` without Fly and without docker:
//!
//! - fly.toml and machine-config.json parse and describe the two-container
//!   machine (a `shell` with dummy keys only, a `sidecar` holding the sealed
//!   secrets), and the files they and the Dockerfiles name exist;
//! - the sidecar command line in machine-config.json is accepted by the real
//!   binary (`proxypilot sidecar ... --check`), and refused when a sealed
//!   secret it names is missing;
//! - seal-secrets.sh --dry-run seals with `proxypilot seal` and the values it
//!   would stage open, with the tokenizer's open key, to the intended secrets;
//! - the shell scripts parse (`bash -n`, and shellcheck when installed);
//! - the sidecar entrypoint's `--cgroup auto:NAME` substitution, and
//!   find-shell-cgroup's discovery (the latter as root, in real cgroups).
//!
//! None of this proves the deployment works on Fly; deploy/README.md lists
//! what is unverified.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use base64::Engine as _;
use proxypilot::tokenizer::{open, OpenKey};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn read(rel: &str) -> String {
    let p = deploy_dir().join(rel);
    fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

fn machine_config() -> Value {
    serde_json::from_str(&read("machine-config.json")).expect("machine-config.json is valid JSON")
}

fn container<'a>(cfg: &'a Value, name: &str) -> &'a Value {
    cfg["containers"]
        .as_array()
        .expect("containers is an array")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container named {name}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected an array of strings, got {v}"))
        .iter()
        .map(|s| s.as_str().expect("string").to_string())
        .collect()
}

/// The sidecar's command line from machine-config.json (`cmd`).
fn sidecar_cmd() -> Vec<String> {
    strings(&container(&machine_config(), "sidecar")["cmd"])
}

/// Values following each occurrence of `flag` in `args`.
fn flag_values(args: &[String], flag: &str) -> Vec<String> {
    args.windows(2)
        .filter(|w| w[0] == flag)
        .map(|w| w[1].clone())
        .collect()
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pp-deploy-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

fn show(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn fly_toml_parses_and_points_at_the_machine_config() {
    let t: toml::Value = toml::from_str(&read("fly.toml")).expect("fly.toml is valid TOML");
    assert!(t["app"].as_str().is_some_and(|a| !a.is_empty()));
    let exp = &t["experimental"];
    let mc = exp["machine_config"]
        .as_str()
        .expect("experimental.machine_config");
    assert!(
        deploy_dir().join(mc).is_file(),
        "{mc} missing next to fly.toml"
    );
    let replaced = exp["container"].as_str().expect("experimental.container");
    assert_eq!(
        replaced, "shell",
        "fly deploy should build and replace the shell image"
    );
    // That container exists in the machine config.
    container(&machine_config(), replaced);
    let df = t["build"]["dockerfile"].as_str().expect("build.dockerfile");
    assert!(
        deploy_dir().join(df).is_file(),
        "{df} missing next to fly.toml"
    );
}

#[test]
fn machine_config_describes_shell_and_sidecar() {
    let cfg = machine_config();
    let names: Vec<&str> = cfg["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(
        names.contains(&"shell") && names.contains(&"sidecar"),
        "{names:?}"
    );

    // The shell: dummy keys, the marker, CA variables; no secrets, no proxy
    // variables.
    let shell = container(&cfg, "shell");
    let env = shell["env"].as_object().expect("shell env");
    for k in ["ANTHROPIC_API_KEY", "OPENAI_API_KEY", "GH_TOKEN"] {
        assert_eq!(env[k], "dummy", "{k} must be a dummy in the shell");
    }
    assert_eq!(env["PROXYPILOT_SANDBOX"], "shell");
    for k in ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"] {
        assert!(env.contains_key(k), "shell env lacks {k}");
    }
    for k in env.keys() {
        let up = k.to_ascii_uppercase();
        assert!(
            !up.contains("PROXY") || up.starts_with("PROXYPILOT_"),
            "proxy variable {k} in the shell"
        );
        assert!(!up.contains("SEALED"), "sealed secret {k} in the shell");
    }
    assert!(
        shell.get("secrets").is_none(),
        "the shell must not ask for secrets"
    );
    assert!(
        shell.get("depends_on").is_none(),
        "the sidecar depends on the shell, not the reverse"
    );

    // The sidecar: our entrypoint, `proxypilot sidecar`, the sealed secrets.
    let side = container(&cfg, "sidecar");
    assert_eq!(
        strings(&side["entrypoint"]),
        ["/usr/local/bin/proxypilot-sidecar-entrypoint"]
    );
    let cmd = sidecar_cmd();
    assert_eq!(&cmd[..2], ["proxypilot", "sidecar"]);
    assert_eq!(flag_values(&cmd, "--cgroup"), ["auto:shell"]);
    assert_eq!(
        flag_values(&cmd, "--tokenizer"),
        ["http://tokenizer.flycast:8080"]
    );
    let secret_vars: Vec<String> = side["secrets"]
        .as_array()
        .expect("sidecar secrets")
        .iter()
        .map(|s| {
            assert_eq!(s["name"], s["env_var"]);
            s["env_var"].as_str().unwrap().to_string()
        })
        .collect();
    let targets: BTreeMap<String, String> = flag_values(&cmd, "--target")
        .iter()
        .map(|t| {
            let (h, v) = t.split_once('=').expect("HOST=VAR");
            (h.to_string(), v.to_string())
        })
        .collect();
    assert_eq!(
        targets.keys().map(String::as_str).collect::<Vec<_>>(),
        ["api.anthropic.com", "api.github.com", "api.openai.com"]
    );
    for var in targets.values() {
        assert!(
            secret_vars.contains(var),
            "--target names {var}, which is not among the sidecar's secrets"
        );
    }
    // The sealed names are the ones seal-secrets.sh stages.
    let seal_script = read("seal-secrets.sh");
    for var in targets.values() {
        assert!(
            seal_script.contains(&format!("add {var} ")),
            "seal-secrets.sh does not stage {var}"
        );
    }
    // Order: the sidecar starts after the shell (it needs its cgroup), and
    // its health check is the ready file it is told to write.
    assert_eq!(side["depends_on"][0]["name"], "shell");
    assert_eq!(side["depends_on"][0]["condition"], "started");
    let ready = flag_values(&cmd, "--ready-file");
    assert_eq!(ready.len(), 1);
    let check = strings(&side["healthchecks"][0]["exec"]["command"]);
    assert!(
        check.contains(&ready[0]),
        "health check {check:?} does not test {}",
        ready[0]
    );
    // The info port the shell polls is the one the sidecar serves.
    assert_eq!(
        flag_values(&cmd, "--info-port"),
        [env["PROXYPILOT_INFO_PORT"].as_str().unwrap()]
    );

    // Every mount names a declared volume.
    let volumes: Vec<&str> = cfg["volumes"]
        .as_array()
        .map(|v| v.iter().map(|v| v["name"].as_str().unwrap()).collect())
        .unwrap_or_default();
    for c in cfg["containers"].as_array().unwrap() {
        for m in c["mounts"].as_array().into_iter().flatten() {
            assert!(
                volumes.contains(&m["name"].as_str().unwrap()),
                "mount {m} has no volume"
            );
        }
    }
    // The CA key's state dir is on a volume only the sidecar mounts.
    assert_eq!(
        side["mounts"][0]["path"],
        flag_values(&cmd, "--state-dir")[0]
    );
    assert!(shell.get("mounts").is_none());
}

#[test]
fn dockerfiles_install_what_the_config_runs() {
    let side = read("Dockerfile");
    for needle in [
        "rustc-web",
        "cargo-web",
        "libstd-rust-web-dev-bpf",
        "llvm-22-dev",
        "LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --version 0.13.0",
        "--no-default-features --features llvm-22",
        "cargo build --release",
        "--bin proxypilot",
        "COPY deploy/find-shell-cgroup.sh /usr/local/bin/find-shell-cgroup",
        "COPY deploy/sidecar-entrypoint.sh /usr/local/bin/proxypilot-sidecar-entrypoint",
        "ENTRYPOINT [\"proxypilot\"]",
    ] {
        assert!(side.contains(needle), "deploy/Dockerfile lacks {needle:?}");
    }
    assert!(
        !side.contains("ENV RUSTC_BOOTSTRAP"),
        "RUSTC_BOOTSTRAP must come from .cargo/config.toml"
    );
    // The build stage's Debian release is the one that carries the toolchain
    // on this machine (bookworm + bookworm-security).
    assert!(side.contains("ARG DEBIAN_RELEASE=bookworm"));

    let shell = read("Dockerfile.shell");
    for needle in [
        "COPY shell-entrypoint.sh /usr/local/bin/proxypilot-shell-init",
        "ENTRYPOINT [\"/usr/local/bin/proxypilot-shell-init\"]",
        "RUN install-packages /usr/local/share/proxypilot/packages/shell.txt",
        "-r /opt/shell-sdk/requirements.txt",
        "npm ci",
        "PROXYPILOT_SANDBOX=shell",
    ] {
        assert!(
            shell.contains(needle),
            "deploy/Dockerfile.shell lacks {needle:?}"
        );
    }
    assert!(side.contains("RUN install-packages /usr/local/share/proxypilot/packages/sidecar.txt"));
    // BuildKit would fetch a `# syntax=` frontend from Docker Hub, which an
    // offline build cannot reach.
    for (name, text) in [("Dockerfile", &side), ("Dockerfile.shell", &shell)] {
        assert!(
            !text.lines().any(|l| l.starts_with("# syntax=")),
            "deploy/{name} names a frontend image"
        );
    }
    let packages = |list: &str| -> Vec<String> {
        read(&format!("packages/{list}"))
            .lines()
            .map(|l| l.split('#').next().unwrap().trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    };
    for p in [
        "curl",
        "python3",
        "python3-venv",
        "nodejs",
        "gh",
        "ca-certificates",
    ] {
        assert!(
            packages("shell.txt").contains(&p.to_string()),
            "packages/shell.txt lacks {p}"
        );
    }
    assert!(packages("sidecar.txt").contains(&"ca-certificates".to_string()));
    for ex in [
        "anthropic.sh",
        "openai.sh",
        "anthropic.mjs",
        "openai.mjs",
        "xanthropic.py",
        "xopenai.py",
    ] {
        assert!(
            deploy_dir().join("examples").join(ex).is_file(),
            "examples/{ex} missing"
        );
    }
    // No hosts-file or proxy-variable tricks in the sandbox's startup.
    let init = read("shell-entrypoint.sh");
    let code: String = init
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(!code.contains("/etc/hosts"));
    assert!(!code.to_ascii_lowercase().contains("https_proxy"));
    assert!(code.contains("update-ca-certificates"));
}

/// The shell image's SDKs are the versions the client tests pin.
#[test]
fn shell_sdks_are_pinned_like_the_tests() {
    let tests_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let pins = fs::read_to_string(tests_dir.join("requirements.txt")).unwrap();
    let deploy_pins = read("shell-sdk/requirements.txt");
    let deploy_pins: Vec<&str> = deploy_pins
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .collect();
    assert!(!deploy_pins.is_empty());
    for pin in &deploy_pins {
        assert!(
            pin.contains("=="),
            "shell-sdk/requirements.txt: {pin} is not pinned"
        );
        assert!(
            pins.lines().any(|l| l.trim() == *pin),
            "shell-sdk/requirements.txt pins {pin}; tests/requirements.txt does not"
        );
    }
    let json =
        |p: &Path| -> Value { serde_json::from_str(&fs::read_to_string(p).unwrap()).unwrap() };
    let clients = tests_dir.join("support/clients");
    assert_eq!(
        json(&deploy_dir().join("shell-sdk/package.json"))["dependencies"],
        json(&clients.join("package.json"))["dependencies"]
    );
    let packages = |v: Value| {
        let mut p = v["packages"].as_object().unwrap().clone();
        p.remove("");
        p
    };
    assert_eq!(
        packages(json(&deploy_dir().join("shell-sdk/package-lock.json"))),
        packages(json(&clients.join("package-lock.json"))),
        "deploy/shell-sdk/package-lock.json must lock what tests/support/clients locks"
    );
}

/// The sidecar command line in machine-config.json, with `auto:shell`
/// replaced by a real cgroup v2 directory and placeholder sealed secrets in
/// the environment, passes `proxypilot sidecar --check`.
#[test]
fn sidecar_command_line_passes_check() {
    let Some(cgroup) = cgroup2_dir() else { return };
    let cmd = sidecar_cmd();
    let args: Vec<String> = cmd[1..]
        .iter()
        .map(|a| {
            if a == "auto:shell" {
                cgroup.display().to_string()
            } else {
                a.clone()
            }
        })
        .collect();
    let targets = flag_values(&cmd, "--target");
    let placeholder = base64::engine::general_purpose::STANDARD.encode([7u8; 120]);

    let mut c = Command::new(proxypilot_tests::proxypilot_bin());
    c.args(&args)
        .arg("--check")
        .env_remove("TARGETS")
        .env_remove("PROXY");
    for t in &targets {
        c.env(t.split_once('=').unwrap().1, &placeholder);
    }
    let out = c.output().unwrap();
    assert!(out.status.success(), "{args:?} --check:\n{}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("3 intercepted host(s)"), "{stdout}");
    assert!(stdout.contains("http://tokenizer.flycast:8080"), "{stdout}");

    // The check is meaningful: without one of the sealed secrets it fails
    // and names the variable.
    let (_, missing) = targets[0].split_once('=').unwrap();
    let mut c = Command::new(proxypilot_tests::proxypilot_bin());
    c.args(&args)
        .arg("--check")
        .env_remove("TARGETS")
        .env_remove("PROXY");
    for t in &targets[1..] {
        c.env(t.split_once('=').unwrap().1, &placeholder);
    }
    c.env_remove(missing);
    let out = c.output().unwrap();
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(missing),
        "{}",
        show(&out)
    );
}

/// A cgroup v2 directory that exists (the mount itself), or None (skip)
/// when this machine has no cgroup v2; in CI that is a failure.
fn cgroup2_dir() -> Option<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    match proxypilot::kernel::cgroup::find_cgroup2_mount(&mountinfo) {
        Some(p) => Some(p),
        None => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI machines have cgroup v2"
            );
            eprintln!("skipping: no cgroup v2 mount in /proc/self/mountinfo");
            None
        }
    }
}

const REAL: [(&str, &str); 3] = [
    ("ANTHROPIC_API_KEY", "sk-ant-real-1234567890"),
    ("OPENAI_API_KEY", "sk-openai-real-abcdef"),
    ("GH_TOKEN", "ghp_realGitHubToken42"),
];

/// Runs seal-secrets.sh with a fresh tokenizer key pair; returns the open
/// key file and the script's output.
fn run_seal_script(dir: &Path, args: &[&str], keys: &[(&str, &str)]) -> (PathBuf, Output) {
    let key_file = dir.join("open.key");
    let _ = fs::remove_file(&key_file);
    let out = Command::new(proxypilot_tests::proxypilot_bin())
        .args(["keygen", "--out"])
        .arg(&key_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let seal_key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(seal_key.len(), 64);

    let mut c = Command::new("bash");
    c.arg(deploy_dir().join("seal-secrets.sh"))
        .args(args)
        .env("SEAL_KEY", &seal_key)
        .env("FLY_ORG", "test-org")
        .env("FLY_APP", "test-app")
        .env("PROXYPILOT", proxypilot_tests::proxypilot_bin())
        // Never run a real flyctl from a test.
        .env("FLY", "/nonexistent/fly");
    for (k, _) in REAL {
        c.env_remove(k);
    }
    for (k, v) in keys {
        c.env(k, v);
    }
    (key_file, c.stdin(Stdio::null()).output().unwrap())
}

#[test]
fn seal_script_dry_run_seals_openable_secrets() {
    let dir = scratch("seal");
    let (key_file, out) = run_seal_script(&dir, &["--dry-run"], &REAL);
    assert!(out.status.success(), "{}", show(&out));
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    for (_, real) in REAL {
        assert!(
            !stdout.contains(real) && !stderr.contains(real),
            "a real key was printed:\n{}",
            show(&out)
        );
    }

    // One command line: fly secrets set --stage -a test-app NAME=VALUE...
    let words: Vec<&str> = stdout.split_whitespace().collect();
    assert_eq!(
        &words[..6],
        [
            "/nonexistent/fly",
            "secrets",
            "set",
            "--stage",
            "-a",
            "test-app"
        ],
        "{stdout}"
    );
    let staged: BTreeMap<&str, String> = words[6..]
        .iter()
        .map(|w| {
            let (k, v) = w.split_once('=').expect("NAME=VALUE");
            // printf %q may escape characters; base64 needs none.
            (k, v.replace('\\', ""))
        })
        .collect();
    assert_eq!(
        staged.keys().copied().collect::<Vec<_>>(),
        ["ANTHROPIC_SEALED", "GH_SEALED", "OPENAI_SEALED"]
    );

    let key = OpenKey::from_file(&key_file).unwrap();
    let expect: [(&str, &str, &str, Value, Value); 3] = [
        (
            "ANTHROPIC_SEALED",
            "api.anthropic.com",
            "sk-ant-real-1234567890",
            serde_json::json!(["x-api-key", "authorization"]),
            serde_json::json!(["%s", "Bearer %s"]),
        ),
        (
            "OPENAI_SEALED",
            "api.openai.com",
            "sk-openai-real-abcdef",
            serde_json::json!(["authorization"]),
            serde_json::json!(["Bearer %s"]),
        ),
        (
            "GH_SEALED",
            "api.github.com",
            "ghp_realGitHubToken42",
            serde_json::json!(["authorization"]),
            serde_json::json!(["Bearer %s", "token %s"]),
        ),
    ];
    for (name, host, real, dsts, fmts) in expect {
        let b64 = &staged[name];
        let secret = open(&key, b64).unwrap_or_else(|e| panic!("{name} does not open: {e}"));
        let redacted: Value = serde_json::from_str(&secret.strip_hazmat_string()).unwrap();
        let full = secret.to_json();
        assert!(
            full.contains(&format!("\"token\":\"{real}\"")),
            "{name}: wrong token"
        );
        assert_eq!(
            redacted["allowed_hosts"],
            serde_json::json!([host]),
            "{name}: {redacted}"
        );
        assert_eq!(
            redacted["fly_src_auth"],
            serde_json::json!({"allowed_orgs": ["test-org"], "allowed_apps": ["test-app"], "allowed_instances": null}),
            "{name}"
        );
        assert_eq!(
            redacted["inject_processor"]["allowed_dst"], dsts,
            "{name}: {redacted}"
        );
        assert_eq!(
            redacted["inject_processor"]["allowed_fmt"], fmts,
            "{name}: {redacted}"
        );
        // crypto_box_seal: 32-byte ephemeral key + 16-byte tag + the JSON.
        let ct = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        assert_eq!(ct.len(), 48 + full.len(), "{name}");

        // `proxypilot seal --dry-run` with the same flags describes the same
        // secret (token redacted).
        let mut args = vec![
            "seal",
            "--dry-run",
            "--host",
            host,
            "--fly-org",
            "test-org",
            "--fly-app",
            "test-app",
        ];
        for d in dsts.as_array().unwrap() {
            args.extend(["--allowed-header", d.as_str().unwrap()]);
        }
        for f in fmts.as_array().unwrap() {
            args.extend(["--allowed-format", f.as_str().unwrap()]);
        }
        let out = Command::new(proxypilot_tests::proxypilot_bin())
            .args(&args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", show(&out));
        let dry: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(dry, redacted, "{name}");
        assert_eq!(dry["inject_processor"]["token"], "REDACTED");
    }
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn seal_script_refuses_missing_inputs() {
    let dir = scratch("seal-missing");
    // A key is missing: refused, naming it.
    let (_, out) = run_seal_script(&dir, &["--dry-run"], &REAL[..2]);
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("GH_TOKEN"),
        "{}",
        show(&out)
    );
    assert!(out.stdout.is_empty(), "{}", show(&out));
    // ... unless --allow-missing.
    let (_, out) = run_seal_script(&dir, &["--dry-run", "--allow-missing"], &REAL[..2]);
    assert!(out.status.success(), "{}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("ANTHROPIC_SEALED=") && !stdout.contains("GH_SEALED"),
        "{stdout}"
    );
    // No SEAL_KEY: refused.
    let out = Command::new("bash")
        .arg(deploy_dir().join("seal-secrets.sh"))
        .arg("--dry-run")
        .env_remove("SEAL_KEY")
        .env("FLY_ORG", "o")
        .env("FLY_APP", "a")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("SEAL_KEY"),
        "{}",
        show(&out)
    );
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn shell_scripts_parse() {
    let mut scripts: Vec<PathBuf> = Vec::new();
    for dir in [deploy_dir(), deploy_dir().join("examples")] {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "sh") {
                scripts.push(p);
            }
        }
    }
    assert!(scripts.len() >= 6, "{scripts:?}");
    let have_shellcheck = Command::new("shellcheck")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_shellcheck {
        eprintln!("note: shellcheck is not installed; only `bash -n`/`sh -n` run");
    }
    for s in &scripts {
        let text = fs::read_to_string(s).unwrap();
        let shell = if text.starts_with("#!/bin/sh") {
            "sh"
        } else {
            "bash"
        };
        let out = Command::new(shell).arg("-n").arg(s).output().unwrap();
        assert!(
            out.status.success(),
            "{shell} -n {}: {}",
            s.display(),
            show(&out)
        );
        if have_shellcheck {
            let out = Command::new("shellcheck").arg(s).output().unwrap();
            assert!(
                out.status.success(),
                "shellcheck {}: {}",
                s.display(),
                show(&out)
            );
        }
    }
}

/// The sidecar entrypoint swaps `--cgroup auto:NAME` for what
/// find-shell-cgroup prints, passes other arguments through, and clears a
/// stale ready file. (A stub stands in for find-shell-cgroup.)
#[test]
fn sidecar_entrypoint_resolves_auto_cgroup() {
    let dir = scratch("entrypoint");
    let bin = dir.join("bin");
    fs::create_dir_all(&bin).unwrap();
    let stub = bin.join("find-shell-cgroup");
    fs::write(
        &stub,
        "#!/bin/sh\n[ \"$1\" = --wait ] && [ \"$3\" = shell ] && echo /sys/fs/cgroup/found-$3\n",
    )
    .unwrap();
    fs::set_permissions(&stub, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let ready = dir.join("run/ready");
    fs::create_dir_all(ready.parent().unwrap()).unwrap();
    fs::write(&ready, "stale").unwrap();

    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .arg(deploy_dir().join("sidecar-entrypoint.sh"))
        .args([
            "printf",
            "%s\\n",
            "sidecar",
            "--cgroup",
            "auto:shell",
            "--target",
            "a=B",
            "--ready-file",
        ])
        .arg(&ready)
        .env("PATH", &path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let lines: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(
        lines,
        [
            "sidecar",
            "--cgroup",
            "/sys/fs/cgroup/found-shell",
            "--target",
            "a=B",
            "--ready-file",
            ready.to_str().unwrap()
        ]
    );
    assert!(!ready.exists(), "the stale ready file was not removed");

    // A plain path passes through; a failed discovery refuses to start.
    let out = Command::new("bash")
        .arg(deploy_dir().join("sidecar-entrypoint.sh"))
        .args(["echo", "--cgroup=/x/y"])
        .env("PATH", &path)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "--cgroup=/x/y",
        "{}",
        show(&out)
    );
    let out = Command::new("bash")
        .arg(deploy_dir().join("sidecar-entrypoint.sh"))
        .args(["echo", "--cgroup", "auto:nosuch"])
        .env("PATH", &path)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", show(&out));
    assert!(out.stdout.is_empty(), "{}", show(&out));
    let _ = fs::remove_dir_all(&dir);
}

/// find-shell-cgroup in real cgroups (root): by marker environment, by
/// directory name, and never the root or its own cgroup.
#[test]
fn find_shell_cgroup_discovers_the_sandbox() {
    proxypilot_tests::require_root!();
    let script = deploy_dir().join("find-shell-cgroup.sh");
    let tc = proxypilot_tests::TestCgroup::new("findshell");
    let marker = format!("sbx{}", std::process::id());

    // By marker: a process carrying PROXYPILOT_SANDBOX=<marker> in the cgroup.
    let mut sleeper = proxypilot_tests::in_cgroup(tc.path(), "sleep")
        .arg("30")
        .env("PROXYPILOT_SANDBOX", &marker)
        .spawn()
        .unwrap();
    // Wait until it has joined.
    let procs = tc.path().join("cgroup.procs");
    for _ in 0..100 {
        if !fs::read_to_string(&procs).unwrap().trim().is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = Command::new("bash")
        .arg(&script)
        .arg(&marker)
        .env_remove("PROXYPILOT_SANDBOX_CGROUP")
        .output()
        .unwrap();
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(
        Path::new(String::from_utf8_lossy(&out.stdout).trim())
            .canonicalize()
            .unwrap(),
        tc.path().canonicalize().unwrap(),
        "{}",
        show(&out)
    );

    // By name: a cgroup directory called <marker>2, no process needed.
    let by_name = tc.child(&format!("{marker}2"));
    let out = Command::new("bash")
        .arg(&script)
        .arg(format!("{marker}2"))
        .env_remove("PROXYPILOT_SANDBOX_CGROUP")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        by_name.to_str().unwrap()
    );

    // Nothing matches: exit 1 with advice.
    let out = Command::new("bash")
        .arg(&script)
        .arg("no-such-sandbox-xyz")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("PROXYPILOT_SANDBOX_CGROUP"));

    // Explicit override: accepted when it is a cgroup, refused for the root.
    let root = proxypilot::kernel::cgroup::cgroup2_mount().unwrap();
    let out = Command::new("bash")
        .arg(&script)
        .env("PROXYPILOT_SANDBOX_CGROUP", tc.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let out = Command::new("bash")
        .arg(&script)
        .env("PROXYPILOT_SANDBOX_CGROUP", &root)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "the cgroup root must be refused: {}",
        show(&out)
    );
}
