#!/usr/bin/env python3
import os

from openai import OpenAI

client = OpenAI()  # uses OPENAI_API_KEY (a dummy)
response = client.responses.create(
    model=os.environ.get("OPENAI_MODEL", "gpt-4o-mini"),
    input="Write a one-sentence bedtime story about a unicorn.",
)
print(response.output_text)
