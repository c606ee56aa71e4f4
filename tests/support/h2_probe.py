"""An HTTP/2 client that misbehaves on purpose, for the relay's timeout
tests (issue 21). Prints one JSON line.

    h2_probe.py trickle HOST   sends the connection preface one byte every
                               0.25 s, never a request; reports when the
                               server closed the connection
    h2_probe.py pings HOST     one GET /echo, then a PING every 0.25 s and
                               nothing else; reports the status and when
                               the server closed the connection
    h2_probe.py open-block HOST  one GET /echo, then the HEADERS frame of a
                               second request without END_HEADERS, and
                               nothing more; reports the first status and
                               when the server closed the connection

    h2_probe.py tls-stall HOST N  opens N connections to HOST:443, sends
                               the first bytes of a ClientHello on each
                               and nothing more (a TLS stall); reports how
                               many the server closed and when the last
                               of them closed

The CA comes from SSL_CERT_FILE. Each mode gives up after 20 s
("closed_after": null: the server kept the connection open).
"""

import json
import socket
import ssl
import sys
import time

import h2.config
import h2.connection
import h2.events

LIMIT = 20.0


def connect(host):
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(["h2"])
    raw = socket.create_connection((host, 443), timeout=5)
    tls = ctx.wrap_socket(raw, server_hostname=host)
    assert tls.selected_alpn_protocol() == "h2", tls.selected_alpn_protocol()
    tls.settimeout(0.25)
    return tls


def closed(sock):
    """True once the server has closed (or reset) the connection."""
    try:
        data = sock.recv(65536)
        return data == b"", data
    except (socket.timeout, ssl.SSLWantReadError):
        return False, b""
    except OSError:
        return True, b""


def trickle(host):
    sock = connect(host)
    preface = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    preface.initiate_connection()
    data = preface.data_to_send()
    start = time.time()
    i = 0
    while time.time() - start < LIMIT:
        if i < len(data):
            try:
                sock.send(data[i : i + 1])
            except OSError:
                break
            i += 1
        done, _ = closed(sock)
        if done:
            break
    else:
        return {"closed_after": None, "sent": i}
    return {"closed_after": round(time.time() - start, 2), "sent": i}


def get_echo(sock, conn, host):
    """One GET /echo on stream 1; returns (status, whether it ended)."""
    conn.send_headers(
        1,
        [
            (":method", "GET"),
            (":scheme", "https"),
            (":authority", host),
            (":path", "/echo"),
            ("x-api-key", "dummy"),
        ],
        end_stream=True,
    )
    sock.sendall(conn.data_to_send())
    status, ended = None, False
    deadline = time.time() + 10
    while not ended and time.time() < deadline:
        done, data = closed(sock)
        if done:
            break
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                status = int(dict(ev.headers)[b":status"])
            elif isinstance(ev, h2.events.DataReceived):
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                ended = True
        sock.sendall(conn.data_to_send())
    return status, ended


def open_block(host):
    sock = connect(host)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    status, ended = get_echo(sock, conn, host)
    # A HEADERS frame for stream 3 with neither END_HEADERS nor END_STREAM:
    # the header block stays open until a CONTINUATION that never comes.
    block = conn.encoder.encode(
        [(":method", "GET"), (":scheme", "https"), (":authority", host), (":path", "/echo")]
    )
    frame = len(block).to_bytes(3, "big") + bytes([0x1, 0x0]) + (3).to_bytes(4, "big") + block
    sock.sendall(frame)
    start = time.time()
    while time.time() - start < LIMIT:
        done, _ = closed(sock)
        if done:
            return {"status": status, "ended": ended,
                    "closed_after": round(time.time() - start, 2)}
    return {"status": status, "ended": ended, "closed_after": None}


def pings(host):
    sock = connect(host)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    status, ended = get_echo(sock, conn, host)
    if not ended:
        return {"status": status, "closed_after": 0, "ended": False}
    start = time.time()
    while time.time() - start < LIMIT:
        try:
            conn.ping(b"12345678")
            sock.sendall(conn.data_to_send())
        except OSError:
            break
        done, data = closed(sock)
        if done:
            break
        try:
            conn.receive_data(data)
        except Exception:
            break
    else:
        return {"status": status, "ended": ended, "closed_after": None}
    return {"status": status, "ended": ended, "closed_after": round(time.time() - start, 2)}


def tls_stall(host, n):
    # A TLS handshake record header and the start of a ClientHello that
    # announces far more than is ever sent.
    begun = bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xFC, 0x03, 0x03])
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, 443), timeout=5)
        s.sendall(begun)
        s.settimeout(0.05)
        socks.append(s)
    start = time.time()
    open_ = set(range(n))
    last = None
    while open_ and time.time() - start < LIMIT:
        for i in list(open_):
            done, _ = closed(socks[i])
            if done:
                open_.discard(i)
                last = round(time.time() - start, 2)
    for s in socks:
        s.close()
    return {"stalled": n, "closed": n - len(open_), "last_closed_after": last}


if __name__ == "__main__":
    mode, host = sys.argv[1], sys.argv[2]
    if mode == "tls-stall":
        print(json.dumps(tls_stall(host, int(sys.argv[3]))), flush=True)
        sys.exit(0)
    modes = {"trickle": trickle, "pings": pings, "open-block": open_block}
    print(json.dumps(modes[mode](host)))
