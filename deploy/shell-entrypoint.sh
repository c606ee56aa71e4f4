#!/usr/bin/env bash
# proxypilot-shell-init: the sandbox ("shell") container's entrypoint.
#
# 1. Waits until the proxypilot sidecar is ready. The readiness signal is the
#    sidecar's info server answering GET http://127.0.0.1:$PROXYPILOT_INFO_PORT/ca.pem
#    with a certificate: proxypilot starts serving that port only after its
#    eBPF programs are attached to this container's cgroup, so a successful
#    answer means every connect() from here on is policed. (The sidecar also
#    writes its --ready-file, inside its own container, for the Fly health
#    check.) Nothing else in this container should start before this.
# 2. Installs that CA into the system trust store (update-ca-certificates)
#    and writes /etc/profile.d/proxypilot.sh pointing SSL_CERT_FILE,
#    REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE, GIT_SSL_CAINFO and NODE_EXTRA_CA_CERTS
#    at it. No /etc/hosts edits and no proxy variables: the kernel redirects.
# 3. Execs its arguments (default: sleep forever, like the original's
#    startup.sh, so that `fly ssh console --container shell` has a place to go).
#
# Fails (exit 1) if the sidecar is not ready within $PROXYPILOT_WAIT_SECS
# (default 180): better a restarted container than an unprotected one.
set -euo pipefail

info_port="${PROXYPILOT_INFO_PORT:-15480}"
wait_secs="${PROXYPILOT_WAIT_SECS:-180}"
ca_dest="${PROXYPILOT_CA_DEST:-/usr/local/share/ca-certificates/proxypilot.crt}"
bundle=/etc/ssl/certs/ca-certificates.crt
url="http://127.0.0.1:${info_port}/ca.pem"

log() { echo "proxypilot-shell-init: $*" >&2; }

tmp="$(mktemp)"
trap 'rm -f "$tmp"' EXIT

log "waiting for the proxypilot sidecar ($url)"
deadline=$((SECONDS + wait_secs))
until curl -fsS --max-time 5 -o "$tmp" "$url" 2>/dev/null \
        && grep -q -- '-----BEGIN CERTIFICATE-----' "$tmp"; do
    if [ "$SECONDS" -ge "$deadline" ]; then
        log "the sidecar did not become ready within ${wait_secs}s; giving up"
        exit 1
    fi
    sleep 1
done
log "sidecar is ready; installing its CA"

install -D -m 0644 "$tmp" "$ca_dest"
update-ca-certificates >/dev/null

cat >/etc/profile.d/proxypilot.sh <<EOF
# Written by proxypilot-shell-init: trust proxypilot's CA everywhere.
export SSL_CERT_FILE=$bundle
export REQUESTS_CA_BUNDLE=$bundle
export CURL_CA_BUNDLE=$bundle
export GIT_SSL_CAINFO=$bundle
export NODE_EXTRA_CA_CERTS=$ca_dest
EOF
# shellcheck disable=SC1091
. /etc/profile.d/proxypilot.sh

log "ready: $(openssl x509 -noout -subject -in "$ca_dest" 2>/dev/null || echo "CA installed at $ca_dest")"

rm -f "$tmp"
trap - EXIT
if [ $# -eq 0 ]; then
    set -- sleep infinity
fi
exec "$@"
