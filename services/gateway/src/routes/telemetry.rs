use axum::Json;
use axum::extract::{Path, State};
use vm0_api_types::cursor::Page;
use vm0_api_types::runs::{LogEntry, LogLevel, LogType, MetricsResponse, MetricsSummary};
use vm0_api_types::{ErrorEnvelope, Timestamp};
use vm0_db::{LogFilter, SortOrder, convert};

use super::runs::{load_records, parse_time};
use super::{PageRequest, cursor};
use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::QueryParams;

fn log_filter(q: &QueryParams) -> ApiResult<LogFilter> {
    let mut filter = LogFilter::default();
    match q.get("type") {
        None | Some("all") => {}
        Some(raw) => {
            filter.log_type = Some(LogType::parse(raw).ok_or_else(|| {
                ApiError::invalid("type", "type must be one of all, agent, system, network")
            })?);
        }
    }
    if let Some(raw) = q.get("level") {
        filter.level = Some(LogLevel::parse(raw).ok_or_else(|| {
            ApiError::invalid("level", "level must be one of debug, info, warn, error")
        })?);
    }
    if let Some(raw) = q.get("since") {
        filter.since = Some(parse_time("since", raw)?.micros());
    }
    if let Some(raw) = q.get("until") {
        filter.until = Some(parse_time("until", raw)?.micros());
    }
    // `until` before `since` is an empty window, not an error: the OpenAPI
    // document cannot say one parameter must follow another.
    Ok(filter)
}

/// Get a run's logs
#[utoipa::path(get, path = "/v1/runs/{id}/logs", tag = "runs",
    params(("id" = String, Path),
        ("type" = Option<String>, Query, description = "all (default), agent, system, network"),
        ("level" = Option<String>, Query, description = "Only lines of this level: debug, info, warn, error"),
        ("since" = Option<String>, Query, description = "RFC 3339, inclusive"),
        ("until" = Option<String>, Query, description = "RFC 3339, inclusive"),
        ("order" = Option<String>, Query, description = "asc (default) or desc"),
        ("limit" = Option<u64>, Query, description = "Items per page (1-100, default 20)"),
        ("cursor" = Option<String>, Query)),
    responses((status = 200, body = Page<LogEntry>), (status = 400, body = ErrorEnvelope, description = "a bad filter or cursor; `invalid_state` when retention deleted the run's records"), (status = 404, body = ErrorEnvelope)),
    security(("bearer" = [])))]
pub async fn logs(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    q: QueryParams,
) -> ApiResult<Json<Page<LogEntry>>> {
    q.only(&[
        "type", "level", "since", "until", "order", "limit", "cursor",
    ])?;
    let order = match q.get("order") {
        None | Some("asc") => SortOrder::Asc,
        Some("desc") => SortOrder::Desc,
        Some(_) => return Err(ApiError::invalid("order", "order must be asc or desc")),
    };
    // A cursor is a place in the run's logs; `order` says which way to go
    // from it (so either order's cursor is valid with either).
    let scope = "logs";
    let page = PageRequest::with_row_ids(&q, scope)?;
    let filter = log_filter(&q)?;
    let run = load_records(&state, &caller, &id, "logs").await?;
    let rows = state
        .store
        .list_logs(&run.id, &filter, order, page.after.as_ref(), page.limit)
        .await?;
    let mut keyed = Vec::with_capacity(rows.len());
    for row in &rows {
        keyed.push((row.ts, row.id, convert::run_log(row)?));
    }
    let page = Page::from_overfetch(keyed, page.limit, |(ts, rowid, _)| {
        cursor(scope, *ts, rowid.to_string())
    });
    Ok(Json(Page {
        data: page.data.into_iter().map(|(_, _, entry)| entry).collect(),
        pagination: page.pagination,
    }))
}

/// Get a run's resource metrics
#[utoipa::path(get, path = "/v1/runs/{id}/metrics", tag = "runs",
    params(("id" = String, Path),
        ("limit" = Option<u64>, Query, description = "Samples per page (1-100, default 100)"),
        ("cursor" = Option<String>, Query)),
    responses((status = 200, body = MetricsResponse), (status = 400, body = ErrorEnvelope, description = "a bad cursor; `invalid_state` when retention deleted the run's records"), (status = 404, body = ErrorEnvelope)),
    security(("bearer" = [])))]
pub async fn metrics(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    q: QueryParams,
) -> ApiResult<Json<MetricsResponse>> {
    q.only(&["limit", "cursor"])?;
    let mut page = PageRequest::with_row_ids(&q, "metrics")?;
    if q.get("limit").is_none() {
        page.limit = vm0_api_types::cursor::MAX_LIMIT;
    }
    let run = load_records(&state, &caller, &id, "metrics").await?;
    let rows = state
        .store
        .list_metrics(&run.id, page.after.as_ref(), page.limit)
        .await?;
    let agg = state.store.metrics_aggregate(&run.id).await?;
    let keyed: Vec<_> = rows
        .iter()
        .map(|m| (m.ts, m.id, convert::run_metric(m)))
        .collect();
    let page = Page::from_overfetch(keyed, page.limit, |(ts, rowid, _)| {
        cursor("metrics", *ts, rowid.to_string())
    });
    let avg_cpu = agg.avg_cpu.unwrap_or(0.0);
    let max_memory = agg.max_memory.unwrap_or(0);
    let end = run
        .completed_at
        .unwrap_or_else(|| Timestamp::now().micros());
    let summary = MetricsSummary {
        sample_count: agg.sample_count,
        avg_cpu_percent: avg_cpu,
        cpu_avg_percent: avg_cpu,
        max_memory_used_mb: max_memory / (1024 * 1024),
        memory_max_bytes: max_memory,
        network_rx_bytes: agg.max_rx.unwrap_or(0),
        network_tx_bytes: agg.max_tx.unwrap_or(0),
        total_duration_ms: run.started_at.map(|s| (end - s).max(0) / 1000).unwrap_or(0),
    };
    Ok(Json(MetricsResponse {
        data: page.data.into_iter().map(|(_, _, m)| m).collect(),
        summary,
        pagination: page.pagination,
    }))
}
