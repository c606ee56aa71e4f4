//! The command's own pseudo-terminal, as `sudo` (use_pty) and `ssh -t` do
//! it. The command never holds a file descriptor of the caller's terminal,
//! so it cannot push input into it (TIOCSTI), change its settings, or read
//! what the caller types after it exits.
//!
//! When any of proxypilot's stdin, stdout or stderr is a terminal, those
//! become the slave of a new pty for the command (the others are passed as
//! they are), and the slave is its controlling terminal. A thread relays
//! bytes between the caller's terminal and the master; the caller's
//! terminal is in raw mode meanwhile, so Ctrl-C and Ctrl-Z reach the pty
//! as bytes and its line discipline signals the command.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd},
    process::Stdio,
    sync::Arc,
    thread::JoinHandle,
};

use anyhow::{Context, Result};
use nix::sys::termios::{self, SetArg, Termios};

/// An allocated pty, before the command starts.
pub struct Pty {
    master: Arc<OwnedFd>,
    slave: OwnedFd,
    /// Which of the caller's fds 0, 1 and 2 are terminals.
    on_terminal: [bool; 3],
}

fn is_tty(fd: RawFd) -> bool {
    // SAFETY: isatty on a small fd number is harmless.
    unsafe { libc::isatty(fd) == 1 }
}

impl Pty {
    /// A pty with the caller terminal's settings and size, its slave owned
    /// by `owner_uid`; `None` when none of fds 0-2 is a terminal.
    pub fn open_if_terminal(owner_uid: u32) -> Result<Option<Pty>> {
        let on_terminal = [is_tty(0), is_tty(1), is_tty(2)];
        let Some(tty) = on_terminal.iter().position(|t| *t) else {
            return Ok(None);
        };
        // SAFETY: fd `tty` is open (isatty said so) for our whole life.
        let tty = unsafe { BorrowedFd::borrow_raw(tty as RawFd) };
        let settings = termios::tcgetattr(tty).ok();
        let size = window_size(tty.as_raw_fd());
        let pty = nix::pty::openpty(size.as_ref(), settings.as_ref())
            .context("allocating a pseudo-terminal for the command")?;
        for fd in [&pty.master, &pty.slave] {
            set_fd_flag(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC)?;
        }
        // The command may open its terminal by name (ssh, gpg, `tty`).
        nix::unistd::fchown(
            pty.slave.as_raw_fd(),
            Some(nix::unistd::Uid::from_raw(owner_uid)),
            None,
        )
        .context("giving the pseudo-terminal to the command's uid")?;
        Ok(Some(Pty {
            master: Arc::new(pty.master),
            slave: pty.slave,
            on_terminal,
        }))
    }

    /// What the command gets as fd `fd` (0-2): the slave in place of a
    /// terminal, the caller's own fd otherwise.
    pub fn stdio_for(&self, fd: usize) -> Result<Stdio> {
        Ok(if self.on_terminal[fd] {
            Stdio::from(self.slave.try_clone()?)
        } else {
            Stdio::inherit()
        })
    }

    /// The slave, to make it the command's controlling terminal.
    pub fn slave_fd(&self) -> RawFd {
        self.slave.as_raw_fd()
    }

    /// Starts relaying, once the command holds the slave. Dropping our
    /// slave lets the master see the command's side close.
    pub fn start_relay(self) -> Result<Relay> {
        let Pty {
            master,
            slave,
            on_terminal,
        } = self;
        drop(slave);
        // Typed input is relayed only when stdin is the terminal and we
        // are its foreground: a background job must not take it.
        // SAFETY: tcgetpgrp/getpgrp have no memory effects.
        let foreground = on_terminal[0] && unsafe { libc::tcgetpgrp(0) == libc::getpgrp() };
        let raw = if foreground { RawMode::enter()? } else { None };
        let output = match on_terminal {
            [_, true, _] => 1,
            [_, false, true] => 2,
            // Only stdin is a terminal: echo goes back to it.
            _ => 0,
        };
        let (stop_r, stop_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        set_fd_flag(master.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK)?;
        let m = master.clone();
        let input = foreground.then_some(0);
        let thread = std::thread::Builder::new()
            .name("proxypilot-pty".into())
            .spawn(move || relay(&m, input, output, &stop_r))?;
        Ok(Relay {
            master,
            tty: on_terminal.iter().position(|t| *t).unwrap_or(0) as RawFd,
            raw,
            stop: Some(stop_w),
            thread: Some(thread),
        })
    }
}

/// The running relay. Dropping it stops the relay after the command's last
/// output and restores the caller's terminal, on every way out.
pub struct Relay {
    master: Arc<OwnedFd>,
    tty: RawFd,
    raw: Option<RawMode>,
    stop: Option<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    /// Copies the caller's window size to the pty (the kernel then sends
    /// SIGWINCH to the command).
    pub fn copy_window_size(&self) {
        if let Some(ws) = window_size(self.tty) {
            // SAFETY: TIOCSWINSZ reads one winsize.
            unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        }
    }

