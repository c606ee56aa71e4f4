//! The unix filter program, assembled here because aya 0.14 cannot load a
//! program for the unix attach types.
//!
//! What it does, for each connect() or sendto() to a unix address from the
//! sandbox:
//! 1. the proxy's own cgroup passes (as in the inet programs);
//! 2. the destination's `sockaddr_un` is reached through the kfuncs
//!    `bpf_cast_to_kern_ctx` (the context's kernel struct, which holds the
//!    address and its length) and `bpf_rdonly_cast` (to read `sun_path`,
//!    which lies beyond `struct sockaddr`);
//! 3. the name is copied into a zeroed 108-byte key, as the kernel reads it:
//!    a path ends at its first NUL or at the address length, an abstract
//!    name (first byte NUL) is all `addrlen - 2` bytes;
//! 4. a key in the allowed map passes (return 1); anything else is reported
//!    to the ring buffer and refused (return 0, so the caller gets EPERM).

use super::insn::{Asm, Cond, Size, FP, R0, R1, R2, R3, R4, R6, R7, R8, R9};

/// Length of `sun_path`, and of the allowed map's keys.
pub const NAME_LEN: usize = 108;

/// What the running kernel's BTF says the program needs.
#[derive(Clone, Copy, Debug)]
pub struct KernelLayout {
    pub cast_to_kern_ctx: u32,
    pub rdonly_cast: u32,
    pub sockaddr_un: u32,
    /// Offsets in `struct bpf_sock_addr_kern`.
    pub uaddr: i16,
    pub uaddrlen: i16,
    /// Offset of `sun_path` in `struct sockaddr_un`.
    pub sun_path: i16,
}

/// Maps and constants baked into one program.
pub struct Params {
    pub layout: KernelLayout,
    pub allowed_map_fd: i32,
    pub denials_map_fd: i32,
    pub hook: u8,
    pub exempt_cgroup_id: u64,
}

/// One record in the denial ring buffer. The program writes it on its stack
/// (the first [`NAME_LEN`] bytes are also the map key) and copies it out.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RawDenial {
    pub name: [u8; NAME_LEN],
    /// The name's length as the caller gave it (addrlen - 2).
    pub name_len: u32,
    pub pid_tgid: u64,
    pub comm: [u8; 16],
    pub hook: u8,
    pub reason: u8,
    pub _pad: [u8; 6],
}

pub mod reason {
    pub const NOT_ALLOWED: u8 = 1;
    pub const ABSTRACT: u8 = 2;
}

const EVENT_SIZE: i16 = std::mem::size_of::<RawDenial>() as i16;
/// The event sits at the top of the stack.
const EV: i16 = -EVENT_SIZE;
const OFF_NAME_LEN: i16 = NAME_LEN as i16;
const OFF_PID_TGID: i16 = OFF_NAME_LEN + 4;
const OFF_COMM: i16 = OFF_PID_TGID + 8;
const OFF_HOOK: i16 = OFF_COMM + 16;
const OFF_REASON: i16 = OFF_HOOK + 1;

const HELPER_MAP_LOOKUP_ELEM: i32 = 1;
const HELPER_GET_CURRENT_PID_TGID: i32 = 14;
const HELPER_GET_CURRENT_COMM: i32 = 16;
const HELPER_GET_CURRENT_CGROUP_ID: i32 = 80;
const HELPER_RINGBUF_OUTPUT: i32 = 130;

