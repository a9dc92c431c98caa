# Sourced by the scripts in this directory: installs Debian packages on demand, so
# that a bare machine (CI, a new laptop) gets what the stack and the tests need.

# ensure_packages CMD_OR_PATH:PACKAGE ...: installs PACKAGE when CMD_OR_PATH is missing.
ensure_packages() {
  local missing=()
  for spec in "$@"; do
    local probe=${spec%%:*} pkg=${spec#*:}
    if [[ $probe == /* ]]; then
      compgen -G "$probe" >/dev/null || missing+=("$pkg")
    else
      command -v "$probe" >/dev/null 2>&1 || missing+=("$pkg")
    fi
  done
  ((${#missing[@]} == 0)) && return 0
  echo "==> installing ${missing[*]}" >&2
  local sudo=""
  [[ $(id -u) == 0 ]] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# free_port START: prints the first TCP port from START up that nothing listens on.
free_port() {
  local port=$1
  while (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
    port=$((port + 1))
  done
  echo "$port"
}
