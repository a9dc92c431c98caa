use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Set,
};
use vm0_api_types::ids::{IdKind, new_id};
use vm0_api_types::runs::{LogLevel, LogType, RunEventType, RunStatus};

use super::{KeysetAfter, SortOrder, Store, StoreError, keyset};
use crate::entity::{checkpoint, run, run_event, run_log, session};

/// Everything needed to insert a run; resolved and validated by the caller.
#[derive(Debug, Clone)]
pub struct NewRun {
    /// A fresh run id (`new_id(IdKind::Run)`): the caller seals the run's secrets
    /// to it before the run exists.
    pub id: String,
    pub org_id: String,
    pub agent_id: String,
    pub agent_name: String,
    pub agent_version_id: String,
    /// Continue this session, or start a new one when `None`.
    pub session_id: Option<String>,
    pub prompt: String,
    /// JSON object.
    pub variables: String,
    /// JSON array of names.
    pub secret_names: String,
    /// JSON object name → version id.
    pub volumes: String,
    pub artifact_name: Option<String>,
    pub artifact_version: Option<String>,
    /// Sealed secrets, opened by the control plane when a worker claims the run.
    pub secrets_sealed: Option<String>,
    pub timeout_seconds: i64,
    pub now: i64,
    /// The checkpoint whose state the run starts from.
    pub resumed_from: Option<String>,
}

/// Filters of `GET /v1/runs`.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub status: Option<RunStatus>,
    pub agent_id: Option<String>,
    /// Only runs created at or after (microseconds).
    pub since: Option<i64>,
}

/// What a cancel request did.
#[derive(Debug, Clone)]
pub enum CancelOutcome {
    Cancelled(run::Model),
    /// The run is running: the request is recorded and its worker must stop it.
    Requested(run::Model),
    /// The run had already ended; carries it as it is.
    AlreadyFinished(run::Model),
    NotFound,
}

fn status_event(
    seq: i64,
    run_id: &str,
    data: serde_json::Value,
    now: i64,
    kind: RunEventType,
) -> run_event::ActiveModel {
    run_event::ActiveModel {
        run_id: Set(run_id.to_owned()),
        seq: Set(seq),
        event_type: Set(kind.as_str().to_owned()),
        data: Set(data.to_string()),
        created_at: Set(now),
    }
}

fn system_log(run_id: &str, now: i64, level: LogLevel, message: &str) -> run_log::ActiveModel {
    run_log::ActiveModel {
        run_id: Set(run_id.to_owned()),
        ts: Set(now),
        log_type: Set(LogType::System.as_str().to_owned()),
        level: Set(level.as_str().to_owned()),
        message: Set(message.to_owned()),
        metadata: Set("{}".to_owned()),
        dedupe_key: Set(None),
        ..Default::default()
    }
}

impl Store {
    /// Inserts a `pending` run with its session (new or continued), its first
    /// `status` event and a system log line, atomically, through the group-commit
    /// writer (`run_batch`); returns once the run is committed.
    pub async fn create_run(&self, new: NewRun) -> Result<run::Model, StoreError> {
        let run = run::Model {
            id: new.id,
            org_id: new.org_id,
            agent_id: new.agent_id,
            agent_name: new.agent_name,
            agent_version_id: new.agent_version_id,
            session_id: new
                .session_id
                .clone()
                .unwrap_or_else(|| new_id(IdKind::Session)),
            status: RunStatus::Pending.as_str().to_owned(),
            prompt: new.prompt,
            variables: new.variables,
            secret_names: new.secret_names,
            volumes: new.volumes,
            artifact_name: new.artifact_name,
            artifact_version: new.artifact_version,
            error: None,
            exit_code: None,
            execution_time_ms: None,
            checkpoint_id: None,
            attempt: 0,
            worker_id: None,
            last_event_seq: 1,
            created_at: new.now,
            started_at: None,
            completed_at: None,
            cancel_requested_at: None,
            secrets_sealed: new.secrets_sealed,
            timeout_seconds: new.timeout_seconds,
            claim_token: None,
            records_purged_at: None,
            resumed_from: new.resumed_from,
        };
        let (done, outcome) = tokio::sync::oneshot::channel();
        let pending = super::run_batch::PendingRun {
            run: run.clone(),
            new_session: new.session_id.is_none(),
            done,
        };
        self.run_queue()
            .send(pending)
            .await
            .map_err(|_| super::run_batch::batch_error("the run writer has stopped".into()))?;
        outcome
            .await
            .map_err(|_| super::run_batch::batch_error("the run writer has stopped".into()))?
            .map_err(super::run_batch::batch_error)?;
        Ok(run)
    }

    pub async fn get_run(&self, org_id: &str, id: &str) -> Result<Option<run::Model>, StoreError> {
        Ok(run::Entity::find_by_id(id.to_owned())
            .filter(run::Column::OrgId.eq(org_id))
            .one(self.conn())
            .await?)
    }

