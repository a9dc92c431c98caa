//! Tokens from a thief's side: what a stolen (or merely lesser) token can mint,
//! revoke and cost, and how long an event stream outlives its token.

use std::time::Duration;

use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common::{Db, TestGateway, assert_error};

async fn mint(gw: &TestGateway, as_token: &str, body: Value) -> (StatusCode, Value) {
    gw.call_as(as_token, Method::POST, "/v1/tokens", Some(body))
        .await
}

fn expires_at(created: &Value) -> Option<i64> {
    created["expiresAt"]
        .as_str()
        .and_then(vm0_api_types::Timestamp::parse)
        .map(|t| t.micros())
}

/// A token that expires cannot make one that lives longer, nor one that never
/// expires: left unsaid, the new one ends with it.
async fn a_token_cannot_mint_one_that_outlives_it(db: Db) {
    let gw = TestGateway::start(db).await;
    let (status, parent) = gw
        .post("/v1/tokens", json!({"name": "ci", "expiresInDays": 5}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{parent}");
    let parent_secret = parent["token"].as_str().expect("token").to_owned();

    let got = mint(&gw, &parent_secret, json!({"expiresInDays": 30})).await;
    assert_error(
        &got,
        400,
        "invalid_request_error",
        "invalid_parameter",
        Some("expiresInDays"),
    );
    let (status, child) = mint(&gw, &parent_secret, json!({"name": "forever"})).await;
    assert_eq!(status, StatusCode::CREATED, "{child}");
    assert_eq!(
        expires_at(&child),
        expires_at(&parent),
        "it ends with its parent"
    );
    let (status, short) = mint(&gw, &parent_secret, json!({"expiresInDays": 2})).await;
    assert_eq!(status, StatusCode::CREATED, "{short}");
    assert!(expires_at(&short) < expires_at(&parent));
}

/// The operator's maximum lifetime (VM0_TOKEN_MAX_DAYS) binds API-minted tokens.
async fn the_configured_maximum_lifetime_binds_minted_tokens(db: Db) {
    let gw = TestGateway::start_with(db, |c| c.token_max_days = Some(7)).await;
    let got = gw.post("/v1/tokens", json!({"expiresInDays": 8})).await;
    assert_error(
        &got,
        400,
        "invalid_request_error",
        "invalid_parameter",
        Some("expiresInDays"),
    );
    let (status, created) = gw.post("/v1/tokens", json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let days = (expires_at(&created).expect("expires") - vm0_api_types::Timestamp::now().micros())
        / 86_400_000_000;
    assert_eq!(
        days, 6,
        "seven days from now, less the moments since: {created}"
    );
}

/// Revocation follows the minting tree: a token revokes itself and what it
/// minted, never a sibling or its parent; revoking a token revokes its line.
async fn a_token_revokes_only_its_own_line(db: Db) {
    let gw = TestGateway::start(db).await;
    let (_, a) = gw.post("/v1/tokens", json!({"name": "a"})).await;
    let (_, b) = gw.post("/v1/tokens", json!({"name": "b"})).await;
    let a_secret = a["token"].as_str().expect("a").to_owned();
    let b_secret = b["token"].as_str().expect("b").to_owned();
    let (_, a_child) = mint(&gw, &a_secret, json!({"name": "a-child"})).await;
    let a_child_secret = a_child["token"].as_str().expect("child").to_owned();
    let root_id = gw.get("/v1/tokens").await.1["data"]
        .as_array()
        .expect("data")
        .iter()
        .find(|t| t["name"] == "test")
        .map(|t| t["id"].as_str().unwrap_or_default().to_owned())
        .expect("the root token is listed");

    // a may not revoke its sibling b, nor the root that minted it.
    for target in [b["id"].as_str().expect("id"), root_id.as_str()] {
        let got = gw
            .call_as(
                &a_secret,
                Method::DELETE,
                &format!("/v1/tokens/{target}"),
                None,
            )
            .await;
        assert_error(
            &got,
            403,
            "permission_error",
            "insufficient_permissions",
            None,
        );
    }
    let (status, _) = gw.call_as(&b_secret, Method::GET, "/v1/agents", None).await;
    assert_eq!(status, StatusCode::OK, "b still works");

    // The root revokes a: a's child goes with it.
    let (status, body) = gw
        .call(
            Method::DELETE,
            &format!("/v1/tokens/{}", a["id"].as_str().expect("id")),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    for secret in [&a_secret, &a_child_secret] {
        let got = gw.call_as(secret, Method::GET, "/v1/agents", None).await;
        assert_error(&got, 401, "authentication_error", "invalid_api_key", None);
    }
    // b may revoke itself.
    let (status, _) = gw
        .call_as(
            &b_secret,
            Method::DELETE,
            &format!("/v1/tokens/{}", b["id"].as_str().expect("id")),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

/// Guessing tokens from one address is cut off with 429 and Retry-After; the
/// address's valid, already verified token keeps working, other addresses are
/// not affected.
async fn guessing_tokens_is_rate_limited_per_address(db: Db) {
    let gw = TestGateway::start_with(db, |c| c.auth_failures_per_minute = 5).await;
    let (status, _) = gw.get("/v1/agents").await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the good token is verified (and cached)"
    );
    let guess = |i: usize| format!("vm0_live_{:064x}", i + 1);
    for i in 0..5 {
        let got = gw.call_as(&guess(i), Method::GET, "/v1/agents", None).await;
        assert_error(&got, 401, "authentication_error", "invalid_api_key", None);
    }
    let resp = gw
        .client
        .get(gw.url("/v1/agents"))
        .bearer_auth(guess(99))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .ok()
        .and_then(|s| s.parse().ok())
        .expect("Retry-After in seconds");
    assert!((1..=60).contains(&retry), "{retry}");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    let (status, _) = gw.get("/v1/agents").await;
    assert_eq!(status, StatusCode::OK, "a cached good token still works");

    // Behind a trusted proxy, the client is the forwarded address.
    let proxied = TestGateway::start_with(Db::Sqlite, |c| {
        c.auth_failures_per_minute = 2;
        c.trusted_proxies = vec!["127.0.0.1".parse().expect("cidr")];
    })
    .await;
    let from = |who: &str, token: String| {
        proxied
            .client
            .get(proxied.url("/v1/agents"))
            .bearer_auth(token)
            .header("x-forwarded-for", who)
            .send()
    };
    for i in 0..2 {
        let r = from("198.51.100.1", guess(i)).await.expect("send");
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
    let r = from("198.51.100.1", guess(2)).await.expect("send");
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let r = from("198.51.100.2", guess(3)).await.expect("send");
    assert_eq!(
        r.status(),
        StatusCode::UNAUTHORIZED,
        "another client is not limited"
    );
}

/// A blocked address's good token keeps working once its cache entry expired
/// (another client behind the same address guessed); a token never verified
/// here is still refused before any lookup.
async fn a_known_token_outlives_its_cache_entry_at_a_blocked_address(db: Db) {
    let gw = TestGateway::start_with(db, |c| {
        c.auth_failures_per_minute = 2;
        c.auth_cache_ttl = std::time::Duration::from_millis(200);
    })
    .await;
    let (_, minted) = gw.post("/v1/tokens", json!({"name": "never-used"})).await;
    let unused = minted["token"].as_str().expect("token").to_owned();
    let (status, _) = gw.get("/v1/agents").await;
    assert_eq!(status, StatusCode::OK);
    for i in 0..3 {
        let guess = format!("vm0_live_{:064x}", i + 1);
        gw.call_as(&guess, Method::GET, "/v1/agents", None).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let (status, body) = gw.get("/v1/agents").await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the known token, looked up again: {body}"
    );
    let got = gw.call_as(&unused, Method::GET, "/v1/agents", None).await;
    assert_error(&got, 429, "rate_limit_error", "rate_limited", None);
}

/// An open event stream ends, with an `error` event, once its token is revoked.
async fn an_event_stream_ends_when_its_token_is_revoked(db: Db) {
    let gw = TestGateway::start(db).await;
    gw.create_agent("waits").await;
    let (_, token) = gw.post("/v1/tokens", json!({"name": "viewer"})).await;
    let secret = token["token"].as_str().expect("token").to_owned();
    // No worker: the run stays pending, its stream open.
    let run = gw.create_run("waits", "p").await;
    let resp = gw
        .client
        .get(gw.url(&format!(
            "/v1/runs/{}/events",
            run["id"].as_str().expect("id")
        )))
        .bearer_auth(&secret)
        .send()
        .await
        .expect("stream");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    // The replayed first event, then the revocation.
    while !text.contains("\n\n") {
        let chunk = tokio::time::timeout(Duration::from_secs(5), body.next())
            .await
            .expect("the replay arrives")
            .expect("open")
            .expect("bytes");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let (status, _) = gw
        .call(
            Method::DELETE,
            &format!("/v1/tokens/{}", token["id"].as_str().expect("id")),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let rest = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(chunk) = body.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.expect("bytes")));
        }
        text
    })
    .await
    .expect("the stream ends soon after the revocation");
    let events = vm0_api_types::sse::parse_stream(&rest);
    let last = events.last().expect("events");
    assert_eq!(last.event, "error", "{rest}");
    let data: Value = serde_json::from_str(&last.data).expect("json");
    assert_eq!(data["code"], "invalid_api_key", "{data}");
    assert!(
        data["message"]
            .as_str()
            .unwrap_or_default()
            .contains("revoked")
    );
}

vm0_db::on_both_databases!(
    a_token_cannot_mint_one_that_outlives_it,
    the_configured_maximum_lifetime_binds_minted_tokens,
    a_token_revokes_only_its_own_line,
    guessing_tokens_is_rate_limited_per_address,
    a_known_token_outlives_its_cache_entry_at_a_blocked_address,
    an_event_stream_ends_when_its_token_is_revoked,
);
