#!/bin/sh
# curl with the dummy key as a Bearer token; proxypilot puts the real one there.
curl https://api.openai.com/v1/responses \
    -H "Content-Type: application/json" \
    -H "Authorization: Bearer $OPENAI_API_KEY" \
    -d '{
        "model": "'"${OPENAI_MODEL:-gpt-4o-mini}"'",
        "input": "Write a one-sentence bedtime story about a unicorn."
    }'
