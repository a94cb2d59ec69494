#!/usr/bin/env bash
# ferry's main job on its embedded default (no hypervisor): build ferry, start a utility VM,
# run containers in it, exec into one, hand the running UVM to a new host process, read the
# logs, stop. Run as root on Debian 12; installs
# busybox-static (the built-in image) if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v busybox >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing busybox-static (the built-in container image)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static >/dev/null
fi
cargo build --release --locked -p ferry
ferry=target/release/ferry
export FERRY_STATE_DIR=${FERRY_STATE_DIR:-/tmp/ferry-demo}
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
run() { step "ferry $*"; "$ferry" "$@"; }

"$ferry" uvm stop demo >/dev/null 2>&1 || true
run uvm start demo
trap '"$ferry" uvm stop demo >/dev/null 2>&1 || true' EXIT
run uvm ls
run run demo --id hello -- sh -c 'echo "hello from $(hostname), pid $$ in its own namespace"; ls /'
run run demo -d --id ticker -- sh -c 'i=0; while true; do echo "tick $i"; i=$((i+1)); sleep 0.2; done'
run exec demo ticker -- ps
run ps demo
step "ferry uvm upgrade demo   (a new host process takes over; the ticker never stops)"
"$ferry" uvm upgrade demo
run ps demo
step "ferry logs demo ticker   (every line, across the handoff; the last ones shown)"
sleep 1
"$ferry" logs demo ticker | tail -n 3
run kill demo ticker
set +e
step "ferry wait demo ticker"
"$ferry" wait demo ticker
echo "exit code: $? (128 + SIGKILL)"
set -e
run uvm stop demo
trap - EXIT
echo
echo "demo OK — state and logs in $FERRY_STATE_DIR/uvms/demo"
