#!/usr/bin/env python3
"""DNS probe the tests run inside a sandbox cgroup. Prints one JSON line.

  dnsprobe.py udp SERVER NAME [QTYPE]          sendto on an unconnected socket
  dnsprobe.py udp-connect SERVER NAME [QTYPE]  connect() then send()
  dnsprobe.py tcp SERVER NAME [QTYPE]          DNS over TCP (length-prefixed)
  dnsprobe.py gai NAME                         getaddrinfo (glibc, resolv.conf)
  dnsprobe.py junk-udp SERVER TEXT             a datagram that is not DNS
  dnsprobe.py junk-tcp SERVER TEXT             the same over TCP

SERVER is an address (port 53); an IPv6 one (v4-mapped too) uses AF_INET6.
The query answers give {"rcode", "answers": [addresses], "from": the source
the socket saw (udp) or its peer (connected), "id_ok"}, or {"error"}.
"""
import ipaddress
import json
import random
import socket
import struct
import sys

TYPES = {"A": 1, "AAAA": 28, "TXT": 16}


def family(server):
    return socket.AF_INET6 if ipaddress.ip_address(server).version == 6 else socket.AF_INET


def query(name, qtype):
    qid = random.randrange(65536)
    msg = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.rstrip(".").split("."):
        msg += bytes([len(label)]) + label.encode()
    msg += b"\0" + struct.pack(">HH", TYPES[qtype], 1)
    return qid, msg


def skip_name(m, i):
    while True:
        n = m[i]
        if n == 0:
            return i + 1
        if n & 0xC0 == 0xC0:
            return i + 2
        i += 1 + n


def parse(m, qid):
    rid, flags, qd, an = struct.unpack(">HHHH", m[:8])
    i = 12
    for _ in range(qd):
        i = skip_name(m, i) + 4
    addrs = []
    for _ in range(an):
        i = skip_name(m, i)
        rtype, _, _, rdlen = struct.unpack(">HHIH", m[i : i + 10])
        i += 10
        rdata = m[i : i + rdlen]
        i += rdlen
        if rtype == 1:
            addrs.append(socket.inet_ntop(socket.AF_INET, rdata))
        elif rtype == 28:
            addrs.append(socket.inet_ntop(socket.AF_INET6, rdata))
    return {"rcode": flags & 0xF, "tc": bool(flags & 0x200), "answers": addrs, "id_ok": rid == qid}


def main():
    kind = sys.argv[1]
    out = {"kind": kind}
    try:
        if kind == "gai":
            try:
                infos = socket.getaddrinfo(sys.argv[2], 443, proto=socket.IPPROTO_TCP)
                out["ok"] = True
                out["addrs"] = sorted({i[4][0] for i in infos})
            except socket.gaierror as e:
                out["ok"] = False
                out["error"] = {socket.EAI_NONAME: "EAI_NONAME", socket.EAI_AGAIN: "EAI_AGAIN"}.get(
                    e.errno, str(e.errno)
                )
        elif kind in ("udp", "udp-connect", "tcp"):
            server, name = sys.argv[2], sys.argv[3]
            qtype = sys.argv[4] if len(sys.argv) > 4 else "A"
            qid, msg = query(name, qtype)
            if kind == "tcp":
                s = socket.socket(family(server), socket.SOCK_STREAM)
                s.settimeout(5)
                s.connect((server, 53))
                out["from"] = s.getpeername()[0]
                s.sendall(struct.pack(">H", len(msg)) + msg)
                n = struct.unpack(">H", recv_exact(s, 2))[0]
                out.update(parse(recv_exact(s, n), qid))
            else:
                s = socket.socket(family(server), socket.SOCK_DGRAM)
                s.settimeout(5)
                if kind == "udp-connect":
                    s.connect((server, 53))
                    s.send(msg)
                    out["peer"] = s.getpeername()[0]
                    data, frm = s.recvfrom(65535)
                else:
                    s.sendto(msg, (server, 53))
                    data, frm = s.recvfrom(65535)
                out["from"] = frm[0]
                out["from_port"] = frm[1]
                out.update(parse(data, qid))
        elif kind in ("junk-udp", "junk-tcp"):
            server, text = sys.argv[2], sys.argv[3].encode()
            typ = socket.SOCK_DGRAM if kind == "junk-udp" else socket.SOCK_STREAM
            s = socket.socket(family(server), typ)
            s.settimeout(2)
            s.connect((server, 53))
            if typ == socket.SOCK_STREAM:
                s.sendall(text)
            else:
                s.send(text)
            out["sent"] = True
            try:
                out["reply"] = s.recv(65535).decode("latin-1")
            except (socket.timeout, ConnectionError) as e:
                out["reply"] = None
                out["reply_error"] = type(e).__name__
    except OSError as e:
        out["error"] = type(e).__name__ + ": " + str(e)
    print(json.dumps(out))


def recv_exact(s, n):
    b = b""
    while len(b) < n:
        chunk = s.recv(n - len(b))
        if not chunk:
            raise ConnectionError("closed after %d of %d bytes" % (len(b), n))
        b += chunk
    return b


main()
