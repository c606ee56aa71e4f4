#!/usr/bin/env python3
"""What the container test tries from inside the shell container, as its root
user with Docker's default capabilities (CAP_NET_RAW included). Each attempt
prints one JSON line: {"try", "ok", "errno"?, ...}; "ok" means the attempt
got through (an escape), so the test expects false everywhere.

  shellprobe.py raw-udp HOST PORT     SOCK_RAW/IPPROTO_UDP datagram to a UDP sink
  shellprobe.py raw-ip HOST PORT      SOCK_RAW/IPPROTO_RAW, our own IPv4 header
  shellprobe.py ping HOST             SOCK_RAW/IPPROTO_ICMP echo; ok = a reply came
  shellprobe.py packet HOST PORT      AF_PACKET frame on lo carrying a UDP datagram
  shellprobe.py bpf                   bpf(BPF_PROG_GET_NEXT_ID): find the programs
  shellprobe.py unpin                 mount bpffs and remove proxypilot's pins
  shellprobe.py leave-cgroup          move itself to the cgroup v2 root
  shellprobe.py read PATH...          read files (secrets, keys); ok = readable
  shellprobe.py environ NAME          read the environ of every process whose
                                      command line mentions NAME
"""
import ctypes
import errno
import json
import os
import socket
import struct
import sys
import time

PAYLOAD = b"escaped-from-the-shell"  # + " via MODE", so the sink tells them apart


def out(**kw):
    print(json.dumps(kw), flush=True)


def err(e):
    return errno.errorcode.get(e.errno, str(e.errno))


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def udp_datagram(port, mode):
    data = PAYLOAD + b" via " + mode.encode()
    return struct.pack("!HHHH", 40000, port, 8 + len(data), 0) + data


def ipv4_udp(src, dst, port, mode):
    udp = udp_datagram(port, mode)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return ip + udp


def attempt(name, fn):
    try:
        extra = fn() or {}
        out(**{"try": name, "ok": extra.pop("ok", True), **extra})
    except OSError as e:
        out(**{"try": name, "ok": False, "errno": err(e)})


def raw_udp(host, port):
    def go():
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
        s.sendto(udp_datagram(port, "raw-udp"), (host, 0))
    attempt(f"raw-udp {host}:{port}", go)


def raw_ip(host, port):
    def go():
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        s.sendto(ipv4_udp("127.0.0.1", host, port, "raw-ip"), (host, 0))
    attempt(f"raw-ip {host}:{port}", go)


def ping(host):
    def go():
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        s.settimeout(2)
        body = struct.pack("!BBHHH", 8, 0, 0, 0x7070, 1) + PAYLOAD
        body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
        s.sendto(body, (host, 0))
        deadline = time.time() + 2
        while time.time() < deadline:
            try:
                data, peer = s.recvfrom(2048)
            except socket.timeout:
                break
            ihl = (data[0] & 0xF) * 4
            if peer[0] == host and data[ihl] == 0:  # echo reply
                return {"ok": True, "reply_from": peer[0]}
        return {"ok": False, "errno": "no reply"}
    attempt(f"ping {host}", go)


def packet(host, port):
    def go():
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        s.bind(("lo", 0))
        eth = b"\0" * 12 + struct.pack("!H", 0x0800)
        s.send(eth + ipv4_udp("127.0.0.1", host, port, "packet"))
    attempt(f"packet {host}:{port}", go)


libc = ctypes.CDLL(None, use_errno=True)
SYS_BPF = 321  # x86_64


def bpf():
    def go():
        attr = ctypes.create_string_buffer(16)  # start_id 0 -> first program
        r = libc.syscall(SYS_BPF, 11, attr, 16)  # BPF_PROG_GET_NEXT_ID
        if r < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return {"next_id": struct.unpack("I", attr.raw[4:8])[0]}
    attempt("bpf prog_get_next_id", go)


def unpin():
    def go():
        os.makedirs("/tmp/bpffs", exist_ok=True)
        r = libc.mount(b"bpf", b"/tmp/bpffs", b"bpf", 0, None)
        if r < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        removed = []
        for root, _, files in os.walk("/tmp/bpffs"):
            for f in files:
                os.unlink(os.path.join(root, f))
                removed.append(f)
        return {"ok": bool(removed), "removed": removed}
    attempt("unpin", go)


def own_cgroup2():
    with open("/proc/self/cgroup") as f:
        return next(l for l in f.read().splitlines() if l.startswith("0::"))


def leave_cgroup():
    """Writes its pid to the root cgroup.procs of every cgroup2 mount it
    sees, then of a cgroup2 it mounts itself; ok = its cgroup changed."""
    def go():
        before = own_cgroup2()
        mounts = []
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split(" - ")
                if fields[1].split()[0] == "cgroup2":
                    mounts.append(fields[0].split()[4])
        os.makedirs("/tmp/cg2", exist_ok=True)
        if libc.mount(b"cgroup2", b"/tmp/cg2", b"cgroup2", 0, None) == 0:
            mounts.append("/tmp/cg2")
        errors = []
        for m in mounts:
            try:
                with open(os.path.join(m, "cgroup.procs"), "r+") as f:
                    f.write(str(os.getpid()))
            except OSError as e:
                errors.append(f"{m}: {err(e)}")
        after = own_cgroup2()
        return {"ok": after != before, "cgroup": after, "tried": mounts, "errors": errors}
    attempt("leave-cgroup", go)


def read(paths):
    for p in paths:
        def go(p=p):
            with open(p, "rb") as f:
                return {"bytes": len(f.read())}
        attempt(f"read {p}", go)


def environ(name):
    me = str(os.getpid())
    found = False
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if name not in cmd:
            continue
        found = True
        for what in ("environ", "root/var/lib/proxypilot/ca-key.pem", "mem"):
            def go(pid=pid, what=what):
                with open(f"/proc/{pid}/{what}", "rb") as f:
                    return {"bytes": len(f.read(4096))}
            attempt(f"/proc/{pid}/{what} ({cmd.split()[0]})", go)
    if not found:
        out(**{"try": f"find {name}", "ok": False, "errno": "no such process"})


def main(argv):
    mode, args = argv[1], argv[2:]
    if mode == "raw-udp":
        raw_udp(args[0], int(args[1]))
    elif mode == "raw-ip":
        raw_ip(args[0], int(args[1]))
    elif mode == "ping":
        ping(args[0])
    elif mode == "packet":
        packet(args[0], int(args[1]))
    elif mode == "bpf":
        bpf()
    elif mode == "unpin":
        unpin()
    elif mode == "leave-cgroup":
        leave_cgroup()
    elif mode == "read":
        read(args)
    elif mode == "environ":
        environ(args[0])
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(sys.argv)
