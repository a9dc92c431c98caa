use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "runs")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub org_id: String,
    pub agent_id: String,
    pub agent_name: String,
    pub agent_version_id: String,
    pub session_id: String,
    pub status: String,
    pub prompt: String,
    /// JSON object of variables (not secret).
    pub variables: String,
    /// JSON array of the names of the secrets given; never their values.
    pub secret_names: String,
    /// JSON object volume name → resolved version id.
    pub volumes: String,
    pub artifact_name: Option<String>,
    pub artifact_version: Option<String>,
    pub error: Option<String>,
    pub exit_code: Option<i32>,
    pub execution_time_ms: Option<i64>,
    pub checkpoint_id: Option<String>,
    /// Claim counter: bumped by every claim, fences stale workers.
    pub attempt: i32,
    pub worker_id: Option<String>,
    /// Sequence number of the last event appended.
    pub last_event_seq: i64,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub completed_at: Option<i64>,
    /// Set when a cancel of the running run was requested; the worker finishes it.
    pub cancel_requested_at: Option<i64>,
    /// The run's secrets, sealed (see the gateway's `secrets` module); erased when
    /// the run ends.
    pub secrets_sealed: Option<String>,
    /// The agent version's `timeoutSeconds`, copied for the control plane's backstop.
    pub timeout_seconds: i64,
    /// The token of the claim holding the run (a retried claim with the same
    /// token gets the same lease).
    pub claim_token: Option<String>,
    /// When the run's events, logs and metrics were deleted by retention.
    pub records_purged_at: Option<i64>,
    /// The checkpoint whose state the run starts from (a continued session's
    /// latest, or the one resumed).
    pub resumed_from: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
