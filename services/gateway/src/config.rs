//! Gateway configuration, from environment variables (each has a default suited to
//! one machine).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use vm0_env_config::parse_or;

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
    /// `VM0_SSE_POLL_MS`: how often an open event stream looks for new events
    /// without NATS (with NATS, new events arrive live), default 250.
    pub sse_poll: Duration,
    /// Dispatch: everything that needs NATS. `None` serves the API from the store
    /// alone (runs stay pending).
    pub dispatch: Option<DispatchConfig>,
}

/// Settings of the dispatch path: NATS, the gRPC control plane, the reaper.
#[derive(Debug, Clone)]
pub struct DispatchConfig {
    /// `VM0_NATS_URL`, e.g. `nats://127.0.0.1:4222`.
    pub nats_url: String,
    /// `VM0_GRPC_ADDR`, default `127.0.0.1:9090`: the control plane for workers.
    pub grpc_addr: SocketAddr,
    /// `VM0_WORKER_TOKEN`: the bearer token workers present (required).
    pub worker_token: String,
    /// `VM0_HEARTBEAT_INTERVAL_MS`, default 5000: asked of workers.
    pub heartbeat_interval: Duration,
    /// `VM0_WORKER_LOST_AFTER_SECS`, default 60: silence after which a worker's runs fail.
    pub worker_lost_after: Duration,
    /// `VM0_TIMEOUT_GRACE_SECS`, default 30: past a run's timeout, how long the
    /// control plane waits for its worker before timing it out itself.
    pub timeout_grace: Duration,
    /// `VM0_PENDING_REPUBLISH_SECS`, default 30: a run pending this long has its job
    /// published again (the first publish may have been lost).
    pub pending_republish_after: Duration,
    /// How often the reaper looks (1 s).
    pub reaper_interval: Duration,
    /// `VM0_CANCEL_WAIT_MS`, default 3000: how long `POST /cancel` of a running run
    /// waits for its worker before cancelling it in the store itself.
    pub cancel_wait: Duration,
}

impl DispatchConfig {
    /// Defaults around a NATS URL and a worker token (tests, `vm0 dev`).
    pub fn new(nats_url: impl Into<String>, worker_token: impl Into<String>) -> DispatchConfig {
        DispatchConfig {
            nats_url: nats_url.into(),
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 9090)),
            worker_token: worker_token.into(),
            heartbeat_interval: Duration::from_secs(5),
            worker_lost_after: Duration::from_secs(60),
            timeout_grace: Duration::from_secs(30),
            pending_republish_after: Duration::from_secs(30),
            reaper_interval: Duration::from_secs(1),
            cancel_wait: Duration::from_secs(3),
        }
    }

    fn from_env() -> Result<Option<DispatchConfig>> {
        let Ok(nats_url) = std::env::var("VM0_NATS_URL") else {
            return Ok(None);
        };
        let worker_token = std::env::var("VM0_WORKER_TOKEN").map_err(|_| {
            anyhow::anyhow!(
                "VM0_WORKER_TOKEN must be set when VM0_NATS_URL is (workers present it)"
            )
        })?;
        anyhow::ensure!(
            worker_token.len() >= 16,
            "VM0_WORKER_TOKEN must be at least 16 characters"
        );
        let mut c = DispatchConfig::new(nats_url, worker_token);
        c.grpc_addr = parse_or("VM0_GRPC_ADDR", c.grpc_addr)?;
        c.heartbeat_interval = Duration::from_millis(parse_or("VM0_HEARTBEAT_INTERVAL_MS", 5000)?);
        c.worker_lost_after = Duration::from_secs(parse_or("VM0_WORKER_LOST_AFTER_SECS", 60)?);
        c.timeout_grace = Duration::from_secs(parse_or("VM0_TIMEOUT_GRACE_SECS", 30)?);
        c.pending_republish_after =
            Duration::from_secs(parse_or("VM0_PENDING_REPUBLISH_SECS", 30)?);
        c.cancel_wait = Duration::from_millis(parse_or("VM0_CANCEL_WAIT_MS", 3000)?);
        anyhow::ensure!(
            c.worker_lost_after > c.heartbeat_interval * 2,
            "VM0_WORKER_LOST_AFTER_SECS must exceed two heartbeat intervals"
        );
        Ok(Some(c))
    }
}

impl GatewayConfig {
    pub fn from_env() -> Result<GatewayConfig> {
        let http_addr = parse_or("VM0_HTTP_ADDR", SocketAddr::from(([127, 0, 0, 1], 8080)))?;
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
        let max_body_bytes = parse_or("VM0_MAX_BODY_BYTES", 1024 * 1024)?;
        anyhow::ensure!(
            max_body_bytes >= 1024,
            "VM0_MAX_BODY_BYTES must be at least 1024"
        );
        let heartbeat_secs: u64 = parse_or("VM0_SSE_HEARTBEAT_SECS", 15)?;
        anyhow::ensure!(
            heartbeat_secs >= 1,
            "VM0_SSE_HEARTBEAT_SECS must be at least 1"
        );
        let poll_ms: u64 = parse_or("VM0_SSE_POLL_MS", 250)?;
        anyhow::ensure!(poll_ms >= 10, "VM0_SSE_POLL_MS must be at least 10");
        let auth_cache_secs: u64 = parse_or("VM0_AUTH_CACHE_SECS", 5)?;
        anyhow::ensure!(
            auth_cache_secs <= 300,
            "VM0_AUTH_CACHE_SECS must be at most 300"
        );
        let db_max_connections = parse_or("VM0_DB_MAX_CONNECTIONS", 16)?;
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
            dispatch: DispatchConfig::from_env()?,
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
            dispatch: None,
        }
    }
}
