use sea_orm::sea_query::{Expr, Func};
use sea_orm::{ColumnTrait, EntityTrait, FromQueryResult, QueryFilter, QueryOrder, QuerySelect};
use vm0_api_types::runs::{LogLevel, LogType};

use super::{KeysetAfter, SortOrder, Store, StoreError, keyset_int};
use crate::entity::{run_event, run_log, run_metric};

/// Filters of `GET /v1/runs/:id/logs`.
#[derive(Debug, Clone, Default)]
pub struct LogFilter {
    pub log_type: Option<LogType>,
    pub level: Option<LogLevel>,
    /// Inclusive lower bound, microseconds.
    pub since: Option<i64>,
    /// Inclusive upper bound, microseconds.
    pub until: Option<i64>,
}

/// Aggregates of all metric samples of a run.
#[derive(Debug, Clone, Default, PartialEq, FromQueryResult)]
pub struct MetricAggregate {
    pub sample_count: i64,
    pub avg_cpu: Option<f64>,
    pub max_memory: Option<i64>,
    pub max_rx: Option<i64>,
    pub max_tx: Option<i64>,
}

impl Store {
    /// Events of a run with a sequence number above `after_seq`, in order.
    pub async fn events_after(
        &self,
        run_id: &str,
        after_seq: i64,
        limit: u64,
    ) -> Result<Vec<run_event::Model>, StoreError> {
        Ok(run_event::Entity::find()
            .filter(run_event::Column::RunId.eq(run_id))
            .filter(run_event::Column::Seq.gt(after_seq))
            .order_by_asc(run_event::Column::Seq)
            .limit(limit)
            .all(self.conn())
            .await?)
    }

    /// Log lines of a run in time order (`order`), keyed by (timestamp, row id).
    pub async fn list_logs(
        &self,
        run_id: &str,
        filter: &LogFilter,
        order: SortOrder,
        after: Option<&KeysetAfter>,
        limit: u64,
    ) -> Result<Vec<run_log::Model>, StoreError> {
        let mut q = run_log::Entity::find().filter(run_log::Column::RunId.eq(run_id));
        if let Some(t) = filter.log_type {
            q = q.filter(run_log::Column::LogType.eq(t.as_str()));
        }
        if let Some(l) = filter.level {
            q = q.filter(run_log::Column::Level.eq(l.as_str()));
        }
        if let Some(since) = filter.since {
            q = q.filter(run_log::Column::Ts.gte(since));
        }
        if let Some(until) = filter.until {
            q = q.filter(run_log::Column::Ts.lte(until));
        }
        if let Some(after) = after {
            q = q.filter(keyset_int(
                run_log::Column::Ts,
                run_log::Column::Id,
                after,
                order,
            )?);
        }
        q = match order {
            SortOrder::Asc => q
                .order_by_asc(run_log::Column::Ts)
                .order_by_asc(run_log::Column::Id),
            SortOrder::Desc => q
                .order_by_desc(run_log::Column::Ts)
                .order_by_desc(run_log::Column::Id),
        };
        Ok(q.limit(limit + 1).all(self.conn()).await?)
    }

    /// Metric samples of a run, oldest first.
    pub async fn list_metrics(
        &self,
        run_id: &str,
        after: Option<&KeysetAfter>,
        limit: u64,
    ) -> Result<Vec<run_metric::Model>, StoreError> {
        let mut q = run_metric::Entity::find().filter(run_metric::Column::RunId.eq(run_id));
        if let Some(after) = after {
            q = q.filter(keyset_int(
                run_metric::Column::Ts,
                run_metric::Column::Id,
                after,
                SortOrder::Asc,
            )?);
        }
        Ok(q.order_by_asc(run_metric::Column::Ts)
            .order_by_asc(run_metric::Column::Id)
            .limit(limit + 1)
            .all(self.conn())
            .await?)
    }

