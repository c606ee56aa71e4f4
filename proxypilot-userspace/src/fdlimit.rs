//! proxypilot's open-files limit. Each relayed connection holds at least
//! two descriptors (client and upstream; more with HTTP/1.1 fan-out), so the
//! 1,024 soft limit most hosts start processes with takes the relay down
//! long before `--max-connections`. At start the soft limit is raised to
//! the hard one; `run` gives the command back the soft limit it inherited,
//! so the sandbox's environment is the caller's.

use std::sync::atomic::{AtomicU64, Ordering};

/// The soft limit proxypilot was started with; `u64::MAX` until recorded.
static INHERITED_SOFT: AtomicU64 = AtomicU64::new(u64::MAX);

/// What `raise_to_hard` found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    /// The soft limit proxypilot was started with.
    pub inherited_soft: u64,
    /// The soft limit now.
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (never fails: a
/// limit that cannot be raised is logged and kept).
pub fn raise_to_hard() -> FdLimit {
    let Some((soft, hard)) = get() else {
        return FdLimit {
            inherited_soft: 0,
            soft: 0,
            hard: 0,
        };
    };
    INHERITED_SOFT.store(soft, Ordering::Relaxed);
    let mut now = soft;
    if soft < hard {
        let lim = libc::rlimit {
            rlim_cur: hard,
            rlim_max: hard,
        };
        // SAFETY: setrlimit reads one rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
            now = hard;
        } else {
            let e = std::io::Error::last_os_error();
            tracing::warn!(soft, hard, error = %e, "could not raise the open-files limit; connections beyond it are refused");
        }
    }
    FdLimit {
        inherited_soft: soft,
        soft: now,
        hard,
    }
}

/// In a forked child, before exec: puts back the soft limit proxypilot
/// inherited. Async-signal-safe (two syscalls, no allocation).
pub fn restore_inherited_in_child() {
    let soft = INHERITED_SOFT.load(Ordering::Relaxed);
    if soft == u64::MAX {
        return;
    }
    if let Some((_, hard)) = get() {
        let lim = libc::rlimit {
            rlim_cur: soft.min(hard),
            rlim_max: hard,
        };
        // SAFETY: setrlimit reads one rlimit.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
}

/// The soft limit proxypilot was started with, if `raise_to_hard` ran.
pub fn inherited_soft() -> Option<u64> {
    let soft = INHERITED_SOFT.load(Ordering::Relaxed);
    (soft != u64::MAX).then_some(soft)
}

/// The current (soft, hard) limits.
pub fn get() -> Option<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0)
        .then_some((lim.rlim_cur, lim.rlim_max))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Never lowers the limit: the other unit tests share this process.
    // The e2e test in tests/e2e/run.rs starts proxypilot at 256.
    #[test]
    fn raises_the_soft_limit_to_the_hard_one_and_records_the_inherited_one() {
        let (before, hard) = get().unwrap();
        let got = raise_to_hard();
        assert_eq!(got.inherited_soft, before);
        assert_eq!((got.soft, got.hard), (hard, hard));
        assert_eq!(get(), Some((hard, hard)));
        assert_eq!(inherited_soft(), Some(before));
    }
}
