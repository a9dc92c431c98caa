#!/usr/bin/env bash
# The curl + jq commands of VM0's API documents (shared/api/), with
# https://api.vm0.ai replaced by $API, run against a live gateway. Each pipes into
# `jq -e` with the shape the documents promise. Needs API, VM0_API_KEY, WORK.
set -euo pipefail
export API VM0_API_KEY
check() { # description, then stdin is the command's output
  local what=$1 out
  out=$(cat)
  if ! jq -e "$2" <<<"$out" >/dev/null; then
    echo "FAILED: $what: $2 on: $out" >&2
    exit 1
  fi
  echo "ok: $what"
}

# 003: list agents with limit; the pagination object.
curl -s "$API/v1/agents?limit=10" -H "Authorization: Bearer $VM0_API_KEY" |
  check "003 list agents" '(.data | type == "array") and (.pagination | has("hasMore") and has("nextCursor"))'

# An agent for the run examples.
curl -s -X POST "$API/v1/agents" -H "Authorization: Bearer $VM0_API_KEY" -H "Content-Type: application/json" \
  -d '{"name": "my-agent", "config": {"command": ["sh", "-c", "echo $VM0_PROMPT"]}}' |
  check "create agent" '.id | startswith("ag_")'

# 002 quick start: list your agents.
bash -c 'curl -s "$API/v1/agents" -H "Authorization: Bearer $VM0_API_KEY"' | jq '.data[] | {id, name}' |
  check "002 list agents" '.name == "my-agent"'

# 001/002: basic run from a request file.
cat >"$WORK/vm0_request.json" <<'JSON'
{
  "agent": "my-agent",
  "prompt": "Hello, please introduce yourself"
}
JSON
cd "$WORK"
RUN=$(bash -c 'curl -s -X POST "$API/v1/runs" -H "Authorization: Bearer $VM0_API_KEY" -H "Content-Type: application/json" -d @/'"$WORK"'/vm0_request.json' | jq '{id, status}')
check "001 basic run" '(.id | startswith("run_")) and .status == "pending"' <<<"$RUN"
RUN_ID=$(jq -r .id <<<"$RUN")

# 000: create run with variables (202 body has every documented field).
curl -s "$API/v1/runs" \
  -H "Authorization: Bearer $VM0_API_KEY" \
  -H "Content-Type: application/json" \
  -d '{
"agent": "my-agent",
"prompt": "Research the latest AI trends and create a summary report",
"variables": {
"SLACK_CHANNEL_ID": "C0123456789"
}
}' | check "000 create run" '([.id, .agentId, .agentName, .status, .prompt, .sessionId, .createdAt] | all)
  and ([has("error"), has("executionTimeMs"), has("checkpointId"), has("artifactName"), has("artifactVersion"), has("startedAt"), has("completedAt")] | all)'

# 001: variables and secrets (heredoc body).
curl -s -X POST "$API/v1/runs" \
  -H "Authorization: Bearer $VM0_API_KEY" \
  -H "Content-Type: application/json" \
  -d @- << 'EOF2' | check "001 run with secrets" '.status == "pending" and (tostring | contains("secret-value") | not)'
{
  "agent": "my-agent",
  "prompt": "Process the data",
  "variables": {
    "DEBUG": "true",
    "LOG_LEVEL": "info"
  },
  "secrets": {
    "API_KEY": "secret-value"
  }
}
EOF2

# 001: artifact name/version (snake_case).
curl -s -X POST "$API/v1/runs" \
  -H "Authorization: Bearer $VM0_API_KEY" \
  -H "Content-Type: application/json" \
  -d @- << 'EOF2' | check "001 run with artifact" '.artifactName == "output-results"'
{
  "agent": "my-agent",
  "prompt": "Process input files and save results",
  "artifact_name": "output-results",
  "artifact_version": "latest"
}
EOF2

# 001: continue the session of the first run.
SESSION=$(curl -s "$API/v1/runs/$RUN_ID" -H "Authorization: Bearer $VM0_API_KEY" | jq -r .sessionId)
curl -s -X POST "$API/v1/runs" \
  -H "Authorization: Bearer $VM0_API_KEY" \
  -H "Content-Type: application/json" \
  -d @- << EOF2 | check "001 continue session" ".sessionId == \"$SESSION\""
{
  "session_id": "$SESSION",
  "prompt": "Continue with the next step"
}
EOF2

