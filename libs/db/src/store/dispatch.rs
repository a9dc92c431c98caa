//! What the control plane writes: workers, claims (the fence), finishes, and the
//! telemetry the persister stores.
//!
//! Event sequence numbers: the control plane numbers the events it writes
//! (`status`, `complete`) from `runs.last_event_seq`; a claim reserves the numbers
//! after its `running` event for the worker, which numbers its own events
//! (`output`, `error`) from `next_event_seq`. A finish continues after the larger of
//! the worker's last number and anything stored, so `complete` is always last.

use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Set,
};
use vm0_api_types::runs::{LogLevel, LogType, RunEventType, RunStatus};

use super::telemetry::{NewLog, NewMetric};
use super::{Store, StoreError, unique_or};
use crate::entity::{run, run_event, run_log, run_metric, worker};

/// How often ending a run is tried when its event numbers were taken meanwhile.
const END_RUN_TRIES: usize = 3;

/// A run a worker now owns.
#[derive(Debug, Clone)]
pub struct ClaimedRun {
    pub run: run::Model,
    pub attempt: i32,
    /// First sequence number the worker may use for its events.
    pub next_event_seq: i64,
    /// Events the claim wrote (to publish live).
    pub events: Vec<run_event::Model>,
}

#[derive(Debug, Clone)]
pub enum ClaimOutcome {
    Claimed(Box<ClaimedRun>),
    /// Running under another claim, or already ended.
    AlreadyClaimed,
    /// Cancelled while pending.
    Cancelled,
    NotFound,
}

/// How a run ends.
#[derive(Debug, Clone)]
pub struct FinishRun {
    pub run_id: String,
    /// The claim's attempt; a finish with another attempt is stale.
    pub attempt: i32,
    /// When set, the run must be owned by this worker.
    pub worker_id: Option<String>,
    pub status: RunStatus,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    pub execution_time_ms: Option<i64>,
    /// The worker's last event number (0 when unknown).
    pub last_worker_seq: i64,
    /// A system log line saying why.
    pub log: String,
    pub now: i64,
    /// The artifact version the run left (its `/work`, committed), if any.
    pub artifact_version: Option<String>,
    /// The checkpoint a completed run leaves (written with its end, in the
    /// same transaction; ignored for any other status).
    pub checkpoint: Option<NewCheckpoint>,
}

/// A completed run's checkpoint: the rest (agent version, volumes, artifact,
/// variables, session) is the run's own.
#[derive(Debug, Clone)]
pub struct NewCheckpoint {
    pub id: String,
    /// The version of the session's state it saved, if the state was not empty.
    pub state_version: Option<String>,
}

#[derive(Debug, Clone)]
pub enum FinishOutcome {
    Finished {
        run: Box<run::Model>,
        events: Vec<run_event::Model>,
    },
    /// Not running with that attempt (and owner): nothing was written.
    Stale,
}

fn event(
    run_id: &str,
    seq: i64,
    kind: RunEventType,
    data: serde_json::Value,
    now: i64,
) -> run_event::Model {
    run_event::Model {
        run_id: run_id.to_owned(),
        seq,
        event_type: kind.as_str().to_owned(),
        data: data.to_string(),
        created_at: now,
    }
}

/// [`Store::max_event_seq`] on `conn` (a transaction sees what it wrote).
async fn max_event_seq_on(
    conn: &impl sea_orm::ConnectionTrait,
    run_id: &str,
) -> Result<i64, StoreError> {
    let last = run_event::Entity::find()
        .filter(run_event::Column::RunId.eq(run_id))
        .order_by_desc(run_event::Column::Seq)
        .limit(1)
        .one(conn)
        .await?;
    Ok(last.map_or(0, |e| e.seq))
}

fn system_log(run_id: &str, now: i64, level: LogLevel, message: String) -> run_log::ActiveModel {
    run_log::ActiveModel {
        run_id: Set(run_id.to_owned()),
        ts: Set(now),
        dedupe_key: Set(None),
        log_type: Set(LogType::System.as_str().to_owned()),
        level: Set(level.as_str().to_owned()),
        message: Set(message),
        metadata: Set("{}".to_owned()),
        ..Default::default()
    }
}

