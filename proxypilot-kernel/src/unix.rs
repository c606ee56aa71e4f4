//! Unix sockets: the sandbox reaches only the unix socket paths it was
//! given with `--allow-unix`; every other path, and every abstract name, is
//! refused with EPERM at connect() and sendto() and reported.
//!
//! The cgroup hooks for unix sockets (`BPF_CGROUP_UNIX_CONNECT`,
//! `BPF_CGROUP_UNIX_SENDMSG`) arrived in Linux 6.7. aya 0.14 does not know
//! them, so the program is assembled here ([`program`]), loaded, attached
//! and pinned with raw bpf(2) ([`sys`]), and its maps are then opened
//! through aya like the others. On older kernels unix sockets are not
//! filtered: proxypilot says so loudly and runs on (see SECURITY.md).

mod btf;
mod insn;
mod program;
mod sys;

use std::{
    fmt,
    fs::{self, File},
    os::fd::{AsRawFd, OwnedFd},
    path::Path,
    str::FromStr,
    sync::{Mutex, OnceLock},
};

use anyhow::{anyhow, Context, Result};
use aya::maps::{HashMap, Map, MapData, RingBuf};

use super::bpffs;
use program::{reason, KernelLayout, Params, RawDenial, NAME_LEN};

/// The Fly machine API. It serves every container of the app its secrets,
/// so it is never on the sandbox's list.
pub const FLY_API_SOCKET: &str = "/.fly/api";

/// Most `--allow-unix` paths one sandbox may have.
const MAX_ALLOWED: u32 = 256;
/// Denial ring buffer size (a power of two, whole pages).
const DENIALS_BYTES: u32 = 64 * 1024;

/// `BPF_CGROUP_UNIX_CONNECT` and `BPF_CGROUP_UNIX_SENDMSG`.
const ATTACH_UNIX_CONNECT: u32 = 49;
const ATTACH_UNIX_SENDMSG: u32 = 50;

/// The two hooks: attach type, program (and pin) name, and the code the
/// program reports.
const HOOKS: [(u32, &str, u8); 2] = [
    (ATTACH_UNIX_CONNECT, "connect_unix", 1),
    (ATTACH_UNIX_SENDMSG, "sendmsg_unix", 2),
];

/// A unix socket path the sandbox may connect or send to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UnixPath(String);

/// Why a `--allow-unix` value was refused.
#[derive(Debug, thiserror::Error)]
#[error("{why}")]
pub struct UnixPathError {
    why: String,
}

impl FromStr for UnixPath {
    type Err = UnixPathError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |why: &str| UnixPathError {
            why: why.to_string(),
        };
        if !input.starts_with('/') {
            return Err(err(
                "the path must be absolute (the kernel compares the exact name the \
                 sandbox passes to connect(), so a relative one could never match)",
            ));
        }
        if input.len() >= NAME_LEN {
            return Err(err(&format!(
                "the path is {} bytes; a unix socket path has at most {} bytes",
                input.len(),
                NAME_LEN - 1
            )));
        }
        if input.contains('\0') {
            return Err(err("the path contains a NUL byte"));
        }
        let components: Vec<&str> = input[1..].split('/').collect();
        if components
            .iter()
            .any(|c| c.is_empty() || *c == "." || *c == "..")
        {
            return Err(err(
                "write the path in its plain form, without `//`, `.`, `..` or a \
                 trailing `/` (clients connect with the plain form, and it is what \
                 the kernel compares)",
            ));
        }
        let resolved = fs::canonicalize(input).ok();
        if input == FLY_API_SOCKET || resolved.as_deref() == Some(Path::new(FLY_API_SOCKET)) {
            return Err(err(
                "the Fly machine API serves this app's secrets (sealed ones \
                 included) to whoever connects, so the sandbox may never reach it",
            ));
        }
        Ok(UnixPath(input.to_string()))
    }
}

