use reqwest::Method;
use serde_json::json;

use crate::common::{Db, TestGateway, assert_error};

async fn another_organization_sees_nothing(db: Db) {
    let gw = TestGateway::start(db).await;
    let agent = gw.create_agent("my-agent").await;
    let run = gw.create_run("my-agent", "p").await;
    let (agent_id, run_id) = (
        agent["id"].as_str().expect("id"),
        run["id"].as_str().expect("id"),
    );
    let (_, token) = gw.post("/v1/tokens", json!({})).await;
    let token_id = token["id"].as_str().expect("id");

    let other = gw.mint_token("globex").await;
    for path in [
        format!("/v1/agents/{agent_id}"),
        format!("/v1/agents/{agent_id}/versions"),
        format!("/v1/runs/{run_id}"),
        format!("/v1/runs/{run_id}/logs"),
        format!("/v1/runs/{run_id}/metrics"),
        format!("/v1/runs/{run_id}/events"),
    ] {
        let got = gw.call_as(&other, Method::GET, &path, None).await;
        assert_error(&got, 404, "not_found_error", "resource_not_found", None);
    }
    for (method, path) in [
        (Method::POST, format!("/v1/runs/{run_id}/cancel")),
        (Method::DELETE, format!("/v1/agents/{agent_id}")),
        (Method::DELETE, format!("/v1/tokens/{token_id}")),
    ] {
        let got = gw.call_as(&other, method, &path, None).await;
        assert_error(&got, 404, "not_found_error", "resource_not_found", None);
    }
    let got = gw
        .call_as(
            &other,
            Method::PUT,
            &format!("/v1/agents/{agent_id}"),
            Some(json!({"config": {"command": ["x"]}})),
        )
        .await;
    assert_error(&got, 404, "not_found_error", "resource_not_found", None);
    // Runs by another org's agent name, id or session are not found either.
    for body in [
        json!({"agent": "my-agent", "prompt": "p"}),
        json!({"agentId": agent_id, "prompt": "p"}),
        json!({"sessionId": run["sessionId"], "prompt": "p"}),
    ] {
        let got = gw
            .call_as(&other, Method::POST, "/v1/runs", Some(body))
            .await;
        assert_error(&got, 404, "not_found_error", "resource_not_found", None);
    }
    for path in ["/v1/agents", "/v1/runs", "/v1/tokens"] {
        let (_, list) = gw.call_as(&other, Method::GET, path, None).await;
        let n = list["data"].as_array().map(Vec::len).expect("data");
        // globex's own token is its only resource.
        assert_eq!(n, usize::from(path == "/v1/tokens"), "{path}: {list}");
    }
    // The same name is free in another organization.
    let (status, _) = gw
        .call_as(
            &other,
            Method::POST,
            "/v1/agents",
            Some(json!({"name": "my-agent", "config": {"command": ["x"]}})),
        )
        .await;
    assert_eq!(status.as_u16(), 201);
    // And acme's things are untouched.
    let (status, still) = gw.get(&format!("/v1/runs/{run_id}")).await;
    assert_eq!(status.as_u16(), 200);
    assert_eq!(still["status"], "pending");
}

vm0_db::on_both_databases!(another_organization_sees_nothing);
