use sea_orm::entity::prelude::*;

/// A worker's credential: the operator mints one per worker
/// (`vm0-gateway worker-token create --name W`); it fixes the worker's identity.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "worker_credentials")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    /// The worker's id, as runs and logs show it.
    pub name: String,
    /// Hex SHA-256 of the credential; the credential itself is never stored.
    #[sea_orm(unique)]
    pub token_hash: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
