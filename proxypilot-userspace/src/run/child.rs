//! Starting the sandboxed command and waiting for it.
//!
//! Before it execs, the forked child, still root on the host: marks every
//! inherited fd above 2 close-on-exec; joins the sandbox cgroup (so nothing
//! it does is unfiltered, and it must happen while it may still write
//! cgroup.procs); starts its own session, with the pty slave as its
//! controlling terminal when there is one; drops root's groups; then
//! becomes its [`Identity`]: either unshares a user namespace whose maps
//! proxypilot writes (0 → the fresh uid/gid) and becomes its root, or
//! drops the capability bounding set and setuids to the `--user`. Then
//! `no_new_privs`, so setuid binaries and file capabilities give nothing.
//! With a pty, last, it splits into a monitor (the session leader) and the
//! command (a job of its own), so that Ctrl-Z works.

use std::{
    ffi::{CString, OsString},
    fs,
    io::{self, Read, Write},
    os::{fd::AsRawFd, unix::ffi::OsStrExt, unix::process::CommandExt},
    path::Path,
    process::Command,
};

use anyhow::{bail, Context, Result};
use nix::{
    sys::wait::{waitpid, WaitPidFlag, WaitStatus},
    unistd::Pid,
};
use tokio::signal::unix::{signal, Signal, SignalKind};

use super::{identity::Identity, terminal};

/// What the command is and how it starts.
pub struct Spawn<'a> {
    pub program: &'a OsString,
    pub args: &'a [OsString],
    pub env: Vec<(OsString, OsString)>,
    pub cgroup: &'a Path,
    pub identity: &'a Identity,
    pub pty: Option<&'a terminal::Pty>,
}

/// The identity, as plain numbers the forked child can use.
enum Become {
    Fresh {
        /// Child → proxypilot: "my pid; I unshared". Then proxypilot → child:
        /// "your maps are written".
        report: libc::c_int,
        go: libc::c_int,
        /// proxypilot's ends, which the child must not hold.
        parent_ends: [libc::c_int; 2],
    },
    User {
        uid: libc::uid_t,
        gid: libc::gid_t,
        groups: Vec<libc::gid_t>,
        last_cap: libc::c_int,
    },
}

/// Starts the command; returns its pid. Everything the forked child does
/// before exec is async-signal-safe: the data is prepared here.
pub fn spawn(s: Spawn<'_>) -> Result<Pid> {
    let procs = CString::new(s.cgroup.join("cgroup.procs").as_os_str().as_bytes())
        .context("cgroup path")?;
    let ctty = s.pty.map(|p| p.slave_fd());
    let mut cmd = Command::new(s.program);
    cmd.args(s.args).env_clear().envs(s.env);
    if let Some(pty) = s.pty {
        cmd.stdin(pty.stdio_for(0)?)
            .stdout(pty.stdio_for(1)?)
            .stderr(pty.stdio_for(2)?);
    }

    let mut mapper = None;
    let become_ = match s.identity {
        Identity::Fresh { uid, gid } => {
            let (report_r, report_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
            let (go_r, go_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
            let become_ = Become::Fresh {
                report: report_w.as_raw_fd(),
                go: go_r.as_raw_fd(),
                parent_ends: [report_r.as_raw_fd(), go_w.as_raw_fd()],
            };
            let (uid, gid) = (*uid, *gid);
            let thread = std::thread::Builder::new()
                .name("proxypilot-userns".into())
                .spawn(move || write_id_maps(report_r, go_w, uid, gid))?;
            // Our copies of the child's ends close after the spawn.
            mapper = Some((thread, report_w, go_r));
            become_
        }
        Identity::User(r) => Become::User {
            uid: r.uid.as_raw(),
            gid: r.gid.as_raw(),
            groups: r.groups.iter().map(|g| g.as_raw()).collect(),
            last_cap: last_capability(),
        },
    };

    // SAFETY: the closure only calls async-signal-safe libc functions on
    // data prepared before fork, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            mark_inherited_fds_cloexec();
            crate::fdlimit::restore_inherited_in_child();
            join_cgroup(&procs)?;
            check(libc::setsid())?;
            if let Some(fd) = ctty {
                check(libc::ioctl(fd, libc::TIOCSCTTY, 0))?;
            }
            match &become_ {
                Become::Fresh {
                    report,
                    go,
                    parent_ends,
                } => {
                    for fd in parent_ends {
                        libc::close(*fd);
                    }
                    check(libc::setgroups(0, std::ptr::null()))?;
                    check(libc::unshare(libc::CLONE_NEWUSER))?;
                    let pid = libc::getpid().to_ne_bytes();
                    if libc::write(*report, pid.as_ptr().cast(), pid.len()) != pid.len() as isize {
                        return Err(io::Error::last_os_error());
                    }
                    let mut ok = [0u8; 1];
                    if libc::read(*go, ok.as_mut_ptr().cast(), 1) != 1 {
                        // proxypilot could not write the maps (it says why).
                        return Err(io::Error::from_raw_os_error(libc::EPERM));
                    }
                    // Root of the new namespace: uid/gid 0 there, the fresh
                    // ids on the host.
                    check(libc::setresgid(0, 0, 0))?;
                    check(libc::setresuid(0, 0, 0))?;
                }
                Become::User {
                    uid,
                    gid,
                    groups,
                    last_cap,
                } => {
                    for cap in 0..=*last_cap {
                        libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
                    }
                    check(libc::setgroups(groups.len(), groups.as_ptr()))?;
                    check(libc::setresgid(*gid, *gid, *gid))?;
                    // From root to a non-root uid: permitted, effective and
                    // ambient capabilities are cleared (no KEEPCAPS).
                    check(libc::setresuid(*uid, *uid, *uid))?;
                }
            }
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
            if let Some(tty) = ctty {
                become_job_under_a_monitor(tty)?;
            }
            Ok(())
        });
    }
    let spawned = cmd.spawn();
    let reached_userns = match mapper {
        Some((thread, report_w, go_r)) => {
            drop((report_w, go_r));
            thread
                .join()
                .expect("the user namespace thread panicked")
                .context("setting up the command's user namespace")?
        }
        None => true,
    };
    let name = s.program.to_string_lossy();
    let child = match spawned {
        Ok(child) => child,
        Err(e) if !reached_userns => bail!(
            "starting {name}: {e}, before it had its user namespace. If user namespaces \
             are disabled here (sysctl user.max_user_namespaces), run it with --user and \
             an account nothing else runs as"
        ),
        Err(e) => return Err(e).with_context(|| format!("starting {name}")),
    };
    Ok(Pid::from_raw(child.id() as i32))
}

