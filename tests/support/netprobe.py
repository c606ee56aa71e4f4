#!/usr/bin/env python3
"""Network probe the tests run inside a sandbox cgroup.

Each attempt prints one JSON line: {"dst", "ok", "errno"?, "peer"?, "reply"?,
"reply_errno"?}. "ok" and "errno" are about the connect (or send) alone.
"reply" is the first line the server answered to a line naming the
destination, parsed as JSON when it is.

  netprobe.py tcp HOST PORT            connect (AF_INET6 for IPv6 literals)
  netprobe.py tcp6 HOST PORT           connect from an AF_INET6 socket (use
                                       ::ffff:a.b.c.d for a v4-mapped peer)
  netprobe.py many HOST:PORT...        open all at once, then talk on each
  netprobe.py udp HOST PORT            sendto on an unconnected socket
  netprobe.py udp-connect HOST PORT    connect() then send()
  netprobe.py tfo HOST PORT            sendto(MSG_FASTOPEN) on a TCP socket
  netprobe.py socket KIND              create a socket: udplite4, udplite6, ping4,
                                       ping6, raw4, raw6, mptcp, sctp, packet
  netprobe.py send KIND HOST PORT      create a socket and send one datagram:
                                       udplite, ping (an ICMP echo; PORT unused),
                                       raw (raw IPPROTO_UDP socket, our UDP header)
  netprobe.py packet SRC HOST PORT [bypass]  AF_PACKET on lo: a hand-made
                                       IPv4/UDP frame (bypass: PACKET_QDISC_BYPASS)
  netprobe.py lsrr WAY HOP HOST PORT [N]  UDP to HOST:PORT with a loose source
                                       route through HOP, set by WAY: sockopt
                                       (IP_OPTIONS) or cmsg (IP_RETOPTS on each
                                       sendmsg); N sends count their errnos
                                       in "errors"
  netprobe.py rthdr HOP HOST PORT      UDP to [HOST]:PORT with a segment routing
                                       header through HOP (IPV6_RTHDR)
  netprobe.py sockopt NAME             setsockopt NAME on a fresh UDP socket
  netprobe.py listen PORT SECONDS      listen on TCP and UDP [::]:PORT; print
                                       {"listening"}, then what was accepted and
                                       received within SECONDS
  netprobe.py tap ADDR...              (outside the sandbox) AF_PACKET on lo: print
                                       {"tapping"}, then, when stdin closes, every
                                       IP packet from or to an ADDR
"""
import errno
import ipaddress
import json
import os
import select
import socket
import struct
import sys
import time

TIMEOUT = 10


def split_hostport(s):
    host, _, port = s.rpartition(":")
    return host.strip("[]"), int(port)


def fmt(addr):
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def failure(dst, exc):
    return {"dst": dst, "ok": False, "errno": errno.errorcode.get(exc.errno, str(exc.errno))}


def talk(sock, dst):
    """Sends the destination and reads one reply line."""
    sock.sendall((dst + "\n").encode())
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    text = data.decode().strip()
    try:
        return json.loads(text)
    except ValueError:
        return text


def tcp(host, port, family=None):
    dst = fmt((host, port))
    family = family or (socket.AF_INET6 if ":" in host else socket.AF_INET)
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    try:
        s.connect((host, port))
    except OSError as e:
        s.close()
        return failure(dst, e)
    # Connected: what happens next is reported apart from the connect.
    res = {"dst": dst, "ok": True, "peer": fmt(s.getpeername())}
    try:
        res["reply"] = talk(s, dst)
    except OSError as e:
        res["reply_errno"] = errno.errorcode.get(e.errno, str(e.errno))
    finally:
        s.close()
    return res


def many(targets):
    """Connects to every target before talking on any, so all are open at once."""
    open_socks = []
    results = []
    for t in targets:
        host, port = split_hostport(t)
        dst = fmt((host, port))
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(TIMEOUT)
        try:
            s.connect((host, port))
            open_socks.append((dst, s))
        except OSError as e:
            results.append(failure(dst, e))
    for dst, s in open_socks:
        try:
            res = {"dst": dst, "ok": True, "peer": fmt(s.getpeername())}
            res["reply"] = talk(s, dst)
            results.append(res)
        except OSError as e:
            results.append(failure(dst, e))
    for _, s in open_socks:
        s.close()
    return results


