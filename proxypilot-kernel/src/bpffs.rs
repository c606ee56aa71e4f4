//! bpffs: where the links and maps of each sandbox are pinned, so the
//! programs outlive the sidecar (fail closed) and a restart can take over.

use std::{
    fs,
    io::ErrorKind,
    os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
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
    statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// proxypilot's own directory in bpffs; every pin lives below it.
fn base_dir() -> PathBuf {
    Path::new(BPFFS).join("proxypilot")
}

/// The directory holding one sandbox cgroup's pinned links and maps.
pub fn pin_dir(cgroup_id: u64) -> PathBuf {
    base_dir().join(format!("cgroup-{cgroup_id}"))
}

/// Creates the pin directory for `cgroup_id` (and proxypilot's directory
/// above it), each private to proxypilot's user, and returns it.
///
/// The bpffs root is world-writable (mode 1777) by default, so another
/// local user could create `proxypilot/` first; it would then own the only
/// references to the links and could unpin them, detaching the programs.
/// So a directory that already exists is used only if proxypilot's own
/// user (root) owns it and nobody else can write to it.
pub fn create_pin_dir(cgroup_id: u64) -> Result<PathBuf> {
    create_private_dir(&base_dir())?;
    let dir = pin_dir(cgroup_id);
    create_private_dir(&dir)?;
    Ok(dir)
}

/// A scratch directory for `doctor`'s trial load, private like the others.
pub fn create_scratch_dir(tag: &str) -> Result<PathBuf> {
    create_private_dir(&base_dir())?;
    let dir = base_dir().join(tag);
    create_private_dir(&dir)?;
    Ok(dir)
}

/// Makes `path` a directory with mode 0700 owned by the current user, or
/// checks that the one already there is safe to use: a real directory (not
/// a symlink), owned by this user, writable by nobody else. Errors name
/// the path and say how to fix it.
pub fn create_private_dir(path: &Path) -> Result<()> {
    match fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
    }
    // lstat: a symlink planted in the place of the directory is refused,
    // never followed.
    let meta =
        fs::symlink_metadata(path).with_context(|| format!("inspecting {}", path.display()))?;
    let owner = nix::unistd::geteuid().as_raw();
    if !meta.file_type().is_dir() {
        bail!(
            "{} exists and is not a directory; proxypilot keeps its pinned programs there. \
             Remove it (as root) and start again",
            path.display()
        );
    }
    if meta.uid() != owner || meta.mode() & 0o022 != 0 {
        bail!(
            "{} is owned by uid {} with mode {:o}; proxypilot pins its programs there only \
             when it is owned by uid {owner} and writable by nobody else, because whoever \
             controls it can detach the sandbox's programs. Remove it (as root) and start again",
            path.display(),
            meta.uid(),
            meta.mode() & 0o7777
        );
    }
    // Directories of older versions were 0755; make them private too.
    if meta.mode() & 0o777 != 0o700 {
        fs::set_permissions(path, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making {} private (mode 0700)", path.display()))?;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pp-bpffs-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_new_directory_is_private() {
        let dir = scratch("new");
        create_private_dir(&dir).unwrap();
        let meta = fs::symlink_metadata(&dir).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o700);
        assert_eq!(meta.uid(), nix::unistd::geteuid().as_raw());
        // Idempotent: the second call accepts its own directory.
        create_private_dir(&dir).unwrap();
        fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn an_older_0755_directory_is_tightened() {
        let dir = scratch("old");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        create_private_dir(&dir).unwrap();
        assert_eq!(fs::symlink_metadata(&dir).unwrap().mode() & 0o7777, 0o700);
        fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        let dir = scratch("writable");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o1777)).unwrap();
        let e = create_private_dir(&dir).unwrap_err().to_string();
        assert!(
            e.contains(&dir.display().to_string()) && e.contains("1777"),
            "{e}"
        );
        fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn a_symlink_in_its_place_is_refused_not_followed() {
        let target = scratch("target");
        fs::create_dir(&target).unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o700)).unwrap();
        let link = scratch("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = create_private_dir(&link).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
        fs::remove_file(&link).unwrap();
        fs::remove_dir(&target).unwrap();
    }

    #[test]
    fn a_directory_another_user_owns_is_refused() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: chown needs root");
            return;
        }
        let dir = scratch("foreign");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
        let e = create_private_dir(&dir).unwrap_err().to_string();
        assert!(e.contains("owned by uid 65534"), "{e}");
        fs::remove_dir(&dir).unwrap();
    }
}
