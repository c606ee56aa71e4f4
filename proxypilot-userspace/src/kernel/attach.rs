//! Loading the programs, attaching them to a sandbox cgroup, pinning them,
//! and the typed map access the rest of proxypilot uses.

use std::{
    collections::HashSet,
    fs::{self, File},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Mutex,
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, RingBuf},
    programs::{links::FdLink, CgroupAttachMode, CgroupSockAddr, SockOps},
    Ebpf, EbpfLoader,
};
use proxypilot_common::{map_names, AllowTarget, Config, DenyEvent, Origin, PeerKey};

use super::{
    bpffs, cgroup,
    origin::{peer_key, words_from_ip, OriginalDestination},
    policy::KernelPolicy,
};

/// The eBPF object built by build.rs.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxypilot-programs"));

/// Every program in the object, in the order they are attached.
const SOCK_ADDR_PROGRAMS: [&str; 6] = [
    "connect4",
    "connect6",
    "sendmsg4",
    "sendmsg6",
    "getpeername4",
    "getpeername6",
];
const SOCK_OPS_PROGRAM: &str = "origin_rekey";

/// Programs attached to one sandbox cgroup, and their maps.
///
/// Dropping it leaves the programs attached (they are pinned): a sandbox
/// whose proxy died stays closed. [`Attachment::detach`] removes them.
pub struct Attachment {
    cgroup: PathBuf,
    pin_dir: PathBuf,
    maps: Mutex<PolicyMaps>,
    peer_origin: Mutex<HashMap<MapData, PeerKey, Origin>>,
    sock_origin: HashMap<MapData, u64, Origin>,
    denials: Mutex<Option<RingBuf<MapData>>>,
    logger: Mutex<Option<aya_log::EbpfLogger<&'static dyn log::Log>>>,
    // Keeps the loaded programs' fds; the links are held by their pins.
    _ebpf: Ebpf,
}

struct PolicyMaps {
    config: Array<MapData, Config>,
    intercept_ports: HashMap<MapData, u16, u8>,
    allowed: LpmTrie<MapData, AllowTarget, u32>,
}

