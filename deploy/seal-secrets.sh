#!/usr/bin/env bash
# seal-secrets.sh: seal the real API keys for the tokenizer and stage them as
# Fly secrets of the app (replaces the original's wrap.sh).
#
# Usage: deploy/seal-secrets.sh [--dry-run | --print-env] [--allow-missing]
#
# Environment (all required unless noted):
#   SEAL_KEY           the tokenizer's seal (public) key, 64 hex digits
#   FLY_ORG, FLY_APP   the org and app the secrets are bound to (fly_src_auth:
#                      the tokenizer only opens them for requests that Fly's
#                      proxy signs as coming from this org/app, which needs
#                      flycast; see deploy/README.md)
#   ANTHROPIC_API_KEY, OPENAI_API_KEY, GH_TOKEN   the real keys
#   PROXYPILOT         the proxypilot binary (optional; default: proxypilot on PATH)
#   FLY                the flyctl binary (optional; default: fly)
#
# For each key it runs `proxypilot seal` (the key is read from the
# environment with --token-env, never put on a command line) and then
#   fly secrets set --stage -a $FLY_APP ANTHROPIC_SEALED=... OPENAI_SEALED=... GH_SEALED=...
# --stage only records them; the next `fly deploy` makes them visible to the
# machine. --dry-run prints that fly command instead of running it (the
# sealed values are safe to print: only the tokenizer can open them, and only
# for this org/app and host). --print-env prints NAME=VALUE lines instead, an
# env file for `docker compose --env-file` (deploy/compose.yaml); fly is not
# needed then.
#
# --allow-missing skips a key whose variable is unset (with a warning) instead
# of failing; remove the matching --target from machine-config.json then.
#
# Each secret is sealed with allowed_hosts = the API's host, and with the
# headers/formats the API accepts, so that proxypilot can put the real key in
# whichever header the client used for its dummy (it names it per request
# with the dst/fmt parameters):
#   api.anthropic.com  x-api-key: %s        or  Authorization: Bearer %s
#   api.openai.com     Authorization: Bearer %s
#   api.github.com     Authorization: Bearer %s  or  Authorization: token %s
set -euo pipefail

output=stage
allow_missing=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) output=command ;;
        --print-env) output=env ;;
        --allow-missing) allow_missing=1 ;;
        -h|--help) sed -n '2,39p' "$0"; exit 0 ;;
        *) echo "seal-secrets.sh: unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done

die() { echo "seal-secrets.sh: $*" >&2; exit 1; }

[ -n "${SEAL_KEY:-}" ] || die "set SEAL_KEY to the tokenizer's seal key (64 hex digits)"
[ -n "${FLY_ORG:-}" ] || die "set FLY_ORG to the Fly organization the app is in (e.g. personal's slug)"
[ -n "${FLY_APP:-}" ] || die "set FLY_APP to the app name (e.g. proxypilot)"
export SEAL_KEY

proxypilot="${PROXYPILOT:-proxypilot}"
fly="${FLY:-fly}"
command -v "$proxypilot" >/dev/null 2>&1 || die "$proxypilot not found; build it (cargo build --release) or set PROXYPILOT=/path/to/proxypilot"

# seal VAR HOST [proxypilot seal options...]: prints the sealed secret.
seal() {
    local var="$1" host="$2"
    shift 2
    "$proxypilot" seal \
        --token-env "$var" \
        --host "$host" \
        --fly-org "$FLY_ORG" \
        --fly-app "$FLY_APP" \
        "$@"
}

assignments=()

# add SECRET_NAME VAR HOST [seal options...]
add() {
    local name="$1" var="$2" host="$3" sealed
    shift 3
    if [ -z "${!var:-}" ]; then
        if [ "$allow_missing" -eq 1 ]; then
            echo "seal-secrets.sh: warning: $var is not set; skipping $name" >&2
            return 0
        fi
        die "$var is not set (export the real key, or pass --allow-missing)"
    fi
    sealed="$(seal "$var" "$host" "$@")" || die "sealing $var failed"
    [ -n "$sealed" ] || die "sealing $var produced nothing"
    assignments+=("$name=$sealed")
    echo "seal-secrets.sh: sealed $var for $host as $name" >&2
}

add ANTHROPIC_SEALED ANTHROPIC_API_KEY api.anthropic.com \
    --allowed-header x-api-key --allowed-header authorization \
    --allowed-format '%s' --allowed-format 'Bearer %s'
add OPENAI_SEALED OPENAI_API_KEY api.openai.com \
    --allowed-header authorization \
    --allowed-format 'Bearer %s'
add GH_SEALED GH_TOKEN api.github.com \
    --allowed-header authorization \
    --allowed-format 'Bearer %s' --allowed-format 'token %s'

[ "${#assignments[@]}" -gt 0 ] || die "nothing to seal"

cmd=("$fly" secrets set --stage -a "$FLY_APP" "${assignments[@]}")
if [ "$output" = env ]; then
    printf '%s\n' "${assignments[@]}"
elif [ "$output" = command ]; then
    # One shell-quoted command line on stdout.
    printf '%q ' "${cmd[@]}"
    printf '\n'
else
    "${cmd[@]}"
    echo "seal-secrets.sh: staged ${#assignments[@]} secret(s); they take effect at the next fly deploy" >&2
fi
