# Sourced by scripts/test.sh and scripts/dev.sh: builds the static guest agent that
# the microVM images boot as /init, and exports VM0_GUEST_AGENT.

build_guest_agent() {
  local target=x86_64-unknown-linux-musl
  if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
    echo "==> rustup target add $target" >&2
    rustup target add "$target" >&2
  fi
  echo "==> building the static guest agent" >&2
  cargo build -q --release --locked --target "$target" -p vm0-guest-agent
  export VM0_GUEST_AGENT=$PWD/target/$target/release/vm0-guest-agent
}
