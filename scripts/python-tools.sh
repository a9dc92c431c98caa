# Sourced by scripts/test.sh: the Python tools the OpenAPI tests drive
# (services/cli/tests/openapi.rs), pinned, from PyPI, in a venv under target/.
SCHEMATHESIS_VERSION=4.32.5
OPENAPI_PYTHON_CLIENT_VERSION=0.29.1

ensure_python_tools() {
  local venv=${VM0_PY_TOOLS:-$PWD/target/py}
  local want="schemathesis==$SCHEMATHESIS_VERSION openapi-python-client==$OPENAPI_PYTHON_CLIENT_VERSION"
  if [[ ! -f $venv/.installed ]] || [[ $(cat "$venv/.installed") != "$want" ]]; then
    echo "==> installing $want (pip, in $venv)" >&2
    python3 -m venv --clear "$venv" 2>/dev/null || {
      ensure_packages python3-venv-probe-absent:python3-venv
      python3 -m venv --clear "$venv"
    }
    # shellcheck disable=SC2086
    "$venv/bin/pip" install -q --disable-pip-version-check $want
    echo "$want" >"$venv/.installed"
  fi
  export VM0_SCHEMATHESIS=$venv/bin/st
  export VM0_OPENAPI_PYTHON_CLIENT=$venv/bin/openapi-python-client
}