impl Attachment {
    /// Loads the programs, writes `policy`, attaches them to `cgroup_path`
    /// and pins the links. If programs of an earlier proxypilot are pinned
    /// for this cgroup, they are replaced without a gap: the new links are
    /// attached first (cgroup links run side by side), and the old ones are
    /// detached when their pins are replaced. The maps are pinned too, so
    /// connections already in flight keep their records.
    pub fn attach(cgroup_path: &Path, policy: &KernelPolicy) -> Result<Attachment> {
        cgroup::ensure_cgroup2_dir(cgroup_path)?;
        let cgroup_id = cgroup::cgroup_id(cgroup_path)?;
        if policy.exempt_cgroup_id == cgroup_id {
            bail!(
                "proxypilot itself runs in the sandbox cgroup {}; exempting its own \
                 sockets would exempt the sandbox too. Run proxypilot in another cgroup \
                 (e.g. a sibling), or attach to the sandbox's own child cgroup",
                cgroup_path.display()
            );
        }
        bpffs::ensure_mounted()?;
        let pin_dir = bpffs::pin_dir(cgroup_id);
        fs::create_dir_all(&pin_dir)
            .with_context(|| format!("creating pin directory {}", pin_dir.display()))?;

        bump_memlock_rlimit();
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .load(EBPF_OBJECT)
            .map_err(|e| {
                anyhow!(e).context(format!(
                    "loading the eBPF programs (if an older proxypilot with other map layouts \
                     pinned maps in {}, run `proxypilot detach --cgroup {}` first)",
                    pin_dir.display(),
                    cgroup_path.display()
                ))
            })?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::debug!(error = %e, "eBPF logging not available");
                None
            }
        };

        let mut maps = PolicyMaps {
            config: take(&mut ebpf, map_names::CONFIG)?,
            intercept_ports: take(&mut ebpf, map_names::INTERCEPT_PORTS)?,
            allowed: take(&mut ebpf, map_names::ALLOWED)?,
        };
        maps.write(policy)?;
        let peer_origin = take(&mut ebpf, map_names::PEER_ORIGIN)?;
        let sock_origin = take(&mut ebpf, map_names::SOCK_ORIGIN)?;
        let denials = take(&mut ebpf, map_names::DENIALS)?;

        let cgroup_dir = File::open(cgroup_path)
            .with_context(|| format!("opening cgroup {}", cgroup_path.display()))?;
        let mut fresh = Vec::new();
        for name in SOCK_ADDR_PROGRAMS {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().map_err(|e| verifier_error(name, e))?;
            let id = prog
                .attach(&cgroup_dir, CgroupAttachMode::Single)
                .map_err(|e| attach_error(name, cgroup_path, e))?;
            let link: FdLink = prog.take_link(id)?.try_into()?;
            fresh.push((name, link));
        }
        let prog: &mut SockOps = program(&mut ebpf, SOCK_OPS_PROGRAM)?;
        prog.load()
            .map_err(|e| verifier_error(SOCK_OPS_PROGRAM, e))?;
        let id = prog
            .attach(&cgroup_dir, CgroupAttachMode::Single)
            .map_err(|e| attach_error(SOCK_OPS_PROGRAM, cgroup_path, e))?;
        fresh.push((SOCK_OPS_PROGRAM, prog.take_link(id)?.try_into()?));

        // Every new program runs now. Replacing each pin drops the old link.
        for (name, link) in fresh {
            let final_pin = bpffs::link_pin(&pin_dir, name);
            let staging = pin_dir.join(format!("staging-{name}"));
            let _ = fs::remove_file(&staging);
            link.pin(&staging)
                .with_context(|| format!("pinning the {name} link in {}", pin_dir.display()))?;
            fs::rename(&staging, &final_pin)
                .with_context(|| format!("replacing pin {}", final_pin.display()))?;
        }

        tracing::info!(
            cgroup = %cgroup_path.display(),
            cgroup_id,
            pins = %pin_dir.display(),
            "kernel programs attached"
        );
        Ok(Attachment {
            cgroup: cgroup_path.to_path_buf(),
            pin_dir,
            maps: Mutex::new(maps),
            peer_origin: Mutex::new(peer_origin),
            sock_origin,
            denials: Mutex::new(Some(denials)),
            logger: Mutex::new(logger),
            _ebpf: ebpf,
        })
    }

    /// The cgroup the programs are attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Where the links and maps are pinned.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Replaces the policy while the programs run. New entries are added
    /// before stale ones go, so nothing that stays allowed is ever denied.
    pub fn set_policy(&self, policy: &KernelPolicy) -> Result<()> {
        self.maps.lock().expect("policy maps lock").write(policy)
    }

    /// The original destination of the connection accepted from `peer`,
    /// removed from the map so each record is used once.
    pub fn original_destination(&self, peer: SocketAddr) -> Option<OriginalDestination> {
        let key = peer_key(peer);
        let mut map = self.peer_origin.lock().expect("origin map lock");
        let origin = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(OriginalDestination::from(&origin))
    }

    /// Number of records waiting in the peer map (for tests and the soak).
    pub fn pending_origins(&self) -> usize {
        let map = self.peer_origin.lock().expect("origin map lock");
        map.keys().filter(|k| k.is_ok()).count()
    }

    /// Number of open redirected sockets the kernel still tracks (their
    /// records go when they close).
    pub fn tracked_sockets(&self) -> usize {
        self.sock_origin.keys().filter(|k| k.is_ok()).count()
    }

    /// Takes the denial ring buffer, to be read by one consumer.
    pub fn take_denials(&self) -> Option<RingBuf<MapData>> {
        self.denials.lock().expect("denials lock").take()
    }

    /// Takes the aya-log reader, to be polled by one consumer.
    pub fn take_logger(&self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        self.logger.lock().expect("logger lock").take()
    }

    /// Detaches the programs and removes their pins and maps. The links
    /// are held only by their pins, so unpinning detaches at once.
    pub fn detach(&self) -> Result<()> {
        bpffs::remove_pins(&self.pin_dir)?;
        Ok(())
    }
}

/// Detaches whatever proxypilot pinned for `cgroup_path`. Returns false when
/// nothing was attached.
pub fn detach(cgroup_path: &Path) -> Result<bool> {
    let cgroup_id = cgroup::cgroup_id(cgroup_path)?;
    detach_by_id(cgroup_id)
}

/// Like [`detach`], by cgroup id (works after the cgroup directory is gone).
pub fn detach_by_id(cgroup_id: u64) -> Result<bool> {
    if !bpffs::is_bpffs(Path::new(bpffs::BPFFS)) {
        return Ok(false);
    }
    bpffs::remove_pins(&bpffs::pin_dir(cgroup_id))
}

