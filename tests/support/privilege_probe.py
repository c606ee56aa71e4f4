"""Tries, from inside `proxypilot run`, everything a privileged sandbox
could do to proxypilot and the host, and prints one JSON line: for each
attempt "ok" or the errno name.

    privilege_probe.py CGROUP2_MOUNT SHARED_DIR

Then it writes its pid to SHARED_DIR/pid and waits (up to 60 s) for
SHARED_DIR/go, so the test can look at it from the host.
"""

import ctypes
import errno
import json
import os
import socket
import sys
import time

cgroup_root, shared = sys.argv[1], sys.argv[2]
out = {}


def attempt(name, fn):
    try:
        fn()
        out[name] = "ok"
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))


def read1(path):
    with open(path, "rb") as f:
        f.read(1)


proxypilot = os.getppid()
run_dir = os.path.join(os.environ["TMPDIR"], f"proxypilot-run-{proxypilot}")
attempt("environ", lambda: read1(f"/proc/{proxypilot}/environ"))
attempt("mem", lambda: read1(f"/proc/{proxypilot}/mem"))
attempt("ca_key", lambda: read1(os.path.join(run_dir, "private", "ca-key.pem")))
attempt("private_dir", lambda: os.listdir(os.path.join(run_dir, "private")))


def own_cgroup():
    with open("/proc/self/cgroup") as f:
        rel = next(l for l in f if l.startswith("0::")).strip()[3:]
    return os.path.normpath(cgroup_root + rel)


def join(cg):
    with open(os.path.join(cg, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))


sandbox = own_cgroup()
# The root, every ancestor, and the siblings of each: all outside.
outside = set()
cg = sandbox
while cg != cgroup_root and cg.startswith(cgroup_root):
    parent = os.path.dirname(cg)
    outside.add(parent)
    for name in os.listdir(parent):
        p = os.path.join(parent, name)
        if p != cg and os.path.isdir(p):
            outside.add(p)
    cg = parent
out["cgroups"] = {}
for cg in sorted(outside):
    try:
        join(cg)
        out["cgroups"][cg] = "ok"
    except OSError as e:
        out["cgroups"][cg] = errno.errorcode.get(e.errno, str(e.errno))
out["still_in_sandbox"] = own_cgroup() == sandbox

libc = ctypes.CDLL(None, use_errno=True)
# Valid attrs, so only privilege decides: an array map of one u32, and
# "the first program id".
map_attr = ctypes.create_string_buffer(128)
ctypes.memmove(map_attr, (ctypes.c_uint32 * 4)(2, 4, 4, 1), 16)
for cmd, name, attr in (
    (11, "bpf_prog_get_next_id", ctypes.create_string_buffer(128)),
    (0, "bpf_map_create", map_attr),
):
    r = libc.syscall(321, cmd, attr, 128)
    out[name] = "ok" if r >= 0 else errno.errorcode[ctypes.get_errno()]

# Capabilities over the host's namespaces and processes (each a no-op when
# allowed, so a failing defence changes nothing).
attempt("sethostname", lambda: socket.sethostname(socket.gethostname()))
attempt("kill_proxypilot", lambda: os.kill(proxypilot, 0))
bundle = os.environ["SSL_CERT_FILE"]
attempt("chown_root_file", lambda: os.chown(bundle, 0, 0))
attempt("read_bundle", lambda: read1(bundle))
attempt("write_home", lambda: open(os.path.join(os.environ["HOME"], "probe"), "w").close())

with open("/proc/self/status") as f:
    out["status"] = {
        k: v.strip()
        for k, v in (l.split(":", 1) for l in f)
        if k in ("Uid", "Gid", "NoNewPrivs", "CapEff")
    }
print(json.dumps(out), flush=True)

with open(os.path.join(shared, "pid.tmp"), "w") as f:
    f.write(f"{os.getpid()}\n")
os.rename(os.path.join(shared, "pid.tmp"), os.path.join(shared, "pid"))
deadline = time.time() + 60
while not os.path.exists(os.path.join(shared, "go")) and time.time() < deadline:
    time.sleep(0.02)