/// Proxypilot's half of the user namespace hand-shake: waits for the
/// child's pid, maps 0 to the fresh uid and gid in its new namespace (only
/// a process privileged in the parent namespace may map another uid), and
/// tells it to go on. False when an EOF came instead of a pid: the child
/// failed before it had its namespace (the spawn reports why).
fn write_id_maps(
    report: std::os::fd::OwnedFd,
    go: std::os::fd::OwnedFd,
    uid: u32,
    gid: u32,
) -> Result<bool> {
    let mut pid = [0u8; 4];
    if fs::File::from(report).read_exact(&mut pid).is_err() {
        return Ok(false);
    }
    let pid = i32::from_ne_bytes(pid);
    let proc = Path::new("/proc").join(pid.to_string());
    fs::write(proc.join("uid_map"), format!("0 {uid} 1\n"))
        .with_context(|| format!("writing /proc/{pid}/uid_map"))?;
    fs::write(proc.join("gid_map"), format!("0 {gid} 1\n"))
        .with_context(|| format!("writing /proc/{pid}/gid_map"))?;
    fs::File::from(go).write_all(b"1")?;
    Ok(true)
}

/// With a terminal, the command must not be its session's leader: the
/// leader's process group is orphaned, and the kernel ignores Ctrl-Z for
/// it. So the forked child splits in two, like `sudo`'s monitor: this
/// process stays as the session leader (in the sandbox, as its identity)
/// and only waits, and the command runs in a process group of its own,
/// the terminal's foreground. The monitor stops itself when the command
/// stops, so proxypilot sees it (and waits for SIGCONT), and exits with
/// the command's status. Returns in the command's process only.
unsafe fn become_job_under_a_monitor(tty: libc::c_int) -> io::Result<()> {
    let mut all: libc::sigset_t = std::mem::zeroed();
    libc::sigfillset(&mut all);
    // Blocked until the command has the terminal (and for good in the
    // monitor): no signal may kill one half before the other is set up.
    libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
    let command = libc::fork();
    if command < 0 {
        return Err(io::Error::last_os_error());
    }
    if command == 0 {
        check(libc::setpgid(0, 0))?;
        // From a background group: allowed while SIGTTOU is blocked.
        check(libc::tcsetpgrp(tty, libc::getpid()))?;
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        return Ok(());
    }
    // The monitor holds nothing of proxypilot's, so the spawn sees the
    // command's exec (or its failure) alone.
    libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
    libc::setpgid(command, command);
    loop {
        let mut status = 0;
        if libc::waitpid(command, &mut status, libc::WUNTRACED) < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            libc::_exit(1);
        }
        if libc::WIFSTOPPED(status) {
            libc::kill(libc::getpid(), libc::SIGSTOP);
            libc::kill(-command, libc::SIGCONT);
        } else if libc::WIFEXITED(status) {
            libc::_exit(libc::WEXITSTATUS(status));
        } else if libc::WIFSIGNALED(status) {
            libc::_exit(128 + libc::WTERMSIG(status));
        }
    }
}

