//! Group commit for run creation. `POST /v1/runs` is the hottest write; on SQLite
//! every write transaction is serialized, so one transaction per run caps the
//! rate at the transaction's round trips. Here a writer task takes every run waiting
//! in its queue (up to [`MAX_BATCH`]) and inserts them together: four multi-row
//! INSERTs and one commit for the whole batch. A run is acknowledged only after its
//! batch committed; if the batch fails, every run in it gets the error and none is
//! stored.

use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, DbErr, EntityTrait, QueryFilter, Set};
use tokio::sync::{mpsc, oneshot};
use vm0_api_types::runs::{LogLevel, LogType, RunEventType};

use super::{Store, StoreError};
use crate::entity::{run, run_event, run_log, session};

/// Runs per transaction at most.
const MAX_BATCH: usize = 64;
/// Runs waiting for the writer at most; callers beyond wait for room.
const QUEUE: usize = 1024;

/// A run to insert and whether its session is new.
pub(crate) struct PendingRun {
    pub run: run::Model,
    pub new_session: bool,
    pub done: oneshot::Sender<Result<(), String>>,
}

pub(crate) type RunQueue = mpsc::Sender<PendingRun>;

/// Starts the writer task; it ends when every [`RunQueue`] handle is dropped,
/// after inserting what is queued.
pub(crate) fn start(store: Store) -> RunQueue {
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(writer(store, rx));
    tx
}

async fn writer(store: Store, mut rx: mpsc::Receiver<PendingRun>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let outcome = insert_batch(&store, &batch)
            .await
            .map_err(|e| e.to_string());
        if let Err(e) = &outcome {
            tracing::warn!(error = %e, runs = batch.len(), "run batch failed");
        }
        for pending in batch.drain(..) {
            // The caller may have gone away (client disconnected): nothing to tell.
            let _ = pending.done.send(outcome.clone());
        }
    }
}

async fn insert_batch(store: &Store, batch: &[PendingRun]) -> Result<(), StoreError> {
    let txn = store.begin_write().await?;
    let mut new_sessions = Vec::new();
    for p in batch {
        let r = &p.run;
        if p.new_session {
            new_sessions.push(session::ActiveModel {
                id: Set(r.session_id.clone()),
                org_id: Set(r.org_id.clone()),
                agent_id: Set(r.agent_id.clone()),
                variables: Set(r.variables.clone()),
                latest_checkpoint_id: Set(None),
                created_at: Set(r.created_at),
                updated_at: Set(r.created_at),
            });
        } else {
            session::Entity::update_many()
                .col_expr(session::Column::UpdatedAt, Expr::value(r.created_at))
                .col_expr(session::Column::Variables, Expr::value(r.variables.clone()))
                .filter(session::Column::Id.eq(r.session_id.clone()))
                .exec(&*txn)
                .await?;
        }
    }
    if !new_sessions.is_empty() {
        session::Entity::insert_many(new_sessions)
            .exec_without_returning(&*txn)
            .await?;
    }
    run::Entity::insert_many(batch.iter().map(|p| run::ActiveModel::from(p.run.clone())))
        .exec_without_returning(&*txn)
        .await?;
    run_event::Entity::insert_many(batch.iter().map(|p| run_event::ActiveModel {
        run_id: Set(p.run.id.clone()),
        seq: Set(1),
        event_type: Set(RunEventType::Status.as_str().to_owned()),
        data: Set(serde_json::json!({"status": "pending"}).to_string()),
        created_at: Set(p.run.created_at),
    }))
    .exec_without_returning(&*txn)
    .await?;
    run_log::Entity::insert_many(batch.iter().map(|p| run_log::ActiveModel {
        run_id: Set(p.run.id.clone()),
        ts: Set(p.run.created_at),
        log_type: Set(LogType::System.as_str().to_owned()),
        level: Set(LogLevel::Info.as_str().to_owned()),
        message: Set("run queued".to_owned()),
        metadata: Set("{}".to_owned()),
        dedupe_key: Set(None),
        ..Default::default()
    }))
    .exec_without_returning(&*txn)
    .await?;
    txn.commit().await?;
    Ok(())
}

/// The error a caller sees when its batch failed or the writer is gone.
pub(crate) fn batch_error(message: String) -> StoreError {
    StoreError::Db(DbErr::Custom(message))
}
