//! Retention: the events, logs and metrics of runs that ended long ago are
//! deleted; the run itself stays, marked with when its records went.

use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};

use super::{Store, StoreError};
use crate::entity::{run, run_event, run_log, run_metric};

impl Store {
    /// Deletes the records of up to `limit` runs that ended before `cutoff`
    /// (microseconds) and still have them; returns the ids of those runs. Each
    /// run's records go in one transaction with the mark, so a reader sees a run
    /// either whole or marked.
    pub async fn purge_run_records(
        &self,
        cutoff: i64,
        limit: u64,
        now: i64,
    ) -> Result<Vec<String>, StoreError> {
        let due: Vec<String> = run::Entity::find()
            .select_only()
            .column(run::Column::Id)
            .filter(run::Column::CompletedAt.lt(cutoff))
            .filter(run::Column::RecordsPurgedAt.is_null())
            .order_by_asc(run::Column::CompletedAt)
            .limit(limit)
            .into_tuple()
            .all(self.conn())
            .await?;
        let mut purged = Vec::with_capacity(due.len());
        for id in due {
            let txn = self.begin_write().await?;
            let marked = run::Entity::update_many()
                .col_expr(run::Column::RecordsPurgedAt, Expr::value(now))
                .filter(run::Column::Id.eq(&id))
                .filter(run::Column::RecordsPurgedAt.is_null())
                .exec(&*txn)
                .await?;
            if marked.rows_affected == 0 {
                continue; // another gateway's pass took it
            }
            run_event::Entity::delete_many()
                .filter(run_event::Column::RunId.eq(&id))
                .exec(&*txn)
                .await?;
            run_log::Entity::delete_many()
                .filter(run_log::Column::RunId.eq(&id))
                .exec(&*txn)
                .await?;
            run_metric::Entity::delete_many()
                .filter(run_metric::Column::RunId.eq(&id))
                .exec(&*txn)
                .await?;
            txn.commit().await?;
            purged.push(id);
        }
        Ok(purged)
    }
}
