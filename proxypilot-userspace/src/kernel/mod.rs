//! The kernel half: the eBPF programs on the sandbox's cgroup, their maps,
//! and the cgroup and bpffs plumbing around them. The only module that
//! talks to aya.

pub mod attach;
pub mod bpffs;
pub mod cgroup;
pub mod denials;
pub mod origin;
pub mod policy;

pub use attach::{detach, Attachment};
pub use origin::OriginalDestination;
pub use policy::{AllowRule, KernelPolicy};
