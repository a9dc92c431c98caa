use reqwest::StatusCode;
use serde_json::Value;

use crate::common::{Db, TestGateway, assert_error};

async fn send_raw(
    gw: &TestGateway,
    method: reqwest::Method,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let mut req = gw
        .client
        .request(method, gw.url(path))
        .bearer_auth(&gw.token)
        .body(body);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let resp = req.send().await.expect("send");
    assert_eq!(resp.headers()["x-api-version"], "v1");
    assert!(resp.headers().contains_key("x-request-id"));
    let status = resp.status();
    (status, resp.json().await.expect("error bodies are JSON"))
}

async fn bad_bodies_get_clear_errors(db: Db) {
    let gw = TestGateway::start_with(db, |c| c.max_body_bytes = 64 * 1024).await;
    let post = reqwest::Method::POST;
    let got = send_raw(
        &gw,
        post.clone(),
        "/v1/agents",
        Some("application/json"),
        b"{\"name\": ".to_vec(),
    )
    .await;
    assert_error(&got, 400, "invalid_request_error", "invalid_json", None);
    let got = send_raw(
        &gw,
        post.clone(),
        "/v1/agents",
        Some("application/json"),
        b"[1, 2]".to_vec(),
    )
    .await;
    assert_error(&got, 400, "invalid_request_error", "invalid_json", None);
    let got = send_raw(
        &gw,
        post.clone(),
        "/v1/agents",
        Some("text/plain"),
        b"{\"name\": \"a\"}".to_vec(),
    )
    .await;
    assert_error(
        &got,
        415,
        "invalid_request_error",
        "unsupported_media_type",
        None,
    );
    let got = send_raw(
        &gw,
        post.clone(),
        "/v1/agents",
        None,
        b"{\"name\": \"a\"}".to_vec(),
    )
    .await;
    assert_error(
        &got,
        415,
        "invalid_request_error",
        "unsupported_media_type",
        None,
    );
    let big = format!(
        "{{\"agent\": \"a\", \"prompt\": \"{}\"}}",
        "x".repeat(100 * 1024)
    );
    let got = send_raw(
        &gw,
        post.clone(),
        "/v1/runs",
        Some("application/json"),
        big.into_bytes(),
    )
    .await;
    assert_error(
        &got,
        413,
        "invalid_request_error",
        "payload_too_large",
        None,
    );
    // charset parameter is fine.
    let got = send_raw(
        &gw,
        post,
        "/v1/agents",
        Some("application/json; charset=utf-8"),
        br#"{"name": "ok", "config": {"command": ["true"]}}"#.to_vec(),
    )
    .await;
    assert_eq!(got.0, StatusCode::CREATED, "{}", got.1);
}

async fn unknown_routes_and_methods(db: Db) {
    let gw = TestGateway::start(db).await;
    for path in ["/", "/v1", "/v1/nope", "/v2/runs", "/v1/runs/run_x/nope"] {
        let got = gw.get(path).await;
        assert_error(&got, 404, "not_found_error", "resource_not_found", None);
    }
    let got = gw.call(reqwest::Method::DELETE, "/v1/runs", None).await;
    assert_error(
        &got,
        405,
        "invalid_request_error",
        "method_not_allowed",
        None,
    );
    let got = gw
        .call(reqwest::Method::PATCH, "/v1/agents/ag_x", None)
        .await;
    assert_error(
        &got,
        405,
        "invalid_request_error",
        "method_not_allowed",
        None,
    );
}

async fn request_ids(db: Db) {
    let gw = TestGateway::start(db).await;
    let resp = gw
        .client
        .get(gw.url("/v1/agents"))
        .bearer_auth(&gw.token)
        .send()
        .await
        .expect("send");
    let id = resp.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(id.starts_with("req_"), "{id}");
    let resp = gw
        .client
        .get(gw.url("/v1/agents"))
        .bearer_auth(&gw.token)
        .header("x-request-id", "client-trace-123")
        .send()
        .await
        .expect("send");
    assert_eq!(
        resp.headers()["x-request-id"],
        "client-trace-123",
        "a valid client id is echoed"
    );
    let resp = gw
        .client
        .get(gw.url("/v1/nope"))
        .header("x-request-id", "bad id with spaces")
        .send()
        .await
        .expect("send");
    let id = resp.headers()["x-request-id"].to_str().expect("ascii");
    assert!(
        id.starts_with("req_"),
        "an invalid client id is replaced: {id}"
    );
}

async fn openapi_document_covers_the_api(db: Db) {
    let gw = TestGateway::start(db).await;
    let resp = gw
        .client
        .get(gw.url("/v1/openapi.json"))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::OK);
    let doc: Value = resp.json().await.expect("json");
    assert!(
        doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1")),
        "{}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().expect("paths");
    for path in [
        "/v1/agents",
        "/v1/agents/{id}",
        "/v1/agents/{id}/versions",
        "/v1/runs",
        "/v1/runs/{id}",
        "/v1/runs/{id}/cancel",
        "/v1/runs/{id}/events",
        "/v1/runs/{id}/logs",
        "/v1/runs/{id}/metrics",
        "/v1/tokens",
        "/v1/tokens/{id}",
        "/healthz",
        "/readyz",
    ] {
        assert!(
            paths.contains_key(path),
            "{path} missing from the OpenAPI document"
        );
    }
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    for schema in [
        "Run",
        "Agent",
        "AgentConfig",
        "ErrorEnvelope",
        "CreateRunRequest",
        "MetricsResponse",
    ] {
        assert!(schemas.contains_key(schema), "{schema} missing");
    }
    // Wire names are camelCase, as served.
    assert!(
        schemas["Run"]["properties"]
            .get("executionTimeMs")
            .is_some()
    );
}

vm0_db::on_both_databases!(
    bad_bodies_get_clear_errors,
    unknown_routes_and_methods,
    request_ids,
    openapi_document_covers_the_api
);
