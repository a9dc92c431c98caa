//! Publishing run jobs, and publishing the control plane's events live.
//!
//! A run is inserted first, then its job published. If the publish fails (NATS down)
//! the run is not lost: the publish is retried with backoff here, and the reaper's
//! sweeper republishes runs that stay `pending`. Duplicate jobs are harmless: the
//! claim lets exactly one start the run.

use std::time::Duration;

use vm0_bus::{Bus, RunJob, Telemetry};
use vm0_db::entity::{run, run_event};

use crate::error::ErrorChain;

/// Backoff between publish attempts of one job.
const PUBLISH_BACKOFF: [Duration; 4] = [
    Duration::from_millis(50),
    Duration::from_millis(250),
    Duration::from_secs(1),
    Duration::from_secs(4),
];

/// The job of `run`. It carries the current span's trace context, so the worker's
/// spans join the trace of the request that created the run.
pub fn job_for(run: &run::Model, vcpus: u32, memory_mb: u64) -> RunJob {
    RunJob {
        traceparent: vm0_telemetry::propagation::traceparent(&tracing::Span::current())
            .unwrap_or_default(),
        run_id: run.id.clone(),
        org_id: run.org_id.clone(),
        vcpus,
        memory_mb,
        created_at_us: run.created_at,
    }
}

/// Publishes `job`, retrying with backoff; gives up quietly after the last
/// attempt (the sweeper will republish).
pub async fn publish_job(bus: &Bus, job: RunJob) {
    for (i, pause) in std::iter::once(Duration::ZERO)
        .chain(PUBLISH_BACKOFF)
        .enumerate()
    {
        tokio::time::sleep(pause).await;
        match bus.publish_job(&job).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(run_id = %job.run_id, attempt = i + 1, error = %ErrorChain(&e), "job publish failed")
            }
        }
    }
    tracing::warn!(run_id = %job.run_id, "job not published; the pending sweeper will retry");
}

/// Publishes events the control plane stored, for live SSE subscribers. Best
/// effort: the store has them, and subscribers re-read the store on a gap.
pub async fn publish_events(bus: &Bus, events: &[run_event::Model]) {
    for e in events {
        let Some(kind) = vm0_api_types::runs::RunEventType::parse(&e.event_type) else {
            continue;
        };
        let msg = Telemetry::Event {
            seq: e.seq,
            event: kind,
            data: serde_json::from_str(&e.data).unwrap_or(serde_json::Value::Null),
            ts: e.created_at,
        };
        if let Err(err) = bus.publish_telemetry(&e.run_id, &msg).await {
            tracing::warn!(run_id = %e.run_id, error = %ErrorChain(&err), "event publish failed");
        }
    }
}
