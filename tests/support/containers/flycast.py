#!/usr/bin/env python3
"""Plays Fly's proxy on a flycast address for the container test: forwards
each connection to the tokenizer, adding to the request a Fly-Src header
signed with an ed25519 key of its own (Fly-Src: instance=..;app=..;org=..;ts=..
and Fly-Src-Signature: base64 of the signature), and dropping any Fly-Src
headers the client sent, as Fly's proxy does. The tokenizer verifies them
with the public key this writes to --pubkey-out (64 hex digits) once it
listens.

  flycast.py --listen IP:PORT --upstream IP:PORT --org ORG --app APP
             --instance ID --pubkey-out FILE
"""
import argparse
import base64
import os
import socket
import threading
import time

import nacl.signing


def split(hostport):
    host, _, port = hostport.rpartition(":")
    return host.strip("[]"), int(port)


def pipe(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def signed_head(head, key, args):
    lines = head.split(b"\r\n")
    # One request per connection (Connection: close), so that every request
    # gets its own signature, as Fly's proxy signs each one.
    kept = [l for l in lines[1:]
            if not l.lower().startswith((b"fly-src", b"connection:", b"keep-alive:"))]
    value = f"instance={args.instance};app={args.app};org={args.org};ts={int(time.time())}"
    sig = base64.b64encode(key.sign(value.encode()).signature).decode()
    extra = [f"Fly-Src: {value}".encode(), f"Fly-Src-Signature: {sig}".encode(),
             b"Connection: close"]
    return b"\r\n".join([lines[0]] + extra + kept) + b"\r\n\r\n"


def serve(conn, key, args):
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = conn.recv(65536)
        if not chunk:
            conn.close()
            return
        head += chunk
    head, rest = head.split(b"\r\n\r\n", 1)
    up = socket.create_connection(split(args.upstream))
    up.sendall(signed_head(head, key, args) + rest)
    threading.Thread(target=pipe, args=(up, conn), daemon=True).start()
    pipe(conn, up)


def main():
    p = argparse.ArgumentParser()
    for a in ("--listen", "--upstream", "--org", "--app", "--instance", "--pubkey-out"):
        p.add_argument(a, required=True)
    args = p.parse_args()
    key = nacl.signing.SigningKey.generate()
    host, port = split(args.listen)
    lst = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind((host, port))
    lst.listen(64)
    with open(args.pubkey_out + ".tmp", "w") as f:
        f.write(key.verify_key.encode().hex() + "\n")
    os.rename(args.pubkey_out + ".tmp", args.pubkey_out)
    while True:
        conn, _ = lst.accept()
        threading.Thread(target=serve, args=(conn, key, args), daemon=True).start()


if __name__ == "__main__":
    main()
