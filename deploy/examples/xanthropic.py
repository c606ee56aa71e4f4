#!/usr/bin/env python3
import os

import anthropic

client = anthropic.Anthropic()  # uses ANTHROPIC_API_KEY (a dummy)
message = client.messages.create(
    model=os.environ.get("ANTHROPIC_MODEL", "claude-sonnet-4-5"),
    max_tokens=1024,
    messages=[{"role": "user", "content": "Hello, Claude"}],
)
print(message.content)
