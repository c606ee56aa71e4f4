#!/usr/bin/env python3
"""HTTPS client the reload test runs inside the sandbox.

Reads commands from stdin, one per line, and answers each with one JSON
line on stdout:

  req NAME METHOD HOST PATH   a request on the kept-alive connection NAME
                              (opened to HOST on first use); prints
                              {"status", "port"} (port: the connection's
                              local port, so the test sees it was reused)
                              or {"error"}; a POST carries a small
                              chat-completion JSON body
  loop HOST PATH              starts a thread that sends GET PATH to HOST on
                              one kept-alive connection until `stop`
  stop                        stops the loop; prints {"ok", "failed",
                              "connections", "errors"}

The CA comes from SSL_CERT_FILE, read anew for each new connection (a
reload that re-issues the CA rewrites that file).
"""
import http.client
import json
import ssl
import sys
import threading
import time

conns = {}


def connect(host):
    ctx = ssl.create_default_context()
    c = http.client.HTTPSConnection(host, 443, timeout=10, context=ctx)
    c.connect()
    return c


BODY = json.dumps({"model": "m", "max_tokens": 1,
                   "messages": [{"role": "user", "content": "hi"}]})


def request(conn, method, host, path):
    # The dummy key where each API's clients put it.
    if host == "api.anthropic.com":
        headers = {"x-api-key": "dummy"}
    else:
        headers = {"authorization": "Bearer dummy"}
    headers["host"] = host
    body = None
    if method == "POST":
        body = BODY
        headers["content-type"] = "application/json"
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    body = resp.read()
    return resp.status, body


class Loop(threading.Thread):
    def __init__(self, host, path):
        super().__init__(daemon=True)
        self.host, self.path = host, path
        self.ok = self.failed = self.connections = 0
        self.errors = []
        self.stopping = threading.Event()

    def run(self):
        conn = None
        while not self.stopping.is_set():
            try:
                if conn is None:
                    conn = connect(self.host)
                    self.connections += 1
                status, _ = request(conn, "GET", self.host, self.path)
                if status == 200:
                    self.ok += 1
                else:
                    self.failed += 1
                    self.errors.append(f"status {status}")
            except Exception as e:  # noqa: BLE001 - every failure counts
                self.failed += 1
                self.errors.append(repr(e))
                conn = None
            time.sleep(0.02)


loop = None
for line in sys.stdin:
    words = line.split()
    if not words:
        continue
    out = {}
    if words[0] == "req":
        name, method, host, path = words[1:5]
        try:
            if name not in conns:
                conns[name] = connect(host)
            c = conns[name]
            status, _ = request(c, method, host, path)
            out = {"status": status, "port": c.sock.getsockname()[1]}
        except Exception as e:  # noqa: BLE001 - reported to the test
            conns.pop(name, None)
            out = {"error": repr(e)}
    elif words[0] == "loop":
        loop = Loop(words[1], words[2])
        loop.start()
        out = {"looping": True}
    elif words[0] == "stop":
        loop.stopping.set()
        loop.join()
        out = {"ok": loop.ok, "failed": loop.failed,
               "connections": loop.connections, "errors": loop.errors[:5]}
    print(json.dumps(out), flush=True)
