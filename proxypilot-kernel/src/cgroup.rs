//! cgroup v2: finding the mount, naming cgroups by id, creating and joining them.

use std::{
    fs,
    io::{self, ErrorKind},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use anyhow::{bail, Context, Result};

/// Where cgroup v2 is mounted, read from `/proc/self/mountinfo`.
///
/// It is `/sys/fs/cgroup` on most distributions and on Fly, and
/// `/sys/fs/cgroup/unified` on hybrid hosts; never assume either.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .context("reading /proc/self/mountinfo to find the cgroup v2 mount")?;
    find_cgroup2_mount(&mountinfo).ok_or_else(|| {
        anyhow::anyhow!(
            "no cgroup v2 filesystem is mounted; proxypilot needs cgroup v2 \
             (mount it with `mount -t cgroup2 none /sys/fs/cgroup`, or boot with \
             systemd.unified_cgroup_hierarchy=1)"
        )
    })
}

/// Parses mountinfo text: the mount point of the first `cgroup2` filesystem.
pub fn find_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // Fields: id parent major:minor root mountpoint options [optional...] - fstype source superopts
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mount_point = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup id the kernel reports for tasks in `path` (the directory's
/// inode number, as `bpf_get_current_cgroup_id` returns it).
pub fn cgroup_id(path: &Path) -> Result<u64> {
    let meta = fs::metadata(path)
        .with_context(|| format!("reading cgroup directory {}", path.display()))?;
    Ok(meta.ino())
}

/// Checks that `path` is a directory of the cgroup v2 hierarchy.
pub fn ensure_cgroup2_dir(path: &Path) -> Result<()> {
    let mount = cgroup2_mount()?;
    let canonical = path.canonicalize().with_context(|| {
        format!(
            "cgroup {} does not exist; create it (mkdir under {}) or pass an existing one",
            path.display(),
            mount.display()
        )
    })?;
    if !canonical.starts_with(&mount) || !canonical.join("cgroup.procs").exists() {
        bail!(
            "{} is not a cgroup v2 directory (the cgroup v2 mount is {})",
            path.display(),
            mount.display()
        );
    }
    Ok(())
}

/// The cgroup v2 directory of process `pid` ("self" for this process).
pub fn cgroup_of(pid: &str) -> Result<PathBuf> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .with_context(|| format!("reading /proc/{pid}/cgroup"))?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| anyhow::anyhow!("process {pid} has no cgroup v2 membership"))?;
    let rel = rel.trim_start_matches('/');
    Ok(cgroup2_mount()?.join(rel))
}

/// Moves process `pid` into the cgroup at `path`.
pub fn join(path: &Path, pid: u32) -> io::Result<()> {
    fs::write(path.join("cgroup.procs"), pid.to_string())
}

/// A cgroup this process created; removed on drop.
///
/// Removal waits briefly for exiting members: `rmdir` fails with EBUSY
/// while a dying process still counts as a member.
#[derive(Debug)]
pub struct OwnedCgroup {
    path: PathBuf,
}

impl OwnedCgroup {
    /// Creates `parent/name`.
    pub fn create(parent: &Path, name: &str) -> Result<Self> {
        let path = parent.join(name);
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(OwnedCgroup { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Kills every process left in the cgroup (and its children), then
    /// removes it.
    pub fn remove(&self) -> io::Result<()> {
        remove_tree(&self.path)
    }
}

impl Drop for OwnedCgroup {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            if e.kind() != ErrorKind::NotFound {
                tracing::warn!(cgroup = %self.path.display(), error = %e, "could not remove cgroup");
            }
        }
    }
}

/// Removes a cgroup directory and its descendants, killing their members.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    if !path.exists() {
        return Ok(());
    }
    // cgroup.kill (Linux 5.14+) kills the whole subtree at once.
    let _ = fs::write(path.join("cgroup.kill"), "1");
    for entry in fs::read_dir(path)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    let mut last = None;
    for _ in 0..200 {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                last = Some(e);
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("cgroup removal failed")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_unified_mount_on_hybrid_hosts() {
        let text = "\
30 25 0:26 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs ro,mode=755
35 30 0:30 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
36 30 0:31 / /sys/fs/cgroup/unified rw,relatime shared:5 - cgroup2 cgroup2 rw
";
        assert_eq!(
            find_cgroup2_mount(text),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_plain_mount_and_unescapes() {
        let text = "36 30 0:31 / /sys/fs/my\\040cgroup rw - cgroup2 none rw\n";
        assert_eq!(
            find_cgroup2_mount(text),
            Some(PathBuf::from("/sys/fs/my cgroup"))
        );
        assert_eq!(
            find_cgroup2_mount("1 2 3:4 / / rw - ext4 /dev/vda rw\n"),
            None
        );
    }
}
