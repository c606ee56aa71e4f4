//! Loading the programs, attaching them to a sandbox cgroup, pinning them,
//! and the typed map access the rest of proxypilot uses.

use std::{
    collections::HashSet,
    fs::{self, File},
    net::SocketAddr,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    sync::Mutex,
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, PerCpuArray, RingBuf},
    programs::{
        links::FdLink, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock,
        CgroupSockAddr, CgroupSockopt, SchedClassifier, SockOps, TcAttachType,
    },
    Ebpf, EbpfLoader,
};
use proxypilot_common::{drop_slot, map_names, AllowTarget, Config, Origin, PeerKey, Resolver};

use super::{
    bpffs, cgroup,
    origin::{peer_key, words_from_ip, OriginalDestination},
    policy::KernelPolicy,
    raw_bpf, unix,
};

/// The eBPF object built by build.rs.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxypilot-programs"));

/// The tc egress program attached to every interface of the namespace.
const FRAME_GUARD_PROGRAM: &str = "frame_guard";

/// The kind of cgroup hook a program attaches to (not [`proxypilot_common::Hook`],
/// which names the hook that denied something).
#[derive(Clone, Copy, Debug)]
enum ProgramKind {
    SockAddr,
    SockOps,
    /// `cgroup/sock_create`.
    SockCreate,
    /// `cgroup/setsockopt`.
    Sockopt,
    /// `cgroup_skb/egress` and `cgroup_skb/ingress`: the packet backstop.
    Skb(CgroupSkbAttachType),
}

/// Every program in the object, in the order they are attached (the packet
/// backstop and the socket-level refusals first). All are required: if the
/// kernel refuses one, the attach fails and nothing is left attached.
const PROGRAMS: [(&str, ProgramKind); 13] = [
    (
        "packet_egress",
        ProgramKind::Skb(CgroupSkbAttachType::Egress),
    ),
    (
        "packet_ingress",
        ProgramKind::Skb(CgroupSkbAttachType::Ingress),
    ),
    ("sock_create", ProgramKind::SockCreate),
    ("setsockopt", ProgramKind::Sockopt),
    ("connect4", ProgramKind::SockAddr),
    ("connect6", ProgramKind::SockAddr),
    ("sendmsg4", ProgramKind::SockAddr),
    ("sendmsg6", ProgramKind::SockAddr),
    ("getpeername4", ProgramKind::SockAddr),
    ("getpeername6", ProgramKind::SockAddr),
    ("recvmsg4", ProgramKind::SockAddr),
    ("recvmsg6", ProgramKind::SockAddr),
    ("origin_rekey", ProgramKind::SockOps),
];

/// Programs attached to one sandbox cgroup, and their maps.
///
/// Dropping it leaves the programs attached (they are pinned): a sandbox
/// whose proxy died stays closed. [`Attachment::detach`] removes them.
pub struct Attachment {
    pin_dir: PathBuf,
    maps: Mutex<PolicyMaps>,
    peer_origin: Mutex<HashMap<MapData, PeerKey, Origin>>,
    sock_origin: HashMap<MapData, u64, Origin>,
    dns_peer: HashMap<MapData, PeerKey, Origin>,
    denials: Mutex<Option<RingBuf<MapData>>>,
    packet_drops: PerCpuArray<MapData, u64>,
    logger: Mutex<Option<aya_log::EbpfLogger<&'static dyn log::Log>>>,
    /// `None` when the kernel has no unix socket hooks.
    unix: Option<unix::UnixFilter>,
    // Keeps the loaded programs' fds; the links are held by their pins.
    _ebpf: Ebpf,
}

/// Counts of packets the backstop dropped, per direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketDrops {
    /// Sent by a sandbox socket to a peer that is not allowed.
    pub egress: u64,
    /// Arriving for a sandbox socket from a peer that is not allowed.
    pub ingress: u64,
    /// Frames from the sandbox's packet sockets, dropped at an interface.
    pub frames: u64,
}

impl PacketDrops {
    fn read(map: &PerCpuArray<MapData, u64>) -> PacketDrops {
        let slot = |i: u32| -> u64 {
            map.get(&i, 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0)
        };
        PacketDrops {
            egress: slot(drop_slot::EGRESS),
            ingress: slot(drop_slot::INGRESS),
            frames: slot(drop_slot::FRAMES),
        }
    }
}

/// The backstop's drop counts for the sandbox cgroup `cgroup_id`, read from
/// the pinned map (from any process, e.g. while another one serves it).
pub fn pinned_packet_drops(cgroup_id: u64) -> Result<PacketDrops> {
    let path = bpffs::pin_dir(cgroup_id).join(map_names::PACKET_DROPS);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening the pinned map {}", path.display()))?;
    let map = PerCpuArray::try_from(aya::maps::Map::from_map_data(data)?)?;
    Ok(PacketDrops::read(&map))
}

