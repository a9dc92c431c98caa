use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m0001_initial"
    }
}

fn index(name: &str, table: &'static str, cols: &[&'static str]) -> IndexCreateStatement {
    let mut idx = Index::create();
    idx.name(name).table(table).if_not_exists();
    for col in cols {
        idx.col(*col);
    }
    idx.to_owned()
}

fn tables() -> Vec<TableCreateStatement> {
    vec![
        Table::create()
            .table("organizations")
            .if_not_exists()
            .col(string("id").primary_key())
            .col(string_uniq("name"))
            .col(big_integer("created_at"))
            .to_owned(),
        Table::create()
            .table("api_tokens")
            .if_not_exists()
            .col(string("id").primary_key())
            .col(string("org_id"))
            .col(string("name"))
            .col(string_uniq("token_hash"))
            .col(string("prefix"))
            .col(big_integer("created_at"))
            .col(big_integer_null("expires_at"))
            .col(big_integer_null("revoked_at"))
            .to_owned(),
        Table::create()
            .table("agents")
            .if_not_exists()
            .col(string("id").primary_key())
            .col(string("org_id"))
            .col(string("name"))
            .col(string("current_version_id"))
            .col(big_integer("created_at"))
            .col(big_integer("updated_at"))
            .to_owned(),
        Table::create()
            .table("agent_versions")
            .if_not_exists()
            .col(string("id").primary_key())
            .col(string("agent_id"))
            .col(string("org_id"))
            .col(big_integer("version_number"))
            .col(text("config"))
            .col(string("config_hash"))
            .col(big_integer("created_at"))
            .to_owned(),
        Table::create()
            .table("sessions")
            .if_not_exists()
            .col(string("id").primary_key())
            .col(string("org_id"))
            .col(string("agent_id"))
            .col(text("variables"))
            .col(string_null("latest_checkpoint_id"))
            .col(big_integer("created_at"))
            .col(big_integer("updated_at"))
            .to_owned(),
        Table::create()
            .table("runs")
            .if_not_exists()
            .col(string("id").primary_key())
            .col(string("org_id"))
            .col(string("agent_id"))
            .col(string("agent_name"))
            .col(string("agent_version_id"))
            .col(string("session_id"))
            .col(string("status"))
            .col(text("prompt"))
            .col(text("variables"))
            .col(text("secret_names"))
            .col(text("volumes"))
            .col(string_null("artifact_name"))
            .col(string_null("artifact_version"))
            .col(text_null("error"))
            .col(integer_null("exit_code"))
            .col(big_integer_null("execution_time_ms"))
            .col(string_null("checkpoint_id"))
            .col(integer("attempt"))
            .col(string_null("worker_id"))
            .col(big_integer("last_event_seq"))
            .col(big_integer("created_at"))
            .col(big_integer_null("started_at"))
            .col(big_integer_null("completed_at"))
            .to_owned(),
        Table::create()
            .table("run_events")
            .if_not_exists()
            .col(string("run_id"))
            .col(big_integer("seq"))
            .col(string("event_type"))
            .col(text("data"))
            .col(big_integer("created_at"))
            .primary_key(Index::create().col("run_id").col("seq"))
            .to_owned(),
        Table::create()
            .table("run_logs")
            .if_not_exists()
            .col(big_pk_auto("id"))
            .col(string("run_id"))
            .col(big_integer("ts"))
            .col(string("log_type"))
            .col(string("level"))
            .col(text("message"))
            .col(text("metadata"))
            .to_owned(),
        Table::create()
            .table("run_metrics")
            .if_not_exists()
            .col(big_pk_auto("id"))
            .col(string("run_id"))
            .col(big_integer("ts"))
            .col(double("cpu_percent"))
            .col(big_integer("memory_used_bytes"))
            .col(big_integer("memory_total_bytes"))
            .col(big_integer("disk_used_bytes"))
            .col(big_integer("disk_total_bytes"))
            .col(big_integer("network_rx_bytes"))
            .col(big_integer("network_tx_bytes"))
            .to_owned(),
        Table::create()
            .table("checkpoints")
            .if_not_exists()
            .col(string("id").primary_key())
            .col(string("org_id"))
            .col(string("run_id"))
            .col(string("session_id"))
            .col(string("agent_version_id"))
            .col(string_null("state_key"))
            .col(text("volumes"))
            .col(string_null("artifact_name"))
            .col(string_null("artifact_version"))
            .col(big_integer("created_at"))
            .to_owned(),
        Table::create()
            .table("storages")
            .if_not_exists()
            .col(string("id").primary_key())
            .col(string("org_id"))
            .col(string("kind"))
            .col(string("name"))
            .col(string_null("current_version_id"))
            .col(big_integer("size"))
            .col(big_integer("file_count"))
            .col(big_integer("created_at"))
            .col(big_integer("updated_at"))
            .to_owned(),
        Table::create()
            .table("storage_versions")
            .if_not_exists()
            .col(string("id").primary_key())
            .col(string("storage_id"))
            .col(string("digest"))
            .col(big_integer("size"))
            .col(big_integer("file_count"))
            .col(text("files"))
            .col(text_null("message"))
            .col(big_integer("created_at"))
            .to_owned(),
    ]
}

fn indexes() -> Vec<IndexCreateStatement> {
    vec![
        index(
            "idx_api_tokens_org",
            "api_tokens",
            &["org_id", "created_at", "id"],
        ),
        index("uq_agents_org_name", "agents", &["org_id", "name"])
            .unique()
            .to_owned(),
        index(
            "idx_agents_org_created",
            "agents",
            &["org_id", "created_at", "id"],
        ),
        index(
            "uq_agent_versions_number",
            "agent_versions",
            &["agent_id", "version_number"],
        )
        .unique()
        .to_owned(),
        index(
            "idx_runs_org_created",
            "runs",
            &["org_id", "created_at", "id"],
        ),
        index(
            "idx_runs_org_status_created",
            "runs",
            &["org_id", "status", "created_at", "id"],
        ),
        index(
            "idx_runs_org_agent_created",
            "runs",
            &["org_id", "agent_id", "created_at", "id"],
        ),
        index("idx_runs_status_created", "runs", &["status", "created_at"]),
        index("idx_run_logs_run_ts", "run_logs", &["run_id", "ts", "id"]),
        index(
            "idx_run_metrics_run_ts",
            "run_metrics",
            &["run_id", "ts", "id"],
        ),
        index(
            "idx_checkpoints_session",
            "checkpoints",
            &["session_id", "created_at"],
        ),
        index(
            "uq_storages_org_kind_name",
            "storages",
            &["org_id", "kind", "name"],
        )
        .unique()
        .to_owned(),
        index(
            "idx_storage_versions_storage",
            "storage_versions",
            &["storage_id", "created_at", "id"],
        ),
        index(
            "idx_storage_versions_digest",
            "storage_versions",
            &["storage_id", "digest"],
        ),
    ]
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in tables() {
            manager.create_table(table).await?;
        }
        for idx in indexes() {
            manager.create_index(idx).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in tables().iter().rev() {
            let name = table
                .get_table_name()
                .cloned()
                .ok_or_else(|| DbErr::Migration("table without a name".into()))?;
            manager
                .drop_table(Table::drop().table(name).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}