impl Store {
    /// Registers (or re-registers) a worker.
    pub async fn register_worker(
        &self,
        id: &str,
        hostname: &str,
        sandbox: &str,
        capacity: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        let txn = self.begin_write().await?;
        let existing = worker::Entity::find_by_id(id.to_owned()).one(&*txn).await?;
        let row = worker::ActiveModel {
            id: Set(id.to_owned()),
            hostname: Set(hostname.to_owned()),
            sandbox: Set(sandbox.to_owned()),
            capacity: Set(capacity.to_owned()),
            free: Set(capacity.to_owned()),
            registered_at: Set(now),
            last_heartbeat_at: Set(now),
        };
        if existing.is_some() {
            row.update(&*txn).await?;
        } else {
            row.insert(&*txn)
                .await
                .map_err(|e| unique_or(e, || StoreError::Conflict))?;
        }
        txn.commit().await?;
        Ok(())
    }

    /// Records a heartbeat; false when the worker is unknown (it must register).
    pub async fn heartbeat_worker(
        &self,
        id: &str,
        free: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let res = worker::Entity::update_many()
            .col_expr(worker::Column::LastHeartbeatAt, Expr::value(now))
            .col_expr(worker::Column::Free, Expr::value(free))
            .filter(worker::Column::Id.eq(id))
            .exec(self.conn())
            .await?;
        Ok(res.rows_affected == 1)
    }

    pub async fn get_worker(&self, id: &str) -> Result<Option<worker::Model>, StoreError> {
        Ok(worker::Entity::find_by_id(id.to_owned())
            .one(self.conn())
            .await?)
    }

    /// A run by id, whatever its organization (control plane only).
    pub async fn get_run_by_id(&self, id: &str) -> Result<Option<run::Model>, StoreError> {
        Ok(run::Entity::find_by_id(id.to_owned())
            .one(self.conn())
            .await?)
    }

    /// An agent version by id, whatever its organization (control plane only).
    pub async fn get_agent_version_by_id(
        &self,
        id: &str,
    ) -> Result<Option<crate::entity::agent_version::Model>, StoreError> {
        Ok(
            crate::entity::agent_version::Entity::find_by_id(id.to_owned())
                .one(self.conn())
                .await?,
        )
    }

    /// `pending → running` for `worker_id`, atomically: of concurrent claims exactly
    /// one wins. Writes the `running` status event and a system log line.
    ///
    /// A claim is a lease named by `token`: the same worker asking again with the
    /// same (non-empty) token, its first answer lost, is given the same lease.
    pub async fn claim_run(
        &self,
        run_id: &str,
        worker_id: &str,
        token: &str,
        now: i64,
    ) -> Result<ClaimOutcome, StoreError> {
        let txn = self.begin_write().await?;
        let Some(current) = run::Entity::find_by_id(run_id.to_owned())
            .one(&*txn)
            .await?
        else {
            return Ok(ClaimOutcome::NotFound);
        };
        match crate::convert::run_status(&current.status)? {
            RunStatus::Pending => {}
            RunStatus::Cancelled if current.started_at.is_none() => {
                return Ok(ClaimOutcome::Cancelled);
            }
            RunStatus::Running
                if !token.is_empty()
                    && current.worker_id.as_deref() == Some(worker_id)
                    && current.claim_token.as_deref() == Some(token) =>
            {
                drop(txn);
                let next_event_seq = current
                    .last_event_seq
                    .max(self.max_event_seq(run_id).await?)
                    + 1;
                let attempt = current.attempt;
                return Ok(ClaimOutcome::Claimed(Box::new(ClaimedRun {
                    run: current,
                    attempt,
                    next_event_seq,
                    events: Vec::new(),
                })));
            }
            _ => return Ok(ClaimOutcome::AlreadyClaimed),
        }
        let attempt = current.attempt + 1;
        let seq = current.last_event_seq + 1;
        let res = run::Entity::update_many()
            .col_expr(
                run::Column::Status,
                Expr::value(RunStatus::Running.as_str()),
            )
            .col_expr(run::Column::Attempt, Expr::value(attempt))
            .col_expr(run::Column::WorkerId, Expr::value(worker_id))
            .col_expr(run::Column::StartedAt, Expr::value(now))
            .col_expr(run::Column::LastEventSeq, Expr::value(seq))
            .col_expr(
                run::Column::ClaimToken,
                Expr::value((!token.is_empty()).then(|| token.to_owned())),
            )
            .filter(run::Column::Id.eq(run_id))
            .filter(run::Column::Status.eq(RunStatus::Pending.as_str()))
            .filter(run::Column::Attempt.eq(current.attempt))
            .exec(&*txn)
            .await?;
        if res.rows_affected != 1 {
            return Ok(ClaimOutcome::AlreadyClaimed);
        }
        let running = event(
            run_id,
            seq,
            RunEventType::Status,
            serde_json::json!({"status": "running"}),
            now,
        );
        run_event::Entity::insert(run_event::ActiveModel::from(running.clone()))
            .exec_without_returning(&*txn)
            .await?;
        system_log(
            run_id,
            now,
            LogLevel::Info,
            format!("claimed by worker {worker_id} (attempt {attempt})"),
        )
        .insert(&*txn)
        .await?;
        txn.commit().await?;
        let run = run::Model {
            status: RunStatus::Running.as_str().to_owned(),
            attempt,
            worker_id: Some(worker_id.to_owned()),
            started_at: Some(now),
            last_event_seq: seq,
            claim_token: (!token.is_empty()).then(|| token.to_owned()),
            ..current
        };
        Ok(ClaimOutcome::Claimed(Box::new(ClaimedRun {
            run,
            attempt,
            next_event_seq: seq + 1,
            events: vec![running],
        })))
    }

