#!/bin/sh
# curl with the dummy key in x-api-key; proxypilot puts the real one there.
curl https://api.anthropic.com/v1/messages \
     --header "x-api-key: $ANTHROPIC_API_KEY" \
     --header "anthropic-version: 2023-06-01" \
     --header "content-type: application/json" \
     --data \
'{
    "model": "'"${ANTHROPIC_MODEL:-claude-sonnet-4-5}"'",
    "max_tokens": 1024,
    "messages": [
        {"role": "user", "content": "Hello, world"}
    ]
}'