    /// The pty's foreground process group: where a terminal sends Ctrl-C.
    pub fn foreground_group(&self) -> Option<nix::unistd::Pid> {
        // SAFETY: TIOCGPGRP on our master reads the slave's group.
        let pgrp = unsafe { libc::tcgetpgrp(self.master.as_raw_fd()) };
        (pgrp > 0).then(|| nix::unistd::Pid::from_raw(pgrp))
    }

    /// The command was stopped (Ctrl-Z): give the caller its terminal back.
    pub fn suspend(&mut self) {
        if let Some(r) = &self.raw {
            r.restore();
        }
    }

    /// The caller continued us: raw mode again, and the current size.
    pub fn resume(&mut self) {
        if let Some(r) = &self.raw {
            r.reapply();
        }
        self.copy_window_size();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(r) = self.raw.take() {
            r.restore();
        }
    }
}

/// The caller's terminal settings, restored when this is dropped.
struct RawMode {
    saved: Termios,
    raw: Termios,
}

impl RawMode {
    fn enter() -> Result<Option<RawMode>> {
        let fd = stdin_fd();
        let Ok(saved) = termios::tcgetattr(fd) else {
            return Ok(None);
        };
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(fd, SetArg::TCSANOW, &raw)
            .context("putting the terminal in raw mode")?;
        Ok(Some(RawMode { saved, raw }))
    }

    fn reapply(&self) {
        let _ = termios::tcsetattr(stdin_fd(), SetArg::TCSANOW, &self.raw);
    }

    fn restore(&self) {
        let _ = termios::tcsetattr(stdin_fd(), SetArg::TCSADRAIN, &self.saved);
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        self.restore();
    }
}

fn stdin_fd() -> BorrowedFd<'static> {
    // SAFETY: fd 0 stays open for the life of the process.
    unsafe { BorrowedFd::borrow_raw(0) }
}

fn window_size(fd: RawFd) -> Option<libc::winsize> {
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize.
    let ok = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0;
    ok.then_some(ws)
}

fn set_fd_flag(fd: RawFd, set: libc::c_int, flag: libc::c_int) -> io::Result<()> {
    let get = if set == libc::F_SETFD {
        libc::F_GETFD
    } else {
        libc::F_GETFL
    };
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let old = libc::fcntl(fd, get);
        if old < 0 || libc::fcntl(fd, set, old | flag) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Copies master → `output` and `input` → master until the command's side
/// of the pty is closed, or `stop` is closed (then what the command already
/// wrote is still delivered).
fn relay(master: &OwnedFd, mut input: Option<RawFd>, output: RawFd, stop: &OwnedFd) {
    const MAX_PENDING: usize = 64 * 1024;
    let m = master.as_raw_fd();
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let mut fds = vec![
            pollfd(stop.as_raw_fd(), libc::POLLIN),
            pollfd(
                m,
                libc::POLLIN | if pending.is_empty() { 0 } else { libc::POLLOUT },
            ),
        ];
        if let Some(i) = input.filter(|_| pending.len() < MAX_PENDING) {
            fds.push(pollfd(i, libc::POLLIN));
        }
        // SAFETY: fds is a valid array of pollfd.
        if unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) } < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        let ready = |i: usize| fds.get(i).map_or(0, |f| f.revents);
        if ready(1) & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
            && !copy_out(m, output, &mut buf)
        {
            return;
        }
        if ready(1) & libc::POLLOUT != 0 {
            // SAFETY: writing our own buffer to the master.
            let n = unsafe { libc::write(m, pending.as_ptr().cast(), pending.len()) };
            if n > 0 {
                pending.drain(..n as usize);
            }
        }
        if ready(2) != 0 {
            let i = input.unwrap_or(0);
            // SAFETY: reading into our buffer.
            let n = unsafe { libc::read(i, buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                pending.extend_from_slice(&buf[..n as usize]);
            } else if n == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                input = None;
            }
        }
        if ready(0) != 0 {
            // The command is gone: deliver what it left, then stop.
            while copy_out(m, output, &mut buf) {}
            return;
        }
    }
}

/// One read from the master, written whole to `output`. False when there
/// is nothing more to read now (EAGAIN) or ever (EIO: slave closed).
fn copy_out(master: RawFd, output: RawFd, buf: &mut [u8]) -> bool {
    // SAFETY: reading into our buffer.
    let n = unsafe { libc::read(master, buf.as_mut_ptr().cast(), buf.len()) };
    if n <= 0 {
        return n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted;
    }
    let mut rest = &buf[..n as usize];
    // SAFETY: fd `output` is open for the process's life; borrowed only here.
    let out = unsafe { BorrowedFd::borrow_raw(output) };
    while !rest.is_empty() {
        let w = unsafe { libc::write(out.as_fd().as_raw_fd(), rest.as_ptr().cast(), rest.len()) };
        if w < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        if w <= 0 {
            // The caller's output is gone; keep draining the pty.
            break;
        }
        rest = &rest[w as usize..];
    }
    true
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}