    /// Fails a pending run that no worker can take (e.g. it asks for more than any
    /// worker has).
    pub async fn reject_pending_run(
        &self,
        run_id: &str,
        error: &str,
        now: i64,
    ) -> Result<FinishOutcome, StoreError> {
        let Some(current) = self.get_run_by_id(run_id).await? else {
            return Ok(FinishOutcome::Stale);
        };
        if current.status != RunStatus::Pending.as_str() {
            return Ok(FinishOutcome::Stale);
        }
        self.end_run(
            current,
            RunStatus::Pending,
            FinishRun {
                run_id: run_id.to_owned(),
                attempt: 0,
                worker_id: None,
                status: RunStatus::Failed,
                exit_code: None,
                error: Some(error.to_owned()),
                execution_time_ms: None,
                last_worker_seq: 0,
                log: error.to_owned(),
                now,
                artifact_version: None,
                checkpoint: None,
            },
        )
        .await
    }

    /// `running → <final>` if the run is running with `attempt` (and owned by
    /// `worker_id` when given). Writes `status` and `complete` after every event
    /// numbered so far, erases the run's sealed secrets.
    pub async fn finish_run(&self, finish: FinishRun) -> Result<FinishOutcome, StoreError> {
        let Some(current) = self.get_run_by_id(&finish.run_id).await? else {
            return Ok(FinishOutcome::Stale);
        };
        let owner_ok = finish
            .worker_id
            .as_ref()
            .is_none_or(|w| current.worker_id.as_ref() == Some(w));
        if current.status != RunStatus::Running.as_str()
            || current.attempt != finish.attempt
            || !owner_ok
        {
            return Ok(FinishOutcome::Stale);
        }
        self.end_run(current, RunStatus::Running, finish).await
    }

    /// Ends a run (see [`Self::end_run_once`]); when a telemetry event took the
    /// number `status` or `complete` was to have (stored meanwhile by a
    /// persister), tries again after it.
    async fn end_run(
        &self,
        current: run::Model,
        from: RunStatus,
        f: FinishRun,
    ) -> Result<FinishOutcome, StoreError> {
        let mut current = current;
        for _ in 0..END_RUN_TRIES - 1 {
            match self.end_run_once(current, from, f.clone()).await {
                Err(StoreError::Conflict) => {
                    current = match self.get_run_by_id(&f.run_id).await? {
                        Some(c) => c,
                        None => return Ok(FinishOutcome::Stale),
                    };
                }
                other => return other,
            }
        }
        self.end_run_once(current, from, f).await
    }

