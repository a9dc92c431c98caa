//! `GET /v1/runs/:id/events`: Server-Sent Events.
//!
//! Replays the run's stored events after the resume position, then follows new ones
//! as they are stored, with a `heartbeat` (no id) every `sse_heartbeat`. The stream
//! ends right after `complete`. Each event's `id:` is `evt_<seq>`, the per-run
//! sequence number, so a resumed stream gets exactly the events it missed.

use std::convert::Infallible;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use vm0_api_types::runs::{RunEventType, event_id, parse_event_id};
use vm0_api_types::{ErrorEnvelope, Timestamp};
use vm0_db::convert::{self, StoredEvent};

use super::runs::load;
use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult, ErrorChain};
use crate::extract::QueryParams;

/// Events fetched per store query while replaying.
const REPLAY_BATCH: u64 = 500;

fn resume_position(headers: &HeaderMap, q: &QueryParams) -> ApiResult<i64> {
    let (param, raw) = match headers.get("last-event-id") {
        Some(v) => ("Last-Event-ID", v.to_str().unwrap_or("\u{0}").to_owned()),
        None => match q.get("lastEventId") {
            Some(v) => ("lastEventId", v.to_owned()),
            None => return Ok(0),
        },
    };
    parse_event_id(&raw).ok_or_else(|| {
        ApiError::invalid(
            param,
            "event ids look like evt_<number>, as sent in the stream's `id:` lines",
        )
    })
}

/// Stream a run's events
#[utoipa::path(get, path = "/v1/runs/{id}/events", tag = "runs",
    params(("id" = String, Path),
        ("lastEventId" = Option<String>, Query, description = "Resume after this event id (also `last_event_id`, or the Last-Event-ID header)")),
    responses((status = 200, content_type = "text/event-stream", description = "status, output, error, complete, heartbeat events"),
        (status = 404, body = ErrorEnvelope)),
    security(("bearer" = [])))]
pub async fn stream(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    q: QueryParams,
) -> ApiResult<Response> {
    q.only(&["lastEventId"])?;
    let after = resume_position(&headers, &q)?;
    let run = load(&state, &caller, &id).await?;
    let (tx, rx) = mpsc::channel(64);
    let org_id = caller.org_id;
    tokio::spawn(async move {
        if let Err(e) = pump(&state, &org_id, &run.id, after, &tx).await {
            tracing::warn!(run_id = %run.id, error = %ErrorChain(e.as_ref()), "event stream ended early");
        }
    });
    let mut resp = Sse::new(ReceiverStream::new(rx)).into_response();
    // Tell proxies not to buffer the stream.
    resp.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(resp)
}

fn sse_event(e: &StoredEvent) -> Event {
    Event::default()
        .event(e.event_type.as_str())
        .id(event_id(e.seq))
        .data(e.data.to_string())
}

fn heartbeat() -> Event {
    Event::default()
        .event(RunEventType::Heartbeat.as_str())
        .data(serde_json::json!({"timestamp": Timestamp::now()}).to_string())
}

/// Sends stored events after `after` until `complete` has been sent or the client
/// goes away.
async fn pump(
    state: &AppState,
    org_id: &str,
    run_id: &str,
    mut after: i64,
    tx: &mpsc::Sender<Result<Event, Infallible>>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut heartbeat_tick = tokio::time::interval(state.config.sse_heartbeat);
    heartbeat_tick.reset(); // the first tick would fire at once
    loop {
        let batch = state
            .store
            .events_after(run_id, after, REPLAY_BATCH)
            .await?;
        let got = batch.len() as u64;
        for row in &batch {
            let event = convert::run_event(row)?;
            if tx.send(Ok(sse_event(&event))).await.is_err() {
                return Ok(()); // client gone
            }
            after = event.seq;
            if event.event_type == RunEventType::Complete {
                return Ok(());
            }
        }
        if got == REPLAY_BATCH {
            continue; // more to replay
        }
        if got == 0 {
            // Nothing new: a finished run whose `complete` the client already has
            // ends here; otherwise wait.
            let run = state.store.get_run(org_id, run_id).await?;
            let finished = match &run {
                None => true,
                Some(r) => {
                    convert::run_status(&r.status)?.is_terminal() && r.last_event_seq <= after
                }
            };
            if finished {
                return Ok(());
            }
        }
        tokio::select! {
            _ = tx.closed() => return Ok(()),
            _ = state.shutdown.cancelled() => return Ok(()),
            _ = heartbeat_tick.tick() => {
                if tx.send(Ok(heartbeat())).await.is_err() {
                    return Ok(());
                }
            }
            _ = tokio::time::sleep(state.config.sse_poll) => {}
        }
    }
}
