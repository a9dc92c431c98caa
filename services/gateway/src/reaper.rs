//! The reaper: the control plane's backstops, run by every gateway (the store's
//! compare-and-set makes concurrent reapers safe).
//!
//! - Runs of a worker silent for `worker_lost_after` end `failed`, error `worker_lost`.
//! - Runs past their timeout plus `timeout_grace` end `timeout` (the worker enforces
//!   timeouts itself; this catches workers that never report).
//! - Runs `pending` for `pending_republish_after` get their job published again.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use vm0_api_types::Timestamp;
use vm0_api_types::runs::RunStatus;
use vm0_bus::Bus;

use crate::prometheus::Instruments;
use vm0_db::{FinishOutcome, FinishRun, Store};

use crate::config::DispatchConfig;
use crate::dispatch::{job_for, publish_events};
use crate::error::ErrorChain;

/// Runs read per query; a pass reads every candidate, page by page.
const PAGE: u64 = 500;
/// A pending run's job is republished at most this often by one gateway.
const REPUBLISH_EVERY: Duration = Duration::from_secs(300);

pub async fn run(
    store: Store,
    bus: Bus,
    config: Arc<DispatchConfig>,
    instruments: Arc<Instruments>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(config.reaper_interval);
    let mut republished: HashMap<String, Instant> = HashMap::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = pass(&store, &bus, &config, &instruments, &mut republished).await {
            tracing::warn!(error = %ErrorChain(e.as_ref()), "reaper pass failed");
        }
    }
}

/// Ends a run; `reason` is why, as `/metrics` counts it.
async fn end(
    store: &Store,
    bus: &Bus,
    instruments: &Instruments,
    reason: &str,
    finish: FinishRun,
) -> Result<(), vm0_db::StoreError> {
    let run_id = finish.run_id.clone();
    let status = finish.status;
    if let FinishOutcome::Finished { events, .. } = store.finish_run(finish).await? {
        instruments.run_finished(status, reason);
        tracing::warn!(%run_id, %status, "run ended by the control plane");
        publish_events(bus, &events).await;
    }
    Ok(())
}

async fn pass(
    store: &Store,
    bus: &Bus,
    config: &DispatchConfig,
    instruments: &Instruments,
    republished: &mut HashMap<String, Instant>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let now = Timestamp::now().micros();
    let lost_after = i64::try_from(config.worker_lost_after.as_micros())?;
    let silent: HashSet<String> = store
        .silent_workers(now - lost_after)
        .await?
        .into_iter()
        .map(|w| w.id)
        .collect();
    let mut after: Option<String> = None;
    loop {
        let page = store.running_runs(after.as_deref(), PAGE).await?;
        for run in &page {
            reap_running(store, bus, config, instruments, &silent, run, now).await?;
        }
        match page.last() {
            Some(last) if page.len() as u64 == PAGE => after = Some(last.id.clone()),
            _ => break,
        }
    }
    let cutoff = now - i64::try_from(config.pending_republish_after.as_micros())?;
    republished.retain(|_, at| at.elapsed() < REPUBLISH_EVERY);
    let mut after: Option<String> = None;
    loop {
        let page = store
            .stale_pending_runs(cutoff, after.as_deref(), PAGE)
            .await?;
        for run in &page {
            if republished.contains_key(&run.id) {
                continue;
            }
            if republish(store, bus, run).await? {
                republished.insert(run.id.clone(), Instant::now());
            }
        }
        match page.last() {
            Some(last) if page.len() as u64 == PAGE => after = Some(last.id.clone()),
            _ => break,
        }
    }
    Ok(())
}

/// Ends a running run whose worker went silent, or that is past its timeout
/// and grace.
async fn reap_running(
    store: &Store,
    bus: &Bus,
    config: &DispatchConfig,
    instruments: &Instruments,
    silent: &HashSet<String>,
    run: &vm0_db::entity::run::Model,
    now: i64,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let grace = i64::try_from(config.timeout_grace.as_micros())?;
    let started = run.started_at.unwrap_or(run.created_at);
    let elapsed_ms = (now - started).max(0) / 1000;
    let worker = run.worker_id.clone().unwrap_or_default();
    let base = FinishRun {
        run_id: run.id.clone(),
        attempt: run.attempt,
        worker_id: None,
        status: RunStatus::Failed,
        exit_code: None,
        error: None,
        execution_time_ms: Some(elapsed_ms),
        last_worker_seq: 0,
        log: String::new(),
        now,
        artifact_version: None,
        checkpoint: None,
    };
    if silent.contains(&worker) {
        let log = format!(
            "worker {worker} stopped heartbeating for {} s; the run is lost",
            config.worker_lost_after.as_secs()
        );
        let error = Some("worker_lost".into());
        end(
            store,
            bus,
            instruments,
            "worker_lost",
            FinishRun { error, log, ..base },
        )
        .await?;
    } else if now > started + run.timeout_seconds * 1_000_000 + grace {
        let log = format!(
            "timed out after {} s and worker {worker} did not report it",
            run.timeout_seconds
        );
        let error = Some(format!("timed out after {} s", run.timeout_seconds));
        let status = RunStatus::Timeout;
        end(
            store,
            bus,
            instruments,
            "timeout",
            FinishRun {
                status,
                error,
                log,
                ..base
            },
        )
        .await?;
    }
    Ok(())
}

/// Publishes a pending run's job again; false when that failed (tried again on
/// a later pass).
async fn republish(
    store: &Store,
    bus: &Bus,
    run: &vm0_db::entity::run::Model,
) -> Result<bool, vm0_db::StoreError> {
    let resources = match store.get_agent_version_by_id(&run.agent_version_id).await? {
        Some(v) => vm0_db::convert::agent_config(&v)?.resources,
        None => Default::default(),
    };
    tracing::info!(run_id = %run.id, "republishing the job of a run still pending");
    if let Err(e) = bus
        .publish_job_again(&job_for(run, resources.vcpus, resources.memory_mb))
        .await
    {
        tracing::warn!(run_id = %run.id, error = %ErrorChain(&e), "republish failed");
        return Ok(false);
    }
    Ok(true)
}