# 001: list, filter by status, by agent, by time, paginate.
bash -c 'curl -s "$API/v1/runs" -H "Authorization: Bearer $VM0_API_KEY"' | jq '.data[] | {id, status, agent_name}' |
  check "001 list runs" '.status == "pending"'
bash -c 'curl -s "$API/v1/runs?status=running" -H "Authorization: Bearer $VM0_API_KEY"' | jq '.data' |
  check "001 filter by status" 'length == 0'
AGENT_ID=$(curl -s "$API/v1/runs/$RUN_ID" -H "Authorization: Bearer $VM0_API_KEY" | jq -r .agentId)
bash -c 'curl -s "$API/v1/runs?agent_id='"$AGENT_ID"'" -H "Authorization: Bearer $VM0_API_KEY"' | jq '.data' |
  check "001 filter by agent" 'length == 5'
bash -c 'curl -s "$API/v1/runs?since=2024-01-01T00:00:00Z" -H "Authorization: Bearer $VM0_API_KEY"' | jq '.data' |
  check "001 filter by time" 'length == 5'
CURSOR=$(bash -c 'curl -s "$API/v1/runs?limit=2" -H "Authorization: Bearer $VM0_API_KEY"' | jq -r '.pagination.nextCursor')
bash -c 'curl -s "$API/v1/runs?limit=10&cursor='"$CURSOR"'" -H "Authorization: Bearer $VM0_API_KEY"' | jq '{data, pagination}' |
  check "001 pagination" '(.data | length) == 3 and .pagination.hasMore == false'

# 001: get run, cancel, events, logs, metrics.
bash -c 'curl -s "$API/v1/runs/'"$RUN_ID"'" -H "Authorization: Bearer $VM0_API_KEY"' | jq '{id, status, error, execution_time_ms}' |
  check "001 get run" '.status == "pending"'
bash -c 'curl -s -X POST "$API/v1/runs/'"$RUN_ID"'/cancel" -H "Authorization: Bearer $VM0_API_KEY"' | jq '{id, status}' |
  check "001 cancel" '.status == "cancelled"'
curl -s -N "$API/v1/runs/$RUN_ID/events" \
  -H "Authorization: Bearer $VM0_API_KEY" \
  -H "Accept: text/event-stream" | grep -c '^event: ' | check "001 events" '. == 3'
curl -s -N "$API/v1/runs/$RUN_ID/events?last_event_id=evt_1" \
  -H "Authorization: Bearer $VM0_API_KEY" \
  -H "Accept: text/event-stream" | grep '^id: ' | jq -R . | jq -s . | check "001 resume" '. == ["id: evt_2", "id: evt_3"]'
bash -c 'curl -s "$API/v1/runs/'"$RUN_ID"'/logs" -H "Authorization: Bearer $VM0_API_KEY"' | jq '.data[]' | jq -s . |
  check "001 logs" 'length == 2 and all(has("timestamp") and has("type") and has("level") and has("message") and has("metadata"))'
bash -c 'curl -s "$API/v1/runs/'"$RUN_ID"'/logs?level=error" -H "Authorization: Bearer $VM0_API_KEY"' | jq '.data' |
  check "001 logs by level" 'length == 0'
bash -c 'curl -s "$API/v1/runs/'"$RUN_ID"'/logs?limit=100&cursor=" -H "Authorization: Bearer $VM0_API_KEY"' | jq '{data, pagination}' |
  check "001 logs, empty cursor = first page" '(.data | length) == 2'
curl -s "$API/v1/runs/$RUN_ID/logs?type=agent&limit=50" -H "Authorization: Bearer $VM0_API_KEY" |
  check "000 logs by type" '.data == [] and .pagination.hasMore == false'
bash -c 'curl -s "$API/v1/runs/'"$RUN_ID"'/metrics" -H "Authorization: Bearer $VM0_API_KEY"' | jq '{summary, data}' |
  check "001 metrics" '(.data | type == "array") and (.summary | has("avgCpuPercent") and has("maxMemoryUsedMb") and has("totalDurationMs") and has("networkRxBytes"))'

# 003: the error format.
curl -s "$API/v1/agents/ag_nosuchagent" -H "Authorization: Bearer $VM0_API_KEY" |
  check "003 error format" '.error.type == "not_found_error" and .error.code == "resource_not_found" and (.error.message | length > 0)'
curl -s "$API/v1/agents" -H "Authorization: Bearer vm0_live_xxx" |
  check "003 bad key" '.error.type == "authentication_error" and .error.code == "invalid_api_key"'
