"""A person at a terminal, for the `proxypilot run` pty tests.

    pty_caller.py shell SCRIPT [REDIRECT]
                                 an interactive bash in a new pty types
                                 `sh SCRIPT REDIRECT`, waits until it is done, then
                                 `exit`: whatever the command pushed into
                                 the caller's terminal input runs in bash
                                 before that exit.
    pty_caller.py smoke SCRIPT   `sh SCRIPT` in a new 33x77 pty; once it
                                 printed READY the window becomes 40x100,
                                 and once the new size shows, Ctrl-C is typed.
    pty_caller.py suspend SCRIPT an interactive bash types `sh SCRIPT`; once
                                 it printed READY, Ctrl-Z; once bash says
                                 the job stopped, `fg`; once it printed
                                 CONTINUED, Ctrl-C; then `echo RC=$?`.

Prints one JSON line: the exit status, the transcript, and whether the
terminal's settings (echo, canonical mode) were restored at the end.
"""

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import sys
import termios
import time


def set_size(fd, rows, cols):
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def spawn(argv, rows, cols, env):
    pid, master = pty.fork()
    if pid == 0:
        set_size(0, rows, cols)
        os.execvpe(argv[0], argv, env)
    return pid, master


class Transcript:
    """What the terminal showed; each wait looks only at what came after
    the previous match."""

    def __init__(self, master, session):
        self.master = master
        self.session = session
        self.text = ""
        self.seen = 0

    def read_until(self, pattern, timeout=20):
        deadline = time.time() + timeout
        while not re.search(pattern, self.text[self.seen :]):
            left = deadline - time.time()
            if left <= 0:
                end_session(self.session)
                raise SystemExit(json.dumps({"timeout": pattern, "transcript": self.text}))
            r, _, _ = select.select([self.master], [], [], left)
            if r:
                try:
                    data = os.read(self.master, 4096)
                except OSError:
                    data = b""
                if not data:
                    end_session(self.session)
                    raise SystemExit(json.dumps({"eof": pattern, "transcript": self.text}))
                self.text += data.decode(errors="replace")
        m = re.search(pattern, self.text[self.seen :])
        self.seen += m.end()
        return m

    def drain(self, seconds):
        deadline = time.time() + seconds
        while time.time() < deadline:
            r, _, _ = select.select([self.master], [], [], 0.05)
            if r:
                try:
                    data = os.read(self.master, 4096)
                except OSError:
                    return
                if not data:
                    return
                self.text += data.decode(errors="replace")


def end_session(sid):
    """On failure: SIGTERM (then SIGCONT) to everything in the caller's
    session, so proxypilot passes it on and cleans up."""
    for sig in (signal.SIGTERM, signal.SIGCONT):
        for entry in os.listdir("/proc"):
            try:
                if entry.isdigit() and os.getsid(int(entry)) == sid:
                    os.kill(int(entry), sig)
            except OSError:
                pass


def restored(master):
    lflag = termios.tcgetattr(master)[3]
    return bool(lflag & termios.ECHO) and bool(lflag & termios.ICANON)


def wait(pid, t):
    t.drain(0.2)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def shell(script, redirect=""):
    env = dict(os.environ, PS1="caller$ ", TERM="dumb")
    pid, master = spawn(["bash", "--norc", "--noprofile", "-i"], 24, 80, env)
    t = Transcript(master, pid)
    t.read_until(r"caller\$ ")
    os.write(master, f"sh {script} {redirect}; echo CALLER-DONE-$?\n".encode())
    t.read_until(r"CALLER-DONE-\d+")
    settings_ok = restored(master)
    # Anything injected is already in bash's input, ahead of this.
    t.read_until(r"caller\$ ")
    t.drain(0.5)
    os.write(master, b"exit\n")
    rc = wait(pid, t)
    print(json.dumps({"rc": rc, "restored": settings_ok, "transcript": t.text}))


def smoke(script):
    pid, master = spawn(["sh", script], 33, 77, dict(os.environ))
    t = Transcript(master, pid)
    t.read_until(r"READY")
    set_size(master, 40, 100)
    # pty.fork's child is the session leader: tell its foreground group.
    t.read_until(r"size=40 100")
    os.write(master, b"\x03")
    rc = wait(pid, t)
    print(json.dumps({"rc": rc, "restored": restored(master), "transcript": t.text}))


def suspend(script):
    env = dict(os.environ, PS1="caller$ ", TERM="dumb")
    pid, master = spawn(["bash", "--norc", "--noprofile", "-i"], 24, 80, env)
    t = Transcript(master, pid)
    t.read_until(r"caller\$ ")
    os.write(master, f"sh {script}\n".encode())
    t.read_until(r"READY")
    os.write(master, b"\x1a")
    t.read_until(r"Stopped")
    stopped_restored = restored(master)
    t.read_until(r"caller\$ ")
    os.write(master, b"fg\n")
    t.read_until(r"CONTINUED")
    os.write(master, b"\x03")
    t.read_until(r"caller\$ ")
    os.write(master, b"echo RC=$((0+$?))\n")
    t.read_until(r"RC=\d+")
    os.write(master, b"exit\n")
    wait(pid, t)
    rc = int(re.search(r"RC=(\d+)", t.text).group(1))
    print(json.dumps({"rc": rc, "restored": stopped_restored, "transcript": t.text}))


if __name__ == "__main__":
    {"shell": shell, "smoke": smoke, "suspend": suspend}[sys.argv[1]](*sys.argv[2:])