    /// Count, mean CPU and maxima over every sample of a run.
    pub async fn metrics_aggregate(&self, run_id: &str) -> Result<MetricAggregate, StoreError> {
        let agg = run_metric::Entity::find()
            .select_only()
            .column_as(
                Expr::expr(Func::count(Expr::col(run_metric::Column::Id))),
                "sample_count",
            )
            .column_as(
                Expr::expr(Func::avg(Expr::col(run_metric::Column::CpuPercent))),
                "avg_cpu",
            )
            .column_as(
                Expr::expr(Func::max(Expr::col(run_metric::Column::MemoryUsedBytes))),
                "max_memory",
            )
            .column_as(
                Expr::expr(Func::max(Expr::col(run_metric::Column::NetworkRxBytes))),
                "max_rx",
            )
            .column_as(
                Expr::expr(Func::max(Expr::col(run_metric::Column::NetworkTxBytes))),
                "max_tx",
            )
            .filter(run_metric::Column::RunId.eq(run_id))
            .into_model::<MetricAggregate>()
            .one(self.conn())
            .await?;
        Ok(agg.unwrap_or_default())
    }
}

/// A log line to append.
#[derive(Debug, Clone)]
pub struct NewLog {
    /// Unique per run when set (dedupes redelivered telemetry).
    pub key: Option<String>,
    pub ts: i64,
    pub log_type: LogType,
    pub level: LogLevel,
    pub message: String,
    pub metadata: serde_json::Value,
}

/// A resource sample to append.
#[derive(Debug, Clone, Default)]
pub struct NewMetric {
    /// Unique per run when set (dedupes redelivered telemetry).
    pub key: Option<String>,
    pub ts: i64,
    pub cpu_percent: f64,
    pub memory_used_bytes: i64,
    pub memory_total_bytes: i64,
    pub disk_used_bytes: i64,
    pub disk_total_bytes: i64,
    pub network_rx_bytes: i64,
    pub network_tx_bytes: i64,
}

impl NewLog {
    pub(crate) fn row(&self, run_id: &str) -> run_log::ActiveModel {
        use sea_orm::Set;
        run_log::ActiveModel {
            run_id: Set(run_id.to_owned()),
            ts: Set(self.ts),
            dedupe_key: Set(self.key.clone()),
            log_type: Set(self.log_type.as_str().to_owned()),
            level: Set(self.level.as_str().to_owned()),
            // Defended here too: one tenant's NUL must never fail a batch.
            message: Set(vm0_api_types::text::storable(&self.message).into_owned()),
            metadata: Set(self.metadata.to_string()),
            ..Default::default()
        }
    }
}

impl NewMetric {
    pub(crate) fn row(&self, run_id: &str) -> run_metric::ActiveModel {
        use sea_orm::Set;
        run_metric::ActiveModel {
            run_id: Set(run_id.to_owned()),
            ts: Set(self.ts),
            dedupe_key: Set(self.key.clone()),
            cpu_percent: Set(self.cpu_percent),
            memory_used_bytes: Set(self.memory_used_bytes),
            memory_total_bytes: Set(self.memory_total_bytes),
            disk_used_bytes: Set(self.disk_used_bytes),
            disk_total_bytes: Set(self.disk_total_bytes),
            network_rx_bytes: Set(self.network_rx_bytes),
            network_tx_bytes: Set(self.network_tx_bytes),
            ..Default::default()
        }
    }
}

impl Store {
    /// Appends log lines of a run in one transaction.
    pub async fn append_logs(&self, run_id: &str, logs: &[NewLog]) -> Result<(), StoreError> {
        let rows: Vec<_> = logs
            .iter()
            .map(|l| (run_id.to_owned(), l.clone()))
            .collect();
        self.insert_telemetry(&[], &rows, &[]).await
    }

    /// Appends resource samples of a run in one transaction.
    pub async fn append_metrics(
        &self,
        run_id: &str,
        samples: &[NewMetric],
    ) -> Result<(), StoreError> {
        let rows: Vec<_> = samples
            .iter()
            .map(|m| (run_id.to_owned(), m.clone()))
            .collect();
        self.insert_telemetry(&[], &[], &rows).await
    }
}
