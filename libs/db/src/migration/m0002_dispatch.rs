//! Dispatch: workers, run fencing and cancellation columns, telemetry dedupe keys.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m0002_dispatch"
    }
}

fn add_column(table: &'static str, col: ColumnDef) -> TableAlterStatement {
    Table::alter().table(table).add_column(col).to_owned()
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table("workers")
                    .if_not_exists()
                    .col(string("id").primary_key())
                    .col(string("hostname"))
                    .col(string("sandbox"))
                    .col(text("capacity"))
                    .col(text("free"))
                    .col(big_integer("registered_at"))
                    .col(big_integer("last_heartbeat_at"))
                    .to_owned(),
            )
            .await?;
        // SQLite alters one column per statement.
        for alter in [
            add_column("runs", big_integer_null("cancel_requested_at")),
            add_column("runs", text_null("secrets_sealed")),
            add_column(
                "runs",
                big_integer("timeout_seconds").default(600).to_owned(),
            ),
            add_column("run_logs", string_null("dedupe_key")),
            add_column("run_metrics", string_null("dedupe_key")),
        ] {
            manager.alter_table(alter).await?;
        }
        for (name, table) in [
            ("uq_run_logs_dedupe", "run_logs"),
            ("uq_run_metrics_dedupe", "run_metrics"),
        ] {
            manager
                .create_index(
                    Index::create()
                        .name(name)
                        .table(table)
                        .col("run_id")
                        .col("dedupe_key")
                        .unique()
                        .to_owned(),
                )
                .await?;
        }
        manager
            .create_index(
                Index::create()
                    .name("idx_runs_worker_status")
                    .table("runs")
                    .col("worker_id")
                    .col("status")
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table("workers").if_exists().to_owned())
            .await
    }
}
