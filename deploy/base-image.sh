#!/usr/bin/env bash
# base-image.sh: makes a Debian bookworm base image that already holds the
# packages of the given lists, with no container registry: mmdebstrap builds
# the root filesystem from Debian's mirror, `docker import` turns it into an
# image. Building deploy/Dockerfile or deploy/Dockerfile.shell FROM it (build
# arg BASE) then needs no network, since deploy/install-packages.sh finds
# every package installed.
#
# Usage: deploy/base-image.sh TAG CACHE_DIR LIST...
#   TAG        the image to create, e.g. local/proxypilot-base:shell
#   CACHE_DIR  where the root filesystem tarball is kept; it is rebuilt only
#              when the lists (or this script) change
#   LIST       package lists, e.g. deploy/packages/shell.txt
# Environment: DOCKER (default: docker) and DOCKER_HOST as for docker.
set -euo pipefail

[ $# -ge 3 ] || { echo "usage: $0 TAG CACHE_DIR LIST..." >&2; exit 2; }
tag="$1" cache="$2"
shift 2
here="$(cd "$(dirname "$0")" && pwd)"
docker="${DOCKER:-docker}"
suite=bookworm
mirrors=(
    "deb http://deb.debian.org/debian $suite main"
    "deb http://deb.debian.org/debian $suite-updates main"
    "deb http://deb.debian.org/debian-security $suite-security main"
)

packages="$(sed -e 's/#.*//' "$@" | tr -s ' \t' '\n\n' | grep -v '^$' | sort -u | paste -sd, -)"
key="$(printf '%s\n' "$suite" "$packages" "${mirrors[@]}" | cat - "$0" | sha256sum | cut -c1-16)"
tarball="$cache/rootfs-$key.tar"

mkdir -p "$cache"
if [ -s "$tarball" ]; then
    echo "base-image.sh: reusing $tarball" >&2
else
    echo "base-image.sh: mmdebstrap $suite with $packages" >&2
    mmdebstrap --quiet --variant=minbase --include="$packages" \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
        "$suite" "$cache/partial-$key.tar" "${mirrors[@]}"
    mv "$cache/partial-$key.tar" "$tarball"
fi
"$docker" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' \
    "$tarball" "$tag" >/dev/null
echo "base-image.sh: $tag from $tarball" >&2
