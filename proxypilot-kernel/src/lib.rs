//! The kernel half: the eBPF programs on the sandbox's cgroup, their maps,
//! the raw unix-socket filter, and the cgroup and bpffs plumbing around
//! them. The only crate that talks to aya or loads BPF; it knows nothing of
//! TLS, the relay or the tokenizer.
//!
//! - [`attach`]: load the embedded object (built by this crate's build.rs),
//!   attach every program to one cgroup, pin the links; [`bpffs`]: the pins.
//! - [`policy`]: the allow list and listeners, written to the maps.
//! - [`denials`]: what the programs refused, read from their ring buffer.
//! - [`unix`]: the unix-socket filter (raw BPF, Linux 6.7+).
//! - [`cgroup`]: cgroup v2 paths, ids and the cgroups `run` creates.
//! - [`doctor`]: can this host run the programs at all?

pub mod attach;
pub mod bpffs;
pub mod cgroup;
pub mod denials;
pub mod doctor;
pub mod policy;
mod raw_bpf;
pub mod unix;

/// The original destination type lives in proxypilot-common, so that the
/// relay, which only reads it, does not depend on the loader.
pub use proxypilot_common::origin;

pub use attach::{detach, Attachment, PacketDrops};
pub use origin::OriginalDestination;
pub use policy::{AllowRule, DnsResolver, KernelPolicy};
pub use unix::UnixPath;
