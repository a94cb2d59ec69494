#!/usr/bin/env bash
# The guest agent alone: builds ferry-gcs and a scripted host that drops the bridge mid-run and
# reconnects. Installs busybox-static first when run as root on Debian.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v busybox >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing busybox-static (the demo container's root filesystem)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static >/dev/null
fi
cargo build --release --locked -p gcs --bin ferry-gcs --example demo
FERRY_TEST_LOG=${FERRY_LOG:-info} exec target/release/examples/demo
