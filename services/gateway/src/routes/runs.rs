use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use vm0_api_types::agents::validate_agent_name;
use vm0_api_types::cursor::Page;
use vm0_api_types::ids::{IdKind, check_id};
use vm0_api_types::runs::{CreateRunRequest, Run, RunStatus};
use vm0_api_types::{ErrorEnvelope, FieldError, Timestamp};
use vm0_db::entity::{agent, agent_version, checkpoint};
use vm0_db::{CancelOutcome, NewRun, RunFilter, convert};

use super::{PageRequest, cursor};
use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::{JsonBody, QueryParams, path_id};
use crate::storage::resolve_version as resolve_storage_version;
use vm0_db::StorageKind;

/// List runs, newest first
#[utoipa::path(get, path = "/v1/runs", tag = "runs",
    params(
        ("limit" = Option<u64>, Query, description = "Items per page (1-100, default 20)"),
        ("cursor" = Option<String>, Query),
        ("status" = Option<RunStatus>, Query),
        ("agentId" = Option<String>, Query, description = "Also accepted as agent_id"),
        ("since" = Option<String>, Query, description = "Runs created at or after this RFC 3339 time"),
    ),
    responses((status = 200, body = Page<Run>), (status = 400, body = ErrorEnvelope)),
    security(("bearer" = [])))]
pub async fn list(
    caller: Caller,
    State(state): State<AppState>,
    q: QueryParams,
) -> ApiResult<Json<Page<Run>>> {
    q.only(&["limit", "cursor", "status", "agentId", "since"])?;
    let page = PageRequest::from_query(&q, "runs")?;
    let mut filter = RunFilter::default();
    if let Some(raw) = q.get("status") {
        filter.status = Some(RunStatus::parse(raw).ok_or_else(|| {
            ApiError::invalid(
                "status",
                "status must be one of pending, running, completed, failed, timeout, cancelled",
            )
        })?);
    }
    if let Some(raw) = q.get("agentId") {
        check_id(IdKind::Agent, "agentId", raw)?;
        filter.agent_id = Some(raw.to_owned());
    }
    if let Some(raw) = q.get("since") {
        filter.since = Some(parse_time("since", raw)?.micros());
    }
    let rows = state
        .store
        .list_runs(&caller.org_id, &filter, page.after.as_ref(), page.limit)
        .await?;
    let items = rows
        .iter()
        .map(convert::run)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(Page::from_overfetch(items, page.limit, |r: &Run| {
        cursor("runs", r.created_at.micros(), r.id.clone())
    })))
}

pub fn parse_time(param: &str, raw: &str) -> Result<Timestamp, ApiError> {
    Timestamp::parse(raw).ok_or_else(|| {
        ApiError::invalid(
            param,
            format!("{param} must be an RFC 3339 time such as 2024-01-01T00:00:00Z"),
        )
    })
}

/// What a create request resolves to before insertion.
struct Target {
    agent: agent::Model,
    version: agent_version::Model,
    session_id: Option<String>,
    /// Variables inherited from the session or checkpoint when the request has none.
    inherited_variables: Option<String>,
    /// The checkpoint the run starts from, and whether exactly (`checkpointId`)
    /// or as a session's latest (`sessionId`: on the latest of everything).
    resumed: Option<(checkpoint::Model, bool)>,
}

