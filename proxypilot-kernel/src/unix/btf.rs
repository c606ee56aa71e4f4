//! Just enough of the kernel's BTF (/sys/kernel/btf/vmlinux) to build the
//! unix program: the ids of two kfuncs and of `struct sockaddr_un`, and the
//! offsets of the fields it reads, taken from the running kernel rather
//! than assumed.

use anyhow::{bail, Context, Result};

pub const KIND_STRUCT: u32 = 4;
pub const KIND_FUNC: u32 = 12;

/// The parsed type section of one BTF blob.
pub struct Btf {
    data: Vec<u8>,
    types_at: usize,
    strings_at: usize,
    strings_len: usize,
    /// Per type id (index 0 is the void type): kind, name offset, and where
    /// its record starts in `data`.
    types: Vec<(u32, u32, usize)>,
}

impl Btf {
    /// The running kernel's BTF.
    pub fn vmlinux() -> Result<Btf> {
        let path = "/sys/kernel/btf/vmlinux";
        let data = std::fs::read(path)
            .with_context(|| format!("reading {path} (the kernel needs CONFIG_DEBUG_INFO_BTF)"))?;
        Btf::parse(data).with_context(|| format!("parsing {path}"))
    }

    fn parse(data: Vec<u8>) -> Result<Btf> {
        let u32_at = |off: usize| -> Result<u32> {
            let b = data.get(off..off + 4).context("truncated BTF")?;
            Ok(u32::from_ne_bytes(b.try_into().expect("4 bytes")))
        };
        if data.len() < 24 || u16::from_ne_bytes([data[0], data[1]]) != 0xeb9f {
            bail!("not BTF (bad magic)");
        }
        let hdr_len = u32_at(4)? as usize;
        let types_at = hdr_len + u32_at(8)? as usize;
        let types_end = types_at + u32_at(12)? as usize;
        let strings_at = hdr_len + u32_at(16)? as usize;
        let strings_len = u32_at(20)? as usize;
        if types_end > data.len() || strings_at + strings_len > data.len() {
            bail!("truncated BTF");
        }
        let mut types = vec![(0, 0, 0)];
        let mut at = types_at;
        while at < types_end {
            let name_off = u32_at(at)?;
            let info = u32_at(at + 4)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let extra = match kind {
                1 | 14 | 17 => 4,
                3 => 12,
                4 | 5 | 15 | 19 => 12 * vlen,
                6 | 13 => 8 * vlen,
                2 | 7..=12 | 16 | 18 => 0,
                other => bail!("unknown BTF kind {other}"),
            };
            types.push((kind, name_off, at));
            at += 12 + extra;
        }
        Ok(Btf {
            data,
            types_at,
            strings_at,
            strings_len,
            types,
        })
    }

    fn u32_at(&self, off: usize) -> u32 {
        u32::from_ne_bytes(self.data[off..off + 4].try_into().expect("4 bytes"))
    }

    fn name(&self, off: u32) -> &[u8] {
        let start = self.strings_at + off as usize;
        let end = self.strings_at + self.strings_len;
        let s = &self.data[start.min(end)..end];
        &s[..s.iter().position(|&b| b == 0).unwrap_or(s.len())]
    }

    /// The id of the type of `kind` named `name`.
    pub fn id(&self, kind: u32, name: &str) -> Option<u32> {
        self.types
            .iter()
            .position(|&(k, n, _)| k == kind && self.name(n) == name.as_bytes())
            .map(|i| i as u32)
    }

    /// The byte offset of `member` in `struct name`.
    pub fn member_offset(&self, name: &str, member: &str) -> Option<u32> {
        let (_, _, at) = self.types[self.id(KIND_STRUCT, name)? as usize];
        debug_assert!(at >= self.types_at);
        let info = self.u32_at(at + 4);
        let bitfields = info >> 31 == 1;
        (0..(info & 0xffff) as usize).find_map(|i| {
            let m = at + 12 + 12 * i;
            if self.name(self.u32_at(m)) != member.as_bytes() {
                return None;
            }
            let bits = self.u32_at(m + 8);
            let bits = if bitfields { bits & 0xff_ffff } else { bits };
            (bits % 8 == 0).then_some(bits / 8)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_what_the_unix_program_needs_in_this_kernel() {
        let Ok(btf) = Btf::vmlinux() else {
            eprintln!("no kernel BTF here; skipped");
            return;
        };
        assert!(btf.id(KIND_FUNC, "bpf_cast_to_kern_ctx").is_some());
        assert!(btf.id(KIND_STRUCT, "sockaddr_un").is_some());
        assert_eq!(btf.member_offset("sockaddr_un", "sun_path"), Some(2));
        assert_eq!(btf.member_offset("bpf_sock_addr_kern", "sk"), Some(0));
        assert!(btf.member_offset("bpf_sock_addr_kern", "nope").is_none());
    }
}
