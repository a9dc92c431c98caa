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

/// Mints a token for `org_id` and stores its hash. Shared by the API and the
/// `vm0-gateway token create` command.
pub async fn create_token(
    store: &Store,
    org_id: &str,
    name: &str,
    expires_in_days: Option<u32>,
) -> Result<CreatedToken, StoreError> {
    let minted = mint_token();
    let now = Timestamp::now().micros();
    let expires_at = expires_in_days.map(|d| now + i64::from(d) * DAY_MICROS);
    let row = store
        .insert_token(
            org_id,
            name,
            &minted.hash,
            display_prefix(&minted.secret),
            now,
            expires_at,
        )
        .await?;
    Ok(CreatedToken {
        token_info: convert::token(&row),
        token: minted.secret,
    })
}

/// Create an API token for the caller's organization (shown once)
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
    let created = create_token(&state.store, &caller.org_id, &name, req.expires_in_days).await?;
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

/// Revoke a token
#[utoipa::path(delete, path = "/v1/tokens/{id}", tag = "tokens", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorEnvelope)),
    security(("bearer" = [])))]
pub async fn revoke(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    path_id(IdKind::Token, &id)?;
    if state
        .store
        .revoke_token(&caller.org_id, &id, Timestamp::now().micros())
        .await?
    {
        state.tokens.forget(&id);
        if let Some(bus) = &state.bus
            && let Err(e) = bus.publish_token_revoked(&id).await
        {
            tracing::warn!(token_id = %id, error = %crate::error::ErrorChain(&e), "revocation not broadcast; other gateways forget the token within VM0_AUTH_CACHE_SECS");
        }
        tracing::info!(token_id = %id, by = %caller.token_id, "token revoked");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("token", &id, None))
    }
}
