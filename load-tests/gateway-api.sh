#!/usr/bin/env bash
# Gateway API throughput and latency: GET /v1/runs/:id and POST /v1/runs, on SQLite
# and on PostgreSQL, with wrk against a release build on this machine.
#
#   load-tests/gateway-api.sh [sqlite|postgres|both] [seconds] [connections]
#   TRACES=1 load-tests/gateway-api.sh ...   # the same, exporting every span over OTLP
#                                            # to vm0-otlp-sink (tracing overhead)
#
# Prints a Markdown table for docs/benchmarks.md. Traffic goes to 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
source scripts/test-postgres.sh

backends=${1:-both}
duration=${2:-10}
connections=${3:-64}
[[ $backends == both ]] && backends="sqlite postgres"

ensure_packages wrk:wrk curl:curl jq:jq '/usr/lib/postgresql/*/bin/initdb:postgresql'
cargo build --release -q -p vm0-gateway -p vm0-load
bin=target/release/vm0-gateway
work=$(mktemp -d /tmp/vm0-bench.XXXXXX)
gateway_pid=""
sink_pid=""
cleanup() {
  [[ -n $gateway_pid ]] && kill "$gateway_pid" 2>/dev/null && wait "$gateway_pid" 2>/dev/null
  [[ -n $sink_pid ]] && kill "$sink_pid" 2>/dev/null && wait "$sink_pid" 2>/dev/null
  stop_test_postgres
  rm -rf "$work"
}
trap cleanup EXIT

run_wrk() { # script url
  wrk -t1 -c"$connections" -d"${duration}s" --timeout 5s -s "$1" "$2" 2>&1 |
    awk '/^RESULT/ {print}' | tail -n 1
}

label=""
if [[ ${TRACES:-0} == 1 ]]; then
  sink_addr="127.0.0.1:$(free_port 18400)"
  target/release/vm0-otlp-sink --addr "$sink_addr" >"$work/sink.log" 2>&1 &
  sink_pid=$!
  export OTEL_EXPORTER_OTLP_ENDPOINT="http://$sink_addr"
  label=" + OTLP"
fi

echo "| store | endpoint | connections | req/s | p50 ms | p90 ms | p99 ms | errors |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
for backend in $backends; do
  export VM0_DATA_DIR="$work/$backend"
  mkdir -p "$VM0_DATA_DIR"
  if [[ $backend == postgres ]]; then
    [[ -n ${VM0_TEST_POSTGRES_URL:-} ]] || start_test_postgres
    psql -q "$VM0_TEST_POSTGRES_URL" -c "CREATE DATABASE bench_$$" >/dev/null
    export DATABASE_URL="${VM0_TEST_POSTGRES_URL%/*}/bench_$$"
  else
    unset DATABASE_URL
  fi
  port=$(free_port 18300)
  export VM0_HTTP_ADDR="127.0.0.1:$port" RUST_LOG=warn VM0_DB_MAX_CONNECTIONS=${VM0_DB_MAX_CONNECTIONS:-16}
  VM0_API_KEY=$("$bin" token create --org bench 2>/dev/null)
  export VM0_API_KEY
  "$bin" serve >"$work/gateway-$backend.log" 2>&1 &
  gateway_pid=$!
  base="http://$VM0_HTTP_ADDR"
  for _ in $(seq 100); do curl -sf "$base/healthz" >/dev/null && break; sleep 0.1; done
  auth=(-H "Authorization: Bearer $VM0_API_KEY" -H "Content-Type: application/json")
  curl -sf "${auth[@]}" "$base/v1/agents" -d '{"name": "bench-agent", "config": {"command": ["true"]}}' >/dev/null
  run_id=$(curl -sf "${auth[@]}" "$base/v1/runs" -d '{"agent": "bench-agent", "prompt": "p"}' | jq -r .id)

  for scenario in "GET /v1/runs/:id|load-tests/get-run.lua|$base/v1/runs/$run_id" \
                  "POST /v1/runs|load-tests/create-run.lua|$base/v1/runs"; do
    IFS='|' read -r name script url <<<"$scenario"
    line=$(run_wrk "$script" "$url")
    # RESULT requests=N errors=N rps=N p50=N p90=N p99=N max=N
    eval "$(echo "${line#RESULT }" | tr ' ' '\n' | sed 's/^/r_/')"
    echo "| $backend$label | $name | $connections | $r_rps | $r_p50 | $r_p90 | $r_p99 | $r_errors |"
  done
  kill "$gateway_pid"; wait "$gateway_pid" 2>/dev/null || true; gateway_pid=""
done
if [[ -n $sink_pid ]]; then
  kill "$sink_pid"; wait "$sink_pid" 2>/dev/null || true; sink_pid=""
  echo "spans received by the sink: $(tail -n 1 "$work/sink.log" | awk '{print $2}')" >&2
fi
