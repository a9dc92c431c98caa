use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use vm0_api_types::cursor::Page;
use vm0_api_types::ids::IdKind;
use vm0_api_types::tokens::{
    CreateTokenRequest, CreatedToken, MAX_EXPIRES_IN_DAYS, Token, display_prefix,
};
use vm0_api_types::{ErrorEnvelope, Timestamp};
use vm0_db::{Store, StoreError, convert};

use super::{PageRequest, cursor};
use crate::AppState;
use crate::auth::{Caller, mint_token};
use crate::error::{ApiError, ApiResult};
use crate::extract::{JsonBody, QueryParams, path_id};

const DAY_MICROS: i64 = 86_400 * 1_000_000;

/// Microseconds `days` from `now`.
pub fn days_from(now: i64, days: u32) -> i64 {
    now.saturating_add(i64::from(days).saturating_mul(DAY_MICROS))
}

/// Mints a token for `org_id` and stores its hash. Shared by the API (which names
/// the minting token as `created_by`) and `vm0-gateway token create`.
pub async fn create_token(
    store: &Store,
    org_id: &str,
    name: &str,
    expires_at: Option<i64>,
    created_by: Option<&str>,
) -> Result<CreatedToken, StoreError> {
    let minted = mint_token();
    let now = Timestamp::now().micros();
    let row = store
        .insert_token(
            org_id,
            name,
            &minted.hash,
            display_prefix(&minted.secret),
            now,
            expires_at,
            created_by,
        )
        .await?;
    Ok(CreatedToken {
        token_info: convert::token(&row),
        token: minted.secret,
    })
}

/// When a token minted by `caller` expires: as asked, capped by
/// `VM0_TOKEN_MAX_DAYS`, never after the caller's own token. Asking for more is
/// an error, not silently shortened.
fn child_expiry(
    caller: &Caller,
    asked_days: Option<u32>,
    max_days: Option<u32>,
    now: i64,
) -> ApiResult<Option<i64>> {
    if let (Some(days), Some(max)) = (asked_days, max_days)
        && days > max
    {
        return Err(ApiError::invalid(
            "expiresInDays",
            format!("expiresInDays may be at most {max} on this deployment (VM0_TOKEN_MAX_DAYS)"),
        ));
    }
    let wanted = asked_days.or(max_days).map(|d| days_from(now, d));
    match (caller.expires_at, wanted) {
        (None, wanted) => Ok(wanted),
        // A token cannot outlive the one that minted it: by default it ends with it.
        (Some(parent), None) => Ok(Some(parent)),
        (Some(parent), Some(w)) if w <= parent => Ok(Some(w)),
        (Some(parent), Some(_)) => Err(ApiError::invalid(
            "expiresInDays",
            format!(
                "the token making this request expires at {}; a token it creates cannot \
                 outlive it (at most {} days, or leave expiresInDays out to end with it)",
                Timestamp(parent).to_rfc3339(),
                (parent - now).max(0) / DAY_MICROS
            ),
        )),
    }
}

/// Create an API token for the caller's organization (shown once). It never
/// outlives the token that creates it, and is revoked with it.
#[utoipa::path(post, path = "/v1/tokens", tag = "tokens", request_body = CreateTokenRequest,
    responses((status = 201, body = CreatedToken), (status = 400, body = ErrorEnvelope)),
    security(("bearer" = [])))]
pub async fn create(
    caller: Caller,
    State(state): State<AppState>,
    JsonBody(req): JsonBody<CreateTokenRequest>,
) -> ApiResult<(StatusCode, Json<CreatedToken>)> {
    let name = req.name.unwrap_or_else(|| "api".to_owned());
    if name.trim().is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "name",
            "name must be 1-100 printable characters",
        ));
    }
    if let Some(days) = req.expires_in_days
        && !(1..=MAX_EXPIRES_IN_DAYS).contains(&days)
    {
        return Err(ApiError::invalid(
            "expiresInDays",
            format!("expiresInDays must be from 1 to {MAX_EXPIRES_IN_DAYS}"),
        ));
    }
    let now = Timestamp::now().micros();
    let expires_at = child_expiry(
        &caller,
        req.expires_in_days,
        state.config.token_max_days,
        now,
    )?;
    let created = create_token(
        &state.store,
        &caller.org_id,
        &name,
        expires_at,
        Some(&caller.token_id),
    )
    .await?;
    tracing::info!(token_id = %created.token_info.id, by = %caller.token_id, "token created");
    Ok((StatusCode::CREATED, Json(created)))
}

