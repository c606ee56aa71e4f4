#!/usr/bin/env python3
"""Python clients the end-to-end tests run, unmodified, inside the sandbox.

Each scenario uses the SDK the way its README does (keys from the
environment, default base URLs) and prints one JSON line per result or
streamed event, flushed at once so the test sees events as they arrive.
"""
import json
import os
import sys


def out(**kw):
    print(json.dumps(kw), flush=True)


def anthropic_create():
    import anthropic

    client = anthropic.Anthropic(timeout=30, max_retries=0)
    msg = client.messages.create(
        model="claude-opus-4-20250514",
        max_tokens=1024,
        messages=[{"role": "user", "content": "Hello, Claude"}],
    )
    out(kind="result", type=msg.type, text=msg.content[0].text)


def anthropic_stream():
    import anthropic

    client = anthropic.Anthropic(timeout=30, max_retries=0)
    with client.messages.stream(
        model="claude-opus-4-20250514",
        max_tokens=1024,
        messages=[{"role": "user", "content": "Hello, Claude"}],
    ) as stream:
        for event in stream:
            out(kind="event", type=event.type)
        out(kind="result", text=stream.get_final_message().content[0].text)


def openai_responses():
    from openai import OpenAI

    client = OpenAI(timeout=30, max_retries=0)
    response = client.responses.create(
        model="gpt-4o-mini",
        input="Write a one-sentence bedtime story about a unicorn.",
    )
    out(kind="result", text=response.output_text)


def openai_chat_stream():
    from openai import OpenAI

    client = OpenAI(timeout=30, max_retries=0)
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Say hello"}],
        stream=True,
    )
    text = ""
    for chunk in stream:
        delta = chunk.choices[0].delta.content if chunk.choices else None
        out(kind="event", type="chunk")
        text += delta or ""
    out(kind="result", text=text)


def requests_github():
    import requests

    r = requests.get(
        "https://api.github.com/user",
        headers={"Authorization": "token " + os.environ["GH_TOKEN"]},
        timeout=30,
    )
    out(kind="result", status=r.status_code, login=r.json().get("login"))


def httpx_github():
    import httpx

    r = httpx.get(
        "https://api.github.com/user",
        headers={"Authorization": "Bearer " + os.environ["GH_TOKEN"]},
        timeout=30,
    )
    out(kind="result", status=r.status_code, login=r.json().get("login"))


SCENARIOS = {
    "anthropic-create": anthropic_create,
    "anthropic-stream": anthropic_stream,
    "openai-responses": openai_responses,
    "openai-chat-stream": openai_chat_stream,
    "requests-github": requests_github,
    "httpx-github": httpx_github,
}

if __name__ == "__main__":
    SCENARIOS[sys.argv[1]]()