/// The filter program for one hook.
pub fn filter(p: &Params) -> Vec<super::insn::Insn> {
    let l = &p.layout;
    let mut a = Asm::default();
    let allow = a.label();
    let abstract_name = a.label();
    let lookup = a.label();
    let named_reason = a.label();

    a.mov(R6, R1);
    a.call_helper(HELPER_GET_CURRENT_CGROUP_ID);
    a.mov_imm64(R1, p.exempt_cgroup_id);
    a.jump_if_reg(Cond::Eq, R0, R1, allow);

    for off in (0..EVENT_SIZE).step_by(8) {
        a.store_imm(Size::DW, FP, EV + off, 0);
    }
    a.mov(R1, R6);
    a.call_kfunc(l.cast_to_kern_ctx);
    a.load(Size::W, R8, R0, l.uaddrlen);
    a.load(Size::DW, R1, R0, l.uaddr);
    a.mov_imm(R2, l.sockaddr_un as i32);
    a.call_kfunc(l.rdonly_cast);
    a.mov(R7, R0);
    a.add_imm(R8, -i32::from(l.sun_path));
    a.store(Size::W, FP, EV + OFF_NAME_LEN, R8);

    a.load(Size::B, R0, R7, l.sun_path);
    a.jump_if(Cond::Eq, R0, 0, abstract_name);
    copy_name(&mut a, l.sun_path, true, lookup);
    a.bind(abstract_name);
    copy_name(&mut a, l.sun_path, false, lookup);

    a.bind(lookup);
    a.map_fd(R1, p.allowed_map_fd);
    a.mov(R2, FP);
    a.add_imm(R2, EV.into());
    a.call_helper(HELPER_MAP_LOOKUP_ELEM);
    a.jump_if(Cond::Ne, R0, 0, allow);

    a.load(Size::B, R0, FP, EV);
    a.mov_imm(R9, reason::NOT_ALLOWED.into());
    a.jump_if(Cond::Ne, R0, 0, named_reason);
    a.mov_imm(R9, reason::ABSTRACT.into());
    a.bind(named_reason);
    a.store(Size::B, FP, EV + OFF_REASON, R9);
    a.store_imm(Size::B, FP, EV + OFF_HOOK, p.hook.into());
    a.call_helper(HELPER_GET_CURRENT_PID_TGID);
    a.store(Size::DW, FP, EV + OFF_PID_TGID, R0);
    a.mov(R1, FP);
    a.add_imm(R1, (EV + OFF_COMM).into());
    a.mov_imm(R2, 16);
    a.call_helper(HELPER_GET_CURRENT_COMM);
    a.map_fd(R1, p.denials_map_fd);
    a.mov(R2, FP);
    a.add_imm(R2, EV.into());
    a.mov_imm(R3, EVENT_SIZE.into());
    a.mov_imm(R4, 0);
    a.call_helper(HELPER_RINGBUF_OUTPUT);
    a.mov_imm(R0, 0);
    a.exit();

    a.bind(allow);
    a.mov_imm(R0, 1);
    a.exit();
    a.finish()
}

/// Copies the name from `sun_path` (R7 + `base`, length in R8) into the
/// zeroed key on the stack, unrolled: the verifier sees constant offsets.
fn copy_name(a: &mut Asm, base: i16, stop_at_nul: bool, done: super::insn::Label) {
    for i in 0..NAME_LEN as i16 {
        a.jump_if(Cond::Le, R8, i.into(), done);
        a.load(Size::B, R0, R7, base + i);
        if stop_at_nul {
            a.jump_if(Cond::Eq, R0, 0, done);
        }
        a.store(Size::B, FP, EV + i, R0);
    }
    a.jump(done);
}

/// The smallest program the unix hooks accept: lets everything through.
/// Loading it tells whether the kernel has the hooks at all.
pub fn allow_all() -> Vec<super::insn::Insn> {
    let mut a = Asm::default();
    a.mov_imm(R0, 1);
    a.exit();
    a.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_assembles_within_the_jump_range() {
        let layout = KernelLayout {
            cast_to_kern_ctx: 1,
            rdonly_cast: 2,
            sockaddr_un: 3,
            uaddr: 8,
            uaddrlen: 32,
            sun_path: 2,
        };
        let insns = filter(&Params {
            layout,
            allowed_map_fd: 3,
            denials_map_fd: 4,
            hook: 1,
            exempt_cgroup_id: u64::MAX,
        });
        // Two unrolled copies of the 108-byte name and some 60 more.
        assert!((800..900).contains(&insns.len()), "{}", insns.len());
    }

    #[test]
    fn the_event_is_what_the_program_writes() {
        assert_eq!(std::mem::size_of::<RawDenial>(), 144);
        assert_eq!(
            std::mem::offset_of!(RawDenial, pid_tgid),
            OFF_PID_TGID as usize
        );
        assert_eq!(std::mem::offset_of!(RawDenial, comm), OFF_COMM as usize);
        assert_eq!(std::mem::offset_of!(RawDenial, hook), OFF_HOOK as usize);
        assert_eq!(std::mem::offset_of!(RawDenial, reason), OFF_REASON as usize);
    }
}