/// List the organization's live tokens (never their secrets)
#[utoipa::path(get, path = "/v1/tokens", tag = "tokens",
    params(("limit" = Option<u64>, Query), ("cursor" = Option<String>, Query)),
    responses((status = 200, body = Page<Token>)),
    security(("bearer" = [])))]
pub async fn list(
    caller: Caller,
    State(state): State<AppState>,
    q: QueryParams,
) -> ApiResult<Json<Page<Token>>> {
    q.only(&["limit", "cursor"])?;
    let page = PageRequest::from_query(&q, "tokens")?;
    let rows = state
        .store
        .list_tokens(&caller.org_id, page.after.as_ref(), page.limit)
        .await?;
    let items = rows.iter().map(convert::token).collect();
    Ok(Json(Page::from_overfetch(
        items,
        page.limit,
        |t: &Token| cursor("tokens", t.created_at.micros(), t.id.clone()),
    )))
}

/// Revokes tokens: the ids revoked are forgotten here, and on every other
/// gateway through NATS.
pub async fn broadcast_revocations(state: &AppState, ids: &[String]) {
    for id in ids {
        state.tokens.forget(id);
        if let Some(bus) = &state.bus
            && let Err(e) = bus.publish_token_revoked(id).await
        {
            tracing::warn!(token_id = %id, error = %crate::error::ErrorChain(&e), "revocation not broadcast; other gateways forget the token within VM0_AUTH_CACHE_SECS");
        }
    }
}

/// Revoke a token, and every token it created. A token may revoke itself and the
/// tokens it created (directly or not), no other.
#[utoipa::path(delete, path = "/v1/tokens/{id}", tag = "tokens", params(("id" = String, Path)),
    responses((status = 204), (status = 403, body = ErrorEnvelope, description = "permission_error: the token was not created by the caller's token"), (status = 404, body = ErrorEnvelope)),
    security(("bearer" = [])))]
pub async fn revoke(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    path_id(IdKind::Token, &id)?;
    if state.store.get_token(&caller.org_id, &id).await?.is_none() {
        return Err(ApiError::not_found("token", &id, None));
    }
    if id != caller.token_id
        && !state
            .store
            .token_descends_from(&caller.org_id, &id, &caller.token_id)
            .await?
    {
        return Err(ApiError::forbidden(format!(
            "Token '{id}' was not created by this token or one it created; only those can \
             revoke it (an operator can: vm0-gateway token revoke {id})"
        )));
    }
    let revoked = state
        .store
        .revoke_token(&caller.org_id, &id, Timestamp::now().micros())
        .await?;
    if revoked.is_empty() {
        return Err(ApiError::not_found("token", &id, None));
    }
    broadcast_revocations(&state, &revoked).await;
    tracing::info!(token_id = %id, with = revoked.len() - 1, by = %caller.token_id, "token revoked");
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(expires_at: Option<i64>) -> Caller {
        Caller {
            org_id: "org_a".into(),
            token_id: "tok_a".into(),
            expires_at,
        }
    }

    #[test]
    fn a_child_token_never_outlives_its_parent() {
        let now = 1_000 * DAY_MICROS;
        let parent = Some(now + 10 * DAY_MICROS);
        assert_eq!(
            child_expiry(&caller(None), None, None, now).ok(),
            Some(None)
        );
        assert_eq!(
            child_expiry(&caller(parent), None, None, now).ok(),
            Some(parent),
            "inherits the parent's end"
        );
        assert_eq!(
            child_expiry(&caller(parent), Some(3), None, now).ok(),
            Some(Some(now + 3 * DAY_MICROS))
        );
        let err = child_expiry(&caller(parent), Some(30), None, now).expect_err("outlives");
        assert_eq!(err.body.param.as_deref(), Some("expiresInDays"));
        assert!(
            err.body.message.contains("at most 10 days"),
            "{}",
            err.body.message
        );
        assert_eq!(
            child_expiry(&caller(None), None, Some(7), now).ok(),
            Some(Some(now + 7 * DAY_MICROS)),
            "the configured maximum is the default"
        );
        assert!(child_expiry(&caller(None), Some(8), Some(7), now).is_err());
    }
}
