#!/usr/bin/env bash
# find-shell-cgroup: print the cgroup v2 directory of the sandbox ("shell")
# container, for `proxypilot sidecar --cgroup`. BEST EFFORT: Fly's Pilot does
# not document its cgroup layout, so this looks for the sandbox in three ways
# and refuses to guess when the answer is ambiguous.
#
# Usage: find-shell-cgroup [--wait SECONDS] [NAME]
#
#   NAME      the sandbox container's name / marker value
#             (default: $PROXYPILOT_SANDBOX_CONTAINER, else "shell")
#   --wait N  keep looking for up to N seconds (the sandbox container may
#             still be starting); default 0 (one attempt)
#
# In order:
#   1. $PROXYPILOT_SANDBOX_CGROUP, when set: that directory, checked. Use this
#      once you know the layout on your machines (no discovery at all).
#   2. Marker: a process whose environment holds PROXYPILOT_SANDBOX=NAME (the
#      shell image and machine-config.json set it). Its cgroup, read from
#      /proc/PID/cgroup, is the answer. Needs the sidecar to see the sandbox's
#      processes in /proc (a shared PID namespace) and to read their environ.
#   3. Name: a directory under the cgroup v2 mount whose name is NAME, or
#      contains NAME as a word (e.g. "shell", "shell.scope", "container-shell").
#      Exactly one must match.
# The answer is never the cgroup v2 root, nor this process's own cgroup or
# one of its ancestors (that would filter the sidecar and everything else).
#
# Exit status: 0 and the path on stdout when found; 1 otherwise, with what
# was tried on stderr.
set -euo pipefail

wait_secs=0
name="${PROXYPILOT_SANDBOX_CONTAINER:-shell}"
while [ $# -gt 0 ]; do
    case "$1" in
        --wait) wait_secs="${2:?--wait needs a number of seconds}"; shift 2 ;;
        --wait=*) wait_secs="${1#--wait=}"; shift ;;
        -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
        -*) echo "find-shell-cgroup: unknown option $1" >&2; exit 2 ;;
        *) name="$1"; shift ;;
    esac
done

log() { echo "find-shell-cgroup: $*" >&2; }

# The first cgroup2 mount point in /proc/self/mountinfo (never hard-coded:
# /sys/fs/cgroup on Fly and most distros, /sys/fs/cgroup/unified on hybrid).
cgroup2_mount() {
    local line mp fstype
    while IFS= read -r line; do
        fstype="${line#* - }"
        fstype="${fstype%% *}"
        if [ "$fstype" = cgroup2 ]; then
            mp="$(echo "$line" | cut -d' ' -f5)"
            # mountinfo escapes space, tab, newline and backslash in octal.
            printf '%b\n' "$mp"
            return 0
        fi
    done </proc/self/mountinfo
    return 1
}

# This process's cgroup v2 path relative to the mount ("0::/x/y" -> /x/y).
own_cgroup() {
    sed -n 's/^0::\(.*\)$/\1/p' /proc/self/cgroup | head -n1
}

# Succeeds when $1 (a directory under the mount) may be the sandbox.
acceptable() {
    local dir="$1" rel
    [ -f "$dir/cgroup.procs" ] || return 1
    rel="${dir#"$mount"}"
    rel="/${rel#/}"
    [ "$rel" != "/" ] || return 1
    # Not our own cgroup, nor an ancestor of it.
    case "$own/" in
        "$rel"/*) return 1 ;;
    esac
    return 0
}

by_marker() {
    local environ pid rel dir text found=""
    for environ in /proc/[0-9]*/environ; do
        pid="${environ#/proc/}"
        pid="${pid%/environ}"
        [ "$pid" != "$$" ] || continue
        # Processes come and go while we scan: ignore unreadable ones. (Read
        # first, then match: with pipefail, `tr | grep -q` could fail on SIGPIPE.)
        text="$( { tr '\0' '\n' <"$environ"; } 2>/dev/null )" || continue
        if grep -qx "PROXYPILOT_SANDBOX=$name" <<<"$text"; then
            rel="$(sed -n 's/^0::\(.*\)$/\1/p' "/proc/$pid/cgroup" 2>/dev/null | head -n1)"
            # "/.." means the process is outside our cgroup namespace's view.
            case "$rel" in ""|/..*) continue ;; esac
            dir="${mount%/}$rel"
            acceptable "$dir" || continue
            if [ -z "$found" ]; then
                found="$dir"
            elif [ "$found" != "$dir" ]; then
                # Several processes in different cgroups: take the common
                # ancestor only if it is still acceptable, else give up.
                while [ "${dir#"$found"/}" = "$dir" ] && [ "$found" != "$dir" ]; do
                    found="${found%/*}"
                done
                acceptable "$found" || { log "marker processes are spread over unrelated cgroups"; return 1; }
            fi
        fi
    done
    [ -n "$found" ] && echo "$found"
}

by_name() {
    local matches=() dir base
    while IFS= read -r dir; do
        base="${dir##*/}"
        case "$base" in
            "$name"|"$name".*|*-"$name"|*-"$name".*|*_"$name"|*:"$name") ;;
            *) continue ;;
        esac
        acceptable "$dir" && matches+=("$dir")
    done < <(find "$mount" -mindepth 1 -maxdepth 6 -type d 2>/dev/null)
    if [ "${#matches[@]}" -eq 1 ]; then
        echo "${matches[0]}"
    elif [ "${#matches[@]}" -gt 1 ]; then
        log "several cgroups match the name '$name': ${matches[*]}; set PROXYPILOT_SANDBOX_CGROUP"
        return 1
    else
        return 1
    fi
}

mount="$(cgroup2_mount)" || { log "no cgroup v2 filesystem is mounted (see /proc/self/mountinfo)"; exit 1; }
own="$(own_cgroup)"
own="${own:-/}"

if [ -n "${PROXYPILOT_SANDBOX_CGROUP:-}" ]; then
    if acceptable "$PROXYPILOT_SANDBOX_CGROUP"; then
        echo "$PROXYPILOT_SANDBOX_CGROUP"
        exit 0
    fi
    log "PROXYPILOT_SANDBOX_CGROUP=$PROXYPILOT_SANDBOX_CGROUP is not a usable cgroup v2 directory under $mount"
    exit 1
fi

deadline=$((SECONDS + wait_secs))
while :; do
    if found="$(by_marker)" && [ -n "$found" ]; then
        log "found by marker PROXYPILOT_SANDBOX=$name: $found"
        echo "$found"
        exit 0
    fi
    if found="$(by_name)" && [ -n "$found" ]; then
        log "found by name '$name': $found"
        echo "$found"
        exit 0
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        break
    fi
    sleep 1
done

log "no cgroup for the sandbox '$name' under $mount (own cgroup: $own)."
log "tried: a process with PROXYPILOT_SANDBOX=$name in its environment; a cgroup directory named like '$name'."
log "set PROXYPILOT_SANDBOX_CGROUP to the sandbox's cgroup directory, or pass --cgroup PATH."
exit 1
