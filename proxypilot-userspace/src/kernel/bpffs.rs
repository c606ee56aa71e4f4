//! bpffs: where the links and maps of each sandbox are pinned, so the
//! programs outlive the sidecar (fail closed) and a restart can take over.

use std::{
    fs,
    io::ErrorKind,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use nix::{
    mount::{mount, MsFlags},
    sys::statfs::statfs,
};

/// The bpffs mount point proxypilot uses.
pub const BPFFS: &str = "/sys/fs/bpf";
/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Mounts bpffs at [`BPFFS`] unless it already is.
pub fn ensure_mounted() -> Result<()> {
    if is_bpffs(Path::new(BPFFS)) {
        return Ok(());
    }
    fs::create_dir_all(BPFFS).with_context(|| format!("creating {BPFFS}"))?;
    mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| {
        format!(
            "mounting bpffs at {BPFFS} (needed to pin the programs so they outlive \
             proxypilot); run as root with CAP_SYS_ADMIN, or mount it yourself: \
             `mount -t bpf bpf {BPFFS}`"
        )
    })?;
    Ok(())
}

/// True when `path` is on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type().0 as i64 == BPF_FS_MAGIC)
}

/// The directory holding one sandbox cgroup's pinned links and maps.
pub fn pin_dir(cgroup_id: u64) -> PathBuf {
    Path::new(BPFFS)
        .join("proxypilot")
        .join(format!("cgroup-{cgroup_id}"))
}

/// Removes a pin directory and everything pinned in it. Unpinning a link
/// that no process holds detaches its program at once.
pub fn remove_pins(dir: &Path) -> Result<bool> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    // Links first, so no program is left running without its maps' pins.
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort_by_key(|p| !is_link_pin(p));
    for path in paths {
        fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
    }
    fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(true)
}

/// Link pins are named `link-<program>`.
pub fn link_pin(dir: &Path, program: &str) -> PathBuf {
    dir.join(format!("link-{program}"))
}

fn is_link_pin(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("link-"))
}
