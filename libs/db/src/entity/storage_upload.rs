use sea_orm::entity::prelude::*;

/// An upload session: the files a client announced, until it commits them
/// or the session expires.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "storage_uploads")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub org_id: String,
    pub storage_id: String,
    /// JSON array of `{path, size, sha256?}`, in the order announced.
    pub files: String,
    pub message: Option<String>,
    pub created_by: String,
    pub expires_at: i64,
    pub created_at: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
