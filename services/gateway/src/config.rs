//! Gateway configuration, from environment variables (each has a default suited to
//! one machine).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// `VM0_HTTP_ADDR`, default `127.0.0.1:8080`.
    pub http_addr: SocketAddr,
    /// `VM0_DATA_DIR`, default `./.vm0`.
    pub data_dir: PathBuf,
    /// `DATABASE_URL`, default SQLite at `<data dir>/vm0.db`.
    pub database_url: String,
    /// `VM0_DB_MAX_CONNECTIONS`, default 16.
    pub db_max_connections: u32,
    /// `VM0_MAX_BODY_BYTES`, default 1 MiB.
    pub max_body_bytes: usize,
    /// `VM0_SSE_HEARTBEAT_SECS`, default 15.
    pub sse_heartbeat: Duration,
    /// `VM0_AUTH_CACHE_SECS`: how long a verified token is trusted without asking
    /// the store again, default 5; 0 disables the cache.
    pub auth_cache_ttl: Duration,
    /// `VM0_SSE_POLL_MS`: how often an open event stream looks for new events, default 250.
    pub sse_poll: Duration,
}

fn env_parse<T: std::str::FromStr>(name: &str, default: T) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(raw) => raw
            .parse()
            .map_err(|e| anyhow::anyhow!("{name}={raw:?} is invalid: {e}")),
        Err(_) => Ok(default),
    }
}

impl GatewayConfig {
    pub fn from_env() -> Result<GatewayConfig> {
        let http_addr = env_parse("VM0_HTTP_ADDR", SocketAddr::from(([127, 0, 0, 1], 8080)))?;
        let data_dir =
            PathBuf::from(std::env::var("VM0_DATA_DIR").unwrap_or_else(|_| ".vm0".into()));
        let database_url = match std::env::var("DATABASE_URL") {
            Ok(url) if !url.is_empty() => url,
            _ => {
                std::fs::create_dir_all(&data_dir)
                    .with_context(|| format!("creating data dir {}", data_dir.display()))?;
                format!("sqlite://{}", data_dir.join("vm0.db").display())
            }
        };
        let max_body_bytes = env_parse("VM0_MAX_BODY_BYTES", 1024 * 1024)?;
        anyhow::ensure!(
            max_body_bytes >= 1024,
            "VM0_MAX_BODY_BYTES must be at least 1024"
        );
        let heartbeat_secs: u64 = env_parse("VM0_SSE_HEARTBEAT_SECS", 15)?;
        anyhow::ensure!(
            heartbeat_secs >= 1,
            "VM0_SSE_HEARTBEAT_SECS must be at least 1"
        );
        let poll_ms: u64 = env_parse("VM0_SSE_POLL_MS", 250)?;
        anyhow::ensure!(poll_ms >= 10, "VM0_SSE_POLL_MS must be at least 10");
        let auth_cache_secs: u64 = env_parse("VM0_AUTH_CACHE_SECS", 5)?;
        anyhow::ensure!(
            auth_cache_secs <= 300,
            "VM0_AUTH_CACHE_SECS must be at most 300"
        );
        let db_max_connections = env_parse("VM0_DB_MAX_CONNECTIONS", 16)?;
        anyhow::ensure!(
            db_max_connections >= 1,
            "VM0_DB_MAX_CONNECTIONS must be at least 1"
        );
        Ok(GatewayConfig {
            http_addr,
            data_dir,
            database_url,
            db_max_connections,
            max_body_bytes,
            sse_heartbeat: Duration::from_secs(heartbeat_secs),
            auth_cache_ttl: Duration::from_secs(auth_cache_secs),
            sse_poll: Duration::from_millis(poll_ms),
        })
    }

    /// Defaults for tests and embedding: everything but the database URL.
    pub fn for_database(database_url: impl Into<String>) -> GatewayConfig {
        GatewayConfig {
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: PathBuf::from(".vm0"),
            database_url: database_url.into(),
            db_max_connections: 8,
            max_body_bytes: 1024 * 1024,
            sse_heartbeat: Duration::from_secs(15),
            auth_cache_ttl: Duration::from_secs(5),
            sse_poll: Duration::from_millis(250),
        }
    }
}
