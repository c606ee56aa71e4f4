//! Helpers for the fault-injection tests (tests/e2e/faults.rs) and the soak
//! (src/bin/soak.rs): counting what is left in the pinned origin maps,
//! reading a process's RSS and open descriptors, restarting a sidecar with
//! the exact command line and environment it ran with, and a background
//! curl loop inside the sandbox.

use std::{
    ffi::OsString,
    fs,
    os::unix::ffi::{OsStrExt, OsStringExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{shapes::FlyShape, upstream::FakeInternet, Proxypilot};

/// The two origin maps the kernel fills for every redirected connect.
pub const ORIGIN_MAPS: [&str; 2] = ["SOCK_ORIGIN", "PEER_ORIGIN"];

/// Where proxypilot pins the programs and maps of a cgroup.
pub fn pin_dir(cgroup_id: u64) -> PathBuf {
    proxypilot::kernel::bpffs::pin_dir(cgroup_id)
}

/// Entries in the pinned map `name` of a cgroup (`bpftool map dump`), or
/// `None` when it is not pinned (nothing attached, or detached).
pub fn map_entries(cgroup_id: u64, name: &str) -> Option<usize> {
    let path = pin_dir(cgroup_id).join(name);
    if !path.exists() {
        return None;
    }
    let out = Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(&path)
        .arg("-j")
        .output()
        .expect("running bpftool");
    assert!(
        out.status.success(),
        "bpftool map dump {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bpftool JSON for {}: {e}", path.display()));
    Some(v.as_array().map_or(0, Vec::len))
}

/// Both origin maps' entry counts, as `[SOCK_ORIGIN, PEER_ORIGIN]`
/// (0 when a map is not pinned).
pub fn origin_entries(cgroup_id: u64) -> [usize; 2] {
    ORIGIN_MAPS.map(|m| map_entries(cgroup_id, m).unwrap_or(0))
}

/// Waits (bounded) until both origin maps are empty; returns the last
/// counts on timeout.
pub fn wait_maps_empty(cgroup_id: u64, within: Duration) -> Result<(), [usize; 2]> {
    let deadline = Instant::now() + within;
    loop {
        let n = origin_entries(cgroup_id);
        if n == [0, 0] {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(n);
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Resident set size of `pid` in KiB (VmRSS).
pub fn rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Open file descriptors of `pid`.
pub fn fd_count(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Polls `cond` every 50 ms until it holds or `within` passes.
pub fn wait_for(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The command line and environment a running process was started with
/// (`/proc/<pid>/cmdline` and `environ`), to start an identical one.
#[derive(Clone, Debug)]
pub struct ProcessSpec {
    pub argv: Vec<OsString>,
    pub env: Vec<(OsString, OsString)>,
}

impl ProcessSpec {
    pub fn of(pid: u32) -> ProcessSpec {
        let split = |bytes: Vec<u8>| -> Vec<OsString> {
            bytes
                .split(|b| *b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| OsString::from_vec(s.to_vec()))
                .collect()
        };
        let argv = split(fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline"));
        let env = split(fs::read(format!("/proc/{pid}/environ")).expect("environ"))
            .into_iter()
            .filter_map(|kv| {
                let b = kv.as_bytes();
                let eq = b.iter().position(|c| *c == b'=')?;
                Some((
                    OsString::from_vec(b[..eq].to_vec()),
                    OsString::from_vec(b[eq + 1..].to_vec()),
                ))
            })
            .collect();
        ProcessSpec { argv, env }
    }

    /// The sidecar of `fly`, as it was started.
    pub fn sidecar(fly: &FlyShape) -> ProcessSpec {
        ProcessSpec::of(fly.sidecar.child.id())
    }

    /// The value after `flag` (e.g. `--state-dir`).
    pub fn arg(&self, flag: &str) -> Option<&OsString> {
        let i = self.argv.iter().position(|a| a == flag)?;
        self.argv.get(i + 1)
    }

    /// Replaces the value after `flag` (which must be present).
    pub fn set_arg(&mut self, flag: &str, value: impl Into<OsString>) -> &mut Self {
        let i = self
            .argv
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("{flag} not on the command line {:?}", self.argv));
        self.argv[i + 1] = value.into();
        self
    }

    /// The same process, through the harness's resolv.conf wrapper.
    pub fn command(&self, net: &FakeInternet) -> Command {
        let mut cmd = net
            .command(&self.argv[0])
            .args(&self.argv[1..])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .command();
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Starts it and waits for its `--ready-file`.
    pub fn start(&self, net: &FakeInternet, log: PathBuf) -> Proxypilot {
        let ready = PathBuf::from(self.arg("--ready-file").expect("--ready-file"));
        Proxypilot::start(self.command(net), &ready, log)
    }
}

/// One curl result of a [`CurlLoop`]: curl's exit code, the HTTP status
/// (0 when there was none) and the body (first line, for error statuses).
#[derive(Clone, Debug)]
pub struct CurlResult {
    pub rc: i32,
    pub code: u16,
    pub body: String,
}

/// A shell loop inside the sandbox running one curl after another and
/// appending each result to a file; stops after `max` requests, when asked,
/// or when the test ends.
pub struct CurlLoop {
    child: Child,
    results: PathBuf,
    stop: PathBuf,
}

impl CurlLoop {
    /// `curl_args` come after `curl -sS --max-time <max_time>`.
    pub fn start(
        net: &FakeInternet,
        fly: &FlyShape,
        tag: &str,
        max: usize,
        max_time_s: u32,
        curl_args: &[&str],
    ) -> CurlLoop {
        let results = fly.dir.join(format!("loop-{tag}.txt"));
        let stop = fly.dir.join(format!("loop-{tag}.stop"));
        let body = fly.dir.join(format!("loop-{tag}.body"));
        let _ = fs::remove_file(&results);
        let _ = fs::remove_file(&stop);
        // Values travel as positional parameters: $1 results, $2 stop,
        // $3 body, $4 max, $5 max-time, then curl's arguments.
        let script = r#"
results=$1; stop=$2; body=$3; max=$4; mt=$5; shift 5
i=0
while [ "$i" -lt "$max" ] && [ ! -e "$stop" ]; do
  i=$((i+1))
  : > "$body"
  code=$(curl -sS -o "$body" -w '%{http_code}' --max-time "$mt" "$@" 2>/dev/null)
  rc=$?
  printf '%s %s %s\n' "$rc" "${code:-000}" "$(head -c 300 "$body" | tr -d '\r\n')" >> "$results"
done
"#;
        let child = fly
            .sandbox(net, "/bin/sh")
            .args(["-c", script, "curlloop"])
            .arg(&results)
            .arg(&stop)
            .arg(&body)
            .arg(max.to_string())
            .arg(max_time_s.to_string())
            .args(curl_args)
            .command()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the curl loop");
        CurlLoop {
            child,
            results,
            stop,
        }
    }

    pub fn results(&self) -> Vec<CurlResult> {
        fs::read_to_string(&self.results)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut it = l.splitn(3, ' ');
                Some(CurlResult {
                    rc: it.next()?.parse().ok()?,
                    code: it.next()?.parse().unwrap_or(0),
                    body: it.next().unwrap_or("").to_string(),
                })
            })
            .collect()
    }

    /// Waits (bounded) until `cond` holds for the results so far.
    pub fn wait_until(&self, within: Duration, cond: impl Fn(&[CurlResult]) -> bool) -> bool {
        wait_for(within, || cond(&self.results()))
    }

    /// Asks the loop to stop and waits (bounded) for it; every result.
    pub fn finish(mut self, within: Duration) -> Vec<CurlResult> {
        let _ = fs::write(&self.stop, b"");
        let done = wait_for(within, || matches!(self.child.try_wait(), Ok(Some(_))));
        if !done {
            let _ = self.child.kill();
            let _ = self.child.wait();
            panic!(
                "the curl loop did not stop within {within:?}: a request hung; results so far: {:?}",
                self.results()
            );
        }
        self.results()
    }
}

impl Drop for CurlLoop {
    fn drop(&mut self) {
        let _ = fs::write(&self.stop, b"");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `dir` exists and holds a file named `name`.
pub fn has_file(dir: &Path, name: &str) -> bool {
    dir.join(name).exists()
}
