#!/bin/sh
# install-packages.sh LIST...: installs the Debian packages named in the
# package lists (deploy/packages/*.txt: one per line, # comments) that are
# not installed yet, and nothing else.
#
# The Dockerfiles run it on top of debian:bookworm, where it fetches the
# packages with apt. On a base image made by deploy/base-image.sh from the
# same lists every package is already there, so it needs no network: that is
# how the container test builds the images offline.
set -eu

packages="$(sed -e 's/#.*//' "$@" | tr -s ' \t' '\n\n' | grep -v '^$' || true)"
[ -n "$packages" ] || { echo "install-packages.sh: no packages in $*" >&2; exit 1; }

missing=""
for p in $packages; do
    if ! dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing="$missing $p"
    fi
done

if [ -z "$missing" ]; then
    echo "install-packages.sh: all of $* already installed" >&2
    exit 0
fi
echo "install-packages.sh: installing$missing" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update
# shellcheck disable=SC2086 # one word per package
apt-get install -y --no-install-recommends $missing
rm -rf /var/lib/apt/lists/*
