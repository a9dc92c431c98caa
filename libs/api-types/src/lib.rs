//! Wire types of the VM0 v1 REST API, shared by the gateway, the CLI and the load tests.
//!
//! Responses serialize in camelCase; requests accept camelCase and snake_case (see
//! `shared/api/README.md`). Nothing here knows about HTTP frameworks or the store.

/// Agents, their versioned `config` (the run recipe) and its validation.
pub mod agents;
/// Opaque pagination cursors and the `{data, pagination}` page envelope.
pub mod cursor;
/// The error envelope `{"error": {type, code, message, param}}`.
pub mod error;
/// Prefixed resource ids (`run_…`, `ag_…`) and their validation.
pub mod ids;
pub mod integer;
/// Runs, run events, logs and metrics.
pub mod runs;
/// Reading the run event stream as a client.
pub mod sse;
/// Volumes and artifacts: versions, uploads, downloads.
pub mod storage;
/// Tenants' text made storable (no NUL).
pub mod text;
/// RFC 3339 timestamps carried as microseconds since the epoch.
pub mod time;
/// API tokens (`vm0_live_…`).
pub mod tokens;

pub use error::{ApiErrorBody, ErrorCode, ErrorEnvelope, ErrorType, FieldError};
pub use time::Timestamp;
