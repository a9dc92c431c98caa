use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "workers")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub hostname: String,
    pub sandbox: String,
    /// JSON `{slots, vcpus, memoryMb, diskMb}`.
    pub capacity: String,
    /// JSON, same shape: what was free at the last heartbeat.
    pub free: String,
    pub registered_at: i64,
    pub last_heartbeat_at: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
