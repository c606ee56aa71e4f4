//! Builds the eBPF object (proxypilot-ebpf) for the bpf target and leaves it
//! in OUT_DIR, where `attach.rs` embeds it with `include_bytes_aligned!`.
//!
//! The toolchain is the one that can build for bpf offline: Debian's
//! rustc-web in /usr (precompiled `core` for bpfel). Set
//! `PROXYPILOT_EBPF_TOOLCHAIN=nightly` on a machine with rustup nightly and
//! rust-src instead.
use std::env;

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=PROXYPILOT_EBPF_TOOLCHAIN");
    // User-space-only builds that never load the programs (the fuzz
    // targets in tests/fuzz/, see run-quick.sh) set this to skip the eBPF
    // build and its toolchain: `kernel::attach` then embeds an empty object
    // and cannot attach anything.
    println!("cargo:rerun-if-env-changed=PROXYPILOT_EBPF_PLACEHOLDER");
    if env::var_os("PROXYPILOT_EBPF_PLACEHOLDER").is_some_and(|v| v == "1") {
        let out = std::path::PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
        std::fs::write(out.join("proxypilot-programs"), [])?;
        println!("cargo:warning=PROXYPILOT_EBPF_PLACEHOLDER=1: eBPF programs not built (empty placeholder)");
        return Ok(());
    }
    let toolchain = env::var("PROXYPILOT_EBPF_TOOLCHAIN").unwrap_or_else(|_| "/usr".to_string());
    let package = aya_build::Package {
        name: "proxypilot-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../proxypilot-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(&toolchain)).map_err(|e| {
        anyhow::anyhow!(
            "building the eBPF programs failed: {e:#}\n\
             hint: run `cargo xtask setup` once (it installs Debian's rustc-web, \
             libstd-rust-web-dev-bpf and bpf-linker)"
        )
    })
}
