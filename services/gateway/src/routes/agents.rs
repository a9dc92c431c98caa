use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use sha2::{Digest, Sha256};
use vm0_api_types::agents::{
    Agent, AgentConfig, AgentVersion, CreateAgentRequest, UpdateAgentRequest, validate_agent_name,
};
use vm0_api_types::cursor::Page;
use vm0_api_types::ids::IdKind;
use vm0_api_types::{ErrorEnvelope, Timestamp};
use vm0_db::{UpdateOutcome, convert};

use super::{PageRequest, cursor};
use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::{JsonBody, QueryParams, path_id};

/// The stored form of a config and its hash: canonical JSON (fixed field order,
/// sorted env), so equal configs hash equally.
fn canonical(config: &AgentConfig) -> ApiResult<(String, String)> {
    let json = serde_json::to_string(config).map_err(|e| ApiError::internal(&e))?;
    let hash = config_hash(&json);
    Ok((json, hash))
}

/// Hash of a config's canonical JSON.
pub fn config_hash(json: &str) -> String {
    hex::encode(Sha256::digest(json.as_bytes()))
}

/// List agents
#[utoipa::path(get, path = "/v1/agents", tag = "agents",
    params(
        ("limit" = Option<u64>, Query, description = "Items per page (1-100, default 20)"),
        ("cursor" = Option<String>, Query, description = "`pagination.nextCursor` of the previous page"),
        ("name" = Option<String>, Query, description = "Only the agent with this name"),
    ),
    responses((status = 200, body = Page<Agent>), (status = 400, body = ErrorEnvelope), (status = 401, body = ErrorEnvelope)),
    security(("bearer" = [])))]
pub async fn list(
    caller: Caller,
    State(state): State<AppState>,
    q: QueryParams,
) -> ApiResult<Json<Page<Agent>>> {
    q.only(&["limit", "cursor", "name"])?;
    let page = PageRequest::from_query(&q, "agents")?;
    let name = q.get("name");
    if let Some(name) = name {
        validate_agent_name(name, "name")?;
    }
    let rows = state
        .store
        .list_agents(&caller.org_id, name, page.after.as_ref(), page.limit)
        .await?;
    let items = rows.iter().map(|a| convert::agent(a, None)).collect();
    Ok(Json(Page::from_overfetch(
        items,
        page.limit,
        |a: &Agent| cursor("agents", a.created_at.micros(), a.id.clone()),
    )))
}

/// Create an agent
#[utoipa::path(post, path = "/v1/agents", tag = "agents", request_body = CreateAgentRequest,
    responses((status = 201, body = Agent), (status = 400, body = ErrorEnvelope), (status = 409, body = ErrorEnvelope)),
    security(("bearer" = [])))]
pub async fn create(
    caller: Caller,
    State(state): State<AppState>,
    JsonBody(req): JsonBody<CreateAgentRequest>,
) -> ApiResult<(StatusCode, Json<Agent>)> {
    validate_agent_name(&req.name, "name")?;
    req.config.validate()?;
    let (json, hash) = canonical(&req.config)?;
    let (agent, _version) = state
        .store
        .create_agent(
            &caller.org_id,
            &req.name,
            &json,
            &hash,
            Timestamp::now().micros(),
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(convert::agent(&agent, Some(req.config))),
    ))
}

async fn load(
    state: &AppState,
    caller: &Caller,
    id: &str,
) -> ApiResult<vm0_db::entity::agent::Model> {
    path_id(IdKind::Agent, id)?;
    state
        .store
        .get_agent(&caller.org_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("agent", id, None))
}

/// Get an agent, with its current config
#[utoipa::path(get, path = "/v1/agents/{id}", tag = "agents", params(("id" = String, Path)),
    responses((status = 200, body = Agent), (status = 404, body = ErrorEnvelope)),
    security(("bearer" = [])))]
pub async fn get(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Agent>> {
    let agent = load(&state, &caller, &id).await?;
    let version = state
        .store
        .get_agent_version(&caller.org_id, &agent.id, &agent.current_version_id)
        .await?
        .ok_or_else(|| ApiError::not_found("agent", &id, None))?;
    let config = convert::agent_config(&version)?;
    Ok(Json(convert::agent(&agent, Some(config))))
}

/// Update an agent's config (a new version only if it changed)
#[utoipa::path(put, path = "/v1/agents/{id}", tag = "agents", params(("id" = String, Path)),
    request_body = UpdateAgentRequest,
    responses((status = 200, body = Agent), (status = 400, body = ErrorEnvelope), (status = 404, body = ErrorEnvelope)),
    security(("bearer" = [])))]
pub async fn update(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<UpdateAgentRequest>,
) -> ApiResult<Json<Agent>> {
    path_id(IdKind::Agent, &id)?;
    req.config.validate()?;
    let (json, hash) = canonical(&req.config)?;
    let outcome = state
        .store
        .update_agent_config(&caller.org_id, &id, &json, &hash, Timestamp::now().micros())
        .await?
        .ok_or_else(|| ApiError::not_found("agent", &id, None))?;
    let (UpdateOutcome::NewVersion(agent, version) | UpdateOutcome::Unchanged(agent, version)) =
        outcome;
    Ok(Json(convert::agent(
        &agent,
        Some(convert::agent_config(&version)?),
    )))
}

/// Delete an agent (its runs remain)
#[utoipa::path(delete, path = "/v1/agents/{id}", tag = "agents", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorEnvelope)),
    security(("bearer" = [])))]
pub async fn delete(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    path_id(IdKind::Agent, &id)?;
    if state.store.delete_agent(&caller.org_id, &id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("agent", &id, None))
    }
}

/// List an agent's versions, newest first
#[utoipa::path(get, path = "/v1/agents/{id}/versions", tag = "agents",
    params(("id" = String, Path),
        ("limit" = Option<u64>, Query, description = "Items per page (1-100, default 20)"),
        ("cursor" = Option<String>, Query)),
    responses((status = 200, body = Page<AgentVersion>), (status = 404, body = ErrorEnvelope)),
    security(("bearer" = [])))]
pub async fn versions(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    q: QueryParams,
) -> ApiResult<Json<Page<AgentVersion>>> {
    q.only(&["limit", "cursor"])?;
    let page = PageRequest::from_query(&q, "agent_versions")?;
    let agent = load(&state, &caller, &id).await?;
    let rows = state
        .store
        .list_agent_versions(&caller.org_id, &agent.id, page.after.as_ref(), page.limit)
        .await?;
    let items = rows
        .iter()
        .map(convert::agent_version)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(Page::from_overfetch(
        items,
        page.limit,
        |v: &AgentVersion| cursor("agent_versions", v.version_number, v.id.clone()),
    )))
}
