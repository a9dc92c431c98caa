//! [`Store`]: the connection pool plus the queries, grouped by resource.
//!
//! Lists use keyset pagination: callers pass the sort key of the last item they saw
//! ([`KeysetAfter`]) and get up to `limit + 1` rows, the extra one telling that more
//! exist. Sort orders are total (a timestamp, then the primary key), so a walk never
//! skips or repeats a row, even when rows are inserted meanwhile.

mod agents;
mod dispatch;
mod retention;
mod run_batch;
mod runs;
mod storage;
mod telemetry;
mod tokens;
mod trust;

use std::sync::Arc;
use std::time::Duration;

use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{
    ColumnTrait, Condition, ConnectOptions, ConnectionTrait, Database, DatabaseConnection,
    DatabaseTransaction, DbErr, SqliteTransactionMode, TransactionOptions, TransactionTrait,
};
use sea_orm_migration::MigratorTrait;

pub use runs::{CancelOutcome, NewRun, RunFilter};
pub use telemetry::{LogFilter, MetricAggregate, NewLog, NewMetric};

pub use agents::UpdateOutcome;
pub use dispatch::{ClaimOutcome, ClaimedRun, FinishOutcome, FinishRun, NewCheckpoint};
pub use storage::{Committed, StorageKind};

use crate::migration::Migrator;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database operation failed")]
    Db(#[from] DbErr),
    #[error("the name '{0}' is already taken")]
    NameTaken(String),
    #[error("a concurrent change won; retry the request")]
    Conflict,
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("unsupported database URL '{0}': use sqlite://PATH or postgres://...")]
    UnsupportedUrl(String),
}

/// Which database is behind the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Position after which a page starts: the sort key and id of the last item seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeysetAfter {
    pub key: i64,
    pub id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortOrder {
    Asc,
    Desc,
}

/// `(key, id)` strictly after `after` in `order`.
fn keyset<K: ColumnTrait, I: ColumnTrait>(
    key_col: K,
    id_col: I,
    after: &KeysetAfter,
    order: SortOrder,
) -> Condition {
    match order {
        SortOrder::Desc => Condition::any().add(key_col.lt(after.key)).add(
            Condition::all()
                .add(key_col.eq(after.key))
                .add(id_col.lt(after.id.clone())),
        ),
        SortOrder::Asc => Condition::any().add(key_col.gt(after.key)).add(
            Condition::all()
                .add(key_col.eq(after.key))
                .add(id_col.gt(after.id.clone())),
        ),
    }
}

/// Like [`keyset`] for tables whose tie-breaker is an integer id.
fn keyset_int<K: ColumnTrait, I: ColumnTrait>(
    key_col: K,
    id_col: I,
    after: &KeysetAfter,
    order: SortOrder,
) -> Result<Condition, StoreError> {
    let id: i64 = after
        .id
        .parse()
        .map_err(|_| StoreError::Corrupt("cursor id is not an integer".into()))?;
    Ok(match order {
        SortOrder::Desc => Condition::any().add(key_col.lt(after.key)).add(
            Condition::all()
                .add(key_col.eq(after.key))
                .add(id_col.lt(id)),
        ),
        SortOrder::Asc => Condition::any().add(key_col.gt(after.key)).add(
            Condition::all()
                .add(key_col.eq(after.key))
                .add(id_col.gt(id)),
        ),
    })
}

/// Arbitrary constant naming the PostgreSQL advisory lock that serializes migrations
/// when several gateways start at once.
const MIGRATION_LOCK_KEY: i64 = 0x0076_6d30_306d_6967;

/// The system of record. Cheap to clone (a pool handle).
#[derive(Debug, Clone)]
pub struct Store {
    db: DatabaseConnection,
    backend: Backend,
    /// SQLite allows one writer at a time. Queueing writers here, in order, beats
    /// letting them collide in SQLite's busy handler, which backs off by sleeping
    /// (tens of milliseconds) and turns contention into tail latency.
    write_lane: Option<Arc<tokio::sync::Mutex<()>>>,
    /// Queue of the group-commit run writer, started on first use.
    run_queue: Arc<std::sync::OnceLock<run_batch::RunQueue>>,
}