async fn resolve_target(state: &AppState, org: &str, req: &CreateRunRequest) -> ApiResult<Target> {
    let store = &state.store;
    let mut resumed = None;
    let (agent, session_id, pinned_version, inherited_variables) = if let Some(name) = &req.agent {
        validate_agent_name(name, "agent")?;
        let agent = store
            .get_agent_by_name(org, name)
            .await?
            .ok_or_else(|| ApiError::not_found("agent", name, Some("agent")))?;
        (agent, None, None, None)
    } else if let Some(id) = &req.agent_id {
        check_id(IdKind::Agent, "agentId", id)?;
        let agent = store
            .get_agent(org, id)
            .await?
            .ok_or_else(|| ApiError::not_found("agent", id, Some("agentId")))?;
        (agent, None, None, None)
    } else if let Some(id) = &req.session_id {
        check_id(IdKind::Session, "sessionId", id)?;
        let session = store
            .get_session(org, id)
            .await?
            .ok_or_else(|| ApiError::not_found("session", id, Some("sessionId")))?;
        let agent = store
            .get_agent(org, &session.agent_id)
            .await?
            .ok_or_else(|| {
                ApiError::invalid_state(format!("The agent of session '{id}' has been deleted"))
            })?;
        resumed = store.latest_checkpoint(&session).await?.map(|c| (c, false));
        (agent, Some(session.id), None, Some(session.variables))
    } else if let Some(id) = &req.checkpoint_id {
        check_id(IdKind::Checkpoint, "checkpointId", id)?;
        let chk = store
            .get_checkpoint(org, id)
            .await?
            .ok_or_else(|| ApiError::not_found("checkpoint", id, Some("checkpointId")))?;
        let session = store.get_session(org, &chk.session_id).await?;
        let agent_id = session
            .as_ref()
            .map(|s| s.agent_id.clone())
            .unwrap_or_default();
        let agent = store.get_agent(org, &agent_id).await?.ok_or_else(|| {
            ApiError::invalid_state(format!("The agent of checkpoint '{id}' has been deleted"))
        })?;
        let pinned = (
            agent,
            Some(chk.session_id.clone()),
            Some(chk.agent_version_id.clone()),
            Some(chk.variables.clone()),
        );
        resumed = Some((chk, true));
        pinned
    } else {
        // `validate` guarantees one of the four.
        return Err(FieldError::missing(
            "agent",
            "one of agent, agentId, sessionId or checkpointId is required",
        )
        .into());
    };
    let version = resolve_version(
        state,
        org,
        &agent,
        req.agent_version.as_deref(),
        pinned_version,
    )
    .await?;
    Ok(Target {
        agent,
        version,
        session_id,
        inherited_variables,
        resumed,
    })
}

/// `agentVersion`: absent or `latest` → current (or the checkpoint's), `ver_…` → that
/// version, digits → that version number.
async fn resolve_version(
    state: &AppState,
    org: &str,
    agent: &agent::Model,
    spec: Option<&str>,
    pinned: Option<String>,
) -> ApiResult<agent_version::Model> {
    let store = &state.store;
    let found = match spec {
        None | Some("latest") => {
            let id = pinned.unwrap_or_else(|| agent.current_version_id.clone());
            store.get_agent_version(org, &agent.id, &id).await?
        }
        Some(v) if v.starts_with("ver_") => {
            check_id(IdKind::AgentVersion, "agentVersion", v)?;
            store.get_agent_version(org, &agent.id, v).await?
        }
        Some(v) => match v.parse::<i64>() {
            Ok(n) if n >= 1 => store.get_agent_version_by_number(org, &agent.id, n).await?,
            _ => {
                return Err(ApiError::invalid(
                    "agentVersion",
                    "agentVersion must be 'latest', a version id (ver_...) or a version number",
                ));
            }
        },
    };
    found.ok_or_else(|| {
        ApiError::not_found(
            "agent version",
            spec.unwrap_or("latest"),
            Some("agentVersion"),
        )
    })
}

/// Volume name → exact version id; `latest` resolves now, so the run is
/// reproducible, and a prefix becomes the full id.
async fn resolve_volumes(
    state: &AppState,
    org: &str,
    volumes: &BTreeMap<String, String>,
) -> ApiResult<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for (name, spec) in volumes {
        let param = format!("volumes.{name}");
        let volume = state
            .store
            .find_storage(org, StorageKind::Volume, name)
            .await?
            .ok_or_else(|| ApiError::not_found("volume", name, Some(&param)))?;
        let version = if spec == "latest" {
            volume.current_version_id.clone().ok_or_else(|| {
                ApiError::invalid_state(format!("Volume '{name}' has no versions yet"))
            })?
        } else {
            resolve_storage_version(&state.store, StorageKind::Volume, &volume, spec, &param)
                .await?
                .id
        };
        out.insert(name.clone(), version);
    }
    Ok(out)
}

/// The artifact version a run mounts: `None` for a new artifact or one without
/// versions; an explicit version must exist.
async fn resolve_artifact(
    state: &AppState,
    org: &str,
    name: Option<&String>,
    version: Option<&str>,
) -> ApiResult<Option<String>> {
    let Some(name) = name else {
        return Ok(None);
    };
    let artifact = state
        .store
        .find_storage(org, StorageKind::Artifact, name)
        .await?;
    match (version, artifact) {
        (None | Some("latest"), None) => Ok(None),
        (None | Some("latest"), Some(a)) => Ok(a.current_version_id),
        (Some(v), None) => Err(ApiError::not_found("artifact", name, Some("artifactName"))
            .with_message(format!(
                "No such artifact: '{name}' (version '{v}' was requested)"
            ))),
        (Some(v), Some(a)) => Ok(Some(
            resolve_storage_version(
                &state.store,
                StorageKind::Artifact,
                &a,
                v,
                "artifactVersion",
            )
            .await?
            .id,
        )),
    }
}

