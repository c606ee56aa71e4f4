//! Developer and CI entry points: `cargo xtask <command>`.
//!
//! Nothing here is needed to build proxypilot; after `cargo xtask setup`,
//! plain `cargo build` builds everything, the eBPF object included.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "proxypilot's developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install everything a fresh Debian machine needs (idempotent): the
    /// offline eBPF toolchain, bpf-linker, bpftool, iproute2, curl, the
    /// test clients, cargo-fuzz, and for the container test docker.io,
    /// mmdebstrap and the shell image's SDKs.
    Setup,
    /// Build, then run the whole test suite (privileged tests need root),
    /// then each fuzz target for 15 s. With a test filter, just those tests.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The original README's transcript, offline: fake APIs in a private
    /// network namespace, the example scripts under `proxypilot run`.
    Demo,
    /// Drive 1,000,000 requests through a sidecar, with clients dying
    /// mid-request, and report RSS, fds and map entries before and after
    /// (as root; not run in CI). Arguments go to the soak binary, e.g.
    /// `--requests 100000`.
    Soak {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmarks that compare things in one run and print the ratios (as root).
    Bench {
        /// Which benchmark: `all` (the default: the side-by-side table of
        /// direct, proxypilot embedded/remote and mitmproxy, written to
        /// target/bench/summary.{json,png}), `relay` (direct vs. proxypilot
        /// embedded/remote: keep-alive, latency, new connections, leaf mint)
        /// `kernel` (connect through the programs vs. without) or `dns`
        /// (queries through proxypilot's resolver vs. the fake resolver).
        #[arg(default_value = "all")]
        which: String,
        /// Shorter runs (under a minute); same rows, noisier figures.
        #[arg(long)]
        quick: bool,
    },
}

/// Debian packages the build and the tests need.
const APT_PACKAGES: &[&str] = &[
    // rustc 1.96 + LLVM 22 with a precompiled `core` for bpfel: builds the
    // eBPF programs with no rustup nightly and no rust-src.
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    // Tests and diagnostics.
    "bpftool",
    "iproute2",
    "curl",
    "openssl",
    "gh",
    "util-linux",
    // The container test (tests/e2e/containers.rs): Debian's docker engine
    // (no registry is reachable: base images come from mmdebstrap).
    "docker.io",
    "mmdebstrap",
];

const BPF_LINKER_VERSION: &str = "0.13.0";
/// Builds and runs the fuzz targets (with the rustup nightly the machine has).
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// How long `cargo xtask test` runs each fuzz target.
const FUZZ_SMOKE_SECONDS: &str = "15";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Setup => setup(),
        Task::Test { args } => test(&args),
        Task::Demo => demo(),
        Task::Soak { args } => soak(&args),
        Task::Bench { which, quick } => bench(&which, quick),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn setup() -> Result<()> {
    install_debian_packages(APT_PACKAGES)?;

    let have_linker = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false);
    if have_linker {
        eprintln!("xtask: bpf-linker {BPF_LINKER_VERSION} already installed");
    } else {
        run(Command::new("cargo")
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"))?;
    }

    let have_fuzz = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION))
        .unwrap_or(false);
    if have_fuzz {
        eprintln!("xtask: cargo-fuzz {CARGO_FUZZ_VERSION} already installed");
    } else {
        run(Command::new("cargo").args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
        ]))?;
    }

    // Python packages the tests use (pinned in the requirements files).
    let root = workspace_root();
    for entry in std::fs::read_dir(root.join("tests"))? {
        let path = entry?.path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("requirements") && name.ends_with(".txt") {
            run(Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--disable-pip-version-check",
                    "-r",
                ])
                .arg(&path))?;
        }
    }
    // Node SDKs the client tests run (pinned by package-lock.json).
    run(Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(root.join("tests/support/clients")))?;
    // The shell image's SDKs, for its offline build in the container test.
    run(Command::new("bash")
        .arg(root.join("deploy/fetch-shell-sdks.sh"))
        .arg(target_dir(&root).join("containers/sdk-cache")))?;
    eprintln!("xtask: setup complete; `cargo build` now builds everything");
    Ok(())
}

