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

    // What generated clients and Schemathesis rely on (issue 13's findings).
    assert_eq!(doc["security"], serde_json::json!([{"bearer": []}]));
    let mut operation_ids = std::collections::BTreeSet::new();
    for (path, ops) in paths {
        for (method, op) in ops.as_object().expect("ops") {
            let label = format!("{method} {path}");
            assert!(
                operation_ids.insert(op["operationId"].as_str().expect("operationId").to_owned()),
                "{label}: operationId repeated"
            );
            let public = op["security"] == serde_json::json!([]);
            assert_eq!(
                public,
                path == "/healthz" || path == "/readyz",
                "{label}: security"
            );
            if public {
                continue;
            }
            for status in ["400", "401", "429"] {
                assert!(
                    op["responses"].get(status).is_some(),
                    "{label}: no {status}"
                );
            }
            if path.contains("{id}") {
                assert!(op["responses"].get("404").is_some(), "{label}: no 404");
            }
            for param in op["parameters"].as_array().into_iter().flatten() {
                let schema = &param["schema"];
                match param["name"].as_str() {
                    Some("id") => assert!(schema["pattern"].is_string(), "{label}: id pattern"),
                    Some("limit") => {
                        assert_eq!(
                            (schema["minimum"].as_u64(), schema["maximum"].as_u64()),
                            (Some(1), Some(100)),
                            "{label}"
                        )
                    }
                    Some("cursor") => {
                        assert!(schema["pattern"].is_string(), "{label}: cursor pattern")
                    }
                    _ => {}
                }
            }
        }
    }
    assert_eq!(
        paths["/v1/tokens"]["post"]["requestBody"]["required"],
        false
    );
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    let resources = &schemas["Resources"]["properties"];
    assert_eq!(resources["vcpus"]["minimum"], 1);
    assert_eq!(resources["vcpus"]["maximum"], 64);
    assert_eq!(
        schemas["CreateTokenRequest"]["properties"]["expiresInDays"]["maximum"],
        3650
    );
    assert!(schemas.contains_key("Volume") && schemas.contains_key("Artifact"));
    assert!(
        !schemas.contains_key("Storage"),
        "volumes and artifacts are told apart"
    );

    // A cursor the API returns matches its documented pattern, and a
    // schema-valid one it never returned is a position, not an error.
    for name in ["a", "b"] {
        gw.create_agent(name).await;
    }
    let (_, page) = gw.get("/v1/agents?limit=1").await;
    let next = page["pagination"]["nextCursor"]
        .as_str()
        .expect("a next page")
        .to_owned();
    let pattern = paths["/v1/agents"]["get"]["parameters"]
        .as_array()
        .expect("params")
        .iter()
        .find(|p| p["name"] == "cursor")
        .and_then(|p| p["schema"]["pattern"].as_str())
        .expect("cursor pattern");
    assert!(
        regex::Regex::new(pattern).expect("regex").is_match(&next),
        "{next} !~ {pattern}"
    );
    let (status, body) = gw.get("/v1/agents?cursor=agents.1.ag_zzz").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Integers as JSON Schema has them: 2.0 is 2.
    let (status, agent) = gw
        .post(
            "/v1/agents",
            serde_json::json!({"name": "floaty", "config": {"command": ["true"], "resources": {"vcpus": 2.0}, "timeoutSeconds": 60.0}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{agent}");
    assert_eq!(agent["config"]["resources"]["vcpus"], 2);

    // Network rules carry the grammar the server parses with.
    let rules = &schemas["NetworkConfig"]["properties"]["allow"];
    assert_eq!(rules["maxItems"], 256);
    let rule = PythonPattern(
        rules["items"]["pattern"]
            .as_str()
            .expect("rule pattern")
            .to_owned(),
    );
    for ok in [
        "api.anthropic.com",
        "*.github.com",
        "203.0.113.0/24",
        "[::1]:443",
    ] {
        assert!(rule.is_match(ok), "{ok}");
    }
    for bad in ["", " a.com", "a.com:080", "1.2.3.0/33"] {
        assert!(!rule.is_match(bad), "{bad:?}");
    }
    let header = PythonPattern(
        schemas["NetworkConfig"]["properties"]["secretHeaders"]["additionalProperties"]
            ["propertyNames"]["pattern"]
            .as_str()
            .expect("header pattern")
            .to_owned(),
    );
    for name in ["X-Api-Key", "authorization", "Hostname"] {
        assert!(header.is_match(name), "{name}");
        assert!(vm0_api_types::agents::is_secret_header(name), "{name}");
    }
    for name in ["host", "HOST", "Content-Length", "bad header", ""] {
        assert!(!header.is_match(name), "{name:?}");
        assert!(!vm0_api_types::agents::is_secret_header(name), "{name:?}");
    }
    // The deployment's own limit on a file, and where responses lead.
    let upload_file = &schemas["UploadFile"];
    assert_eq!(
        upload_file["allOf"][0]["else"]["properties"]["size"]["maximum"],
        vm0_storage::Limits::default().max_file_bytes
    );
    assert_eq!(
        paths["/v1/volumes"]["post"]["responses"]["201"]["links"]["upload"]["operationId"],
        "volumes_upload"
    );
    assert_eq!(
        paths["/v1/artifacts/{id}/upload"]["post"]["responses"]["201"]["links"]["commit"]["requestBody"]
            ["uploadSessionId"],
        "$response.body#/uploadSessionId"
    );
    // A place in a run's logs is a place in either order.
    gw.create_agent("logger").await;
    let run = gw.create_run("logger", "p").await;
    let id = run["id"].as_str().expect("run id");
    let (status, asc) = gw.get(&format!("/v1/runs/{id}/logs?limit=1")).await;
    assert_eq!(status, StatusCode::OK, "{asc}");
    if let Some(next) = asc["pagination"]["nextCursor"].as_str() {
        let (status, body) = gw
            .get(&format!("/v1/runs/{id}/logs?order=desc&cursor={next}"))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (status, _) = gw
        .get(&format!("/v1/runs/{id}/logs?order=desc&cursor=logs.1.1"))
        .await;
    assert_eq!(status, StatusCode::OK);
    // What one uploaded entry must be on its own, named by its place.
    let (_, volume) = gw
        .post("/v1/volumes", serde_json::json!({"name": "v"}))
        .await;
    let upload = format!(
        "/v1/volumes/{}/upload",
        volume["id"].as_str().expect("volume id")
    );
    let zeros = "0".repeat(64);
    let (status, body) = gw
        .post(
            &upload,
            serde_json::json!({"files": [{"path": "empty", "size": 0, "sha256": zeros}]}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["param"], "files[0].sha256", "{body}");
    let (status, body) = gw
        .post(
            &upload,
            serde_json::json!({"files": [{"path": "l", "size": 7, "sha256": "x", "link": "t"}]}),
        )
        .await;
    assert_eq!(body["error"]["param"], "files[0].sha256", "{status} {body}");
    let (status, body) = gw
        .post(&upload, serde_json::json!({"files": [{"path": "ok", "size": 1}, {"path": "big", "size": 6u64 << 30}]}))
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(body["error"]["param"], "files[1].size", "{body}");
    let (status, body) = gw
        .post(
            &upload,
            serde_json::json!({"files": [{"path": "l", "size": 99, "link": "target"}]}),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "a link's size is its target's: {body}"
    );
}

/// A pattern of the document as Schemathesis reads it (Python's `re`; the
/// `regex` crate lacks the lookaround the rule pattern uses for names).
struct PythonPattern(String);

impl PythonPattern {
    fn is_match(&self, s: &str) -> bool {
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import re,sys; sys.exit(0 if re.fullmatch(sys.argv[1], sys.argv[2]) else 1)",
                &self.0,
                s,
            ])
            .output()
            .expect("python3 (the test command installs it)");
        out.status.success()
    }
}

vm0_db::on_both_databases!(
    bad_bodies_get_clear_errors,
    unknown_routes_and_methods,
    request_ids,
    openapi_document_covers_the_api
);