def udp(host, port, connect):
    dst = fmt((host, port))
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if connect:
            s.connect((host, port))
            s.send(b"probe " + dst.encode())
        else:
            s.sendto(b"probe " + dst.encode(), (host, port))
        return {"dst": dst, "ok": True}
    except OSError as e:
        return failure(dst, e)
    finally:
        s.close()


def tfo(host, port):
    dst = fmt((host, port))
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    try:
        s.sendto(b"probe\n", socket.MSG_FASTOPEN, (host, port))
        return {"dst": dst, "ok": True}
    except OSError as e:
        return failure(dst, e)
    finally:
        s.close()


IPPROTO_UDPLITE = 136
IPPROTO_SCTP = 132
IPPROTO_MPTCP = 262
ETH_P_IP = 0x0800
ETH_P_ALL = 0x0003
IPOPT_LSRR = 0x83
IPV6_RTHDR = 57
IPV6_SRCRT_TYPE_4 = 4

SOCKETS = {
    "udplite4": (socket.AF_INET, socket.SOCK_DGRAM, IPPROTO_UDPLITE),
    "udplite6": (socket.AF_INET6, socket.SOCK_DGRAM, IPPROTO_UDPLITE),
    "ping4": (socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP),
    "ping6": (socket.AF_INET6, socket.SOCK_DGRAM, socket.IPPROTO_ICMPV6),
    "raw4": (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP),
    "raw6": (socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_UDP),
    "mptcp": (socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP),
    "sctp": (socket.AF_INET, socket.SOCK_STREAM, IPPROTO_SCTP),
    "packet": (socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)),
}