    /// `status` and `complete` are numbered after every event stored, read in
    /// the transaction that writes them, and inserted strictly: a number already
    /// taken is a conflict, never a silently dropped `complete`.
    async fn end_run_once(
        &self,
        current: run::Model,
        from: RunStatus,
        mut f: FinishRun,
    ) -> Result<FinishOutcome, StoreError> {
        // A worker's error text may quote the run's output: storable, always.
        f.error = f
            .error
            .map(|e| vm0_api_types::text::storable(&e).into_owned());
        f.log = vm0_api_types::text::storable(&f.log).into_owned();
        let txn = self.begin_write().await?;
        if self.backend() == super::Backend::Postgres {
            // Persisters hold the run's row shared while they store its events:
            // with it held exclusively, every event stored is seen below, and
            // every one stored later sees `complete`. (SQLite's writers are one.)
            run::Entity::find_by_id(f.run_id.clone())
                .lock_exclusive()
                .one(&*txn)
                .await?;
        }
        let stored_max = max_event_seq_on(&*txn, &f.run_id).await?;
        let base = current
            .last_event_seq
            .max(f.last_worker_seq)
            .max(stored_max);
        let mut update = run::Entity::update_many();
        if let Some(version) = &f.artifact_version {
            update = update.col_expr(run::Column::ArtifactVersion, Expr::value(version.clone()));
        }
        let checkpoint = f
            .checkpoint
            .clone()
            .filter(|_| f.status == RunStatus::Completed);
        if let Some(c) = &checkpoint {
            update = update.col_expr(run::Column::CheckpointId, Expr::value(c.id.clone()));
        }
        let res = update
            .col_expr(run::Column::Status, Expr::value(f.status.as_str()))
            .col_expr(run::Column::ExitCode, Expr::value(f.exit_code))
            .col_expr(run::Column::Error, Expr::value(f.error.clone()))
            .col_expr(
                run::Column::ExecutionTimeMs,
                Expr::value(f.execution_time_ms),
            )
            .col_expr(run::Column::CompletedAt, Expr::value(f.now))
            .col_expr(run::Column::LastEventSeq, Expr::value(base + 2))
            .col_expr(
                run::Column::SecretsSealed,
                Expr::value(Option::<String>::None),
            )
            .filter(run::Column::Id.eq(f.run_id.clone()))
            .filter(run::Column::Status.eq(from.as_str()))
            .filter(run::Column::Attempt.eq(current.attempt))
            .filter(run::Column::LastEventSeq.eq(current.last_event_seq))
            .exec(&*txn)
            .await?;
        if res.rows_affected != 1 {
            return Ok(FinishOutcome::Stale);
        }
        if let Some(c) = checkpoint {
            use sea_orm::ActiveModelTrait;
            crate::entity::checkpoint::ActiveModel::from(crate::entity::checkpoint::Model {
                id: c.id.clone(),
                org_id: current.org_id.clone(),
                run_id: current.id.clone(),
                session_id: current.session_id.clone(),
                agent_version_id: current.agent_version_id.clone(),
                state_key: c.state_version,
                volumes: current.volumes.clone(),
                artifact_name: current.artifact_name.clone(),
                artifact_version: f
                    .artifact_version
                    .clone()
                    .or_else(|| current.artifact_version.clone()),
                created_at: f.now,
                variables: current.variables.clone(),
            })
            .insert(&*txn)
            .await?;
            crate::entity::session::Entity::update_many()
                .col_expr(
                    crate::entity::session::Column::LatestCheckpointId,
                    Expr::value(c.id),
                )
                .col_expr(
                    crate::entity::session::Column::UpdatedAt,
                    Expr::value(f.now),
                )
                .filter(crate::entity::session::Column::Id.eq(current.session_id.clone()))
                .exec(&*txn)
                .await?;
        }
        let mut status_data = serde_json::json!({"status": f.status.as_str()});
        let mut complete = serde_json::json!({"status": f.status.as_str(), "executionTimeMs": f.execution_time_ms});
        if let Some(code) = f.exit_code {
            status_data["exitCode"] = code.into();
            complete["exitCode"] = code.into();
        }
        if let Some(err) = &f.error {
            complete["error"] = err.clone().into();
        }
        let events = vec![
            event(
                &f.run_id,
                base + 1,
                RunEventType::Status,
                status_data,
                f.now,
            ),
            event(&f.run_id, base + 2, RunEventType::Complete, complete, f.now),
        ];
        run_event::Entity::insert_many(events.iter().cloned().map(run_event::ActiveModel::from))
            .exec_without_returning(&*txn)
            .await
            .map_err(|e| unique_or(e, || StoreError::Conflict))?;
        let level = if f.status == RunStatus::Completed {
            LogLevel::Info
        } else {
            LogLevel::Warn
        };
        system_log(&f.run_id, f.now, level, f.log)
            .insert(&*txn)
            .await?;
        txn.commit().await?;
        let run = run::Model {
            status: f.status.as_str().to_owned(),
            exit_code: f.exit_code,
            error: f.error,
            execution_time_ms: f.execution_time_ms,
            completed_at: Some(f.now),
            last_event_seq: base + 2,
            secrets_sealed: None,
            ..current
        };
        Ok(FinishOutcome::Finished {
            run: Box::new(run),
            events,
        })
    }

