//! `GET /v1/runs/:id/events`: Server-Sent Events.
//!
//! Replays the run's stored events after the resume position, then follows new ones
//! as they are stored, with a `heartbeat` (no id) every `sse_heartbeat`. The stream
//! ends right after `complete`. Each event's `id:` is `evt_<seq>`, the per-run
//! sequence number, so a resumed stream gets exactly the events it missed.
//!
//! A stream lives no longer than its token: when the token is revoked (heard at
//! once on this replica, over NATS from others) or expires, the stream sends an
//! `error` event (`{type, code, message}`, no id) and ends. With NATS down, the
//! store is asked at every heartbeat.

use std::collections::BTreeMap;
use std::convert::Infallible;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use vm0_api_types::runs::{RunEventType, event_id, parse_event_id};
use vm0_api_types::{ErrorEnvelope, Timestamp};
use vm0_bus::Telemetry;
use vm0_db::convert::{self, StoredEvent};

use super::runs::load_records;
use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult, ErrorChain};
use crate::extract::QueryParams;

/// Event streams this process serves now.
static OPEN_STREAMS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many event streams this process serves now (their tasks are alive).
pub fn open_streams() -> usize {
    OPEN_STREAMS.load(std::sync::atomic::Ordering::SeqCst)
}

/// Open event streams per organization on one gateway: each holds its task, a
/// NATS subscription and store reads, so one tenant may not open without end.
#[derive(Debug, Default)]
pub struct OrgStreams {
    open: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

impl OrgStreams {
    /// Streams open on this gateway, of every organization.
    pub fn total(&self) -> usize {
        self.open.lock().map(|o| o.values().sum()).unwrap_or(0)
    }
}

/// Counts a stream's task while it lives.
struct OpenStream {
    org_id: String,
    streams: std::sync::Arc<OrgStreams>,
}

impl OpenStream {
    /// A stream of `org_id`, unless it has `max` open already.
    fn new(
        streams: &std::sync::Arc<OrgStreams>,
        org_id: &str,
        max: usize,
    ) -> ApiResult<OpenStream> {
        let mut open = streams
            .open
            .lock()
            .map_err(|_| ApiError::internal(&std::io::Error::other("stream counts poisoned")))?;
        let count = open.entry(org_id.to_owned()).or_default();
        if *count >= max {
            return Err(ApiError::rate_limited(
                format!(
                    "this organization has {max} event streams open on this gateway \
                     (VM0_SSE_MAX_STREAMS_PER_ORG): close one, or retry later"
                ),
                1,
            ));
        }
        *count += 1;
        OPEN_STREAMS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(OpenStream {
            org_id: org_id.to_owned(),
            streams: streams.clone(),
        })
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        OPEN_STREAMS.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        if let Ok(mut open) = self.streams.open.lock()
            && let Some(count) = open.get_mut(&self.org_id)
        {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.org_id);
            }
        }
    }
}

