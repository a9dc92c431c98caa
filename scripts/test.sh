#!/usr/bin/env bash
# The test command (README, CI): on a bare Debian machine, installs what the tests
# need, starts a private PostgreSQL, then runs fmt, clippy and every test.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
source scripts/test-postgres.sh

ensure_packages '/usr/lib/postgresql/*/bin/initdb:postgresql' curl:curl jq:jq \
  nats-server:nats-server bwrap:bubblewrap qemu-system-x86_64:qemu-system-x86 \
  xz:xz-utils /usr/sbin/mkfs.ext4:e2fsprogs /usr/sbin/nft:nftables /usr/bin/ip:iproute2 \
  nsenter:util-linux
# The guest images need a *static* busybox (Debian's plain busybox is dynamic).
dpkg -s busybox-static >/dev/null 2>&1 || ensure_packages busybox-static-probe-absent:busybox-static
# An unprivileged worker's microVMs open taps through /dev/net/tun: Debian's udev
# makes it 0666, a container may leave it 0600.
if [ -c /dev/net/tun ] && [ "$(id -u)" = 0 ]; then chmod 0666 /dev/net/tun; fi

# A real S3-compatible server for the object store's tests (moto, from PyPI).
python3 -c 'import moto.server' 2>/dev/null || {
  echo "==> installing moto[server] (pip)" >&2
  python3 -m pip install -q --disable-pip-version-check 'moto[server]==5.2.1'
}

# Schemathesis and openapi-python-client for the OpenAPI tests (PyPI, pinned).
source scripts/python-tools.sh
ensure_python_tools

# The guest agent is PID 1 of the microVMs' initramfs: a static (musl) binary.
source scripts/guest-agent.sh
build_guest_agent
export VM0_IMAGE_CACHE=${VM0_IMAGE_CACHE:-$PWD/target/vm0-images}

trap stop_test_postgres EXIT
start_test_postgres

export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
echo "==> cargo fmt --check" >&2
cargo fmt --all --check
echo "==> cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> tests" >&2
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast "$@"
else
  echo "cargo-nextest not found; using cargo test" >&2
  cargo test --workspace --locked --no-fail-fast "$@"
fi
