//! The system of record: sea-orm entities, migrations and [`Store`], the one API the
//! services use to read and write it. SQLite (embedded default, WAL mode) and
//! PostgreSQL share every code path; the backend is chosen by the URL.
//!
//! This crate knows nothing of HTTP, NATS or sandboxes. Every query of tenant data
//! takes the organization id, so a caller cannot forget the tenant filter.

/// Model → API type conversions.
pub mod convert;
/// sea-orm entities, one module per table.
pub mod entity;
/// Schema migrations.
pub mod migration;
/// [`Store`]: connection, migrations and queries.
pub mod store;
/// Fresh databases for tests (SQLite files, PostgreSQL databases).
pub mod testing;

pub use store::{
    Backend, CancelOutcome, ClaimOutcome, ClaimedRun, Committed, FinishOutcome, FinishRun,
    KeysetAfter, LogFilter, NewCheckpoint, NewLog, NewMetric, NewRun, RunFilter, SortOrder,
    StorageKind, Store, StoreError, UpdateOutcome,
};
