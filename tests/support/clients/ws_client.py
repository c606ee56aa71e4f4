#!/usr/bin/env python3
"""The `websockets` client against wss://api.openai.com/v1/realtime, run
unmodified inside the sandbox (issue 17). It sends the sandbox's dummy key,
as an agent would, and prints one JSON line per scenario:

  echo          text frames both ways, then the client closes
  server-close  the server closes (asked to by a `close` message)
  status-N      the upstream answers the upgrade with N instead of 101
  idle-S        sends nothing for up to 5*S seconds: when is it closed?
  busy-S        a message every S/4 seconds for 2.5*S seconds: never closed
  openai-sdk    the OpenAI SDK's realtime client (sync): one
                conversation item, then the SDK closes
  slot          the sidecar's open connections (/stats on the info port)
                while a stream is open and after it closed
"""
import asyncio
import json
import os
import sys
import time
import urllib.request

import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

URL = "wss://api.openai.com/v1/realtime?model=gpt-realtime"


def out(**kw):
    print(json.dumps(kw), flush=True)


def connect(url=URL):
    key = os.environ["OPENAI_API_KEY"]
    # No keepalive pings: the idle scenario must be truly idle.
    return websockets.connect(
        url,
        additional_headers={"Authorization": f"Bearer {key}"},
        ping_interval=None,
        open_timeout=20,
        close_timeout=10,
    )


async def echo():
    async with connect() as ws:
        created = json.loads(await ws.recv())
        replies = []
        for text in ["hello", "second message"]:
            await ws.send(text)
            replies.append(json.loads(await ws.recv())["text"])
        await ws.close()
        out(scenario="echo", created=created["type"], replies=replies,
            close_code=ws.close_code)


async def server_close():
    async with connect() as ws:
        await ws.recv()
        await ws.send("close")
        try:
            await asyncio.wait_for(ws.recv(), 10)
            out(scenario="server-close", error="a message instead of the close")
        except ConnectionClosed as e:
            out(scenario="server-close", code=e.rcvd.code if e.rcvd else None,
                reason=e.rcvd.reason if e.rcvd else None)


async def status(n):
    try:
        async with connect(f"{URL}&status={n}"):
            out(scenario=f"status-{n}", error="the upgrade succeeded")
    except InvalidStatus as e:
        out(scenario=f"status-{n}", status=e.response.status_code,
            body=e.response.body.decode(errors="replace"))


async def idle(name, secs):
    async with connect() as ws:
        await ws.recv()
        start = time.monotonic()
        try:
            await asyncio.wait_for(ws.recv(), 5 * secs)
            out(scenario=name, error="a message arrived")
        except ConnectionClosed:
            out(scenario=name, closed_after=time.monotonic() - start)
        except asyncio.TimeoutError:
            out(scenario=name, closed_after=None)


async def busy(name, secs):
    async with connect() as ws:
        await ws.recv()
        start, sent, echoed = time.monotonic(), 0, 0
        try:
            while time.monotonic() - start < 2.5 * secs:
                await ws.send(f"tick {sent}")
                sent += 1
                if json.loads(await ws.recv())["text"] == f"tick {sent - 1}":
                    echoed += 1
                await asyncio.sleep(secs / 4)
            out(scenario=name, sent=sent, echoed=echoed, open=True)
        except ConnectionClosed:
            out(scenario=name, sent=sent, echoed=echoed, open=False,
                after=time.monotonic() - start)


def openai_sdk():
    import openai

    client = openai.OpenAI(max_retries=0)
    with client.realtime.connect(model="gpt-realtime") as conn:
        created = conn.recv()
        conn.send({
            "type": "conversation.item.create",
            "item": {"type": "message", "role": "user",
                     "content": [{"type": "input_text", "text": "hello realtime"}]},
        })
        item = conn.recv()
        out(scenario="openai-sdk", created=created.type, type=item.type,
            text=item.item.content[0].text)


def connections_open():
    with urllib.request.urlopen("http://127.0.0.1:15480/stats", timeout=10) as r:
        return json.load(r)["connections_open"]


async def slot():
    async with connect() as ws:
        await ws.recv()
        during = connections_open()
        await ws.send("still open")
        await ws.recv()
    after = during
    for _ in range(50):
        after = connections_open()
        if after < during:
            break
        await asyncio.sleep(0.1)
    out(scenario="slot", during=during, after=after)


async def main(names):
    for name in names:
        kind, _, arg = name.partition("-")
        if name == "echo":
            await echo()
        elif name == "server-close":
            await server_close()
        elif name == "openai-sdk":
            openai_sdk()
        elif name == "slot":
            await slot()
        elif kind == "status":
            await status(int(arg))
        elif kind == "idle":
            await idle(name, float(arg))
        elif kind == "busy":
            await busy(name, float(arg))
        else:
            sys.exit(f"unknown scenario {name}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
