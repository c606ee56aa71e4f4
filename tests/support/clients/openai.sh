#!/bin/sh
# The original README's openai.sh: curl with the dummy key as a Bearer token.
curl -sS https://api.openai.com/v1/responses \
    -H "Content-Type: application/json" \
    -H "Authorization: Bearer $OPENAI_API_KEY" \
    -d '{
        "model": "gpt-4o-mini",
        "input": "Write a one-sentence bedtime story about a unicorn."
    }'