# setsockopt NAME -> (level, optname, value) on a UDP socket of the family.
SOCKOPTS = {
    "ip_options": (socket.AF_INET, socket.IPPROTO_IP, socket.IP_OPTIONS,
                   bytes([IPOPT_LSRR, 7, 4, 203, 0, 113, 40, 1])),
    "ipv6_rthdr": (socket.AF_INET6, socket.IPPROTO_IPV6, IPV6_RTHDR, None),
    "so_bindtodevice": (socket.AF_INET, socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo"),
    "ip_transparent": (socket.AF_INET, socket.IPPROTO_IP, 19, struct.pack("i", 1)),
    "so_mark": (socket.AF_INET, socket.SOL_SOCKET, 36, struct.pack("i", 1)),
    "ip_unicast_if": (socket.AF_INET, socket.IPPROTO_IP, 50, struct.pack("!i", 1)),
    # Harmless options that must keep working.
    "ip_freebind": (socket.AF_INET, socket.IPPROTO_IP, 15, struct.pack("i", 1)),
    "so_rcvbuf": (socket.AF_INET, socket.SOL_SOCKET, socket.SO_RCVBUF, struct.pack("i", 65536)),
}


def errname(e):
    return errno.errorcode.get(e.errno, str(e.errno))


def make_socket(kind):
    res = {"dst": kind}
    try:
        socket.socket(*SOCKETS[kind]).close()
        res["ok"] = True
    except OSError as e:
        res.update(ok=False, errno=errname(e))
    return res


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_header(sport, dport, payload):
    # Checksum 0: "none", valid for UDP over IPv4.
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def send(kind, host, port):
    """One datagram through a socket of KIND; "reply" when one came back."""
    dst = fmt((host, port))
    v6 = ":" in host
    payload = b"probe " + dst.encode()
    try:
        if kind == "udplite":
            s = socket.socket(*SOCKETS["udplite6" if v6 else "udplite4"])
            data = payload
        elif kind == "ping":
            s = socket.socket(*SOCKETS["ping6" if v6 else "ping4"])
            icmp_type = 128 if v6 else 8
            data = struct.pack("!BBHHH", icmp_type, 0, 0, 0, 1) + payload
            port = 0
        elif kind == "raw":
            s = socket.socket(*SOCKETS["raw6" if v6 else "raw4"])
            data = udp_header(40000, port, payload)
            port = 0
        else:
            sys.exit(f"unknown send kind {kind}")
    except OSError as e:
        return failure(dst, e)
    res = {"dst": dst}
    try:
        s.sendto(data, (host, port))
        res["ok"] = True
    except OSError as e:
        s.close()
        return failure(dst, e)
    if kind == "ping":
        s.settimeout(2)
        try:
            s.recv(2048)
            res["reply"] = True
        except OSError as e:
            res["reply_errno"] = errname(e) if e.errno else "timeout"
    s.close()
    return res


def packet(src, host, port, bypass=False):
    """A whole frame on lo through AF_PACKET, below every IP-level hook;
    with BYPASS, through PACKET_QDISC_BYPASS (which skips tc) first."""
    dst = fmt((host, port))
    payload = b"probe " + dst.encode()
    udp = udp_header(40000, port, payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, socket.IPPROTO_UDP, 0,
                     socket.inet_aton(src), socket.inet_aton(host))
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    frame = bytes(12) + struct.pack("!H", ETH_P_IP) + ip + udp
    try:
        s = socket.socket(*SOCKETS["packet"])
        if bypass:
            s.setsockopt(263, 20, struct.pack("i", 1))  # PACKET_QDISC_BYPASS
        s.bind(("lo", 0))
        s.send(frame)
        s.close()
        return {"dst": dst, "ok": True}
    except OSError as e:
        return failure(dst, e)


def lsrr(way, hop, host, port, count=None):
    """UDP to HOST:PORT (what sendmsg checks), routed first to HOP."""
    dst = fmt((host, port))
    # One address: the kernel sends to it and puts HOST in the route.
    route = bytes([IPOPT_LSRR, 7, 4]) + socket.inet_aton(hop) + bytes([1])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def once():
        if way == "sockopt":
            s.sendto(b"probe " + dst.encode(), (host, port))
        else:
            s.sendmsg([b"probe " + dst.encode()],
                      [(socket.IPPROTO_IP, socket.IP_RETOPTS, route)], 0, (host, port))

    try:
        if way == "sockopt":
            s.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, route)
        if count is None:
            once()
            return {"dst": dst, "ok": True}
        errors = {}
        for _ in range(count):
            try:
                once()
            except OSError as e:
                errors[errname(e)] = errors.get(errname(e), 0) + 1
        return {"dst": dst, "ok": True, "errors": errors}
    except OSError as e:
        return failure(dst, e)
    finally:
        s.close()


def rthdr(hop, host, port):
    """UDP to [HOST]:PORT with an SRv6 routing header whose next segment is HOP."""
    dst = fmt((host, port))
    # Segments are stored last first: [0] is replaced by HOST, [1] is HOP.
    segments = bytes(16) + socket.inet_pton(socket.AF_INET6, hop)
    srh = struct.pack("!BBBBBBH", 0, len(segments) // 8, IPV6_SRCRT_TYPE_4, 1, 1, 0, 0) + segments
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.IPPROTO_IPV6, IPV6_RTHDR, srh)
        s.sendto(b"probe " + dst.encode(), (host, port))
        return {"dst": dst, "ok": True}
    except OSError as e:
        return failure(dst, e)
    finally:
        s.close()


def sockopt(name):
    family, level, opt, value = SOCKOPTS[name]
    if value is None:
        value = struct.pack("!BBBBBBH", 0, 4, IPV6_SRCRT_TYPE_4, 1, 1, 0, 0) + bytes(16) + \
            socket.inet_pton(socket.AF_INET6, "2001:db8::40")
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        s.setsockopt(level, opt, value)
        res = {"dst": name, "ok": True}
        if len(value) == 4:
            # Read back, to show the kernel applied the caller's value.
            res["value"] = s.getsockopt(level, opt)
        return res
    except OSError as e:
        return failure(name, e)
    finally:
        s.close()


