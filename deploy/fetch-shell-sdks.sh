#!/usr/bin/env bash
# fetch-shell-sdks.sh DIR: fetches the shell image's SDKs, pinned in
# shell-sdk/, into DIR for an offline build of Dockerfile.shell
# (SDKS_FROM=context with DIR copied to the context as sdk-cache/):
#   DIR/wheels        the wheels of shell-sdk/requirements.txt and their
#                     dependencies, for the image's Python (Debian bookworm's 3.11)
#   DIR/node_modules  `npm ci` of shell-sdk/package-lock.json (plain JavaScript)
# Needs PyPI and npm, python3 with pip, and npm. Does nothing when DIR
# already holds what the pins name (DIR/stamp). `cargo xtask setup` runs it.
set -euo pipefail

[ $# -eq 1 ] || { echo "usage: $0 DIR" >&2; exit 2; }
dir="$1"
sdk="$(cd "$(dirname "$0")/shell-sdk" && pwd)"
stamp="$(cat "$sdk/requirements.txt" "$sdk/package.json" "$sdk/package-lock.json" "$0" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$dir/stamp" 2>/dev/null || true)" = "$stamp" ]; then
    echo "fetch-shell-sdks.sh: $dir is up to date" >&2
    exit 0
fi

rm -rf "$dir"
mkdir -p "$dir/npm"
python3 -m pip download --quiet --disable-pip-version-check \
    --only-binary=:all: --implementation cp --python-version 3.11 \
    --platform "manylinux2014_$(uname -m)" \
    --dest "$dir/wheels" -r "$sdk/requirements.txt"
cp "$sdk/package.json" "$sdk/package-lock.json" "$dir/npm/"
(cd "$dir/npm" && npm ci --no-audit --no-fund --loglevel=error)
mv "$dir/npm/node_modules" "$dir/node_modules"
rm -rf "$dir/npm"
echo "$stamp" >"$dir/stamp"
echo "fetch-shell-sdks.sh: wheels and node_modules in $dir" >&2
