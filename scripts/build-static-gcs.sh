#!/usr/bin/env bash
# Builds a statically linked, stripped ferry-gcs (the guest agent has to run in minimal UVM
# images with no libc of their own) and prints its path and size.
#
# Usage: scripts/build-static-gcs.sh
# Honours CARGO_TARGET_DIR. The explicit --target keeps these artifacts apart from the normal
# (dynamic) release build, and keeps +crt-static away from build scripts and proc macros, which
# cannot be static.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

triple=x86_64-unknown-linux-gnu
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --release -p gcs --bin ferry-gcs --target "$triple"

bin="${CARGO_TARGET_DIR:-$root/target}/$triple/release/ferry-gcs"
info="$(file -L "$bin")"
echo "$info" >&2

# `file` says "statically linked" (or "static-pie linked" for a static PIE).
case "$info" in
*"statically linked"* | *"static-pie linked"*) ;;
*)
    echo "error: $bin is not statically linked" >&2
    exit 1
    ;;
esac
# ldd must not find any shared library either (it prints "not a dynamic executable" or
# "statically linked", and exits non-zero for the former).
if deps="$(ldd "$bin" 2>&1)" && grep -q '=>' <<<"$deps"; then
    echo "error: ldd lists shared libraries for $bin:" >&2
    echo "$deps" >&2
    exit 1
fi
case "$info" in
*"not stripped"*)
    echo "error: $bin is not stripped (profile.release.strip changed?)" >&2
    exit 1
    ;;
esac

size=$(stat -c %s "$bin")
echo "$bin"
echo "size: $size bytes ($(awk -v s="$size" 'BEGIN { printf "%.2f MiB", s / 1048576 }'))"
