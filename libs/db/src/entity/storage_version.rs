use sea_orm::entity::prelude::*;

/// A version of a volume or artifact. Its id is the content hash (64 hex), so
/// the key is (storage, id); its files are listed in the object store.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "storage_versions")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub storage_id: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub size: i64,
    pub file_count: i64,
    pub message: Option<String>,
    /// The token (`tok_…`) or run (`run_…`) that made it.
    pub created_by: String,
    pub created_at: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
