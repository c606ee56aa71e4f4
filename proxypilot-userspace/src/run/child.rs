//! Starting the sandboxed command: it joins the sandbox cgroup before it
//! execs (so nothing it does is unfiltered), gets its own process group
//! (the terminal's foreground one when there is a terminal, so Ctrl-C goes
//! to it), and drops privileges when asked. Signals proxypilot receives are
//! passed on to it.

use std::{
    ffi::{CString, OsString},
    io,
    os::unix::ffi::OsStrExt,
    path::Path,
    process::ExitStatus,
};

use anyhow::{Context, Result};
use nix::unistd::{Gid, Uid, User};
use tokio::{
    process::{Child, Command},
    signal::unix::{signal, SignalKind},
};

/// Who the command runs as, resolved before anything starts.
#[derive(Clone, Debug)]
pub struct RunAs {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
    pub groups: Vec<Gid>,
    pub home: std::path::PathBuf,
}

impl RunAs {
    pub fn lookup(name: &str) -> Result<RunAs> {
        let user = User::from_name(name)
            .with_context(|| format!("looking up user {name}"))?
            .ok_or_else(|| anyhow::anyhow!("--user {name}: no such user"))?;
        let cname = CString::new(name).context("user name")?;
        let groups = nix::unistd::getgrouplist(&cname, user.gid)
            .with_context(|| format!("reading the groups of {name}"))?;
        Ok(RunAs {
            name: name.to_string(),
            uid: user.uid,
            gid: user.gid,
            groups,
            home: user.dir,
        })
    }
}

/// What the command is and how it starts.
pub struct Spawn<'a> {
    pub program: &'a OsString,
    pub args: &'a [OsString],
    pub env: Vec<(OsString, OsString)>,
    pub cgroup: &'a Path,
    pub run_as: Option<&'a RunAs>,
}

/// Starts the command. Everything the forked child does before exec is
/// async-signal-safe: the strings are prepared here, in the parent.
pub fn spawn(s: Spawn<'_>) -> Result<Child> {
    let procs = CString::new(s.cgroup.join("cgroup.procs").as_os_str().as_bytes())
        .context("cgroup path")?;
    let creds = s.run_as.map(|r| {
        let groups: Vec<libc::gid_t> = r.groups.iter().map(|g| g.as_raw()).collect();
        (r.uid.as_raw(), r.gid.as_raw(), groups)
    });
    let foreground = nix::unistd::isatty(0).unwrap_or(false);

    let mut cmd = Command::new(s.program);
    cmd.args(s.args).env_clear().envs(s.env).kill_on_drop(false);
    // SAFETY: the closure only calls async-signal-safe libc functions on
    // data prepared before fork, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            join_cgroup(&procs)?;
            check(libc::setpgid(0, 0))?;
            if foreground {
                // A background group may not take the terminal unless
                // SIGTTOU is ignored while it does.
                libc::signal(libc::SIGTTOU, libc::SIG_IGN);
                libc::tcsetpgrp(0, libc::getpid());
                libc::signal(libc::SIGTTOU, libc::SIG_DFL);
            }
            if let Some((uid, gid, groups)) = &creds {
                check(libc::setgroups(groups.len(), groups.as_ptr()))?;
                check(libc::setgid(*gid))?;
                check(libc::setuid(*uid))?;
            }
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("starting {}", s.program.to_string_lossy()))
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

/// Waits for the child, passing SIGINT, SIGTERM, SIGHUP and SIGQUIT on to
/// its process group.
pub async fn wait_forwarding_signals(child: &mut Child) -> Result<ExitStatus> {
    let pgid = child.id().map(|p| p as i32);
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut quit = signal(SignalKind::quit())?;
    loop {
        let sig = tokio::select! {
            status = child.wait() => return Ok(status?),
            _ = int.recv() => libc::SIGINT,
            _ = term.recv() => libc::SIGTERM,
            _ = hup.recv() => libc::SIGHUP,
            _ = quit.recv() => libc::SIGQUIT,
        };
        if let Some(pgid) = pgid {
            tracing::debug!(signal = sig, "passing the signal on to the command");
            // SAFETY: kill(2) on the child's process group.
            unsafe { libc::kill(-pgid, sig) };
        }
    }
}

/// Gives the terminal back to proxypilot's own process group.
pub fn reclaim_terminal() {
    if nix::unistd::isatty(0).unwrap_or(false) {
        // SAFETY: plain libc calls on fd 0 and signal dispositions.
        unsafe {
            libc::signal(libc::SIGTTOU, libc::SIG_IGN);
            libc::tcsetpgrp(0, libc::getpgrp());
            libc::signal(libc::SIGTTOU, libc::SIG_DFL);
        }
    }
}

/// The shell convention: the exit code, or 128 + the signal that killed it.
pub fn exit_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => c as u8,
        (None, Some(s)) => (128 + s) as u8,
        _ => 1,
    }
}
