//! Who the sandboxed command runs as. Never root on the host, and never a
//! uid that another process on the host runs as (a shared uid can signal,
//! ptrace and rewrite the files of everything else of that uid).
//!
//! By default the command gets a uid and gid picked for this run that no
//! account, no `/etc/subuid` range and no running process uses, and runs as
//! root of a new user namespace whose only mapping is 0 → that uid. Tools
//! that want to be root keep working; on the host it is an unknown uid
//! with no capability.

use std::{
    collections::HashSet,
    ffi::CString,
    fs,
    ops::Range,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use nix::unistd::{Gid, Group, Uid, User};
use rand::Rng;

/// Where fresh ids are picked: the block systemd documents as unused,
/// above systemd-nspawn's container range (524288–1879048191) and below its
/// "foreign" range (2147352576–) and 2^31, above which tools that store ids
/// in signed ints break. Login accounts, DynamicUser and the usual subuid
/// ranges (from 100000) are all far below it. 268 million ids: a random one
/// is almost never taken, and the checks below make sure of it.
pub const FRESH_IDS: Range<u32> = 0x7000_0000..0x7FFE_0000;

/// The identity the command runs as.
#[derive(Clone, Debug)]
pub enum Identity {
    /// Root inside a new user namespace mapping 0 to `uid`/`gid` of the
    /// host, and nothing else.
    Fresh { uid: u32, gid: u32 },
    /// `--user NAME`.
    User(RunAs),
}

impl Identity {
    /// The uid the command's processes have on the host.
    pub fn host_uid(&self) -> u32 {
        match self {
            Identity::Fresh { uid, .. } => *uid,
            Identity::User(r) => r.uid.as_raw(),
        }
    }

    /// The gids whose group permissions apply to the command.
    pub fn host_gids(&self) -> Vec<u32> {
        match self {
            Identity::Fresh { gid, .. } => vec![*gid],
            Identity::User(r) => {
                let mut g: Vec<u32> = r.groups.iter().map(|g| g.as_raw()).collect();
                g.push(r.gid.as_raw());
                g
            }
        }
    }
}

/// A `--user` account, resolved before anything starts.
#[derive(Clone, Debug)]
pub struct RunAs {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
    pub groups: Vec<Gid>,
    pub home: PathBuf,
}

impl RunAs {
    /// Looks the user up and refuses root and uids in use by a running
    /// process.
    pub fn lookup(name: &str) -> Result<RunAs> {
        let user = User::from_name(name)
            .with_context(|| format!("looking up user {name}"))?
            .ok_or_else(|| anyhow::anyhow!("--user {name}: no such user"))?;
        if user.uid.is_root() {
            bail!(
                "--user {name}: uid 0 is root, and root is never a sandbox user; leave out \
                 --user to run the command as root of its own user namespace, with a uid of its own"
            );
        }
        let running = processes_of(user.uid.as_raw());
        if let Some((pid, comm)) = running.first() {
            bail!(
                "--user {name}: uid {uid} is in use by {n} running process(es) (pid {pid} {comm}, ...); \
                 a sandbox sharing their uid could signal, trace and tamper with them. Leave out \
                 --user (the command then gets a uid of its own), or use an account nothing else runs as",
                uid = user.uid,
                n = running.len(),
            );
        }
        let cname = CString::new(name).context("user name")?;
        let groups = nix::unistd::getgrouplist(&cname, user.gid)
            .with_context(|| format!("reading the groups of {name}"))?;
        Ok(RunAs {
            name: name.to_string(),
            uid: user.uid,
            gid: user.gid,
            groups,
            home: user.dir,
        })
    }
}

/// Picks a uid and gid (the same number) from [`FRESH_IDS`] that nothing
/// on the host uses.
pub fn pick_fresh() -> Result<Identity> {
    let (uids, gids) = ids_of_running_processes();
    let subids = subordinate_ranges();
    let mut rng = rand::thread_rng();
    for _ in 0..100 {
        let id = rng.gen_range(FRESH_IDS);
        let taken = uids.contains(&id)
            || gids.contains(&id)
            || subids.iter().any(|r| r.contains(&id))
            || User::from_uid(Uid::from_raw(id)).ok().flatten().is_some()
            || Group::from_gid(Gid::from_raw(id)).ok().flatten().is_some();
        if !taken {
            return Ok(Identity::Fresh { uid: id, gid: id });
        }
    }
    bail!(
        "found no unused uid in {}..{}; is /etc/subuid covering it?",
        FRESH_IDS.start,
        FRESH_IDS.end
    )
}

/// Every real, effective, saved and filesystem uid and gid of the
/// processes in /proc.
fn ids_of_running_processes() -> (HashSet<u32>, HashSet<u32>) {
    let (mut uids, mut gids) = (HashSet::new(), HashSet::new());
    for (_, status) in process_statuses() {
        for line in status.lines() {
            let set = match line.split_once(':') {
                Some(("Uid", rest)) => (&mut uids, rest),
                Some(("Gid", rest)) => (&mut gids, rest),
                _ => continue,
            };
            set.0.extend(
                set.1
                    .split_whitespace()
                    .filter_map(|n| n.parse::<u32>().ok()),
            );
        }
    }
    (uids, gids)
}

/// The processes (pid, name) that have `uid` as any of their uids.
pub fn processes_of(uid: u32) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for (pid, status) in process_statuses() {
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap_or("")
                .trim()
                .to_string()
        };
        let has_uid = field("Uid:")
            .split_whitespace()
            .any(|n| n.parse() == Ok(uid));
        if has_uid {
            found.push((pid, field("Name:")));
        }
    }
    found
}

