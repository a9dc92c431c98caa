use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "checkpoints")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub org_id: String,
    pub run_id: String,
    pub session_id: String,
    pub agent_version_id: String,
    /// Object-store key of the saved state directory, if any.
    pub state_key: Option<String>,
    /// JSON object volume name → version id.
    pub volumes: String,
    pub artifact_name: Option<String>,
    pub artifact_version: Option<String>,
    pub created_at: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
