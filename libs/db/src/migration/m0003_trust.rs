//! Trust boundaries: per-worker credentials, the secrets keys a deployment seals
//! with (so that a gateway with another key refuses to start), and who minted a
//! token (so that a token cannot outlive, or revoke more than, its own line).

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m0003_trust"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table("worker_credentials")
                    .if_not_exists()
                    .col(string("id").primary_key())
                    .col(string("name"))
                    .col(string_uniq("token_hash"))
                    .col(big_integer("created_at"))
                    .col(big_integer_null("revoked_at"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_worker_credentials_name")
                    .table("worker_credentials")
                    .col("name")
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table("secrets_keys")
                    .if_not_exists()
                    .col(string("key_id").primary_key())
                    .col(big_integer("created_at"))
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table("api_tokens")
                    .add_column(string_null("created_by"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_api_tokens_created_by")
                    .table("api_tokens")
                    .col("created_by")
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in ["worker_credentials", "secrets_keys"] {
            manager
                .drop_table(Table::drop().table(table).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}
