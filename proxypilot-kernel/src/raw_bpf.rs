//! The two bpf(2) commands proxypilot needs that aya 0.14 does not offer
//! for every program type: it cannot hand out the link of a
//! `cgroup/setsockopt` program as an `FdLink`, so that one is created and
//! pinned here.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    os::unix::ffi::OsStrExt,
    path::Path,
};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
/// `enum bpf_attach_type` value of `cgroup/setsockopt`.
pub const BPF_CGROUP_SETSOCKOPT: u32 = 22;

/// Creates a link attaching `prog` to the cgroup `target` (multi-attach, as
/// every proxypilot link is).
pub fn link_create(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    // struct { __u32 prog_fd, target_fd, attach_type, flags; } plus the
    // rest of union bpf_attr, zeroed.
    let mut attr = [0u32; 16];
    attr[0] = prog.as_raw_fd() as u32;
    attr[1] = target.as_raw_fd() as u32;
    attr[2] = attach_type;
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Pins the object `fd` (a link here) at `path` in bpffs.
pub fn pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // struct { __aligned_u64 pathname; __u32 bpf_fd, file_flags; }
    let mut attr = [0u32; 16];
    let ptr = path.as_ptr() as u64;
    attr[0] = ptr as u32;
    attr[1] = (ptr >> 32) as u32;
    attr[2] = fd.as_raw_fd() as u32;
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

fn bpf(cmd: libc::c_long, attr: &mut [u32; 16]) -> io::Result<i32> {
    // SAFETY: attr is a zero-padded bpf_attr of the size passed, valid for
    // the whole call; the kernel reads (and may write) only within it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr) as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as i32)
    }
}
