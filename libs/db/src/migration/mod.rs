//! Schema migrations, applied in order at start-up. Written with sea-query's schema
//! builder (not derived from the entities) so that an old migration keeps meaning
//! what it meant when it shipped.

use sea_orm_migration::prelude::*;

mod m0001_initial;
mod m0002_dispatch;
mod m0003_trust;
mod m0004_claims;
mod m0005_retention;
mod m0006_storage;
mod m0007_checkpoints;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m0001_initial::Migration),
            Box::new(m0002_dispatch::Migration),
            Box::new(m0003_trust::Migration),
            Box::new(m0004_claims::Migration),
            Box::new(m0005_retention::Migration),
            Box::new(m0006_storage::Migration),
            Box::new(m0007_checkpoints::Migration),
        ]
    }
}
