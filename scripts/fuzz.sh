#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 120), one after the other.
#
# Usage: scripts/fuzz.sh [SECONDS]
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
    # Keep going after a crash so every target gets its time; report at the end.
    if ! cargo fuzz run "$target" -- -max_total_time="$secs" -print_final_stats=1; then
        failed+=("$target")
    fi
done

if ((${#failed[@]})); then
    echo "crashes in: ${failed[*]} (inputs under fuzz/artifacts/; reproduce with" \
        "cargo fuzz run <target> fuzz/artifacts/<target>/<file>)" >&2
    exit 1
fi
echo "all targets ran ${secs}s without a crash" >&2