/// Create a run (it executes asynchronously)
#[utoipa::path(post, path = "/v1/runs", tag = "runs", request_body = CreateRunRequest,
    responses((status = 202, body = Run), (status = 400, body = ErrorEnvelope), (status = 404, body = ErrorEnvelope)),
    security(("bearer" = [])))]
pub async fn create(
    caller: Caller,
    State(state): State<AppState>,
    JsonBody(req): JsonBody<CreateRunRequest>,
) -> ApiResult<(StatusCode, Json<Run>)> {
    req.validate()?;
    let org = caller.org_id.as_str();
    let target = resolve_target(&state, org, &req).await?;
    // What the run mounts: as asked; else a resumed checkpoint's exact
    // versions, or a continued session's names on their latest versions.
    let checkpoint = target.resumed.as_ref();
    let volumes = match (&req.volumes, checkpoint) {
        (Some(asked), _) => resolve_volumes(&state, org, asked).await?,
        (None, Some((chk, exact))) => {
            let kept: BTreeMap<String, String> =
                serde_json::from_str(&chk.volumes).map_err(|e| ApiError::internal(&e))?;
            if *exact {
                kept
            } else {
                let latest = kept.into_keys().map(|n| (n, "latest".to_owned())).collect();
                resolve_volumes(&state, org, &latest).await?
            }
        }
        (None, None) => BTreeMap::new(),
    };
    let (artifact_name, artifact_version) = match (&req.artifact_name, checkpoint) {
        (None, Some((chk, exact))) if chk.artifact_name.is_some() => {
            let name = chk.artifact_name.clone();
            if *exact {
                (name, chk.artifact_version.clone())
            } else {
                let latest = resolve_artifact(&state, org, name.as_ref(), None).await?;
                (name, latest)
            }
        }
        _ => (
            req.artifact_name.clone(),
            resolve_artifact(
                &state,
                org,
                req.artifact_name.as_ref(),
                req.artifact_version.as_deref(),
            )
            .await?,
        ),
    };
    let variables = match (&req.variables, target.inherited_variables) {
        (Some(v), _) => serde_json::to_string(v).map_err(|e| ApiError::internal(&e))?,
        (None, Some(inherited)) => inherited,
        (None, None) => "{}".to_owned(),
    };
    // Secrets are stored sealed (opened only for the worker that claims the run) and
    // listed by name.
    let secret_names: Vec<&String> = req
        .secrets
        .as_ref()
        .map(|s| s.0.keys().collect())
        .unwrap_or_default();
    let run_id = vm0_api_types::ids::new_id(IdKind::Run);
    let secrets_sealed = req
        .secrets
        .as_ref()
        .filter(|s| !s.0.is_empty())
        .map(|s| state.secrets.seal(&run_id, &s.0));
    let config = convert::agent_config(&target.version)?;
    // The proxy sends these secrets for the run: without them it has nothing to send.
    for name in config.network.secret_header_names() {
        let value = req.secrets.as_ref().and_then(|s| s.0.get(name));
        let Some(value) = value else {
            return Err(vm0_api_types::error::FieldError::missing(
                format!("secrets.{name}"),
                format!(
                    "the agent's network.secretHeaders sends secret {name}: pass it in secrets"
                ),
            )
            .into());
        };
        if !vm0_egress::policy::is_header_value(value) {
            return Err(ApiError::invalid(
                format!("secrets.{name}"),
                format!(
                    "secret {name} is sent as a header (network.secretHeaders): it may not hold a control character"
                ),
            ));
        }
    }
    let new = NewRun {
        id: run_id,
        org_id: caller.org_id.clone(),
        agent_id: target.agent.id.clone(),
        agent_name: target.agent.name.clone(),
        agent_version_id: target.version.id.clone(),
        session_id: target.session_id,
        prompt: req.prompt.clone().unwrap_or_default(),
        variables,
        secret_names: serde_json::to_string(&secret_names).map_err(|e| ApiError::internal(&e))?,
        volumes: serde_json::to_string(&volumes).map_err(|e| ApiError::internal(&e))?,
        artifact_name,
        artifact_version,
        secrets_sealed,
        timeout_seconds: i64::try_from(config.timeout_seconds).unwrap_or(i64::MAX),
        now: Timestamp::now().micros(),
        resumed_from: target.resumed.map(|(c, _)| c.id),
    };
    let run = state.store.create_run(new).await?;
    state.instruments.run_created();
    tracing::info!(run_id = %run.id, agent_id = %run.agent_id, "run created");
    if let Some(bus) = state.bus.clone() {
        let job =
            crate::dispatch::job_for(&run, config.resources.vcpus, config.resources.memory_mb);
        tokio::spawn(async move { crate::dispatch::publish_job(&bus, job).await });
    }
    Ok((StatusCode::ACCEPTED, Json(convert::run(&run)?)))
}

