use reqwest::{Method, StatusCode};
use serde_json::json;
use vm0_api_types::Timestamp;
use vm0_api_types::runs::{LogLevel, LogType};
use vm0_db::{NewLog, NewMetric};

use crate::common::{Db, TestGateway, assert_error};

async fn create_get_list_cancel(db: Db) {
    let gw = TestGateway::start(db).await;
    let agent = gw.create_agent("my-agent").await;
    let agent_id = agent["id"].as_str().expect("id");

    let run = gw.create_run("my-agent", "Research AI trends").await;
    let run_id = run["id"].as_str().expect("id").to_owned();
    assert!(run_id.starts_with("run_"));
    assert_eq!(run["status"], "pending");
    assert_eq!(run["agentId"], agent_id);
    assert_eq!(run["agentName"], "my-agent");
    assert_eq!(run["prompt"], "Research AI trends");
    assert!(
        run["sessionId"]
            .as_str()
            .is_some_and(|s| s.starts_with("sess_"))
    );
    for field in [
        "error",
        "executionTimeMs",
        "checkpointId",
        "artifactName",
        "artifactVersion",
        "startedAt",
        "completedAt",
    ] {
        assert!(run[field].is_null(), "{field} should be null: {run}");
    }
    assert!(
        run["createdAt"]
            .as_str()
            .is_some_and(|t| Timestamp::parse(t).is_some())
    );

    // snake_case input, by agent id, with a session continuation.
    let (status, second) = gw
        .post(
            "/v1/runs",
            json!({"agent_id": agent_id, "prompt": "two", "agent_version": "1"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{second}");
    let (status, third) = gw
        .post(
            "/v1/runs",
            json!({"session_id": run["sessionId"], "prompt": "continue"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{third}");
    assert_eq!(third["sessionId"], run["sessionId"]);

    let (status, got) = gw.get(&format!("/v1/runs/{run_id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got, run);

    let (_, list) = gw.get("/v1/runs").await;
    let ids: Vec<_> = list["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|r| r["id"].clone())
        .collect();
    assert_eq!(
        ids,
        vec![third["id"].clone(), second["id"].clone(), run["id"].clone()],
        "newest first"
    );

    // Cancel a pending run, then again.
    let (status, cancelled) = gw
        .post(&format!("/v1/runs/{run_id}/cancel"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled");
    assert!(cancelled["completedAt"].is_string());
    let got = gw
        .call(Method::POST, &format!("/v1/runs/{run_id}/cancel"), None)
        .await;
    assert_error(&got, 400, "invalid_request_error", "invalid_state", None);

    // Filters.
    let (_, by_status) = gw.get("/v1/runs?status=cancelled").await;
    assert_eq!(by_status["data"].as_array().map(Vec::len), Some(1));
    assert_eq!(by_status["data"][0]["id"], run_id.as_str());
    let (_, pending) = gw
        .get(&format!("/v1/runs?status=pending&agent_id={agent_id}"))
        .await;
    assert_eq!(pending["data"].as_array().map(Vec::len), Some(2));
    let (_, none) = gw.get("/v1/runs?agentId=ag_other").await;
    assert_eq!(none["data"].as_array().map(Vec::len), Some(0));
    let (_, since_future) = gw.get("/v1/runs?since=2999-01-01T00:00:00Z").await;
    assert_eq!(since_future["data"].as_array().map(Vec::len), Some(0));
    let (_, since_past) = gw.get("/v1/runs?since=2000-01-01T00:00:00Z").await;
    assert_eq!(since_past["data"].as_array().map(Vec::len), Some(3));
}

async fn create_run_errors(db: Db) {
    let gw = TestGateway::start(db).await;
    gw.create_agent("my-agent").await;
    let cases = [
        (
            json!({"agent": "my-agent"}),
            400,
            "missing_parameter",
            "prompt",
        ),
        (json!({"prompt": "p"}), 400, "missing_parameter", "agent"),
        (
            json!({"agent": "my-agent", "prompt": ""}),
            400,
            "invalid_parameter",
            "prompt",
        ),
        (
            json!({"agent": "my-agent", "prompt": 42}),
            400,
            "invalid_parameter",
            "prompt",
        ),
        (
            json!({"agent": "my-agent", "agentId": "ag_x", "prompt": "p"}),
            400,
            "invalid_parameter",
            "agent",
        ),
        (
            json!({"agent": "my-agent", "prompt": "p", "promt": "typo"}),
            400,
            "invalid_parameter",
            "promt",
        ),
        (
            json!({"agent": "my-agent", "prompt": "p", "variables": {"OK": 1}}),
            400,
            "invalid_parameter",
            "variables.OK",
        ),
        (
            json!({"agent": "my-agent", "prompt": "p", "variables": {"VM0_PROMPT": "x"}}),
            400,
            "invalid_parameter",
            "variables.VM0_PROMPT",
        ),
        (
            json!({"agent": "my-agent", "prompt": "p", "agentVersion": "banana"}),
            400,
            "invalid_parameter",
            "agentVersion",
        ),
        (
            json!({"agent": "my-agent", "prompt": "p", "artifactVersion": "v1"}),
            400,
            "missing_parameter",
            "artifactName",
        ),
        (
            json!({"agentId": "not-an-id", "prompt": "p"}),
            400,
            "invalid_parameter",
            "agentId",
        ),
        (
            json!({"sessionId": "ses_wrongprefix", "prompt": "p"}),
            400,
            "invalid_parameter",
            "sessionId",
        ),
        (
            json!({"agent": "nope", "prompt": "p"}),
            404,
            "resource_not_found",
            "agent",
        ),
        (
            json!({"agentId": "ag_nope", "prompt": "p"}),
            404,
            "resource_not_found",
            "agentId",
        ),
        (
            json!({"sessionId": "sess_nope", "prompt": "p"}),
            404,
            "resource_not_found",
            "sessionId",
        ),
        (
            json!({"checkpointId": "chk_nope", "prompt": "p"}),
            404,
            "resource_not_found",
            "checkpointId",
        ),
        (
            json!({"agent": "my-agent", "prompt": "p", "agentVersion": "7"}),
            404,
            "resource_not_found",
            "agentVersion",
        ),
        (
            json!({"agent": "my-agent", "prompt": "p", "agentVersion": "ver_nope"}),
            404,
            "resource_not_found",
            "agentVersion",
        ),
        (
            json!({"agent": "my-agent", "prompt": "p", "volumes": {"input-data": "latest"}}),
            404,
            "resource_not_found",
            "volumes.input-data",
        ),
        (
            json!({"agent": "my-agent", "prompt": "p", "artifactName": "out", "artifactVersion": "sv_x"}),
            404,
            "resource_not_found",
            "artifactName",
        ),
    ];
    for (body, status, code, param) in cases {
        let got = gw.post("/v1/runs", body.clone()).await;
        let kind = if status == 404 {
            "not_found_error"
        } else {
            "invalid_request_error"
        };
        assert_error(&got, status, kind, code, Some(param));
    }
    // A new artifact name is fine: the run will create it.
    let (status, run) = gw
        .post("/v1/runs", json!({"agent": "my-agent", "prompt": "p", "artifact_name": "out", "artifact_version": "latest"}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{run}");
    assert_eq!(run["artifactName"], "out");
    for (path, status) in [
        ("/v1/runs/nope", 400),
        ("/v1/runs/run_missing", 404),
        ("/v1/runs?status=done", 400),
        ("/v1/runs?since=yesterday", 400),
        ("/v1/runs?agentId=bad", 400),
    ] {
        let (s, body) = gw.get(path).await;
        assert_eq!(s.as_u16(), status, "{path}: {body}");
    }
    let got = gw
        .call(Method::POST, "/v1/runs/run_missing/cancel", None)
        .await;
    assert_error(&got, 404, "not_found_error", "resource_not_found", None);
}

async fn secrets_are_never_returned_or_stored(db: Db) {
    let gw = TestGateway::start(db).await;
    gw.create_agent("my-agent").await;
    let secret = "s3cr3t-value-that-must-not-leak";
    let (status, run) = gw
        .post(
            "/v1/runs",
            json!({"agent": "my-agent", "prompt": "p", "variables": {"DEBUG": "true"}, "secrets": {"API_KEY": secret}}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert!(!run.to_string().contains(secret));
    let id = run["id"].as_str().expect("id");
    for path in [
        format!("/v1/runs/{id}"),
        "/v1/runs".to_owned(),
        format!("/v1/runs/{id}/logs"),
    ] {
        let (_, body) = gw.get(&path).await;
        assert!(
            !body.to_string().contains(secret),
            "{path} leaked the secret"
        );
    }
    let org = gw
        .store
        .find_organization("acme")
        .await
        .expect("q")
        .expect("org");
    let row = gw
        .store
        .get_run(&org.id, id)
        .await
        .expect("q")
        .expect("row");
    assert_eq!(row.secret_names, r#"["API_KEY"]"#);
    let stored = format!("{row:?}");
    assert!(!stored.contains(secret), "the store holds the secret");
}

async fn logs_and_metrics(db: Db) {
    let gw = TestGateway::start(db).await;
    gw.create_agent("my-agent").await;
    let run = gw.create_run("my-agent", "p").await;
    let id = run["id"].as_str().expect("id");
    let base = Timestamp::parse("2030-01-01T00:00:00Z")
        .expect("t")
        .micros();
    let logs: Vec<NewLog> = (0..45)
        .map(|i| NewLog {
            key: None,
            ts: base + i * 1_000_000,
            log_type: if i % 3 == 0 {
                LogType::System
            } else {
                LogType::Agent
            },
            level: if i % 5 == 0 {
                LogLevel::Error
            } else {
                LogLevel::Info
            },
            message: format!("line {i}"),
            metadata: json!({"i": i}),
        })
        .collect();
    gw.store.append_logs(id, &logs).await.expect("append");

    // All lines, oldest first; the "run queued" line comes before the 2030 ones.
    let all = gw.walk(&format!("/v1/runs/{id}/logs"), 10).await;
    assert_eq!(all.len(), 46);
    assert_eq!(all[0]["message"], "run queued");
    assert_eq!(all[1]["message"], "line 0");
    assert_eq!(all[1]["metadata"], json!({"i": 0}));
    assert_eq!(all[45]["message"], "line 44");
    let desc = gw.walk(&format!("/v1/runs/{id}/logs?order=desc"), 7).await;
    assert_eq!(desc.len(), 46);
    assert_eq!(desc[0]["message"], "line 44");
    let agent_only = gw
        .walk(&format!("/v1/runs/{id}/logs?type=agent"), 100)
        .await;
    assert_eq!(agent_only.len(), 30);
    assert!(agent_only.iter().all(|l| l["type"] == "agent"));
    let errors = gw
        .walk(&format!("/v1/runs/{id}/logs?level=error"), 100)
        .await;
    assert_eq!(errors.len(), 9);
    let window = gw
        .walk(
            &format!("/v1/runs/{id}/logs?since=2030-01-01T00:00:10Z&until=2030-01-01T00:00:19Z"),
            100,
        )
        .await;
    assert_eq!(window.len(), 10);
    assert_eq!(window[0]["message"], "line 10");
    let inverted = gw
        .walk(
            &format!("/v1/runs/{id}/logs?since=2030-01-02T00:00:00Z&until=2030-01-01T00:00:00Z"),
            100,
        )
        .await;
    assert!(
        inverted.is_empty(),
        "an inverted window is empty: {inverted:?}"
    );
    for (query, param) in [
        ("type=stdout", "type"),
        ("level=fatal", "level"),
        ("order=up", "order"),
        ("since=x", "since"),
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("cursor=garbage", "cursor"),
    ] {
        let got = gw.get(&format!("/v1/runs/{id}/logs?{query}")).await;
        assert_error(
            &got,
            400,
            "invalid_request_error",
            "invalid_parameter",
            Some(param),
        );
    }
    // A cursor is a place in the logs: with `order=desc` it walks back from
    // where an ascending page ended.
    let (_, page) = gw.get(&format!("/v1/runs/{id}/logs?limit=2")).await;
    let cursor = page["pagination"]["nextCursor"].as_str().expect("cursor");
    let (status, back) = gw
        .get(&format!("/v1/runs/{id}/logs?order=desc&cursor={cursor}"))
        .await;
    assert_eq!(status, StatusCode::OK, "{back}");
    assert_eq!(back["data"], serde_json::json!([page["data"][0]]), "{back}");

    // Metrics: samples and a summary over all of them.
    let mb = 1024 * 1024;
    let samples: Vec<NewMetric> = (0..5)
        .map(|i| NewMetric {
            key: None,
            ts: base + i * 2_000_000,
            cpu_percent: 10.0 * (i + 1) as f64,
            memory_used_bytes: (100 + i * 100) * mb,
            memory_total_bytes: 2048 * mb,
            disk_used_bytes: 100 * mb,
            disk_total_bytes: 1000 * mb,
            network_rx_bytes: 1000 * i,
            network_tx_bytes: 500 * i,
        })
        .collect();
    gw.store.append_metrics(id, &samples).await.expect("append");
    let (status, metrics) = gw.get(&format!("/v1/runs/{id}/metrics")).await;
    assert_eq!(status, StatusCode::OK);
    let data = metrics["data"].as_array().expect("data");
    assert_eq!(data.len(), 5);
    let first = &data[0];
    for field in [
        "timestamp",
        "cpuPercent",
        "memoryUsedMb",
        "memoryTotalMb",
        "diskUsedMb",
        "diskTotalMb",
        "memoryBytes",
        "networkRxBytes",
        "networkTxBytes",
    ] {
        assert!(!first[field].is_null(), "{field} missing in {first}");
    }
    assert_eq!(first["memoryUsedMb"], 100);
    assert_eq!(first["memoryTotalMb"], 2048);
    let s = &metrics["summary"];
    assert_eq!(s["sampleCount"], 5);
    assert_eq!(s["avgCpuPercent"], 30.0);
    assert_eq!(s["cpuAvgPercent"], 30.0);
    assert_eq!(s["maxMemoryUsedMb"], 500);
    assert_eq!(s["memoryMaxBytes"], 500 * mb);
    assert_eq!(s["networkRxBytes"], 4000);
    assert_eq!(s["networkTxBytes"], 2000);
    assert!(s["totalDurationMs"].is_i64());
    let (_, page) = gw.get(&format!("/v1/runs/{id}/metrics?limit=2")).await;
    assert_eq!(page["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        page["summary"]["sampleCount"], 5,
        "the summary covers every sample"
    );
    assert_eq!(page["pagination"]["hasMore"], true);
}

async fn concurrent_creates_are_all_stored(db: Db) {
    let gw = TestGateway::start(db).await;
    gw.create_agent("my-agent").await;
    let n = 120;
    let creates = (0..n).map(|i| {
        let (client, url, token) = (gw.client.clone(), gw.url("/v1/runs"), gw.token.clone());
        async move {
            let resp = client
                .post(url)
                .bearer_auth(token)
                .json(&json!({"agent": "my-agent", "prompt": format!("run {i}")}))
                .send()
                .await
                .expect("send");
            assert_eq!(resp.status(), StatusCode::ACCEPTED);
            resp.json::<serde_json::Value>().await.expect("json")["id"]
                .as_str()
                .expect("id")
                .to_owned()
        }
    });
    let ids: std::collections::HashSet<String> = futures::future::join_all(creates)
        .await
        .into_iter()
        .collect();
    assert_eq!(ids.len(), n);
    let listed = gw.walk("/v1/runs", 100).await;
    assert_eq!(listed.len(), n);
    for id in ids.iter().take(10) {
        let (status, run) = gw.get(&format!("/v1/runs/{id}")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(run["status"], "pending");
        let events = gw.store.events_after(id, 0, 10).await.expect("events");
        assert_eq!(events.len(), 1, "each run has its first status event");
    }
}

vm0_db::on_both_databases!(
    concurrent_creates_are_all_stored,
    create_get_list_cancel,
    create_run_errors,
    secrets_are_never_returned_or_stored,
    logs_and_metrics,
);
