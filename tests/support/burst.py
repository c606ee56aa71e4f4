"""Opens N HTTP/2 connections to HOST, makes one request on each and keeps
them all open until the file READY is removed... simply: holds them for
HOLD seconds, then closes them all. Prints one JSON line when all are open
(to stdout, flushed) and another when closed.

    burst.py HOST N HOLD
"""

import json
import socket
import ssl
import sys
import time

import h2.config
import h2.connection
import h2.events


def open_one(ctx, host):
    raw = socket.create_connection((host, 443), timeout=10)
    tls = ctx.wrap_socket(raw, server_hostname=host)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(
        1,
        [(":method", "GET"), (":scheme", "https"), (":authority", host),
         (":path", "/bytes?n=65536"), ("x-api-key", "dummy")],
        end_stream=True,
    )
    tls.sendall(conn.data_to_send())
    done = False
    while not done:
        data = tls.recv(65536)
        if not data:
            break
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.DataReceived):
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                done = True
        tls.sendall(conn.data_to_send())
    return tls


host, n, hold = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ctx = ssl.create_default_context()
ctx.set_alpn_protocols(["h2"])
conns = [open_one(ctx, host) for _ in range(n)]
print(json.dumps({"open": len(conns)}), flush=True)
time.sleep(hold)
for c in conns:
    c.close()
print(json.dumps({"closed": len(conns)}), flush=True)
