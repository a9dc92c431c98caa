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
    /// The version of the session's state (`VM0_STATE_DIR`) the run left.
    pub state_key: Option<String>,
    /// JSON object volume name → version id.
    pub volumes: String,
    pub artifact_name: Option<String>,
    pub artifact_version: Option<String>,
    pub created_at: i64,
    /// JSON object of the run's variables (not secret), reused by a resume.
    pub variables: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
