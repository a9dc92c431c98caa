//! Volumes and artifacts on the object store. A version's id is its content
//! hash, so two volumes holding the same files have versions of the same id:
//! `storage_versions` is keyed by (storage, id), and the file list lives in the
//! object store beside the archive (no unbounded column). Upload sessions are
//! a table of their own. Nothing wrote `storage_versions` before this
//! migration, so it is made anew.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m0006_storage"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table("storage_versions").to_owned())
            .await?;
        manager
            .create_table(
                Table::create()
                    .table("storage_versions")
                    .col(string("storage_id"))
                    .col(string("id"))
                    .col(big_integer("size"))
                    .col(big_integer("file_count"))
                    .col(text_null("message"))
                    .col(string("created_by"))
                    .col(big_integer("created_at"))
                    .primary_key(Index::create().col("storage_id").col("id"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_storage_versions_created")
                    .table("storage_versions")
                    .col("storage_id")
                    .col("created_at")
                    .col("id")
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table("storage_uploads")
                    .col(string("id").primary_key())
                    .col(string("org_id"))
                    .col(string("storage_id"))
                    .col(text("files"))
                    .col(text_null("message"))
                    .col(string("created_by"))
                    .col(big_integer("expires_at"))
                    .col(big_integer("created_at"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_storage_uploads_expires")
                    .table("storage_uploads")
                    .col("expires_at")
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table("storage_uploads").to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table("storage_versions").to_owned())
            .await
    }
}