impl PolicyMaps {
    fn write(&mut self, policy: &KernelPolicy) -> Result<()> {
        let config = Config {
            listen_ip4: policy
                .listen_v4
                .map_or(0, |a| u32::from_ne_bytes(a.ip().octets())),
            listen_port4: policy.listen_v4.map_or(0, |a| a.port()),
            listen_port6: policy.listen_v6.map_or(0, |a| a.port()),
            listen_ip6: policy
                .listen_v6
                .map_or([0; 4], |a| words_from_ip((*a.ip()).into())),
            exempt_cgroup_id: policy.exempt_cgroup_id,
        };
        self.config
            .set(0, config, 0)
            .context("writing the CONFIG map")?;

        let ports: HashSet<u16> = policy.intercept_ports.iter().copied().collect();
        for port in &ports {
            self.intercept_ports
                .insert(port, 1, 0)
                .with_context(|| format!("adding intercepted port {port}"))?;
        }
        let stale: Vec<u16> = self
            .intercept_ports
            .keys()
            .filter_map(Result::ok)
            .filter(|p| !ports.contains(p))
            .collect();
        for port in stale {
            let _ = self.intercept_ports.remove(&port);
        }

        let mut wanted: std::collections::HashMap<(u32, [u8; 20]), u32> = Default::default();
        for rule in &policy.allowed {
            let (bits, target) = rule.trie_key();
            *wanted.entry((bits, target_bytes(&target))).or_default() |= rule.flags();
        }
        for rule in &policy.allowed {
            let (bits, target) = rule.trie_key();
            let flags = wanted[&(bits, target_bytes(&target))];
            self.allowed
                .insert(&Key::new(bits, target), flags, 0)
                .with_context(|| format!("adding allowed destination {rule}"))?;
        }
        let stale: Vec<Key<AllowTarget>> = self
            .allowed
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains_key(&(k.prefix_len(), target_bytes(&k.data()))))
            .collect();
        for key in stale {
            let _ = self.allowed.remove(&key);
        }
        Ok(())
    }
}

fn target_bytes(t: &AllowTarget) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[..2].copy_from_slice(&t.port);
    for (i, w) in t.addr.iter().enumerate() {
        b[4 + i * 4..8 + i * 4].copy_from_slice(&w.to_ne_bytes());
    }
    b
}

fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("the eBPF object has no map {name} (a build mismatch)"))?;
    T::try_from(map).with_context(|| format!("opening map {name}"))
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut P>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("the eBPF object has no program {name} (a build mismatch)"))?;
    Ok(prog.try_into()?)
}

fn verifier_error(name: &str, e: aya::programs::ProgramError) -> anyhow::Error {
    anyhow!(e).context(format!(
        "the kernel refused to load the {name} program; run `proxypilot doctor` to check \
         kernel support (Linux 5.8+ with BTF and cgroup v2)"
    ))
}

fn attach_error(name: &str, cgroup: &Path, e: aya::programs::ProgramError) -> anyhow::Error {
    anyhow!(e).context(format!(
        "attaching {name} to {} failed; if another tool attached a program there in \
         exclusive (non-multi) mode, `bpftool cgroup show {}` lists it",
        cgroup.display(),
        cgroup.display()
    ))
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; newer ones use
/// memcg and ignore it. Raising it is harmless either way.
fn bump_memlock_rlimit() {
    use nix::sys::resource::{setrlimit, Resource, RLIM_INFINITY};
    if let Err(e) = setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY) {
        tracing::debug!(error = %e, "could not raise RLIMIT_MEMLOCK");
    }
}

/// Parses one record from the denial ring buffer.
pub fn parse_denial(bytes: &[u8]) -> Option<DenyEvent> {
    if bytes.len() < std::mem::size_of::<DenyEvent>() {
        return None;
    }
    // SAFETY: DenyEvent is Pod (any bit pattern is valid) and the length was
    // checked; read_unaligned copes with the ring's 8-byte alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<DenyEvent>()) })
}

/// Loads every program into the kernel (verifier included) without
/// attaching anything, then unloads. Returns how many were loaded.
pub fn trial_load() -> Result<usize> {
    bump_memlock_rlimit();
    let dir = Path::new(bpffs::BPFFS)
        .join("proxypilot")
        .join(format!("doctor-{}", std::process::id()));
    if bpffs::is_bpffs(Path::new(bpffs::BPFFS)) {
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    } else {
        bail!(
            "bpffs is not mounted at {}; the maps are pinned there",
            bpffs::BPFFS
        );
    }
    let result = (|| {
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&dir)
            .load(EBPF_OBJECT)?;
        for name in SOCK_ADDR_PROGRAMS {
            program::<CgroupSockAddr>(&mut ebpf, name)?
                .load()
                .map_err(|e| verifier_error(name, e))?;
        }
        program::<SockOps>(&mut ebpf, SOCK_OPS_PROGRAM)?
            .load()
            .map_err(|e| verifier_error(SOCK_OPS_PROGRAM, e))?;
        Ok::<_, anyhow::Error>(SOCK_ADDR_PROGRAMS.len() + 1)
    })();
    let _ = bpffs::remove_pins(&dir);
    result
}
