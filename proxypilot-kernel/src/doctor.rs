//! `proxypilot doctor`: can this host run proxypilot? Each check says what
//! it found and, when it fails, how to fix it.

use std::{fs, path::Path};

use crate::{attach, bpffs, cgroup, unix};

/// The outcome of one check.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// What to do about a failure.
    pub fix: Option<String>,
}

impl Check {
    fn pass(name: &'static str, detail: impl Into<String>) -> Self {
        Check {
            name,
            ok: true,
            detail: detail.into(),
            fix: None,
        }
    }
    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Check {
            name,
            ok: false,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// Oldest kernel with everything proxypilot uses: BPF links for cgroups
/// (5.7), and getpeername hooks (5.8). The packet backstop (cgroup_skb,
/// 4.10), sock_create (4.10) and setsockopt (5.3) are older; the trial load
/// checks each, and attaching fails (nothing runs) if any is missing. The tc
/// interface guard needs TCX links (6.6); older kernels run without it, with
/// a warning at attach.
const MIN_KERNEL: (u32, u32) = (5, 8);

/// Runs every check in order.
pub fn run_checks() -> Vec<Check> {
    let mut checks = vec![
        kernel_version(),
        btf(),
        cgroup2(),
        bpffs_check(),
        capabilities(),
    ];
    let can_load = checks.iter().all(|c| c.ok);
    checks.push(if can_load {
        trial_load()
    } else {
        Check::fail(
            "trial load",
            "skipped: an earlier check failed",
            "fix the failures above first",
        )
    });
    if can_load {
        checks.push(unix_sockets());
    }
    checks
}

fn kernel_version() -> Check {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim();
    match parse_release(release) {
        Some(v) if v >= MIN_KERNEL => Check::pass("kernel", format!("Linux {release}")),
        Some(_) => Check::fail(
            "kernel",
            format!(
                "Linux {release} is older than {}.{}",
                MIN_KERNEL.0, MIN_KERNEL.1
            ),
            "upgrade to Linux 5.8 or newer",
        ),
        None => Check::fail(
            "kernel",
            format!("cannot read the kernel version ({release:?})"),
            "is /proc mounted?",
        ),
    }
}

/// "6.18.44-fc" -> (6, 18)
pub fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn btf() -> Check {
    if Path::new("/sys/kernel/btf/vmlinux").exists() {
        Check::pass("btf", "/sys/kernel/btf/vmlinux present")
    } else {
        Check::fail(
            "btf",
            "/sys/kernel/btf/vmlinux is missing",
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (most distribution kernels are)",
        )
    }
}

fn cgroup2() -> Check {
    match cgroup::cgroup2_mount() {
        Ok(p) => Check::pass("cgroup v2", format!("mounted at {}", p.display())),
        Err(e) => Check::fail(
            "cgroup v2",
            format!("{e:#}"),
            "mount it: `mount -t cgroup2 none /sys/fs/cgroup`",
        ),
    }
}

fn bpffs_check() -> Check {
    if bpffs::is_bpffs(Path::new(bpffs::BPFFS)) {
        return Check::pass("bpffs", format!("mounted at {}", bpffs::BPFFS));
    }
    // proxypilot mounts it itself when it attaches; do the same here so the
    // trial load below sees what a real run would.
    match bpffs::ensure_mounted() {
        Ok(()) => Check::pass(
            "bpffs",
            format!("was not mounted; mounted it at {}", bpffs::BPFFS),
        ),
        Err(e) => Check::fail(
            "bpffs",
            format!("{e:#}"),
            format!(
                "`mount -t bpf bpf {}`, or in a container mount it from the host",
                bpffs::BPFFS
            ),
        ),
    }
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

fn capabilities() -> Check {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| eff & (1u64 << cap) != 0;
    let missing: Vec<&str> = [
        (CAP_BPF, "CAP_BPF"),
        (CAP_PERFMON, "CAP_PERFMON"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    ]
    .iter()
    .filter(|(c, _)| !has(*c))
    .map(|(_, n)| *n)
    .collect();
    if missing.is_empty() {
        Check::pass(
            "capabilities",
            "CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN and CAP_SYS_ADMIN",
        )
    } else {
        Check::fail(
            "capabilities",
            format!("missing {}", missing.join(", ")),
            "run as root, or grant them (docker/fly: --cap-add BPF,PERFMON,NET_ADMIN,SYS_ADMIN); \
             CAP_SYS_ADMIN is needed to mount bpffs and move processes between cgroups",
        )
    }
}

fn trial_load() -> Check {
    match attach::trial_load() {
        Ok(n) => Check::pass(
            "trial load",
            format!(
                "the kernel verified all {n} programs: connect, sendmsg, getpeername, sock_ops, \
                 sock_create, setsockopt, the cgroup_skb packet backstop and the tc interface \
                 guard"
            ),
        ),
        Err(e) => Check::fail(
            "trial load",
            format!("{e:#}"),
            "check `dmesg` and the verifier log above; the kernel may lack a hook proxypilot needs",
        ),
    }
}

/// The unix hooks are newer than everything else: without them proxypilot
/// runs, but the sandbox can reach any unix socket, so this check fails.
fn unix_sockets() -> Check {
    match unix::trial_load() {
        Ok(()) => Check::pass(
            "unix sockets",
            "the kernel verified connect_unix and sendmsg_unix: the sandbox reaches \
             only --allow-unix paths",
        ),
        Err(e) => Check::fail(
            "unix sockets",
            format!("NOT filtered: {e:#}"),
            "use Linux 6.7 or newer; until then the sandbox can connect to any unix \
             socket it can name (on Fly, /.fly/api), see SECURITY.md",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_releases() {
        assert_eq!(parse_release("6.18.44-fc-v782"), Some((6, 18)));
        assert_eq!(parse_release("5.8.0"), Some((5, 8)));
        assert_eq!(parse_release("junk"), None);
        assert!(parse_release("5.4.0").unwrap() < MIN_KERNEL);
    }
}
