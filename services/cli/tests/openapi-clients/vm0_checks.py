"""Schemathesis hooks for the vm0 API (services/cli/tests/openapi.rs).

`positive_data_acceptance`, with the two refusals of a schema-valid request
that a JSON Schema cannot rule out and that VM0's API answers by design:

- `400 invalid_state`: the request is well formed but the resource cannot do
  it now (cancel a run that already ended, run a session whose agent was
  deleted). VM0 documents `invalid_state` as a 400.
- `400`/`413` with `param: "files"`: an upload's list as a whole breaks a
  rule between its entries (two entries with one path, a file that is also
  a directory, sizes adding up past the deployment's total). Every rule about
  one entry is in the schema, and its error names the entry (`files[2].size`).
- `400 missing_parameter` with `param: "secrets.NAME"` on `POST /v1/runs`: the
  agent's `network.secretHeaders` sends that secret, and the run did not
  bring it (a rule between the agent and the run).

Anything else that refuses schema-valid data fails as the stock check does.
"""

import ast
import threading

import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance

# CPython 3.11 keeps `ast.parse`'s recursion depth in state its threads share:
# two parsing at once can fail with "SystemError: AST constructor recursion
# depth mismatch". Hypothesis parses sources to describe the lambdas it filters
# with, and `--workers 2` runs two threads. One parse at a time.
_parse = ast.parse
_parsing = threading.Lock()


def _one_parse_at_a_time(*args, **kwargs):
    with _parsing:
        return _parse(*args, **kwargs)


ast.parse = _one_parse_at_a_time


def _refused_by_design(response) -> bool:
    if response.status_code not in (400, 413):
        return False
    try:
        error = response.json().get("error", {})
    except Exception:
        return False
    if not isinstance(error, dict):
        return False
    if response.status_code == 400 and error.get("code") == "invalid_state":
        return True
    param = error.get("param") or ""
    if error.get("code") == "missing_parameter" and param.startswith("secrets."):
        return True
    return error.get("param") == "files"


@schemathesis.check
def vm0_positive_data_acceptance(ctx, response, case):
    if _refused_by_design(response):
        return None
    return positive_data_acceptance(ctx, response, case)