    /// Highest stored event number of a run (0 when none).
    pub async fn max_event_seq(&self, run_id: &str) -> Result<i64, StoreError> {
        max_event_seq_on(self.conn(), run_id).await
    }

    /// Runs currently `running`, a page of `limit` after the run id `after` (for
    /// the reaper: lost workers, timeouts).
    pub async fn running_runs(
        &self,
        after: Option<&str>,
        limit: u64,
    ) -> Result<Vec<run::Model>, StoreError> {
        let mut q = run::Entity::find().filter(run::Column::Status.eq(RunStatus::Running.as_str()));
        if let Some(after) = after {
            q = q.filter(run::Column::Id.gt(after));
        }
        Ok(q.order_by_asc(run::Column::Id)
            .limit(limit)
            .all(self.conn())
            .await?)
    }

    /// Workers whose last heartbeat is older than `cutoff`.
    pub async fn silent_workers(&self, cutoff: i64) -> Result<Vec<worker::Model>, StoreError> {
        Ok(worker::Entity::find()
            .filter(worker::Column::LastHeartbeatAt.lt(cutoff))
            .all(self.conn())
            .await?)
    }

    /// Runs `pending` since before `cutoff` (the sweeper republishes them), a page
    /// of `limit` after the run id `after`.
    pub async fn stale_pending_runs(
        &self,
        cutoff: i64,
        after: Option<&str>,
        limit: u64,
    ) -> Result<Vec<run::Model>, StoreError> {
        let mut q = run::Entity::find()
            .filter(run::Column::Status.eq(RunStatus::Pending.as_str()))
            .filter(run::Column::CreatedAt.lt(cutoff));
        if let Some(after) = after {
            q = q.filter(run::Column::Id.gt(after));
        }
        Ok(q.order_by_asc(run::Column::Id)
            .limit(limit)
            .all(self.conn())
            .await?)
    }

    /// Reconciles a worker's heartbeat with the store: of `reported` (the runs it
    /// says it runs), those that are not its running runs any more; and its running
    /// runs it did not report although they were claimed before `claimed_before`
    /// (it lost them: restarted, or the run never started), which are ended
    /// `failed` / `worker_lost` here. Returns (to stop, ended).
    pub async fn reconcile_worker(
        &self,
        worker_id: &str,
        reported: &[String],
        claimed_before: i64,
        now: i64,
    ) -> Result<(Vec<String>, Vec<FinishOutcome>), StoreError> {
        let mine: Vec<run::Model> = run::Entity::find()
            .filter(run::Column::WorkerId.eq(worker_id))
            .filter(run::Column::Status.eq(RunStatus::Running.as_str()))
            .all(self.conn())
            .await?;
        let stop = reported
            .iter()
            .filter(|id| !mine.iter().any(|r| &r.id == *id))
            .cloned()
            .collect();
        let mut ended = Vec::new();
        for run in mine {
            let started = run.started_at.unwrap_or(run.created_at);
            if reported.contains(&run.id) || started >= claimed_before {
                continue;
            }
            ended.push(
                self.finish_run(FinishRun {
                    run_id: run.id.clone(),
                    attempt: run.attempt,
                    worker_id: Some(worker_id.to_owned()),
                    status: RunStatus::Failed,
                    exit_code: None,
                    error: Some("worker_lost".into()),
                    execution_time_ms: Some((now - started).max(0) / 1000),
                    last_worker_seq: 0,
                    log: format!(
                        "worker {worker_id} heartbeats without this run: it does not run it any more (restarted?)"
                    ),
                    now,
                    artifact_version: None,
                    checkpoint: None,
                })
                .await?,
            );
        }
        Ok((stop, ended))
    }

    /// Running runs of `worker_id` whose cancellation was requested.
    pub async fn cancel_requested_runs(&self, worker_id: &str) -> Result<Vec<String>, StoreError> {
        Ok(run::Entity::find()
            .filter(run::Column::WorkerId.eq(worker_id))
            .filter(run::Column::Status.eq(RunStatus::Running.as_str()))
            .filter(run::Column::CancelRequestedAt.is_not_null())
            .all(self.conn())
            .await?
            .into_iter()
            .map(|r| r.id)
            .collect())
    }

