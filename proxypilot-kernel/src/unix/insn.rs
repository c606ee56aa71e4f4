//! A small assembler for eBPF instructions: just the opcodes the unix
//! program uses, and labels so its jumps need no hand-counted offsets.

/// One `struct bpf_insn`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    code: u8,
    /// dst in the low nibble, src in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

pub type Reg = u8;
pub const R0: Reg = 0;
pub const R1: Reg = 1;
pub const R2: Reg = 2;
pub const R3: Reg = 3;
pub const R4: Reg = 4;
pub const R6: Reg = 6;
pub const R7: Reg = 7;
pub const R8: Reg = 8;
pub const R9: Reg = 9;
/// The read-only frame pointer; the stack is the 512 bytes below it.
pub const FP: Reg = 10;

/// Load and store widths.
#[derive(Clone, Copy)]
pub enum Size {
    B = 0x10,
    W = 0x00,
    DW = 0x18,
}

/// Conditional jumps (against an immediate).
#[derive(Clone, Copy)]
pub enum Cond {
    Eq = 0x10,
    Ne = 0x50,
    /// Unsigned <=.
    Le = 0xb0,
}

const LDX_MEM: u8 = 0x01 | 0x60;
const ST_MEM: u8 = 0x02 | 0x60;
const STX_MEM: u8 = 0x03 | 0x60;
const ALU64_MOV_K: u8 = 0xb7;
const ALU64_MOV_X: u8 = 0xbf;
const ALU64_ADD_K: u8 = 0x07;
const LD_IMM64: u8 = 0x18;
const JA: u8 = 0x05;
/// Compare against a register rather than the immediate.
const JMP_X: u8 = 0x08;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
/// `src_reg` of an ld_imm64 whose immediate is a map fd.
const PSEUDO_MAP_FD: u8 = 1;
/// `src_reg` of a call whose immediate is a kfunc's BTF id in vmlinux.
const PSEUDO_KFUNC_CALL: u8 = 2;

fn insn(code: u8, dst: Reg, src: Reg, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

/// A jump target, bound to a position with [`Asm::bind`].
#[derive(Clone, Copy)]
pub struct Label(usize);

/// Builds a program; jumps name labels and are resolved by [`Asm::finish`].
#[derive(Default)]
pub struct Asm {
    insns: Vec<Insn>,
    labels: Vec<Option<usize>>,
    jumps: Vec<(usize, Label)>,
}

impl Asm {
    pub fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    pub fn bind(&mut self, l: Label) {
        self.labels[l.0] = Some(self.insns.len());
    }

    pub fn mov_imm(&mut self, dst: Reg, imm: i32) {
        self.insns.push(insn(ALU64_MOV_K, dst, 0, 0, imm));
    }

    pub fn mov(&mut self, dst: Reg, src: Reg) {
        self.insns.push(insn(ALU64_MOV_X, dst, src, 0, 0));
    }

    pub fn add_imm(&mut self, dst: Reg, imm: i32) {
        self.insns.push(insn(ALU64_ADD_K, dst, 0, 0, imm));
    }

    /// `dst = *(size *)(src + off)`
    pub fn load(&mut self, size: Size, dst: Reg, src: Reg, off: i16) {
        self.insns
            .push(insn(LDX_MEM | size as u8, dst, src, off, 0));
    }

    /// `*(size *)(dst + off) = src`
    pub fn store(&mut self, size: Size, dst: Reg, off: i16, src: Reg) {
        self.insns
            .push(insn(STX_MEM | size as u8, dst, src, off, 0));
    }

    /// `*(size *)(dst + off) = imm`
    pub fn store_imm(&mut self, size: Size, dst: Reg, off: i16, imm: i32) {
        self.insns.push(insn(ST_MEM | size as u8, dst, 0, off, imm));
    }

    /// `dst = imm` for a full 64-bit immediate (two instruction slots).
    pub fn mov_imm64(&mut self, dst: Reg, imm: u64) {
        self.insns
            .push(insn(LD_IMM64, dst, 0, 0, imm as u32 as i32));
        self.insns.push(insn(0, 0, 0, 0, (imm >> 32) as u32 as i32));
    }

    /// `dst = &map` for the map whose fd is `fd`.
    pub fn map_fd(&mut self, dst: Reg, fd: i32) {
        self.insns.push(insn(LD_IMM64, dst, PSEUDO_MAP_FD, 0, fd));
        self.insns.push(insn(0, 0, 0, 0, 0));
    }

    pub fn call_helper(&mut self, id: i32) {
        self.insns.push(insn(CALL, 0, 0, 0, id));
    }

    pub fn call_kfunc(&mut self, btf_id: u32) {
        self.insns
            .push(insn(CALL, 0, PSEUDO_KFUNC_CALL, 0, btf_id as i32));
    }

    pub fn jump(&mut self, to: Label) {
        self.jumps.push((self.insns.len(), to));
        self.insns.push(insn(JA, 0, 0, 0, 0));
    }

    /// `if reg <cond> imm goto to`
    pub fn jump_if(&mut self, cond: Cond, reg: Reg, imm: i32, to: Label) {
        self.jumps.push((self.insns.len(), to));
        self.insns.push(insn(JA | cond as u8, reg, 0, 0, imm));
    }

    /// `if a <cond> b goto to`
    pub fn jump_if_reg(&mut self, cond: Cond, a: Reg, b: Reg, to: Label) {
        self.jumps.push((self.insns.len(), to));
        self.insns.push(insn(JA | cond as u8 | JMP_X, a, b, 0, 0));
    }

    pub fn exit(&mut self) {
        self.insns.push(insn(EXIT, 0, 0, 0, 0));
    }

    /// The instructions, every jump resolved. Panics on an unbound label or
    /// a jump too far for 16 bits (programming errors, caught by the tests).
    pub fn finish(mut self) -> Vec<Insn> {
        for (at, label) in std::mem::take(&mut self.jumps) {
            let target = self.labels[label.0].expect("jump to an unbound label");
            let off = target as isize - at as isize - 1;
            self.insns[at].off = i16::try_from(off).expect("jump offset fits 16 bits");
        }
        self.insns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_like_the_kernel_headers() {
        let mut a = Asm::default();
        let end = a.label();
        a.mov_imm(R0, 1); // BPF_MOV64_IMM(BPF_REG_0, 1)
        a.jump_if(Cond::Eq, R1, 0, end); // BPF_JMP_IMM(BPF_JEQ, R1, 0, +1)
        a.load(Size::B, R2, FP, -8); // BPF_LDX_MEM(BPF_B, R2, R10, -8)
        a.bind(end);
        a.exit();
        let p = a.finish();
        assert_eq!(
            p[0],
            Insn {
                code: 0xb7,
                regs: 0x00,
                off: 0,
                imm: 1
            }
        );
        assert_eq!(
            p[1],
            Insn {
                code: 0x15,
                regs: 0x01,
                off: 1,
                imm: 0
            }
        );
        assert_eq!(
            p[2],
            Insn {
                code: 0x71,
                regs: 0xa2,
                off: -8,
                imm: 0
            }
        );
        assert_eq!(
            p[3],
            Insn {
                code: 0x95,
                regs: 0,
                off: 0,
                imm: 0
            }
        );
    }
}
