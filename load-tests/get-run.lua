-- wrk script: GET /v1/runs/:id (the URL is given on the command line).
wrk.headers["Authorization"] = "Bearer " .. os.getenv("VM0_API_KEY")
dofile("load-tests/report.lua")
