use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::common::{Db, TestGateway, assert_error};

async fn agent_lifecycle(db: Db) {
    let gw = TestGateway::start(db).await;
    let created = gw.create_agent("my-agent").await;
    let id = created["id"].as_str().expect("id").to_owned();
    assert!(id.starts_with("ag_"));
    assert_eq!(
        created["config"]["resources"]["vcpus"], 1,
        "defaults are filled in"
    );
    assert_eq!(created["config"]["timeoutSeconds"], 600);

    // Get has the config; list does not.
    let (status, got) = gw.get(&format!("/v1/agents/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got["config"]["command"], json!(["echo", "hi"]));
    let (_, list) = gw.get("/v1/agents").await;
    assert_eq!(list["data"][0]["id"], id.as_str());
    assert!(list["data"][0].get("config").is_none());

    // Same config: no new version. Changed config: a new one.
    let v1 = created["currentVersionId"].clone();
    let (status, same) = gw
        .call(
            Method::PUT,
            &format!("/v1/agents/{id}"),
            Some(json!({"config": {"command": ["echo", "hi"], "timeoutSeconds": 600}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{same}");
    assert_eq!(same["currentVersionId"], v1);
    let (status, changed) = gw
        .call(
            Method::PUT,
            &format!("/v1/agents/{id}"),
            Some(json!({"config": {"command": ["sh", "-c", "echo $VM0_PROMPT"], "resources": {"vcpus": 2, "memory_mb": 1024}, "timeout_seconds": 30, "workingDir": "/work"}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{changed}");
    assert_ne!(changed["currentVersionId"], v1);
    assert_eq!(changed["config"]["resources"]["memoryMb"], 1024);
    let (_, versions) = gw.get(&format!("/v1/agents/{id}/versions")).await;
    let versions = versions["data"].as_array().expect("data").clone();
    assert_eq!(versions.len(), 2);
    assert_eq!(versions[0]["versionNumber"], 2, "newest first");
    assert_eq!(versions[1]["id"], v1);
    assert_eq!(versions[1]["agentId"], id.as_str());

    // Name filter.
    gw.create_agent("other").await;
    let (_, filtered) = gw.get("/v1/agents?name=other").await;
    assert_eq!(filtered["data"].as_array().map(Vec::len), Some(1));
    assert_eq!(filtered["data"][0]["name"], "other");

    // Delete, then it is gone.
    let (status, body) = gw
        .call(Method::DELETE, &format!("/v1/agents/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(body.is_null());
    let got = gw.get(&format!("/v1/agents/{id}")).await;
    assert_error(&got, 404, "not_found_error", "resource_not_found", None);
    let got = gw
        .call(Method::DELETE, &format!("/v1/agents/{id}"), None)
        .await;
    assert_error(&got, 404, "not_found_error", "resource_not_found", None);
    // The name is free again.
    gw.create_agent("my-agent").await;
}

async fn agent_validation(db: Db) {
    let gw = TestGateway::start(db).await;
    gw.create_agent("taken").await;
    let got = gw
        .post(
            "/v1/agents",
            json!({"name": "taken", "config": {"command": ["x"]}}),
        )
        .await;
    assert_error(
        &got,
        409,
        "conflict_error",
        "resource_already_exists",
        Some("name"),
    );

    let cases = [
        (
            json!({"name": "Bad Name", "config": {"command": ["x"]}}),
            "invalid_parameter",
            "name",
        ),
        (
            json!({"name": "-x", "config": {"command": ["x"]}}),
            "invalid_parameter",
            "name",
        ),
        (
            json!({"config": {"command": ["x"]}}),
            "missing_parameter",
            "name",
        ),
        (json!({"name": "a"}), "missing_parameter", "config"),
        (
            json!({"name": "a", "config": {}}),
            "missing_parameter",
            "config.command",
        ),
        (
            json!({"name": "a", "config": {"command": []}}),
            "invalid_parameter",
            "config.command",
        ),
        (
            json!({"name": "a", "config": {"command": "echo hi"}}),
            "invalid_parameter",
            "config.command",
        ),
        (
            json!({"name": "a", "config": {"command": ["x"], "comand": ["y"]}}),
            "invalid_parameter",
            "config.comand",
        ),
        (
            json!({"name": "a", "config": {"command": ["x"], "resources": {"vcpus": 0}}}),
            "invalid_parameter",
            "config.resources.vcpus",
        ),
        (
            json!({"name": "a", "config": {"command": ["x"], "resources": {"vcpus": -1}}}),
            "invalid_parameter",
            "config.resources.vcpus",
        ),
        (
            json!({"name": "a", "config": {"command": ["x"], "resources": {"memoryMb": 10}}}),
            "invalid_parameter",
            "config.resources.memoryMb",
        ),
        (
            json!({"name": "a", "config": {"command": ["x"], "resources": {"diskMb": 99999999}}}),
            "invalid_parameter",
            "config.resources.diskMb",
        ),
        (
            json!({"name": "a", "config": {"command": ["x"], "resources": {"gpus": 1}}}),
            "invalid_parameter",
            "config.resources.gpus",
        ),
        (
            json!({"name": "a", "config": {"command": ["x"], "timeoutSeconds": 0}}),
            "invalid_parameter",
            "config.timeoutSeconds",
        ),
        (
            json!({"name": "a", "config": {"command": ["x"], "timeoutSeconds": 100000}}),
            "invalid_parameter",
            "config.timeoutSeconds",
        ),
        (
            json!({"name": "a", "config": {"command": ["x"], "workingDir": "relative"}}),
            "invalid_parameter",
            "config.workingDir",
        ),
        (
            json!({"name": "a", "config": {"command": ["x"], "env": {"A B": "1"}}}),
            "invalid_parameter",
            "config.env.A B",
        ),
        (
            json!({"name": "a", "config": {"command": ["x"]}, "extra": 1}),
            "invalid_parameter",
            "extra",
        ),
        (
            json!({"name": "a", "config": {"command": ["x"], "user": "admin"}}),
            "invalid_parameter",
            "config.user",
        ),
        // The network policy: each field named where it is wrong.
        (
            json!({"name": "a", "config": {"command": ["x"], "network": {"mode": "sometimes"}}}),
            "invalid_parameter",
            "config.network.mode",
        ),
        (
            json!({"name": "a", "config": {"command": ["x"], "network": {"allow": ["a.com", "not a host"]}}}),
            "invalid_parameter",
            "config.network.allow[1]",
        ),
        (
            json!({"name": "a", "config": {"command": ["x"], "network": {"deny": ["10.0.0.0/40"]}}}),
            "invalid_parameter",
            "config.network.deny[0]",
        ),
        (
            json!({"name": "a", "config": {"command": ["x"], "network": {"allow": ["a.com:99999"]}}}),
            "invalid_parameter",
            "config.network.allow[0]",
        ),
        (
            json!({"name": "a", "config": {"command": ["x"], "network": {"extraHosts": {"a.test": "nowhere"}}}}),
            "invalid_parameter",
            "config.network.extraHosts.a.test",
        ),
        (
            json!({"name": "a", "config": {"command": ["x"], "network": {"proxy": "x"}}}),
            "invalid_parameter",
            "config.network.proxy",
        ),
    ];
    for (body, code, param) in cases {
        let got = gw.post("/v1/agents", body.clone()).await;
        assert_error(&got, 400, "invalid_request_error", code, Some(param));
    }
    // A valid policy is kept as given; none at all is not shown.
    let network = json!({
        "mode": "allowlist",
        "allow": ["api.anthropic.com", "*.github.com", "203.0.113.0/24", "example.test:8080"],
        "deny": ["evil.github.com"],
        "extraHosts": {"example.test": "10.1.2.3"}
    });
    let (status, created) = gw
        .post(
            "/v1/agents",
            json!({"name": "netted", "config": {"command": ["x"], "network": network}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["config"]["network"], network);
    let plain = gw.create_agent("unnetted").await;
    assert!(plain["config"].get("network").is_none(), "{plain}");
    // Update validates too.
    let id = gw.create_agent("valid").await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let got = gw
        .call(
            Method::PUT,
            &format!("/v1/agents/{id}"),
            Some(json!({"config": {"command": ["x"], "resources": {"vcpus": 1000}}})),
        )
        .await;
    assert_error(
        &got,
        400,
        "invalid_request_error",
        "invalid_parameter",
        Some("config.resources.vcpus"),
    );
    let got = gw
        .call(
            Method::PUT,
            &format!("/v1/agents/{id}"),
            Some(json!({"name": "rename", "config": {"command": ["x"]}})),
        )
        .await;
    assert_error(
        &got,
        400,
        "invalid_request_error",
        "invalid_parameter",
        Some("name"),
    );
    for path in [
        "/v1/agents/nope",
        "/v1/agents/run_abc",
        "/v1/agents/ag_UPPER/versions",
    ] {
        let got = gw.get(path).await;
        assert_error(
            &got,
            400,
            "invalid_request_error",
            "invalid_parameter",
            Some("id"),
        );
    }
    let got = gw.get("/v1/agents/ag_doesnotexist").await;
    assert_error(&got, 404, "not_found_error", "resource_not_found", None);
    let got = gw.get("/v1/agents?name=NOT_VALID").await;
    assert_error(
        &got,
        400,
        "invalid_request_error",
        "invalid_parameter",
        Some("name"),
    );
}

vm0_db::on_both_databases!(agent_lifecycle, agent_validation);
