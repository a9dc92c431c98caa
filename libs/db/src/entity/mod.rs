//! sea-orm entities, one module per table. Times are microseconds since the Unix
//! epoch (`i64`), JSON is stored as text: both compare and round-trip identically on
//! SQLite and PostgreSQL.

pub mod agent;
pub mod agent_version;
pub mod api_token;
pub mod checkpoint;
pub mod organization;
pub mod run;
pub mod run_event;
pub mod run_log;
pub mod run_metric;
pub mod secrets_key;
pub mod session;
pub mod storage;
pub mod storage_upload;
pub mod storage_version;
pub mod worker;
pub mod worker_credential;