def listen(port, seconds):
    """A sandbox server on TCP and UDP PORT: did anyone get through to it?"""
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    s.listen(8)
    u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    u.bind(("::", port))
    print(json.dumps({"listening": port}), flush=True)
    res = {"dst": f"[::]:{port}", "ok": True, "accepted": [], "received": []}
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([s, u], [], [], left)
        # Answers are best effort: the backstop may refuse them.
        if s in ready:
            c, peer = s.accept()
            res["accepted"].append(fmt(peer))
            try:
                c.sendall(b"sandbox data\n")
            except OSError:
                pass
            c.close()
        if u in ready:
            data, peer = u.recvfrom(2048)
            res["received"].append(fmt(peer))
            try:
                u.sendto(b"sandbox data\n", peer)
            except OSError:
                pass
    s.close()
    u.close()
    return res


def tap(addrs):
    """Every IP packet on lo from or to one of ADDRS, until stdin closes."""
    wanted = {ipaddress.ip_address(a) for a in addrs}
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind(("lo", 0))
    print(json.dumps({"tapping": sorted(map(str, wanted))}), flush=True)
    seen = []
    while True:
        ready, _, _ = select.select([s, sys.stdin], [], [])
        if sys.stdin in ready and not sys.stdin.buffer.read1(4096):
            break
        if s not in ready:
            continue
        frame, (_, _, pkttype, _, _) = s.recvfrom(65535)
        ip = frame[14:]
        if not ip:
            continue
        version = ip[0] >> 4
        if version == 4 and len(ip) >= 20:
            proto, l4 = ip[9], ip[(ip[0] & 15) * 4:]
            src, dst = ipaddress.ip_address(ip[12:16]), ipaddress.ip_address(ip[16:20])
        elif version == 6 and len(ip) >= 40:
            proto, l4 = ip[6], ip[40:]
            src, dst = ipaddress.ip_address(ip[8:24]), ipaddress.ip_address(ip[24:40])
        else:
            continue
        if src not in wanted and dst not in wanted:
            continue
        pkt = {"proto": proto, "src": str(src), "dst": str(dst), "pkttype": pkttype}
        if proto in (socket.IPPROTO_TCP, socket.IPPROTO_UDP, IPPROTO_UDPLITE) and len(l4) >= 4:
            pkt["sport"], pkt["dport"] = struct.unpack("!HH", l4[:4])
        seen.append(pkt)
    return {"dst": "lo", "ok": True, "packets": seen}


def main(argv):
    mode = argv[1]
    if mode == "tcp":
        out = [tcp(argv[2], int(argv[3]))]
    elif mode == "tcp6":
        out = [tcp(argv[2], int(argv[3]), socket.AF_INET6)]
    elif mode == "many":
        out = many(argv[2:])
    elif mode == "udp":
        out = [udp(argv[2], int(argv[3]), False)]
    elif mode == "udp-connect":
        out = [udp(argv[2], int(argv[3]), True)]
    elif mode == "tfo":
        out = [tfo(argv[2], int(argv[3]))]
    elif mode == "socket":
        out = [make_socket(argv[2])]
    elif mode == "send":
        out = [send(argv[2], argv[3], int(argv[4]))]
    elif mode == "packet":
        out = [packet(argv[2], argv[3], int(argv[4]), argv[5:] == ["bypass"])]
    elif mode == "lsrr":
        count = int(argv[6]) if len(argv) > 6 else None
        out = [lsrr(argv[2], argv[3], argv[4], int(argv[5]), count)]
    elif mode == "rthdr":
        out = [rthdr(argv[2], argv[3], int(argv[4]))]
    elif mode == "sockopt":
        out = [sockopt(argv[2])]
    elif mode == "listen":
        out = [listen(int(argv[2]), float(argv[3]))]
    elif mode == "tap":
        out = [tap(argv[2:])]
    else:
        sys.exit(f"unknown mode {mode}")
    for r in out:
        r["pid"] = os.getpid()
        print(json.dumps(r))


if __name__ == "__main__":
    main(sys.argv)