impl fmt::Display for UnixPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl UnixPath {
    /// The allowed map's key: the path, zero-padded.
    fn key(&self) -> [u8; NAME_LEN] {
        let mut key = [0u8; NAME_LEN];
        key[..self.0.len()].copy_from_slice(self.0.as_bytes());
        key
    }
}

/// Whether this kernel can filter unix sockets.
#[derive(Clone, Debug)]
pub enum Support {
    Filtered,
    /// Why not, in a sentence.
    NotFiltered(String),
}

/// Probes once: loads a trivial program for the unix connect hook.
pub fn support() -> &'static Support {
    static SUPPORT: OnceLock<Support> = OnceLock::new();
    SUPPORT.get_or_init(|| probe(ATTACH_UNIX_CONNECT))
}

/// A kernel that does not know `attach_type` refuses the load with EINVAL.
fn probe(attach_type: u32) -> Support {
    match sys::prog_load(&program::allow_all(), attach_type, "probe_unix") {
        Ok(_) => Support::Filtered,
        Err(e) if e.error.raw_os_error() == Some(libc::EINVAL) => Support::NotFiltered(
            "this kernel has no cgroup hooks for unix sockets (they need Linux 6.7+), \
             so the sandbox can connect to any unix socket it can name, abstract or path"
                .to_string(),
        ),
        Err(e) => {
            Support::NotFiltered(format!("probing the unix socket hooks failed: {}", e.error))
        }
    }
}

/// How many programs run on `cgroup`'s own unix connect and sendmsg hooks
/// (bpftool before 7.4 does not list them).
pub fn attached_programs(cgroup: &Path) -> Result<(u32, u32)> {
    let dir = File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
    let count = |attach_type| {
        sys::prog_count(&dir, attach_type)
            .with_context(|| format!("querying the unix hooks of {}", cgroup.display()))
    };
    Ok((count(ATTACH_UNIX_CONNECT)?, count(ATTACH_UNIX_SENDMSG)?))
}

/// The unix hooks on one sandbox cgroup: the allowed paths and the denials.
pub struct UnixFilter {
    allowed: Mutex<HashMap<MapData, [u8; NAME_LEN], u8>>,
    denials: Mutex<Option<RingBuf<MapData>>>,
}

/// Attaches the unix hooks to `cgroup` and pins their links in `pin_dir`,
/// replacing the links of an earlier proxypilot without a gap. Returns
/// `None`, after a loud warning, when the kernel lacks the hooks.
pub fn attach(
    cgroup: &File,
    pin_dir: &Path,
    allowed: &[UnixPath],
    exempt_cgroup_id: u64,
) -> Result<Option<UnixFilter>> {
    if let Support::NotFiltered(why) = support() {
        tracing::warn!("unix sockets are NOT filtered: {why}");
        return Ok(None);
    }
    let (links, filter) = load(exempt_cgroup_id, allowed, |prog, attach_type, name| {
        sys::link_create(prog, cgroup, attach_type)
            .with_context(|| format!("attaching the {name} program to the sandbox cgroup"))
    })?;
    // The new links run now, next to any old ones; replacing a pin drops
    // the old link it held.
    for (name, link) in links {
        let final_pin = bpffs::link_pin(pin_dir, name);
        let staging = pin_dir.join(format!("staging-{name}"));
        let _ = fs::remove_file(&staging);
        sys::obj_pin(&link, &staging)
            .with_context(|| format!("pinning the {name} link in {}", pin_dir.display()))?;
        fs::rename(&staging, &final_pin)
            .with_context(|| format!("replacing pin {}", final_pin.display()))?;
    }
    tracing::info!(allowed = ?allowed.iter().map(ToString::to_string).collect::<Vec<_>>(),
                   "unix sockets filtered");
    Ok(Some(filter))
}

/// Loads both programs through the verifier without attaching them (for
/// `doctor`). Fails when the kernel lacks the hooks.
pub fn trial_load() -> Result<()> {
    if let Support::NotFiltered(why) = support() {
        return Err(anyhow!("{why}"));
    }
    load(0, &[], |_, _, _| Ok(()))?;
    Ok(())
}