/// Events fetched per store query while replaying.
const REPLAY_BATCH: u64 = 500;
/// With live events from NATS, the store is still read this often, in case a
/// live message was lost.
const LIVE_FALLBACK_POLL: std::time::Duration = std::time::Duration::from_secs(1);
/// How soon to look in the store again when an event is missing before ones we hold.
const GAP_POLL: std::time::Duration = std::time::Duration::from_millis(20);

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
        (status = 400, body = ErrorEnvelope, description = "a bad Last-Event-ID; `invalid_state` when retention deleted the run's events"),
        (status = 404, body = ErrorEnvelope),
        (status = 429, body = ErrorEnvelope, description = "the organization has VM0_SSE_MAX_STREAMS_PER_ORG streams open on this gateway")),
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
    let run = load_records(&state, &caller, &id, "events").await?;
    let open = OpenStream::new(
        &state.event_streams,
        &caller.org_id,
        state.config.sse_max_streams_per_org,
    )?;
    let (tx, rx) = mpsc::channel(64);
    // Subscribed before the stream starts: a revocation from now on is heard.
    let revocations = state.tokens.revocations();
    tokio::spawn(async move {
        let _open = open;
        tokio::select! {
            pumped = pump(&state, &caller.org_id, &run.id, after, &tx) => {
                if let Err(e) = pumped {
                    tracing::warn!(run_id = %run.id, error = %ErrorChain(e.as_ref()), "event stream ended early");
                }
            }
            why = token_ends(&state, &caller, revocations) => {
                tracing::info!(run_id = %run.id, token_id = %caller.token_id, why, "event stream ended: its token is no longer valid");
                let _ = tx.send(Ok(auth_error(why))).await;
            }
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

/// The `error` event (no id) that reports events `from..=to` as lost.
fn missing(from: i64, to: i64) -> Event {
    const LISTED: i64 = 100;
    let ids: Vec<String> = (from..=to.min(from + LISTED - 1)).map(event_id).collect();
    let message = if from == to {
        format!(
            "event {} of this run was lost and will not be sent",
            event_id(from)
        )
    } else {
        format!(
            "events {} to {} of this run were lost and will not be sent",
            event_id(from),
            event_id(to)
        )
    };
    Event::default().event(RunEventType::Error.as_str()).data(
        serde_json::json!({
            "type": "api_error",
            "code": "events_missing",
            "message": message,
            "missing": ids,
            "missingCount": to - from + 1,
        })
        .to_string(),
    )
}

/// The `error` event that ends a stream whose run's events retention deleted
/// meanwhile: the error a new stream gets, as its data.
fn purged_event(purged_at: i64) -> Event {
    let body = crate::retention::purged_error("events", purged_at).body;
    Event::default()
        .event(RunEventType::Error.as_str())
        .data(serde_json::to_string(&body).unwrap_or_default())
}

/// The `error` event that ends a stream whose token stopped being valid.
fn auth_error(message: &str) -> Event {
    Event::default().event(RunEventType::Error.as_str()).data(
        serde_json::json!({"type": "authentication_error", "code": "invalid_api_key", "message": message})
            .to_string(),
    )
}

/// Resolves when the caller's token is revoked or expires, with the reason.
async fn token_ends(
    state: &AppState,
    caller: &Caller,
    mut revocations: tokio::sync::broadcast::Receiver<String>,
) -> &'static str {
    use tokio::sync::broadcast::error::RecvError;
    let mut recheck = tokio::time::interval(state.config.sse_heartbeat);
    recheck.reset();
    loop {
        let expiry = async {
            match caller.expires_at {
                Some(at) => {
                    let left = (at - Timestamp::now().micros()).max(0);
                    tokio::time::sleep(std::time::Duration::from_micros(left as u64)).await
                }
                None => std::future::pending().await,
            }
        };
        let ask_store = tokio::select! {
            heard = revocations.recv() => match heard {
                Ok(id) if id == caller.token_id => return "This API key has been revoked",
                Ok(_) => false,
                // Missed some: the store knows.
                Err(RecvError::Lagged(_)) => true,
                Err(RecvError::Closed) => std::future::pending().await,
            },
            _ = expiry => return "This API key has expired",
            _ = recheck.tick() => true,
        };
        if ask_store
            && matches!(
                state
                    .store
                    .get_token(&caller.org_id, &caller.token_id)
                    .await,
                Ok(None)
            )
        {
            return "This API key has been revoked";
        }
    }
}

fn heartbeat() -> Event {
    Event::default()
        .event(RunEventType::Heartbeat.as_str())
        .data(serde_json::json!({"timestamp": Timestamp::now()}).to_string())
}

/// Sends the run's events after `after`, in sequence order with no gap and no
/// duplicate, until `complete` has been sent or the client goes away.
///
/// Two sources feed it: the store (replay, and whenever a gap must be filled) and,
/// with NATS, the run's live subjects, subscribed to *before* the first store read
/// so nothing published meanwhile is missed. Events are emitted strictly in order:
/// one that arrives early waits in `ahead` until those before it are known.
async fn pump(
    state: &AppState,
    org_id: &str,
    run_id: &str,
    after: i64,
    tx: &mpsc::Sender<Result<Event, Infallible>>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut live = match &state.bus {
        Some(bus) => Some(bus.subscribe_run(run_id).await?),
        None => None,
    };
    let idle_poll = if live.is_some() {
        LIVE_FALLBACK_POLL
    } else {
        state.config.sse_poll
    };
    let mut next = after + 1;
    let mut ahead: BTreeMap<i64, StoredEvent> = BTreeMap::new();
    let mut heartbeat_tick = tokio::time::interval(state.config.sse_heartbeat);
    heartbeat_tick.reset(); // the first tick would fire at once
    let mut read_store = true;
    // A hole in the sequence (from `next` up to the event after it, or to the
    // run's last event): since when it has been waited for.
    let mut hole: Option<(i64, tokio::time::Instant)> = None;
    // The run's last event number, once it has ended.
    let mut last_of_ended: Option<i64> = None;
    loop {
        if read_store {
            read_store = false;
            loop {
                let batch = state
                    .store
                    .events_after(run_id, next - 1, REPLAY_BATCH)
                    .await?;
                let full = batch.len() as u64 == REPLAY_BATCH;
                for row in &batch {
                    let event = convert::run_event(row)?;
                    ahead.insert(event.seq, event);
                }
                let before = next;
                if emit_ready(&mut ahead, &mut next, tx).await? == Flow::Stop {
                    return Ok(());
                }
                // A hole at `next`: reading the same page again would find it
                // again (it was a hot loop).
                if !full || next == before || tx.is_closed() {
                    break;
                }
            }
            if ahead.is_empty() {
                last_of_ended = match state.store.get_run(org_id, run_id).await? {
                    None => return Ok(()),
                    // Retention emptied the run while it was streamed.
                    Some(r) if let Some(at) = r.records_purged_at => {
                        let _ = tx.send(Ok(purged_event(at))).await;
                        return Ok(());
                    }
                    Some(r) if convert::run_status(&r.status)?.is_terminal() => {
                        // A finished run whose `complete` the client already has
                        // ends here.
                        if r.last_event_seq < next {
                            return Ok(());
                        }
                        Some(r.last_event_seq)
                    }
                    Some(_) => None,
                };
            }
        }
        if emit_ready(&mut ahead, &mut next, tx).await? == Flow::Stop {
            return Ok(());
        }
        // What is missing: up to the first event held, or, of an ended run, to its
        // last one.
        let missing_to = match ahead.first_key_value() {
            Some((first, _)) => Some(first - 1),
            None => last_of_ended.filter(|last| *last >= next),
        };
        match (missing_to, hole) {
            (None, _) => hole = None,
            (Some(to), Some((at, since))) if at == next => {
                if since.elapsed() >= state.config.sse_gap_wait {
                    if tx.send(Ok(missing(next, to))).await.is_err() {
                        return Ok(());
                    }
                    tracing::warn!(%run_id, from = next, to, "events lost: reported to the stream's client and skipped");
                    next = to + 1;
                    hole = None;
                    if ahead.is_empty() && last_of_ended.is_some() {
                        return Ok(());
                    }
                    continue;
                }
            }
            (Some(_), _) => hole = Some((next, tokio::time::Instant::now())),
        }
        // Something is missing before what we hold: look in the store again soon.
        let wait = if ahead.is_empty() {
            idle_poll
        } else {
            GAP_POLL
        };
        tokio::select! {
            _ = tx.closed() => return Ok(()),
            _ = state.shutdown.cancelled() => return Ok(()),
            _ = heartbeat_tick.tick() => {
                if tx.send(Ok(heartbeat())).await.is_err() {
                    return Ok(());
                }
            }
            msg = next_live(&mut live) => match msg {
                Some(msg) => {
                    if let Ok((id, Telemetry::Event { seq, event, data, .. })) =
                        Telemetry::from_subject(msg.subject.as_str(), &msg.payload)
                        && id == run_id
                        && seq >= next
                    {
                        ahead.insert(seq, StoredEvent { seq, event_type: event, data });
                    }
                }
                None => live = None,
            },
            _ = tokio::time::sleep(wait) => read_store = true,
        }
    }
}

#[derive(PartialEq)]
enum Flow {
    Continue,
    Stop,
}

/// Emits the events of `ahead` that continue the sequence; drops stale ones.
async fn emit_ready(
    ahead: &mut BTreeMap<i64, StoredEvent>,
    next: &mut i64,
    tx: &mpsc::Sender<Result<Event, Infallible>>,
) -> Result<Flow, Box<dyn std::error::Error + Send + Sync>> {
    ahead.retain(|seq, _| *seq >= *next);
    while let Some(event) = ahead.remove(next) {
        if tx.send(Ok(sse_event(&event))).await.is_err() {
            return Ok(Flow::Stop); // client gone
        }
        *next += 1;
        if event.event_type == RunEventType::Complete {
            return Ok(Flow::Stop);
        }
    }
    Ok(Flow::Continue)
}

async fn next_live(live: &mut Option<async_nats::Subscriber>) -> Option<async_nats::Message> {
    match live.as_mut() {
        Some(sub) => sub.next().await,
        None => std::future::pending().await,
    }
}
