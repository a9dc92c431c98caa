"""A client generated from /v1/openapi.json by openapi-python-client, used as a
user would: create an agent, page through agents, create a run with variables,
follow it to its end, read its output, list it, and read an error.

Run by services/cli/tests/openapi.rs with the generated package `vm0_client`
on PYTHONPATH and VM0_API_URL / VM0_API_KEY set. Prints `followed <status>`.
"""

import os
import sys
import time

from vm0_client import AuthenticatedClient
from vm0_client.api.agents import agents_create, agents_list
from vm0_client.api.runs import runs_create, runs_get, runs_list, runs_logs
from vm0_client.models import (
    Agent,
    AgentConfig,
    CreateAgentRequest,
    CreateRunRequest,
    CreateRunRequestVariables,
    ErrorEnvelope,
    PageAgent,
    PageLogEntry,
    PageRun,
    Run,
    RunStatus,
)

client = AuthenticatedClient(base_url=os.environ["VM0_API_URL"], token=os.environ["VM0_API_KEY"])

agents = []
for name in ["generated-a", "generated-b", "generated-c"]:
    agent = agents_create.sync(
        client=client,
        body=CreateAgentRequest(
            name=name,
            config=AgentConfig(command=["sh", "-c", 'echo "from $GREETING"; sleep 1; echo done']),
        ),
    )
    assert isinstance(agent, Agent), agent
    agents.append(agent)

# Every agent, one page at a time, by the cursor the API hands back.
seen, cursor = [], None
while True:
    page = agents_list.sync(client=client, limit=1, **({"cursor": cursor} if cursor else {}))
    assert isinstance(page, PageAgent), page
    seen += [a.id for a in page.data]
    if not page.pagination.has_more:
        break
    cursor = page.pagination.next_cursor
assert {a.id for a in agents} <= set(seen), (agents, seen)

variables = CreateRunRequestVariables.from_dict({"GREETING": "generated"})
run = runs_create.sync(
    client=client,
    body=CreateRunRequest(prompt="hello", agent="generated-a", variables=variables),
)
assert isinstance(run, Run), run
assert run.status in (RunStatus.PENDING, RunStatus.RUNNING), run.status

# Follow it: its status until it ends, its output as it comes.
deadline = time.monotonic() + 120
lines = []
while True:
    got = runs_get.sync(run.id, client=client)
    assert isinstance(got, Run), got
    logs = runs_logs.sync(run.id, client=client, limit=100)
    assert isinstance(logs, PageLogEntry), logs
    lines = [entry.message for entry in logs.data]
    if got.status not in (RunStatus.PENDING, RunStatus.RUNNING):
        break
    assert time.monotonic() < deadline, f"run {run.id} still {got.status}"
    time.sleep(0.2)
assert got.status == RunStatus.COMPLETED, (got.status, got.error, lines)
assert any("from generated" in line for line in lines), lines
assert got.completed_at is not None and got.execution_time_ms is not None, got

listed = runs_list.sync(client=client, agent_id=agents[0].id)
assert isinstance(listed, PageRun), listed
assert [r.id for r in listed.data] == [run.id], listed

missing = runs_get.sync("run_" + "0" * 24, client=client)
assert isinstance(missing, ErrorEnvelope), missing
assert missing.error.code.value == "resource_not_found", missing.error

print(f"followed {got.status.value}")
sys.exit(0)