/// Creates the maps, fills the allowed one, and loads one program per hook,
/// handing each to `attach` (so no program runs before its list is in
/// place); returns what `attach` returned, by program name.
fn load<T>(
    exempt_cgroup_id: u64,
    allowed: &[UnixPath],
    mut attach: impl FnMut(&OwnedFd, u32, &'static str) -> Result<T>,
) -> Result<(Vec<(&'static str, T)>, UnixFilter)> {
    let layout = kernel_layout()?;
    let allowed_map = sys::map_create(
        sys::MAP_TYPE_HASH,
        NAME_LEN as u32,
        1,
        MAX_ALLOWED,
        "unix_allowed",
    )
    .context("creating the allowed unix paths map")?;
    let denials_map = sys::map_create(sys::MAP_TYPE_RINGBUF, 0, 0, DENIALS_BYTES, "unix_denials")
        .context("creating the unix denials ring buffer")?;
    // The filter keeps both fds open (aya keeps the fd it is given).
    let (allowed_map_fd, denials_map_fd) = (allowed_map.as_raw_fd(), denials_map.as_raw_fd());
    let filter = UnixFilter::open(allowed_map, denials_map)?;
    filter.set_allowed(allowed)?;
    let mut out = Vec::new();
    for (attach_type, name, hook) in HOOKS {
        let insns = program::filter(&Params {
            layout,
            allowed_map_fd,
            denials_map_fd,
            hook,
            exempt_cgroup_id,
        });
        let prog = sys::prog_load(&insns, attach_type, name).map_err(|e| {
            anyhow!(e.error).context(format!(
                "the kernel refused to load the {name} program; verifier log:\n{}",
                e.log
            ))
        })?;
        out.push((name, attach(&prog, attach_type, name)?));
    }
    Ok((out, filter))
}

/// The kfunc and type ids and field offsets the program needs, read from
/// the running kernel's BTF (parsed once).
fn kernel_layout() -> Result<KernelLayout> {
    static LAYOUT: OnceLock<Result<KernelLayout, String>> = OnceLock::new();
    let found = LAYOUT.get_or_init(|| {
        let btf = btf::Btf::vmlinux().map_err(|e| format!("{e:#}"))?;
        let need =
            |what: &str, v: Option<u32>| v.ok_or_else(|| format!("the kernel's BTF has no {what}"));
        let offset =
            |s: &str, m: &str| need(&format!("{s}.{m}"), btf.member_offset(s, m)).map(|o| o as i16);
        Ok(KernelLayout {
            cast_to_kern_ctx: need(
                "kfunc bpf_cast_to_kern_ctx",
                btf.id(btf::KIND_FUNC, "bpf_cast_to_kern_ctx"),
            )?,
            rdonly_cast: need(
                "kfunc bpf_rdonly_cast",
                btf.id(btf::KIND_FUNC, "bpf_rdonly_cast"),
            )?,
            sockaddr_un: need(
                "struct sockaddr_un",
                btf.id(btf::KIND_STRUCT, "sockaddr_un"),
            )?,
            uaddr: offset("bpf_sock_addr_kern", "uaddr")?,
            uaddrlen: offset("bpf_sock_addr_kern", "uaddrlen")?,
            sun_path: offset("sockaddr_un", "sun_path")?,
        })
    });
    found.clone().map_err(|e| anyhow!("{e}"))
}

impl UnixFilter {
    fn open(allowed: OwnedFd, denials: OwnedFd) -> Result<UnixFilter> {
        let allowed = MapData::from_fd(allowed).context("opening the unix allowed map")?;
        let denials = MapData::from_fd(denials).context("opening the unix denials map")?;
        Ok(UnixFilter {
            allowed: Mutex::new(HashMap::try_from(Map::HashMap(allowed))?),
            denials: Mutex::new(Some(RingBuf::try_from(Map::RingBuf(denials))?)),
        })
    }

    /// Replaces the allowed paths, adding before removing so a path that
    /// stays allowed is never refused.
    pub fn set_allowed(&self, paths: &[UnixPath]) -> Result<()> {
        anyhow::ensure!(
            paths.len() <= MAX_ALLOWED as usize,
            "at most {MAX_ALLOWED} --allow-unix paths are supported"
        );
        let mut map = self.allowed.lock().expect("unix map lock");
        let wanted: Vec<[u8; NAME_LEN]> = paths.iter().map(UnixPath::key).collect();
        for (path, key) in paths.iter().zip(&wanted) {
            map.insert(key, 1, 0)
                .with_context(|| format!("allowing unix socket {path}"))?;
        }
        let stale: Vec<[u8; NAME_LEN]> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains(k))
            .collect();
        for key in stale {
            let _ = map.remove(&key);
        }
        Ok(())
    }

    /// Takes the denial ring buffer, to be read by one consumer.
    pub fn take_denials(&self) -> Option<RingBuf<MapData>> {
        self.denials.lock().expect("unix denials lock").take()
    }
}

/// One refused unix connect or send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnixDenial {
    /// The path, or `@name` for an abstract name (NULs in it as `\0`).
    pub name: String,
    pub pid: u32,
    pub comm: String,
    /// "connect_unix" or "sendmsg_unix".
    pub hook: &'static str,
    pub is_abstract: bool,
}

