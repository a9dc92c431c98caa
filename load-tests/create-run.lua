-- wrk script: POST /v1/runs with a small JSON body (token from the environment).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("VM0_API_KEY")
wrk.body = '{"agent": "bench-agent", "prompt": "Summarize the latest AI trends", "variables": {"DEBUG": "false"}}'
dofile("load-tests/report.lua")