fn process_statuses() -> impl Iterator<Item = (u32, String)> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            // A process may exit while we look.
            let status = fs::read_to_string(e.path().join("status")).ok()?;
            Some((pid, status))
        })
}

/// The ranges /etc/subuid and /etc/subgid hand to rootless containers.
fn subordinate_ranges() -> Vec<Range<u32>> {
    ["/etc/subuid", "/etc/subgid"]
        .iter()
        .filter_map(|p| fs::read_to_string(p).ok())
        .flat_map(|text| {
            text.lines()
                .filter_map(|l| {
                    let mut f = l.trim().split(':').skip(1);
                    let start: u32 = f.next()?.parse().ok()?;
                    let count: u32 = f.next()?.parse().ok()?;
                    Some(start..start.saturating_add(count))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Whether `uid` (with `gids`) may do `want` (4 read, 2 write, 1
/// search/execute) on `path` by the mode bits, every directory above it
/// searchable: `None` if so, else the first path that stops it. ACLs are
/// not read; they can only matter for ids that have entries, which a fresh
/// uid never has.
pub fn first_denial(path: &Path, want: u32, uid: u32, gids: &[u32]) -> Option<PathBuf> {
    let allowed = |p: &Path, want: u32| -> bool {
        let Ok(m) = fs::metadata(p) else {
            return false;
        };
        let bits = if m.uid() == uid {
            m.mode() >> 6
        } else if gids.contains(&m.gid()) {
            m.mode() >> 3
        } else {
            m.mode()
        };
        bits & want == want
    };
    let mut ancestors: Vec<&Path> = path.ancestors().skip(1).collect();
    ancestors.reverse();
    for dir in ancestors {
        if !allowed(dir, 1) {
            return Some(dir.to_path_buf());
        }
    }
    (!allowed(path, want)).then(|| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_ids_are_unused_and_in_the_range() {
        let Identity::Fresh { uid, gid } = pick_fresh().unwrap() else {
            panic!("not fresh")
        };
        assert!(FRESH_IDS.contains(&uid) && uid == gid);
        assert!(processes_of(uid).is_empty());
        assert!(User::from_uid(Uid::from_raw(uid)).unwrap().is_none());
    }

    #[test]
    fn a_uid_of_a_running_process_is_found() {
        let me = nix::unistd::getuid().as_raw();
        let mine = processes_of(me);
        assert!(
            mine.iter().any(|(pid, _)| *pid == std::process::id()),
            "{mine:?}"
        );
    }

    #[test]
    fn denials_name_the_directory_that_stops_the_walk() {
        use std::os::unix::fs::PermissionsExt;
        let base = std::env::temp_dir().join(format!("pp-identity-{}", std::process::id()));
        let locked = base.join("locked");
        fs::create_dir_all(&locked).unwrap();
        fs::write(locked.join("f"), "x").unwrap();
        fs::set_permissions(&base, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(&locked, fs::Permissions::from_mode(0o700)).unwrap();
        fs::set_permissions(locked.join("f"), fs::Permissions::from_mode(0o644)).unwrap();
        let stranger = FRESH_IDS.start;
        assert_eq!(
            first_denial(&locked.join("f"), 4, stranger, &[stranger]),
            Some(locked.clone())
        );
        fs::set_permissions(&locked, fs::Permissions::from_mode(0o711)).unwrap();
        assert_eq!(
            first_denial(&locked.join("f"), 4, stranger, &[stranger]),
            None
        );
        assert_eq!(
            first_denial(&locked.join("f"), 2, stranger, &[stranger]),
            Some(locked.join("f"))
        );
        fs::remove_dir_all(&base).unwrap();
    }
}