impl UnixDenial {
    /// Reads one record of the unix denial ring buffer.
    pub fn parse(bytes: &[u8]) -> Option<UnixDenial> {
        if bytes.len() < std::mem::size_of::<RawDenial>() {
            return None;
        }
        // SAFETY: RawDenial is plain bytes and integers (any bit pattern is
        // valid) and the length was checked; read_unaligned copes with the
        // ring's 8-byte alignment.
        let raw: RawDenial = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let is_abstract = raw.reason == reason::ABSTRACT;
        let name = if is_abstract {
            let len = (raw.name_len as usize).min(NAME_LEN);
            let body: String = raw.name[1..len.max(1)]
                .iter()
                .flat_map(|&b| std::ascii::escape_default(b).map(char::from))
                .collect();
            format!("@{body}")
        } else {
            let end = raw.name.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
            String::from_utf8_lossy(&raw.name[..end]).into_owned()
        };
        let comm_end = raw.comm.iter().position(|&b| b == 0).unwrap_or(16);
        Some(UnixDenial {
            name,
            pid: (raw.pid_tgid >> 32) as u32,
            comm: String::from_utf8_lossy(&raw.comm[..comm_end]).into_owned(),
            hook: HOOKS
                .iter()
                .find(|h| h.2 == raw.hook)
                .map_or("unix", |h| h.1),
            is_abstract,
        })
    }
}

/// Sockets that glibc's name service modules try on every user or host
/// lookup, falling back to files and DNS when refused.
const NSS_SOCKETS: [&str; 4] = [
    "/var/run/nscd/socket",
    "/run/nscd/socket",
    "/run/systemd/userdb/",
    "/run/systemd/resolve/",
];

impl UnixDenial {
    /// True for a name service lookup's try of nscd or systemd (harmless:
    /// the lookup falls back), which would otherwise log a line for every
    /// `ls -l` in the sandbox.
    pub fn is_name_service_probe(&self) -> bool {
        NSS_SOCKETS.iter().any(|p| match p.strip_suffix('/') {
            Some(dir) => self.name.starts_with(dir) && self.name[dir.len()..].starts_with('/'),
            None => self.name == *p,
        })
    }
}

impl fmt::Display for UnixDenial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unix {} ({}) from pid {} ({}): ",
            self.name, self.hook, self.pid, self.comm
        )?;
        if self.is_abstract {
            write!(
                f,
                "abstract unix names outside the sandbox are never reachable"
            )
        } else {
            write!(f, "not allowed; allow it with --allow-unix {}", self.name)
        }
    }
}

