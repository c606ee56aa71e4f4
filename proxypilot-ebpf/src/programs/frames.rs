//! The interface guard: a tc egress program on each interface of the
//! sandbox's network namespace that drops frames sent by the sandbox's
//! packet sockets (AF_PACKET). Those frames never pass the IP output path,
//! so neither `sock_create` (inet only) nor the cgroup_skb backstop sees
//! them; a sandbox holding CAP_NET_RAW (root in a Docker container) could
//! otherwise send anything anywhere. Frames of inet sockets pass here: the
//! cgroup programs decided them already.

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::generated::{bpf_sk_fullsock, bpf_skb_ancestor_cgroup_id},
    macros::classifier,
    programs::TcContext,
};
use proxypilot_common::{drop_slot, DenyReason, Hook, Origin};

use super::{backstop::count_drop, AF_INET, AF_INET6, FRAME_GUARD};

/// cgroup v2 depth searched for the sandbox among a socket's ancestors.
const MAX_LEVEL: i32 = 32;

#[classifier]
pub fn frame_guard(ctx: TcContext) -> i32 {
    let Some(&sandbox) = FRAME_GUARD.get(0) else {
        return TC_ACT_OK as i32;
    };
    if sandbox == 0 {
        return TC_ACT_OK as i32;
    }
    let skb = ctx.skb.skb;
    // SAFETY: `sk` is readable in tc programs; it may be null.
    let sk = unsafe { read_volatile(addr_of!((*skb).__bindgen_anon_2.sk)) };
    if sk.is_null() {
        return TC_ACT_OK as i32;
    }
    // SAFETY: a socket pointer from the ctx, checked for null.
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        return TC_ACT_OK as i32;
    }
    // SAFETY: a full socket returned by the helper.
    let family = unsafe { read_volatile(addr_of!((*full).family)) };
    if family == u32::from(AF_INET) || family == u32::from(AF_INET6) {
        return TC_ACT_OK as i32;
    }
    // The sandbox's own level is not known here (cgroup namespaces hide
    // it from user space): look for it among all the ancestors.
    let mut in_sandbox = false;
    for level in 0..MAX_LEVEL {
        // SAFETY: a tc ctx.
        in_sandbox |= unsafe { bpf_skb_ancestor_cgroup_id(skb.cast(), level) } == sandbox;
    }
    if !in_sandbox {
        return TC_ACT_OK as i32;
    }
    let origin = Origin {
        addr: [0; 4],
        port: 0,
        family: family as u16,
        tgid: 0,
        tid: 0,
        uid: ctx.get_socket_uid(),
        cgroup_id: sandbox,
        comm: [0; 16],
    };
    count_drop(
        drop_slot::FRAMES,
        &origin,
        0,
        Hook::Frame,
        DenyReason::FrameSocket,
    );
    TC_ACT_SHOT as i32
}