    /// How many runs are in each of `statuses` now, across organizations (an
    /// operator's gauge; statuses with none are absent).
    pub async fn count_runs_by_status(
        &self,
        statuses: &[RunStatus],
    ) -> Result<Vec<(RunStatus, u64)>, StoreError> {
        let rows: Vec<(String, i64)> = run::Entity::find()
            .select_only()
            .column(run::Column::Status)
            .column_as(run::Column::Id.count(), "n")
            .filter(run::Column::Status.is_in(statuses.iter().map(|s| s.as_str())))
            .group_by(run::Column::Status)
            .into_tuple()
            .all(self.conn())
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(status, n)| Some((RunStatus::parse(&status)?, u64::try_from(n).ok()?)))
            .collect())
    }

    /// Runs of `org_id`, newest first.
    pub async fn list_runs(
        &self,
        org_id: &str,
        filter: &RunFilter,
        after: Option<&KeysetAfter>,
        limit: u64,
    ) -> Result<Vec<run::Model>, StoreError> {
        let mut q = run::Entity::find().filter(run::Column::OrgId.eq(org_id));
        if let Some(status) = filter.status {
            q = q.filter(run::Column::Status.eq(status.as_str()));
        }
        if let Some(agent_id) = &filter.agent_id {
            q = q.filter(run::Column::AgentId.eq(agent_id.clone()));
        }
        if let Some(since) = filter.since {
            q = q.filter(run::Column::CreatedAt.gte(since));
        }
        if let Some(after) = after {
            q = q.filter(keyset(
                run::Column::CreatedAt,
                run::Column::Id,
                after,
                SortOrder::Desc,
            ));
        }
        Ok(q.order_by_desc(run::Column::CreatedAt)
            .order_by_desc(run::Column::Id)
            .limit(limit + 1)
            .all(self.conn())
            .await?)
    }

    /// Cancels a `pending` run at once: status `cancelled`, then `status` and
    /// `complete` events. For a `running` run it records the request
    /// ([`CancelOutcome::Requested`]); the worker ends the run. A compare-and-set on (status, last event) makes concurrent
    /// cancels and status changes safe: exactly one transition wins.
    pub async fn cancel_run(
        &self,
        org_id: &str,
        id: &str,
        now: i64,
    ) -> Result<CancelOutcome, StoreError> {
        const ATTEMPTS: usize = 5;
        for _ in 0..ATTEMPTS {
            let Some(current) = self.get_run(org_id, id).await? else {
                return Ok(CancelOutcome::NotFound);
            };
            let status = crate::convert::run_status(&current.status)?;
            if status.is_terminal() {
                return Ok(CancelOutcome::AlreadyFinished(current));
            }
            if status == RunStatus::Running {
                if current.cancel_requested_at.is_none() {
                    run::Entity::update_many()
                        .col_expr(run::Column::CancelRequestedAt, Expr::value(now))
                        .filter(run::Column::Id.eq(id))
                        .filter(run::Column::CancelRequestedAt.is_null())
                        .exec(self.conn())
                        .await?;
                }
                return Ok(CancelOutcome::Requested(current));
            }
            let execution_ms = current.started_at.map(|s| (now - s).max(0) / 1000);
            let seq = current.last_event_seq;
            let txn = self.begin_write().await?;
            let res = run::Entity::update_many()
                .col_expr(
                    run::Column::Status,
                    Expr::value(RunStatus::Cancelled.as_str()),
                )
                .col_expr(run::Column::Error, Expr::value("cancelled by user"))
                .col_expr(run::Column::CompletedAt, Expr::value(now))
                .col_expr(run::Column::ExecutionTimeMs, Expr::value(execution_ms))
                .col_expr(run::Column::LastEventSeq, Expr::value(seq + 2))
                .col_expr(
                    run::Column::SecretsSealed,
                    Expr::value(Option::<String>::None),
                )
                .filter(run::Column::Id.eq(id))
                .filter(run::Column::Status.eq(current.status.clone()))
                .filter(run::Column::LastEventSeq.eq(seq))
                .exec(&*txn)
                .await?;
            if res.rows_affected != 1 {
                // Something else changed the run meanwhile: look again.
                txn.rollback().await?;
                continue;
            }
            status_event(
                seq + 1,
                id,
                serde_json::json!({"status": "cancelled"}),
                now,
                RunEventType::Status,
            )
            .insert(&*txn)
            .await?;
            status_event(
                seq + 2,
                id,
                serde_json::json!({"status": "cancelled", "executionTimeMs": execution_ms, "error": "cancelled by user"}),
                now,
                RunEventType::Complete,
            )
            .insert(&*txn)
            .await?;
            system_log(id, now, LogLevel::Info, "run cancelled by user")
                .insert(&*txn)
                .await?;
            txn.commit().await?;
            let run = self
                .get_run(org_id, id)
                .await?
                .ok_or(StoreError::Conflict)?;
            return Ok(CancelOutcome::Cancelled(run));
        }
        Err(StoreError::Conflict)
    }

    pub async fn get_session(
        &self,
        org_id: &str,
        id: &str,
    ) -> Result<Option<session::Model>, StoreError> {
        Ok(session::Entity::find_by_id(id.to_owned())
            .filter(session::Column::OrgId.eq(org_id))
            .one(self.conn())
            .await?)
    }

    /// The latest checkpoint of a session, if it has one.
    pub async fn latest_checkpoint(
        &self,
        session: &session::Model,
    ) -> Result<Option<checkpoint::Model>, StoreError> {
        match &session.latest_checkpoint_id {
            Some(id) => self.get_checkpoint(&session.org_id, id).await,
            None => Ok(None),
        }
    }

    pub async fn get_checkpoint(
        &self,
        org_id: &str,
        id: &str,
    ) -> Result<Option<checkpoint::Model>, StoreError> {
        Ok(checkpoint::Entity::find_by_id(id.to_owned())
            .filter(checkpoint::Column::OrgId.eq(org_id))
            .one(self.conn())
            .await?)
    }
}