/// Reads unix denials until the ring buffer fails, calling `on_denial` for each.
pub async fn watch(
    ring: RingBuf<MapData>,
    mut on_denial: impl FnMut(UnixDenial),
) -> std::io::Result<()> {
    let mut fd = super::denials::readable(ring)?;
    loop {
        let mut guard = fd.readable_mut().await?;
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if let Some(denial) = UnixDenial::parse(&item) {
                on_denial(denial);
            }
        }
        guard.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_unix_takes_plain_absolute_paths() {
        let p: UnixPath = "/run/agent.sock".parse().unwrap();
        assert_eq!(p.to_string(), "/run/agent.sock");
        assert_eq!(&p.key()[..16], b"/run/agent.sock\0");
        let longest = format!("/{}", "a".repeat(106));
        assert_eq!(longest.parse::<UnixPath>().unwrap().key()[106], b'a');
    }

    #[test]
    fn allow_unix_refuses_what_could_never_match_or_must_never_pass() {
        for (bad, says) in [
            ("run/agent.sock", "absolute"),
            ("", "absolute"),
            ("@abstract", "absolute"),
            (&format!("/{}", "a".repeat(107)), "at most 107 bytes"),
            ("/run//agent.sock", "plain form"),
            ("/run/./agent.sock", "plain form"),
            ("/.fly/x/../api", "plain form"),
            ("/run/", "plain form"),
            ("/a\0b", "NUL"),
            ("/.fly/api", "secrets"),
        ] {
            let e = bad.parse::<UnixPath>().unwrap_err().to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn the_probe_tells_a_kernel_without_the_hook() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: loading BPF programs needs root");
            return;
        }
        assert!(matches!(probe(ATTACH_UNIX_CONNECT), Support::Filtered));
        // An attach type this kernel does not know stands in for 6.6 and older.
        let Support::NotFiltered(why) = probe(ATTACH_UNIX_CONNECT + 1000) else {
            panic!("an unknown attach type was accepted");
        };
        assert!(why.contains("Linux 6.7+"), "{why}");
    }

    #[test]
    fn a_refused_program_comes_back_with_the_verifiers_reason() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: loading BPF programs needs root");
            return;
        }
        let mut a = insn::Asm::default();
        a.exit(); // R0 never set
        let e = sys::prog_load(&a.finish(), ATTACH_UNIX_CONNECT, "bad").unwrap_err();
        assert!(e.log.contains("R0 !read_ok"), "{}", e.log);
    }

    #[test]
    fn denials_read_as_the_kernel_wrote_them() {
        let mut raw = RawDenial {
            name: [0; NAME_LEN],
            name_len: 4,
            pid_tgid: (42u64 << 32) | 43,
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
            hook: 1,
            reason: reason::ABSTRACT,
            _pad: [0; 6],
        };
        raw.name[1..4].copy_from_slice(b"a\0b");
        // SAFETY: RawDenial is plain data; viewing it as bytes is sound.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&raw as *const RawDenial).cast::<u8>(),
                std::mem::size_of::<RawDenial>(),
            )
        };
        let d = UnixDenial::parse(bytes).unwrap();
        assert_eq!(
            (d.name.as_str(), d.pid, d.comm.as_str(), d.hook),
            ("@a\\x00b", 42, "curl", "connect_unix")
        );
        assert!(d.to_string().contains("never reachable"));
        assert!(!d.is_name_service_probe());
    }

    #[test]
    fn name_service_probes_are_recognised() {
        let denial = |name: &str| UnixDenial {
            name: name.to_string(),
            pid: 1,
            comm: "ls".into(),
            hook: "connect_unix",
            is_abstract: false,
        };
        for quiet in [
            "/var/run/nscd/socket",
            "/run/systemd/userdb/io.systemd.Multiplexer",
            "/run/systemd/resolve/io.systemd.Resolve",
        ] {
            assert!(denial(quiet).is_name_service_probe(), "{quiet}");
        }
        for loud in [
            "/run/systemd/userdbx",
            "/var/run/nscd/socket2",
            "/run/docker.sock",
        ] {
            assert!(!denial(loud).is_name_service_probe(), "{loud}");
        }
    }
}
