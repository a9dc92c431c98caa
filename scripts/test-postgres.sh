# Sourced by scripts/test.sh: starts a throwaway PostgreSQL server on a private port
# and exports VM0_TEST_POSTGRES_URL; the server stops when the shell exits.

start_test_postgres() {
  local bin
  bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [[ -n $bin ]] || { echo "PostgreSQL server binaries not found" >&2; return 1; }
  PG_TEST_DIR=$(mktemp -d /tmp/vm0-test-pg.XXXXXX)
  local port as_pg=()
  port=$(free_port 55432)
  if [[ $(id -u) == 0 ]]; then
    # initdb refuses to run as root: use the postgres account the package created.
    chown postgres: "$PG_TEST_DIR"
    as_pg=(runuser -u postgres --)
  fi
  "${as_pg[@]}" "$bin/initdb" -D "$PG_TEST_DIR/data" -A trust -U vm0 --no-sync -E UTF8 >/dev/null
  "${as_pg[@]}" "$bin/pg_ctl" -D "$PG_TEST_DIR/data" -l "$PG_TEST_DIR/log" -w \
    -o "-p $port -k $PG_TEST_DIR -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=400" \
    start >/dev/null
  PG_TEST_BIN=$bin
  export VM0_TEST_POSTGRES_URL="postgres://vm0@127.0.0.1:$port/postgres"
  echo "==> PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port" >&2
}

stop_test_postgres() {
  [[ -n ${PG_TEST_DIR:-} ]] || return 0
  local as_pg=()
  [[ $(id -u) == 0 ]] && as_pg=(runuser -u postgres --)
  "${as_pg[@]}" "$PG_TEST_BIN/pg_ctl" -D "$PG_TEST_DIR/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$PG_TEST_DIR"
}
