//! Helpers for tests that need a database of their own: a fresh SQLite file or a
//! fresh PostgreSQL database on the server named by `VM0_TEST_POSTGRES_URL` (which
//! `scripts/test.sh` starts).

use sea_orm::{ConnectionTrait, Database};

use crate::StoreError;

/// Environment variable with the admin URL of the test PostgreSQL server.
pub const POSTGRES_URL_VAR: &str = "VM0_TEST_POSTGRES_URL";

/// Creates an empty database named `name` on the server of `admin_url` and returns
/// its URL.
pub async fn create_postgres_database(admin_url: &str, name: &str) -> Result<String, StoreError> {
    assert!(
        name.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
        "database names here are plain identifiers"
    );
    let admin = Database::connect(admin_url).await?;
    admin
        .execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await?;
    admin.close().await?;
    let base = admin_url
        .rsplit_once('/')
        .map(|(base, _db)| base)
        .unwrap_or(admin_url);
    Ok(format!("{base}/{name}"))
}
