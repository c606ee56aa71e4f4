#!/usr/bin/env bash
# CI smoke run of proxypilot's fuzz targets: builds every target, then runs
# each one for FUZZ_SECONDS (default 20) over a scratch copy of its
# committed corpus. Fails on any crash, panic, leak, timeout or OOM (the
# reproducer is left in tests/fuzz/artifacts/<target>/).
#
#   tests/fuzz/run-quick.sh                # all targets, 20 s each
#   FUZZ_SECONDS=60 tests/fuzz/run-quick.sh client_hello config
#   FUZZ_SANITIZER=none tests/fuzz/run-quick.sh   # what `cargo xtask test` does
#
# Needs the rustup nightly toolchain (cargo-fuzz builds with -Z flags);
# installs cargo-fuzz if it is missing. FUZZ_SANITIZER (default address)
# goes to `cargo fuzz -s`. Build output goes to <target dir>/fuzz (the
# target dir is $CARGO_TARGET_DIR, default <repo>/target), apart from the
# normal build, whose flags differ. The eBPF programs are not built
# (PROXYPILOT_EBPF_PLACEHOLDER=1), so no BPF toolchain is needed.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
secs=${FUZZ_SECONDS:-20}
sanitizer=${FUZZ_SANITIZER:-address}
all_targets=(client_hello proxy_tokenizer config relay_request dns_query macaroon)
if [ $# -gt 0 ]; then targets=("$@"); else targets=("${all_targets[@]}"); fi

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    echo "run-quick.sh: the rustup 'nightly' toolchain is required (cargo-fuzz builds with -Zsanitizer=address)." >&2
    echo "  install it with: rustup toolchain install nightly --profile minimal" >&2
    exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "run-quick.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}/fuzz
# The targets never load the eBPF programs: skip building them (and the
# BPF toolchain they need); see proxypilot-kernel/build.rs.
export PROXYPILOT_EBPF_PLACEHOLDER=${PROXYPILOT_EBPF_PLACEHOLDER:-1}
cd "$root"

start=$(date +%s)
echo "== building fuzz targets (sanitizer $sanitizer, CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
cargo +nightly fuzz build -s "$sanitizer" --fuzz-dir tests/fuzz
echo "== built in $(( $(date +%s) - start )) s"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
failed=()
for t in "${targets[@]}"; do
    echo "== $t: ${secs} s"
    mkdir -p "$scratch/$t"
    cp -R "tests/fuzz/corpus/$t/." "$scratch/$t/"
    # -timeout: one input taking >10 s is a finding (the relay's own
    # timeouts are 1-5 s in the harness).
    # libFuzzer's progress lines go to a log: a run that passes prints its
    # final stats, one that fails its last lines (the crash and reproducer).
    log="$scratch/$t.log"
    if cargo +nightly fuzz run -s "$sanitizer" "$t" --fuzz-dir tests/fuzz "$scratch/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
        grep -E '^(Done|stat::)' "$log" || true
    else
        tail -n 80 "$log"
        failed+=("$t")
    fi
done

echo "== total $(( $(date +%s) - start )) s"
if [ ${#failed[@]} -gt 0 ]; then
    echo "run-quick.sh: FAILED: ${failed[*]} (reproducers in tests/fuzz/artifacts/)" >&2
    exit 1
fi
echo "run-quick.sh: all fuzz targets ran clean"
