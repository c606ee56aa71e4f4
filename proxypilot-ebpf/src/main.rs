//! proxypilot's kernel programs, attached to a sandbox's cgroup v2.
//!
//! * `connect4` / `connect6` decide every TCP and UDP connect: intercepted TCP
//!   ports are rewritten to the proxy's listener (the original destination is
//!   recorded by socket cookie), allowed destinations pass, the rest get EPERM.
//! * `sock_ops` re-keys that record by the client's local address once the
//!   ephemeral port is chosen, so the proxy can find it from `accept()`, and
//!   forgets both records when the socket closes.
//! * `getpeername4` / `getpeername6` show the client its original peer.
//! * `sendmsg4` / `sendmsg6` apply the UDP policy to unconnected sends.
//! * `sock_create` and `setsockopt` (programs/refusals.rs) refuse sockets
//!   other than TCP and UDP, and the options that reroute packets.
//! * `packet_egress` / `packet_ingress` (programs/backstop.rs) apply the same
//!   allowlist to every packet, and count what they drop.
//!
//! Each hook is a thin wrapper around a `try_*` function; the policy itself is
//! in `decide`, shared by all address hooks.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("proxypilot-ebpf is built for the bpfel-unknown-none target by proxypilot-kernel's build script");
}
