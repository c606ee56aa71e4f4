#!/usr/bin/env python3
"""Unix socket probe the tests run inside a sandbox cgroup.

Prints one JSON line: {"dst", "ok", "errno"?, "reply"?}. "ok" and "errno"
are about the connect (or send) alone; "reply" is the line a stream server
answered. NAME is a path, or @name for an abstract name.

  unixprobe.py stream NAME          connect, send a line, read the reply
  unixprobe.py dgram NAME           sendto on an unbound datagram socket
  unixprobe.py dgram-connect NAME   connect() a datagram socket, then send()
  unixprobe.py own NAME             listen on NAME inside the sandbox, connect to it
  unixprobe.py socketpair           a socketpair() round trip
  unixprobe.py inherited            talk on the connected stream socket on stdin
"""
import errno
import json
import socket
import sys

TIMEOUT = 10


def address(name):
    return "\0" + name[1:] if name.startswith("@") else name


def failure(dst, exc):
    return {"dst": dst, "ok": False, "errno": errno.errorcode.get(exc.errno, str(exc.errno))}


def read_line(s):
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


def stream(name):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    try:
        s.connect(address(name))
    except OSError as e:
        return failure(name, e)
    s.sendall(b"hello\n")
    return {"dst": name, "ok": True, "reply": read_line(s)}


def dgram(name, connect):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        if connect:
            s.connect(address(name))
            s.send(b"hello")
        else:
            s.sendto(b"hello", address(name))
    except OSError as e:
        return failure(name, e)
    return {"dst": name, "ok": True}


def own(name):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address(name))
    listener.listen()
    return stream(name)


def pair():
    a, b = socket.socketpair()
    a.sendall(b"ping\n")
    return {"dst": "socketpair", "ok": True, "reply": read_line(b)}


def inherited():
    s = socket.socket(fileno=0)
    s.settimeout(TIMEOUT)
    s.sendall(b"hello\n")
    return {"dst": "stdin", "ok": True, "reply": read_line(s)}


def main():
    mode = sys.argv[1]
    if mode == "stream":
        result = stream(sys.argv[2])
    elif mode == "dgram":
        result = dgram(sys.argv[2], connect=False)
    elif mode == "dgram-connect":
        result = dgram(sys.argv[2], connect=True)
    elif mode == "own":
        result = own(sys.argv[2])
    elif mode == "socketpair":
        result = pair()
    elif mode == "inherited":
        result = inherited()
    else:
        sys.exit(f"unknown mode {mode}")
    print(json.dumps(result), flush=True)


main()
