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
"""
import errno
import json
import os
import socket
import sys

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
    else:
        sys.exit(f"unknown mode {mode}")
    for r in out:
        r["pid"] = os.getpid()
        print(json.dumps(r))


if __name__ == "__main__":
    main(sys.argv)
