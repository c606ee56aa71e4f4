//! The raw bpf(2) commands the unix hooks need and aya 0.14 cannot issue:
//! it has no unix attach types, so the program is loaded, attached and
//! pinned here by hand. Every `unsafe` block of the unix filter is here.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    os::unix::ffi::OsStrExt,
    path::Path,
};

use super::insn::Insn;

/// `BPF_PROG_TYPE_CGROUP_SOCK_ADDR`.
const PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
/// `BPF_MAP_TYPE_HASH`, `BPF_MAP_TYPE_RINGBUF`.
pub const MAP_TYPE_HASH: u32 = 1;
pub const MAP_TYPE_RINGBUF: u32 = 27;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_CREATE: libc::c_long = 28;

/// Big enough for every attr below; the kernel requires the unused tail of
/// the union to be zero, which `Default` gives.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Attr([0; 128])
    }
    fn u32(&mut self, off: usize, v: u32) -> &mut Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(&mut self, off: usize, v: u64) -> &mut Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn bytes(&mut self, off: usize, v: &[u8]) -> &mut Self {
        self.0[off..off + v.len()].copy_from_slice(v);
        self
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, writable 128-byte buffer laid out as the
    // `union bpf_attr` member for `cmd`; any pointers stored in it point to
    // buffers the caller keeps alive for the duration of this call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            std::mem::size_of::<Attr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn fd(ret: libc::c_long) -> OwnedFd {
    // SAFETY: the commands that call this return a new file descriptor that
    // nothing else owns.
    unsafe { OwnedFd::from_raw_fd(ret as i32) }
}

/// `BPF_MAP_CREATE` with no flags.
pub fn map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    name: &str,
) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.u32(0, map_type)
        .u32(4, key_size)
        .u32(8, value_size)
        .u32(12, max_entries)
        .bytes(28, &object_name(name));
    bpf(BPF_MAP_CREATE, &mut attr).map(fd)
}

/// A program refused by the verifier, with the verifier's log.
#[derive(Debug)]
pub struct LoadError {
    pub error: io::Error,
    pub log: String,
}

/// `BPF_PROG_LOAD` of a cgroup sock_addr program for `attach_type`. On
/// failure, loads again with the verifier log on so the error explains.
pub fn prog_load(insns: &[Insn], attach_type: u32, name: &str) -> Result<OwnedFd, LoadError> {
    let load = |log: &mut [u8]| {
        let license = c"GPL";
        let mut attr = Attr::new();
        attr.u32(0, PROG_TYPE_CGROUP_SOCK_ADDR)
            .u32(4, insns.len() as u32)
            .u64(8, insns.as_ptr() as u64)
            .u64(16, license.as_ptr() as u64)
            .bytes(48, &object_name(name))
            .u32(68, attach_type);
        if !log.is_empty() {
            attr.u32(24, 1)
                .u32(28, log.len() as u32)
                .u64(32, log.as_mut_ptr() as u64);
        }
        bpf(BPF_PROG_LOAD, &mut attr).map(fd)
    };
    load(&mut []).or_else(|error| {
        let mut log = vec![0u8; 1 << 20];
        match load(&mut log) {
            Ok(fd) => Ok(fd),
            Err(_) => {
                let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                // The last lines say why; the start is the walk through the code.
                let text = String::from_utf8_lossy(&log[..end]);
                let tail: Vec<&str> = text.lines().rev().take(12).collect();
                let log = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
                Err(LoadError { error, log })
            }
        }
    })
}

/// `BPF_LINK_CREATE`: attaches `prog` to the cgroup `target` as a link
/// (cgroup links always run side by side with other programs).
pub fn link_create(prog: &OwnedFd, target: &impl AsRawFd, attach_type: u32) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.u32(0, prog.as_raw_fd() as u32)
        .u32(4, target.as_raw_fd() as u32)
        .u32(8, attach_type);
    bpf(BPF_LINK_CREATE, &mut attr).map(fd)
}

/// `BPF_OBJ_PIN`: pins `object` (a link or map) at `path` in bpffs.
pub fn obj_pin(object: &OwnedFd, path: &Path) -> io::Result<()> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in pin path"))?;
    let mut attr = Attr::new();
    attr.u64(0, path.as_ptr() as u64)
        .u32(8, object.as_raw_fd() as u32);
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// `BPF_PROG_QUERY`: how many programs run for `attach_type` on the cgroup
/// `target` (its own, not inherited ones).
pub fn prog_count(target: &impl AsRawFd, attach_type: u32) -> io::Result<u32> {
    let mut attr = Attr::new();
    attr.u32(0, target.as_raw_fd() as u32).u32(4, attach_type);
    bpf(BPF_PROG_QUERY, &mut attr)?;
    Ok(u32::from_ne_bytes(
        attr.0[24..28].try_into().expect("4 bytes"),
    ))
}

/// A kernel object name: at most 15 bytes and a NUL.
fn object_name(name: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    let n = name.len().min(15);
    out[..n].copy_from_slice(&name.as_bytes()[..n]);
    out
}