/// The highest capability number this kernel knows.
fn last_capability() -> libc::c_int {
    fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
}

/// Fds proxypilot inherited without close-on-exec (from whoever started
/// it) must not reach the command: one could be the caller's terminal.
unsafe fn mark_inherited_fds_cloexec() {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC) == 0 {
        return;
    }
    // Kernels before 5.11.
    for fd in 3..4096 {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
        }
    }
}

fn join_cgroup(procs: &CString) -> io::Result<()> {
    // SAFETY: a NUL-terminated path; open/write/close are signal-safe.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // "0" moves the writing process.
        let n = libc::write(fd, b"0".as_ptr().cast(), 1);
        let err = io::Error::last_os_error();
        libc::close(fd);
        if n != 1 {
            return Err(err);
        }
    }
    Ok(())
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The signals proxypilot watches while the command runs; made before the
/// spawn so that no SIGCHLD is missed.
pub struct Waiter {
    chld: Signal,
    int: Signal,
    term: Signal,
    hup: Signal,
    quit: Signal,
    winch: Signal,
}

impl Waiter {
    pub fn new() -> Result<Waiter> {
        Ok(Waiter {
            chld: signal(SignalKind::child())?,
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
            quit: signal(SignalKind::quit())?,
            winch: signal(SignalKind::window_change())?,
        })
    }

    /// Waits for the command to end and returns its exit code (128 + N
    /// when signal N killed it). SIGINT, SIGTERM, SIGHUP and SIGQUIT are
    /// passed on to its process group. With a pty, window size changes are
    /// copied to it, and when the command stops (Ctrl-Z), proxypilot stops
    /// too, giving the caller its terminal back until it is continued.
    pub async fn wait(mut self, pid: Pid, mut relay: Option<&mut terminal::Relay>) -> Result<u8> {
        loop {
            // The child may have changed state before we got here.
            match waitpid(pid, Some(WaitPidFlag::WNOHANG | WaitPidFlag::WUNTRACED))
                .context("waiting for the command")?
            {
                WaitStatus::Exited(_, code) => return Ok(code as u8),
                WaitStatus::Signaled(_, sig, _) => return Ok((128 + sig as i32) as u8),
                WaitStatus::Stopped(..) => {
                    if let Some(r) = relay.as_deref_mut() {
                        tracing::debug!("the command stopped; stopping too");
                        r.suspend();
                        // Default action: stop (ignored in an orphaned
                        // process group, so nothing hangs without job control).
                        let _ = nix::sys::signal::raise(nix::sys::signal::SIGTSTP);
                        r.resume();
                        tracing::debug!("continued; continuing the command");
                        // The monitor continues the command.
                        let _ = nix::sys::signal::kill(pid, nix::sys::signal::SIGCONT);
                    }
                }
                _ => {}
            }
            let sig = tokio::select! {
                _ = self.chld.recv() => continue,
                _ = self.winch.recv() => {
                    if let Some(r) = relay.as_deref() {
                        r.copy_window_size();
                    }
                    continue;
                }
                _ = self.int.recv() => nix::sys::signal::SIGINT,
                _ = self.term.recv() => nix::sys::signal::SIGTERM,
                _ = self.hup.recv() => nix::sys::signal::SIGHUP,
                _ = self.quit.recv() => nix::sys::signal::SIGQUIT,
            };
            // With a pty the command is its foreground group (`pid` is
            // its monitor); without, its own session's group.
            let group = relay
                .as_deref()
                .and_then(terminal::Relay::foreground_group)
                .unwrap_or(pid);
            tracing::debug!(signal = %sig, "passing the signal on to the command");
            let group = Pid::from_raw(-group.as_raw());
            let _ = nix::sys::signal::kill(group, sig);
            if matches!(sig, nix::sys::signal::SIGTERM | nix::sys::signal::SIGHUP) {
                // A stopped command would only see it once continued.
                let _ = nix::sys::signal::kill(group, nix::sys::signal::SIGCONT);
            }
        }
    }
}
