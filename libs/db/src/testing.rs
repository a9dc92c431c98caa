//! Helpers for tests that need a database of their own: a fresh SQLite file or a
//! fresh PostgreSQL database on the server named by `VM0_TEST_POSTGRES_URL` (which
//! `scripts/test.sh` starts).

use std::path::Path;

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

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestDb {
    Sqlite,
    Postgres,
}

/// The URL of a fresh, empty database: a SQLite file in `dir`, or a new database on
/// the test PostgreSQL server.
///
/// # Panics
/// When PostgreSQL is asked for and `VM0_TEST_POSTGRES_URL` is unset: the tests are
/// meant to run through `scripts/test.sh`, which starts the server.
pub async fn fresh_database_url(db: TestDb, dir: &Path) -> String {
    match db {
        TestDb::Sqlite => format!("sqlite://{}", dir.join("vm0.db").display()),
        TestDb::Postgres => {
            let admin = std::env::var(POSTGRES_URL_VAR).unwrap_or_else(|_| {
                panic!("{POSTGRES_URL_VAR} is not set: run the tests with scripts/test.sh, which starts PostgreSQL")
            });
            let name = format!(
                "t_{}",
                vm0_api_types::ids::new_id(vm0_api_types::ids::IdKind::Request)
                    .trim_start_matches("req_")
            );
            match create_postgres_database(&admin, &name).await {
                Ok(url) => url,
                Err(e) => panic!("creating test database {name}: {e}"),
            }
        }
    }
}

/// Runs each listed `async fn name(db: TestDb)` once on SQLite and once on
/// PostgreSQL, as `sqlite::name` and `postgres::name` tests.
#[macro_export]
macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name($crate::testing::TestDb::Sqlite).await } )*
        }
        mod postgres {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name($crate::testing::TestDb::Postgres).await } )*
        }
    };
}

/// Runs `sql` on the database at `url` (fault injection: a test breaks a table
/// and mends it).
pub async fn execute(url: &str, sql: &str) -> Result<(), StoreError> {
    let conn = Database::connect(url).await?;
    conn.execute_unprepared(sql).await?;
    conn.close().await?;
    Ok(())
}