struct PolicyMaps {
    config: Array<MapData, Config>,
    intercept_ports: HashMap<MapData, u16, u8>,
    allowed: LpmTrie<MapData, AllowTarget, u32>,
    resolver: Array<MapData, Resolver>,
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
        let pin_dir = bpffs::create_pin_dir(cgroup_id)?;

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
            resolver: take(&mut ebpf, map_names::DNS_RESOLVER)?,
        };
        maps.write(policy)?;
        let peer_origin = take(&mut ebpf, map_names::PEER_ORIGIN)?;
        let sock_origin = take(&mut ebpf, map_names::SOCK_ORIGIN)?;
        let dns_peer = take(&mut ebpf, map_names::DNS_PEER)?;
        let denials = take(&mut ebpf, map_names::DENIALS)?;
        let packet_drops = take(&mut ebpf, map_names::PACKET_DROPS)?;

        let cgroup_dir = File::open(cgroup_path)
            .with_context(|| format!("opening cgroup {}", cgroup_path.display()))?;
        let mut fresh = Vec::new();
        for (name, hook) in PROGRAMS {
            load(&mut ebpf, name, hook)?;
            let link = attach_link(&mut ebpf, name, hook, &cgroup_dir, cgroup_path)?;
            fresh.push((name.to_string(), link));
        }
        let mut frame_guard: Array<MapData, u64> = take(&mut ebpf, map_names::FRAME_GUARD)?;
        frame_guard
            .set(0, cgroup_id, 0)
            .context("writing the FRAME_GUARD map")?;
        fresh.extend(attach_frame_guard(&mut ebpf)?);

        // Every new program runs now. Replacing each pin drops the old link.
        for (name, link) in fresh {
            let final_pin = bpffs::link_pin(&pin_dir, &name);
            let staging = pin_dir.join(format!("staging-{name}"));
            let _ = fs::remove_file(&staging);
            link.pin(&staging)
                .with_context(|| format!("pinning the {name} link in {}", pin_dir.display()))?;
            fs::rename(&staging, &final_pin)
                .with_context(|| format!("replacing pin {}", final_pin.display()))?;
        }
        let unix = unix::attach(
            &cgroup_dir,
            &pin_dir,
            &policy.allowed_unix,
            policy.exempt_cgroup_id,
        )?;

        tracing::info!(
            cgroup = %cgroup_path.display(),
            cgroup_id,
            pins = %pin_dir.display(),
            "kernel programs attached"
        );
        Ok(Attachment {
            pin_dir,
            maps: Mutex::new(maps),
            peer_origin: Mutex::new(peer_origin),
            sock_origin,
            dns_peer,
            denials: Mutex::new(Some(denials)),
            packet_drops,
            logger: Mutex::new(logger),
            unix,
            _ebpf: ebpf,
        })
    }

    /// Replaces the policy while the programs run. New entries are added
    /// before stale ones go, so nothing that stays allowed is ever denied.
    pub fn set_policy(&self, policy: &KernelPolicy) -> Result<()> {
        self.maps.lock().expect("policy maps lock").write(policy)?;
        if let Some(unix) = &self.unix {
            unix.set_allowed(&policy.allowed_unix)?;
        }
        Ok(())
    }

    /// Whether unix sockets are filtered (the kernel has the hooks).
    pub fn filters_unix(&self) -> bool {
        self.unix.is_some()
    }

    /// Takes the unix denial ring buffer, to be read by one consumer.
    pub fn take_unix_denials(&self) -> Option<RingBuf<MapData>> {
        self.unix.as_ref()?.take_denials()
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

    /// Who sent the DNS datagram that arrived from `peer` (a sandbox UDP
    /// socket's local address), and the server it asked. Left in the map:
    /// a socket sends many queries.
    pub fn dns_sender(&self, peer: SocketAddr) -> Option<OriginalDestination> {
        let origin = self.dns_peer.get(&peer_key(peer), 0).ok()?;
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

    /// Packets the backstop dropped since the maps were created (they are
    /// pinned, so the count survives a takeover).
    pub fn packet_drops(&self) -> PacketDrops {
        PacketDrops::read(&self.packet_drops)
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
        let resolver = Resolver {
            ip4: policy
                .resolver
                .v4
                .map_or(0, |a| u32::from_ne_bytes(a.ip().octets())),
            port4: policy.resolver.v4.map_or(0, |a| a.port()),
            port6: policy.resolver.v6.map_or(0, |a| a.port()),
            ip6: policy
                .resolver
                .v6
                .map_or([0; 4], |a| words_from_ip((*a.ip()).into())),
        };
        self.resolver
            .set(0, resolver, 0)
            .context("writing the DNS_RESOLVER map")?;

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

/// Loads one program into the kernel (the verifier runs here).
fn load(ebpf: &mut Ebpf, name: &str, hook: ProgramKind) -> Result<()> {
    let loaded = match hook {
        ProgramKind::SockAddr => program::<CgroupSockAddr>(ebpf, name)?.load(),
        ProgramKind::SockOps => program::<SockOps>(ebpf, name)?.load(),
        ProgramKind::SockCreate => program::<CgroupSock>(ebpf, name)?.load(),
        ProgramKind::Sockopt => program::<CgroupSockopt>(ebpf, name)?.load(),
        ProgramKind::Skb(_) => program::<CgroupSkb>(ebpf, name)?.load(),
    };
    loaded.map_err(|e| verifier_error(name, e))
}

/// Attaches a loaded program to `cgroup` and returns its link, to be pinned.
fn attach_link(
    ebpf: &mut Ebpf,
    name: &str,
    hook: ProgramKind,
    cgroup: &File,
    cgroup_path: &Path,
) -> Result<FreshLink> {
    let mode = CgroupAttachMode::Single;
    let failed = |e| attach_error(name, cgroup_path, e);
    let link: FdLink = match hook {
        ProgramKind::SockAddr => {
            let p: &mut CgroupSockAddr = program(ebpf, name)?;
            let id = p.attach(cgroup, mode).map_err(failed)?;
            p.take_link(id)?.try_into()?
        }
        ProgramKind::SockOps => {
            let p: &mut SockOps = program(ebpf, name)?;
            let id = p.attach(cgroup, mode).map_err(failed)?;
            p.take_link(id)?.try_into()?
        }
        ProgramKind::SockCreate => {
            let p: &mut CgroupSock = program(ebpf, name)?;
            let id = p.attach(cgroup, mode).map_err(failed)?;
            p.take_link(id)?.try_into()?
        }
        ProgramKind::Sockopt => {
            // aya 0.14 cannot turn this program's link into an FdLink.
            let p: &mut CgroupSockopt = program(ebpf, name)?;
            let fd = raw_bpf::link_create(
                p.fd()?.as_fd(),
                cgroup.as_fd(),
                raw_bpf::BPF_CGROUP_SETSOCKOPT,
            )
            .with_context(|| format!("attaching {name} to {} failed", cgroup_path.display()))?;
            return Ok(FreshLink::Raw(fd));
        }
        ProgramKind::Skb(direction) => {
            let p: &mut CgroupSkb = program(ebpf, name)?;
            let id = p.attach(cgroup, direction, mode).map_err(failed)?;
            p.take_link(id)?.try_into()?
        }
    };
    Ok(FreshLink::Aya(link))
}

/// Loads the interface guard and attaches it (tc egress, TCX links) to
/// every interface of this network namespace, the sandbox's in the sidecar
/// shape. An interface it cannot be attached to is named in a warning:
/// packet-socket frames leave through it unfiltered.
fn attach_frame_guard(ebpf: &mut Ebpf) -> Result<Vec<(String, FreshLink)>> {
    let prog: &mut SchedClassifier = program(ebpf, FRAME_GUARD_PROGRAM)?;
    prog.load()
        .map_err(|e| verifier_error(FRAME_GUARD_PROGRAM, e))?;
    let mut links = Vec::new();
    for iface in interfaces()? {
        let attached = prog
            .attach(&iface, TcAttachType::Egress)
            .map_err(anyhow::Error::from)
            .and_then(|id| Ok(FdLink::try_from(prog.take_link(id)?)?));
        match attached {
            Ok(link) => links.push((
                format!("{FRAME_GUARD_PROGRAM}-{iface}"),
                FreshLink::Aya(link),
            )),
            Err(e) => tracing::warn!(
                interface = %iface,
                error = %format!("{e:#}"),
                "frames from the sandbox's packet sockets (AF_PACKET, which needs \
                 CAP_NET_RAW) are NOT filtered on this interface; tc egress links need \
                 Linux 6.6"
            ),
        }
    }
    Ok(links)
}

/// The names of this network namespace's interfaces.
fn interfaces() -> Result<Vec<String>> {
    let list = nix::net::if_::if_nameindex().context("listing network interfaces")?;
    Ok(list
        .iter()
        .map(|i| i.name().to_string_lossy().into_owned())
        .collect())
}

/// A link just attached, held until it is pinned.
enum FreshLink {
    Aya(FdLink),
    Raw(OwnedFd),
}

impl FreshLink {
    fn pin(self, path: &Path) -> Result<()> {
        match self {
            FreshLink::Aya(link) => drop(link.pin(path)?),
            FreshLink::Raw(fd) => raw_bpf::pin(fd.as_fd(), path)?,
        }
        Ok(())
    }
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

/// Loads every program into the kernel (verifier included) without
/// attaching anything, then unloads. Returns how many were loaded.
pub fn trial_load() -> Result<usize> {
    bump_memlock_rlimit();
    if !bpffs::is_bpffs(Path::new(bpffs::BPFFS)) {
        bail!(
            "bpffs is not mounted at {}; the maps are pinned there",
            bpffs::BPFFS
        );
    }
    let dir = bpffs::create_scratch_dir(&format!("doctor-{}", std::process::id()))?;
    let result = (|| {
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&dir)
            .load(EBPF_OBJECT)?;
        for (name, hook) in PROGRAMS {
            load(&mut ebpf, name, hook)?;
        }
        program::<SchedClassifier>(&mut ebpf, FRAME_GUARD_PROGRAM)?
            .load()
            .map_err(|e| verifier_error(FRAME_GUARD_PROGRAM, e))?;
        Ok::<_, anyhow::Error>(PROGRAMS.len() + 1)
    })();
    let _ = bpffs::remove_pins(&dir);
    result
}
