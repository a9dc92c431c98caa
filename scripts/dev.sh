#!/usr/bin/env bash
# The start command (README): builds and runs `vm0 dev`, which serves the API on
# VM0_HTTP_ADDR (default 127.0.0.1:8080) with SQLite under VM0_DATA_DIR (default
# ./.vm0), and prints the URL and an API key. VM0_SANDBOX=qemu runs every run in a
# QEMU microVM (QEMU and busybox-static are installed first).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
ensure_packages curl:curl jq:jq nats-server:nats-server bwrap:bubblewrap \
  /usr/sbin/nft:nftables /usr/bin/ip:iproute2 nsenter:util-linux
# Every backend runs commands through the static guest agent.
source scripts/guest-agent.sh
build_guest_agent
if [[ ${VM0_SANDBOX:-auto} == qemu ]]; then
  ensure_packages qemu-system-x86_64:qemu-system-x86
  dpkg -s busybox-static >/dev/null 2>&1 || ensure_packages busybox-static-probe-absent:busybox-static
fi
cargo build -q -p vm0-cli
exec target/debug/vm0 dev "$@"
