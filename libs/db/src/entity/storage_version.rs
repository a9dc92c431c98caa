use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "storage_versions")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub storage_id: String,
    /// SHA-256 over sorted paths and file digests.
    pub digest: String,
    pub size: i64,
    pub file_count: i64,
    /// JSON array of `{path, size, sha256}`.
    pub files: String,
    pub message: Option<String>,
    pub created_at: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