    /// Stores telemetry in one transaction. Everything is idempotent: an event
    /// number, a log key or a metric key already stored is skipped, so redelivered
    /// messages change nothing.
    pub async fn insert_telemetry(
        &self,
        events: &[run_event::Model],
        logs: &[(String, NewLog)],
        metrics: &[(String, NewMetric)],
    ) -> Result<(), StoreError> {
        if events.is_empty() && logs.is_empty() && metrics.is_empty() {
            return Ok(());
        }
        let txn = self.begin_write().await?;
        // Nothing is stored after a run's `complete`: a worker's last messages,
        // sent after the control plane ended its run (a forced cancel, the
        // reaper), stay out of the record. Nor anything of a run whose records
        // retention deleted (a message redelivered late would bring back a
        // piece of them). One look at the runs tells both: an ended run's
        // `last_event_seq` is its `complete` (every way to end writes it so).
        let mut run_ids: Vec<&str> = events.iter().map(|e| e.run_id.as_str()).collect();
        run_ids.extend(logs.iter().map(|(id, _)| id.as_str()));
        run_ids.extend(metrics.iter().map(|(id, _)| id.as_str()));
        run_ids.sort_unstable();
        run_ids.dedup();
        let mut completed: std::collections::HashMap<String, i64> = Default::default();
        let mut purged: std::collections::HashSet<String> = Default::default();
        for chunk in run_ids.chunks(500) {
            let mut q = run::Entity::find()
                .select_only()
                .columns([
                    run::Column::Id,
                    run::Column::Status,
                    run::Column::LastEventSeq,
                    run::Column::RecordsPurgedAt,
                ])
                .filter(run::Column::Id.is_in(chunk.iter().copied()))
                .order_by_asc(run::Column::Id);
            if self.backend() == super::Backend::Postgres {
                // See `end_run_once`: a run's end and its events' storing do
                // not interleave (shared locks, taken in id order).
                q = q.lock_shared();
            }
            let rows: Vec<(String, String, i64, Option<i64>)> = q.into_tuple().all(&*txn).await?;
            for (id, status, last_seq, purged_at) in rows {
                if purged_at.is_some() {
                    purged.insert(id);
                } else if RunStatus::parse(&status).is_some_and(|s| s.is_terminal()) {
                    completed.insert(id, last_seq);
                }
            }
        }
        let events: Vec<&run_event::Model> = events
            .iter()
            .filter(|e| completed.get(&e.run_id).is_none_or(|done| e.seq < *done))
            .filter(|e| !purged.contains(&e.run_id))
            .collect();
        let logs: Vec<&(String, NewLog)> =
            logs.iter().filter(|(id, _)| !purged.contains(id)).collect();
        let metrics: Vec<&(String, NewMetric)> = metrics
            .iter()
            .filter(|(id, _)| !purged.contains(id))
            .collect();
        for chunk in events.chunks(500) {
            run_event::Entity::insert_many(
                chunk
                    .iter()
                    .map(|e| run_event::ActiveModel::from((*e).clone())),
            )
            .on_conflict(
                OnConflict::columns([run_event::Column::RunId, run_event::Column::Seq])
                    .do_nothing()
                    .to_owned(),
            )
            .exec_without_returning(&*txn)
            .await?;
        }
        for chunk in logs.chunks(500) {
            run_log::Entity::insert_many(chunk.iter().map(|(run_id, l)| l.row(run_id)))
                .on_conflict(
                    OnConflict::columns([run_log::Column::RunId, run_log::Column::DedupeKey])
                        .do_nothing()
                        .to_owned(),
                )
                .exec_without_returning(&*txn)
                .await?;
        }
        for chunk in metrics.chunks(500) {
            run_metric::Entity::insert_many(chunk.iter().map(|(run_id, m)| m.row(run_id)))
                .on_conflict(
                    OnConflict::columns([run_metric::Column::RunId, run_metric::Column::DedupeKey])
                        .do_nothing()
                        .to_owned(),
                )
                .exec_without_returning(&*txn)
                .await?;
        }
        txn.commit().await?;
        Ok(())
    }
}