/// A write transaction; on SQLite it also holds the write lane until it ends.
pub(crate) struct WriteTxn {
    txn: DatabaseTransaction,
    _lane: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl WriteTxn {
    pub(crate) async fn commit(self) -> Result<(), DbErr> {
        self.txn.commit().await
    }

    pub(crate) async fn rollback(self) -> Result<(), DbErr> {
        self.txn.rollback().await
    }
}

impl std::ops::Deref for WriteTxn {
    type Target = DatabaseTransaction;

    fn deref(&self) -> &DatabaseTransaction {
        &self.txn
    }
}

impl Store {
    /// Connects to `url`: `sqlite://PATH` (created if missing; WAL mode) or
    /// `postgres://…`. Does not migrate: call [`Store::migrate`].
    pub async fn connect(url: &str, max_connections: u32) -> Result<Store, StoreError> {
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            return Err(StoreError::UnsupportedUrl(redact_url(url)));
        };
        let mut opts = ConnectOptions::new(url.to_owned());
        opts.max_connections(max_connections)
            .min_connections(1)
            .connect_timeout(Duration::from_secs(10))
            .acquire_timeout(Duration::from_secs(10))
            // Statements are traced by our own spans; sqlx's per-statement logging at
            // INFO would drown everything else.
            .sqlx_logging(false);
        if backend == Backend::Sqlite {
            opts.map_sqlx_sqlite_opts(|o| {
                o.create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal)
                    .busy_timeout(Duration::from_secs(10))
            });
        }
        let db = Database::connect(opts).await?;
        let write_lane =
            (backend == Backend::Sqlite).then(|| Arc::new(tokio::sync::Mutex::new(())));
        Ok(Store {
            db,
            backend,
            write_lane,
            run_queue: Arc::new(std::sync::OnceLock::new()),
        })
    }

    /// Applies pending migrations, in one transaction. Concurrent callers (replicas
    /// starting together) queue: on PostgreSQL on an advisory lock, on SQLite on the
    /// write lock.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let txn = self.begin_write().await?;
        if self.backend == Backend::Postgres {
            txn.execute_unprepared(&format!(
                "SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})"
            ))
            .await?;
        }
        Migrator::up(&*txn, None).await?;
        txn.commit().await?;
        Ok(())
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        Ok(self.db.ping().await?)
    }

    pub async fn close(self) -> Result<(), StoreError> {
        Ok(self.db.close().await?)
    }

    /// The run writer's queue, starting the writer on first use. The writer holds a
    /// copy of this store without the queue, so it stops once every store is dropped.
    fn run_queue(&self) -> &run_batch::RunQueue {
        self.run_queue.get_or_init(|| {
            let writer_store = Store {
                db: self.db.clone(),
                backend: self.backend,
                write_lane: self.write_lane.clone(),
                run_queue: Arc::new(std::sync::OnceLock::new()),
            };
            run_batch::start(writer_store)
        })
    }

    pub(crate) fn conn(&self) -> &DatabaseConnection {
        &self.db
    }

    /// A transaction that will write. On SQLite it takes the write lock at `BEGIN`
    /// (`IMMEDIATE`): a deferred transaction that reads first and then writes would
    /// fail with `SQLITE_BUSY` instead of waiting when another writer is active.
    pub(crate) async fn begin_write(&self) -> Result<WriteTxn, StoreError> {
        let lane = match &self.write_lane {
            Some(lane) => Some(lane.clone().lock_owned().await),
            None => None,
        };
        let txn = self
            .db
            .begin_with_options(TransactionOptions {
                sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                ..Default::default()
            })
            .await?;
        Ok(WriteTxn { txn, _lane: lane })
    }
}

/// `url` without its password, for error messages and logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            match url[scheme_end + 3..at].split_once(':') {
                Some((user, _password)) => {
                    format!("{}://{}:***@{}", &url[..scheme_end], user, &url[at + 1..])
                }
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Maps a unique-constraint violation to `on_unique`, anything else to `Db`.
fn unique_or(err: DbErr, on_unique: impl FnOnce() -> StoreError) -> StoreError {
    match err.sql_err() {
        Some(sea_orm::SqlErr::UniqueConstraintViolation(_)) => on_unique(),
        _ => StoreError::Db(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("postgres://vm0:secret@db:5432/vm0"),
            "postgres://vm0:***@db:5432/vm0"
        );
        assert_eq!(redact_url("sqlite:///x.db"), "sqlite:///x.db");
        assert_eq!(redact_url("postgres://vm0@db/vm0"), "postgres://vm0@db/vm0");
    }
}
