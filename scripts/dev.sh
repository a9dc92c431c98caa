#!/usr/bin/env bash
# The start command (README): builds and runs `vm0 dev`, which serves the API on
# VM0_HTTP_ADDR (default 127.0.0.1:8080) with SQLite under VM0_DATA_DIR (default
# ./.vm0), and prints the URL and an API key.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
ensure_packages curl:curl jq:jq nats-server:nats-server bwrap:bubblewrap
cargo build -q -p vm0-cli
exec target/debug/vm0 dev "$@"
