#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 120), one after the other:
# frame_decoder and payloads (the bridge), snapshot_decoder (the shim's saved state), mux (the
# host's multiplexer and session hello, fed by an untrusted guest) and migration_options (the
# QEMU migration plan). Each target's doc comment says which properties it checks.
#
# Usage: scripts/fuzz.sh [SECONDS]      (issue 7's runs: nice -n 19 scripts/fuzz.sh 600)
# Needs cargo-fuzz (cargo install cargo-fuzz --locked). On a stable toolchain RUSTC_BOOTSTRAP=1
# lets cargo-fuzz pass its -Z sanitizer flags. New corpus entries land in fuzz/corpus/<target>/
# (git-ignored except the seed-* files); crashes in fuzz/artifacts/<target>/.
set -euo pipefail

secs="${1:-120}"
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

if ! command -v cargo-fuzz >/dev/null; then
    echo "error: cargo-fuzz not found; install it with: cargo install cargo-fuzz --locked" >&2
    exit 1
fi
export RUSTC_BOOTSTRAP="${RUSTC_BOOTSTRAP:-1}"

failed=()
for target in $(cargo fuzz list); do
    echo "== fuzzing $target for ${secs}s" >&2
    # Keep going after a crash so every target gets its time; report at the end. An input
    # that takes over a minute is a finding too (-timeout; units take milliseconds): a busy
    # loop that the mux target's own limits, an I/O-call budget and virtual time, cannot see.
    if ! cargo fuzz run "$target" -- -max_total_time="$secs" -timeout=60 -print_final_stats=1; then
        failed+=("$target")
    fi
done

if ((${#failed[@]})); then
    echo "crashes in: ${failed[*]} (inputs under fuzz/artifacts/; reproduce with" \
        "cargo fuzz run <target> fuzz/artifacts/<target>/<file>)" >&2
    exit 1
fi
echo "all targets ran ${secs}s without a crash" >&2