fn test(args: &[String]) -> Result<()> {
    let root = workspace_root();
    // The end-to-end tests run the proxypilot binary.
    run(Command::new("cargo")
        .current_dir(&root)
        .args(["build", "--bins"]))?;
    // Every test binary runs even after a failure, so one run reports all.
    let (tests, failures) = run_tests(
        Command::new("cargo")
            .current_dir(&root)
            .args(["test", "--no-fail-fast"])
            .args(args),
    )?;
    if !args.is_empty() {
        print_failures(&failures);
        return tests; // a filtered run: just those tests
    }
    // The whole suite also fuzzes each target briefly, from its committed
    // corpus. Without a sanitizer: the build is minutes shorter, and the
    // long runs with AddressSanitizer are done by hand (tests/fuzz/README.md).
    let fuzz = run(Command::new(root.join("tests/fuzz/run-quick.sh"))
        .current_dir(&root)
        .env("FUZZ_SECONDS", FUZZ_SMOKE_SECONDS)
        .env("FUZZ_SANITIZER", "none"));
    // Last, so that the end of a long log says what failed.
    print_failures(&failures);
    match (tests, fuzz) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(e), Ok(())) => Err(e),
        (Ok(()), Err(e)) => Err(e.context("the tests passed, but a fuzz target failed")),
        (Err(t), Err(f)) => bail!("{t:#}; and a fuzz target failed: {f:#}"),
    }
}

/// One failed test: its name and what it printed (its panic message).
struct Failure {
    name: String,
    output: Vec<String>,
}

/// Runs `cargo test`, passing its output through while keeping the failed
/// tests' names and output, which the end of the run repeats.
fn run_tests(cmd: &mut Command) -> Result<(Result<()>, Vec<Failure>)> {
    eprintln!("xtask: running {cmd:?}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut failures = Vec::new();
    let mut current: Option<Failure> = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test's output")?;
        println!("{line}");
        if let Some(name) = line
            .strip_prefix("---- ")
            .and_then(|l| l.strip_suffix(" stdout ----"))
        {
            failures.extend(current.take());
            current = Some(Failure {
                name: name.to_owned(),
                output: Vec::new(),
            });
        } else if line == "failures:" || line.starts_with("test result:") {
            failures.extend(current.take());
        } else if let Some(f) = current.as_mut() {
            f.output.push(line);
        }
    }
    failures.extend(current.take());
    let status = child.wait().context("waiting for cargo test")?;
    let result = if status.success() {
        Ok(())
    } else {
        Err(anyhow::anyhow!("{cmd:?} failed with {status}"))
    };
    Ok((result, failures))
}

