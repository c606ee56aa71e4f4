#!/usr/bin/env bash
# proxypilot-sidecar-entrypoint: the sidecar container's entrypoint on Fly.
#
# Usage: proxypilot-sidecar-entrypoint proxypilot sidecar --cgroup auto:NAME ARGS...
#
# Runs the command it is given, with two adjustments:
#   --cgroup auto:NAME   is replaced by the cgroup v2 directory of the sandbox
#                        container NAME, found by find-shell-cgroup (waiting up
#                        to $PROXYPILOT_CGROUP_WAIT seconds, default 120).
#                        Any other --cgroup value is passed through unchanged.
#   --ready-file PATH    its directory is created and a stale file left by an
#                        earlier run is removed, so the health check only
#                        passes once this run is ready.
# Then it execs the command (proxypilot stays PID 1 of the container and gets
# SIGTERM directly).
set -euo pipefail

log() { echo "proxypilot-sidecar-entrypoint: $*" >&2; }

[ $# -gt 0 ] || { log "usage: $0 proxypilot sidecar --cgroup auto:NAME ARGS..."; exit 2; }

resolve() {
    local spec="$1"
    case "$spec" in
        auto:*)
            local name="${spec#auto:}" found
            if ! found="$(find-shell-cgroup --wait "${PROXYPILOT_CGROUP_WAIT:-120}" "$name")"; then
                log "could not find the cgroup of the sandbox container '$name'; refusing to start"
                exit 1
            fi
            log "sandbox '$name' is cgroup $found"
            echo "$found"
            ;;
        *) echo "$spec" ;;
    esac
}

args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --cgroup)
            [ $# -ge 2 ] || { log "--cgroup needs a value"; exit 2; }
            args+=("--cgroup" "$(resolve "$2")")
            shift 2
            ;;
        --cgroup=*)
            args+=("--cgroup=$(resolve "${1#--cgroup=}")")
            shift
            ;;
        --ready-file)
            [ $# -ge 2 ] || { log "--ready-file needs a value"; exit 2; }
            mkdir -p -- "$(dirname -- "$2")"
            rm -f -- "$2"
            args+=("$1" "$2")
            shift 2
            ;;
        --ready-file=*)
            mkdir -p -- "$(dirname -- "${1#--ready-file=}")"
            rm -f -- "${1#--ready-file=}"
            args+=("$1")
            shift
            ;;
        *)
            args+=("$1")
            shift
            ;;
    esac
done

exec "${args[@]}"