/// Loads a run of the caller's organization, or 404.
pub async fn load(
    state: &AppState,
    caller: &Caller,
    id: &str,
) -> ApiResult<vm0_db::entity::run::Model> {
    path_id(IdKind::Run, id)?;
    state
        .store
        .get_run(&caller.org_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("run", id, None))
}

/// [`load`], to read the run's `what` (events, logs, metrics): `400
/// invalid_state` once retention deleted them.
pub async fn load_records(
    state: &AppState,
    caller: &Caller,
    id: &str,
    what: &str,
) -> ApiResult<vm0_db::entity::run::Model> {
    let run = load(state, caller, id).await?;
    match run.records_purged_at {
        Some(at) => Err(crate::retention::purged_error(what, at)),
        None => Ok(run),
    }
}

/// Get a run
#[utoipa::path(get, path = "/v1/runs/{id}", tag = "runs", params(("id" = String, Path)),
    responses((status = 200, body = Run), (status = 404, body = ErrorEnvelope)),
    security(("bearer" = [])))]
pub async fn get(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Run>> {
    let run = load(&state, &caller, &id).await?;
    Ok(Json(convert::run(&run)?))
}

/// Cancel a pending or running run
#[utoipa::path(post, path = "/v1/runs/{id}/cancel", tag = "runs", params(("id" = String, Path)),
    responses((status = 200, body = Run), (status = 400, body = ErrorEnvelope, description = "invalid_state: the run already ended"), (status = 404, body = ErrorEnvelope)),
    security(("bearer" = [])))]
pub async fn cancel(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Run>> {
    path_id(IdKind::Run, &id)?;
    match state
        .store
        .cancel_run(&caller.org_id, &id, Timestamp::now().micros())
        .await?
    {
        CancelOutcome::Cancelled(run) => {
            tracing::info!(run_id = %run.id, "run cancelled");
            Ok(Json(convert::run(&run)?))
        }
        CancelOutcome::Requested(run) => {
            Ok(Json(convert::run(&cancel_running(&state, run).await?)?))
        }
        CancelOutcome::AlreadyFinished(run) => Err(ApiError::invalid_state(format!(
            "Run '{id}' is {}; only pending and running runs can be cancelled",
            run.status
        ))),
        CancelOutcome::NotFound => Err(ApiError::not_found("run", &id, None)),
    }
}

/// Cancel of a running run: tell its worker, wait for it to report `cancelled`, and
/// if it does not within `cancel_wait`, end the run in the store (the worker's late
/// finish is then refused, and its next heartbeat tells it to stop).
async fn cancel_running(
    state: &AppState,
    run: vm0_db::entity::run::Model,
) -> ApiResult<vm0_db::entity::run::Model> {
    let (Some(bus), Some(dispatch)) = (&state.bus, &state.config.dispatch) else {
        return force_cancel(state, run).await;
    };
    if let Err(e) = bus.publish_cancel(&run.id).await {
        tracing::warn!(run_id = %run.id, error = %crate::error::ErrorChain(&e), "cancel publish failed");
    }
    let deadline = tokio::time::Instant::now() + dispatch.cancel_wait;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        if let Some(now) = state.store.get_run(&run.org_id, &run.id).await?
            && convert::run_status(&now.status)?.is_terminal()
        {
            return Ok(now);
        }
    }
    force_cancel(state, run).await
}

async fn force_cancel(
    state: &AppState,
    run: vm0_db::entity::run::Model,
) -> ApiResult<vm0_db::entity::run::Model> {
    let now = Timestamp::now().micros();
    let finish = vm0_db::FinishRun {
        run_id: run.id.clone(),
        attempt: run.attempt,
        worker_id: None,
        status: RunStatus::Cancelled,
        exit_code: None,
        error: Some("cancelled by user".into()),
        execution_time_ms: run.started_at.map(|s| (now - s).max(0) / 1000),
        last_worker_seq: 0,
        log: "run cancelled by user (the worker did not confirm in time)".into(),
        now,
        artifact_version: None,
        checkpoint: None,
    };
    if let vm0_db::FinishOutcome::Finished { events, .. } = state.store.finish_run(finish).await? {
        state
            .instruments
            .run_finished(RunStatus::Cancelled, "cancelled");
        if let Some(bus) = &state.bus {
            crate::dispatch::publish_events(bus, &events).await;
        }
    }
    state
        .store
        .get_run(&run.org_id, &run.id)
        .await?
        .ok_or_else(|| ApiError::not_found("run", &run.id, None))
}