fn print_failures(failures: &[Failure]) {
    if failures.is_empty() {
        return;
    }
    // From the panic message on (else the end), cut to a few lines: the
    // whole output was printed above.
    const KEEP: usize = 25;
    eprintln!("\nxtask: {} test(s) failed:", failures.len());
    for f in failures {
        eprintln!("---- {}", f.name);
        let start = f
            .output
            .iter()
            .position(|l| l.contains("panicked at"))
            .unwrap_or(f.output.len().saturating_sub(KEEP));
        for line in f.output.iter().skip(start).take(KEEP) {
            eprintln!("    {line}");
        }
    }
    eprintln!(
        "xtask: failed: {}",
        failures
            .iter()
            .map(|f| f.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
}

fn soak(args: &[String]) -> Result<()> {
    let root = workspace_root();
    // Release binaries: the soak measures the sidecar as shipped.
    run(Command::new("cargo")
        .current_dir(&root)
        .args(["build", "--release", "--bins"]))?;
    run(Command::new("cargo")
        .current_dir(&root)
        .args([
            "run",
            "--release",
            "--quiet",
            "-p",
            "proxypilot-tests",
            "--bin",
            "soak",
            "--",
        ])
        .args(args))
}

fn demo() -> Result<()> {
    let root = workspace_root();
    run(Command::new("cargo")
        .current_dir(&root)
        .args(["build", "--bins"]))?;
    run(Command::new("cargo").current_dir(&root).args([
        "run",
        "--quiet",
        "-p",
        "proxypilot-tests",
        "--bin",
        "demo",
    ]))
}

fn bench(which: &str, quick: bool) -> Result<()> {
    let root = workspace_root();
    match which {
        "kernel" => run(Command::new("cargo").current_dir(&root).args([
            "bench",
            "-p",
            "proxypilot-tests",
            "--bench",
            "kernel",
        ])),
        "dns" => bench_dns(&root),
        "relay" => bench_relay(&root, which, quick),
        // The full table, then the resolver's queries/s against asking
        // the fake resolver directly.
        "all" => bench_relay(&root, which, quick).and_then(|()| bench_dns(&root)),
        other => bail!("unknown benchmark `{other}`; available: all (default), relay, kernel, dns"),
    }
}

/// `cargo xtask bench dns`: builds proxypilot in release (the bench binary
/// finds it in target/release), then runs tests/benches/dns.rs.
fn bench_dns(root: &Path) -> Result<()> {
    build_release_bins(root)?;
    run(Command::new("cargo").current_dir(root).args([
        "bench",
        "-p",
        "proxypilot-tests",
        "--bench",
        "dns",
    ]))
}

fn build_release_bins(root: &Path) -> Result<()> {
    run(Command::new("cargo").current_dir(root).args([
        "build",
        "--release",
        "-p",
        "proxypilot-userspace",
        "--bins",
    ]))
}

/// Installs the Debian packages of `packages` not installed yet. Services
/// they bring are not started (a policy-rc.d says no for the install):
/// nginx would otherwise listen on port 80 of this machine.
fn install_debian_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        eprintln!(
            "xtask: Debian packages already installed: {}",
            packages.join(" ")
        );
        return Ok(());
    }
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let own_policy = !policy.exists();
    if own_policy {
        std::fs::write(
            policy,
            "#!/bin/sh\n# written by cargo xtask for one install\nexit 101\n",
        )?;
        std::fs::set_permissions(policy, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    let installed = run(Command::new("apt-get").arg("update").arg("-q")).and_then(|()| {
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))
    });
    if own_policy {
        let _ = std::fs::remove_file(policy);
    }
    installed
}

/// The target directory cargo uses here (CARGO_TARGET_DIR or `target/`).
fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if Path::new(&d).is_absolute() => PathBuf::from(d),
        Some(d) => root.join(d),
        None => root.join("target"),
    }
}

/// `cargo xtask bench [all|relay] [--quick]`: builds proxypilot in release
/// (the bench binary finds it in target/release), prepares the Python venv
/// for mitmproxy and the chart (full table only), then runs
/// tests/benches/relay.rs.
fn bench_relay(root: &Path, which: &str, quick: bool) -> Result<()> {
    // The peer columns (issue 20).
    install_debian_packages(&["nginx", "haproxy"])?;
    let target = target_dir(root);
    let out = target.join("bench");
    std::fs::create_dir_all(&out)?;
    build_release_bins(root)?;
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root)
        .args([
            "bench",
            "-p",
            "proxypilot-tests",
            "--bench",
            "relay",
            "--",
            which,
        ])
        .env("PROXYPILOT_BENCH_OUT", &out);
    if quick {
        cmd.arg("--quick");
    }
    if which == "all" {
        cmd.env("PROXYPILOT_BENCH_VENV", bench_venv(root, &out)?);
    }
    run(&mut cmd)
}

/// A venv under target/bench with tests/bench/requirements-bench.txt
/// (mitmproxy, matplotlib; pinned) installed from PyPI; reinstalled only
/// when the requirements change.
fn bench_venv(root: &Path, out: &Path) -> Result<PathBuf> {
    let venv = out.join("venv");
    let reqs = root.join("tests/bench/requirements-bench.txt");
    let wanted =
        std::fs::read_to_string(&reqs).with_context(|| format!("reading {}", reqs.display()))?;
    let stamp = venv.join("requirements-bench.txt");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str())
        && venv.join("bin/mitmdump").exists()
    {
        return Ok(venv);
    }
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    run(Command::new(venv.join("bin/python"))
        .args([
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "-r",
        ])
        .arg(&reqs))?;
    std::fs::write(&stamp, wanted)?;
    Ok(venv)
}
