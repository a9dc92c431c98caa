use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::common::{Db, TestGateway, assert_error};

async fn missing_malformed_unknown_tokens_are_401(db: Db) {
    let gw = TestGateway::start(db).await;
    // No header at all.
    let resp = gw
        .client
        .get(gw.url("/v1/runs"))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["type"], "authentication_error");
    assert_eq!(body["error"]["code"], "invalid_api_key");
    // Wrong scheme, wrong format, right format but unknown.
    for header in [
        format!("Basic {}", gw.token),
        "Bearer vm0_live_short".to_owned(),
        format!("Bearer {}", gw.token.to_uppercase()),
        format!("Bearer vm0_live_{}", "0".repeat(64)),
        "Bearer".to_owned(),
    ] {
        let resp = gw
            .client
            .get(gw.url("/v1/agents"))
            .header("authorization", &header)
            .send()
            .await
            .expect("send");
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.expect("json");
        assert_error(
            &(status, body),
            401,
            "authentication_error",
            "invalid_api_key",
            None,
        );
    }
    // Auth comes before validation: a bad body with a bad token is a 401.
    let got = gw
        .call_as(
            "vm0_live_nope",
            Method::POST,
            "/v1/runs",
            Some(json!({"nonsense": true})),
        )
        .await;
    assert_error(&got, 401, "authentication_error", "invalid_api_key", None);
}

async fn expired_and_revoked_tokens_are_401(db: Db) {
    let gw = TestGateway::start(db).await;
    // Revoke a second token through the API, with the first.
    let (status, created) = gw
        .post("/v1/tokens", json!({"name": "ci", "expiresInDays": 1}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let second = created["token"]
        .as_str()
        .expect("token shown once")
        .to_owned();
    assert!(vm0_api_types::tokens::is_token(&second));
    assert!(created["expiresAt"].is_string());
    let (status, _) = gw.call_as(&second, Method::GET, "/v1/agents", None).await;
    assert_eq!(status, StatusCode::OK);
    let id = created["id"].as_str().expect("id");
    let (status, body) = gw
        .call(Method::DELETE, &format!("/v1/tokens/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let got = gw.call_as(&second, Method::GET, "/v1/agents", None).await;
    assert_error(&got, 401, "authentication_error", "invalid_api_key", None);
    assert!(
        got.1["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("revoked")
    );
    let got = gw
        .call(Method::DELETE, &format!("/v1/tokens/{id}"), None)
        .await;
    assert_error(&got, 404, "not_found_error", "resource_not_found", None);

    // An expired token, written straight to the store.
    let org = gw
        .store
        .find_organization("acme")
        .await
        .expect("q")
        .expect("org");
    let minted = vm0_gateway::auth::mint_token();
    let now = vm0_api_types::Timestamp::now().micros();
    gw.store
        .insert_token(
            &org.id,
            "old",
            &minted.hash,
            "vm0_live_x",
            now - 10,
            Some(now - 1),
            None,
        )
        .await
        .expect("insert");
    let got = gw
        .call_as(&minted.secret, Method::GET, "/v1/agents", None)
        .await;
    assert_error(&got, 401, "authentication_error", "invalid_api_key", None);
    assert!(
        got.1["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("expired")
    );
}

async fn tokens_are_listed_without_secrets(db: Db) {
    let gw = TestGateway::start(db).await;
    let (status, created) = gw.post("/v1/tokens", json!({})).await;
    assert_eq!(status, StatusCode::CREATED);
    let secret = created["token"].as_str().expect("token").to_owned();
    let (status, list) = gw.get("/v1/tokens").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["data"].as_array().map(Vec::len), Some(2));
    let text = list.to_string();
    assert!(
        !text.contains(&secret) && !text.contains(&gw.token),
        "a secret was listed"
    );
    assert!(text.contains(&secret[..17]), "the display prefix is listed");
    // Only the hash is stored.
    let row = gw
        .store
        .find_token_by_hash(&vm0_gateway::auth::hash_token(&secret))
        .await
        .expect("q")
        .expect("row");
    assert_ne!(row.token_hash, secret);
    for (body, param) in [
        (json!({"expiresInDays": 0}), "expiresInDays"),
        (json!({"expiresInDays": 99999}), "expiresInDays"),
        (json!({"name": ""}), "name"),
        (json!({"nmae": "x"}), "nmae"),
    ] {
        let got = gw.post("/v1/tokens", body).await;
        assert_error(
            &got,
            400,
            "invalid_request_error",
            "invalid_parameter",
            Some(param),
        );
    }
    let got = gw
        .call(Method::DELETE, "/v1/tokens/not-a-token", None)
        .await;
    assert_error(
        &got,
        400,
        "invalid_request_error",
        "invalid_parameter",
        Some("id"),
    );
}

async fn health_endpoints_need_no_auth(db: Db) {
    let gw = TestGateway::start(db).await;
    for path in ["/healthz", "/readyz"] {
        let resp = gw.client.get(gw.url(path)).send().await.expect("send");
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
    }
}

vm0_db::on_both_databases!(
    missing_malformed_unknown_tokens_are_401,
    expired_and_revoked_tokens_are_401,
    tokens_are_listed_without_secrets,
    health_endpoints_need_no_auth,
);
