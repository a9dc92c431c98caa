//! Gateway configuration, from environment variables (each has a default suited to
//! one machine).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use vm0_bus::NatsOptions;
use vm0_env_config::parse_or;

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// `VM0_HTTP_ADDR`, default `127.0.0.1:8080`.
    pub http_addr: SocketAddr,
    /// `VM0_METRICS_ADDR`: where `GET /metrics` is served instead of the API
    /// port (unset: on the API port).
    pub metrics_addr: Option<SocketAddr>,
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
    /// `VM0_SSE_GAP_WAIT_MS`: how long an event stream waits for a missing event
    /// before it reports it lost and goes on, default 15000: longer than a dead
    /// gateway's unacked telemetry takes to reach another persister
    /// (`vm0_bus::PERSIST_ACK_WAIT`), so a delay is not reported as a loss.
    pub sse_gap_wait: Duration,
    /// `VM0_SSE_MAX_STREAMS_PER_ORG`: event streams one organization may have
    /// open on one gateway, default 100; past it, `429`.
    pub sse_max_streams_per_org: usize,
    /// `VM0_TOKEN_MAX_DAYS`: the longest lifetime of a token minted through the
    /// API (those asking none get it); none by default.
    pub token_max_days: Option<u32>,
    /// `VM0_AUTH_FAILURES_PER_MINUTE`: bad tokens an address may present a
    /// minute before it is answered `429`, default 30 (0: no limit).
    pub auth_failures_per_minute: u32,
    /// `VM0_TRUSTED_PROXIES`: comma-separated addresses or CIDR blocks of load
    /// balancers whose `X-Forwarded-For` names the client; none by default.
    pub trusted_proxies: Vec<crate::auth::Cidr>,
    /// `VM0_RUN_RECORDS_RETENTION_DAYS`: the events, logs and metrics of a run
    /// are deleted this long after it ended (the run stays), default 90 days;
    /// 0 keeps them forever (`None`).
    pub records_retention: Option<Duration>,
    /// How often retention looks for runs due (10 minutes).
    pub retention_interval: Duration,
    /// Volumes', artifacts' and checkpoints' bytes.
    pub storage: StorageConfig,
    /// Dispatch: everything that needs NATS. `None` serves the API from the store
    /// alone (runs stay pending).
    pub dispatch: Option<DispatchConfig>,
}

/// Where stored files live and what a version may hold.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    /// `VM0_OBJECT_STORE_URL`: `s3://bucket[/prefix]` (with the `AWS_*`
    /// variables); unset, a directory under the data dir (`<data dir>/objects`).
    pub object_store_url: Option<String>,
    /// S3 settings over the `AWS_*` variables (`object_store`'s keys, e.g.
    /// `aws_endpoint`): for embedding and tests; none from the environment.
    pub object_store_options: Vec<(String, String)>,
    /// `VM0_PUBLIC_URL`: the URL clients reach this gateway at, for the signed
    /// URLs it serves itself (local store); unset, the request's `Host`.
    pub public_url: Option<String>,
    /// `VM0_SIGNED_URL_TTL_SECS`, default 3600: how long a signed URL, and an
    /// upload session, lasts.
    pub url_ttl: Duration,
    /// `VM0_STORAGE_MAX_FILE_BYTES` (5 GiB), `VM0_STORAGE_MAX_VERSION_BYTES`
    /// (20 GiB), `VM0_STORAGE_MAX_FILES` (100000), `VM0_STORAGE_MAX_PATH_BYTES`
    /// (4096).
    pub limits: vm0_storage::Limits,
}

impl StorageConfig {
    fn from_env() -> Result<StorageConfig> {
        let d = StorageConfig::default();
        let limits = vm0_storage::Limits {
            max_file_bytes: parse_or("VM0_STORAGE_MAX_FILE_BYTES", d.limits.max_file_bytes)?,
            max_total_bytes: parse_or("VM0_STORAGE_MAX_VERSION_BYTES", d.limits.max_total_bytes)?,
            max_files: parse_or("VM0_STORAGE_MAX_FILES", d.limits.max_files)?,
            max_path_bytes: parse_or("VM0_STORAGE_MAX_PATH_BYTES", d.limits.max_path_bytes)?,
        };
        anyhow::ensure!(
            (1..=vm0_storage::paths::MAX_PATH_BYTES).contains(&limits.max_path_bytes),
            "VM0_STORAGE_MAX_PATH_BYTES must be from 1 to {}",
            vm0_storage::paths::MAX_PATH_BYTES
        );
        anyhow::ensure!(
            limits.max_files >= 1,
            "VM0_STORAGE_MAX_FILES must be at least 1"
        );
        let ttl: u64 = parse_or("VM0_SIGNED_URL_TTL_SECS", 3600)?;
        anyhow::ensure!(
            (10..=7 * 86_400).contains(&ttl),
            "VM0_SIGNED_URL_TTL_SECS must be from 10 to 604800 (S3's longest)"
        );
        let public_url = std::env::var("VM0_PUBLIC_URL")
            .ok()
            .filter(|u| !u.is_empty());
        if let Some(url) = &public_url {
            anyhow::ensure!(
                url.starts_with("http://") || url.starts_with("https://"),
                "VM0_PUBLIC_URL must start with http:// or https://"
            );
        }
        Ok(StorageConfig {
            object_store_url: std::env::var("VM0_OBJECT_STORE_URL")
                .ok()
                .filter(|u| !u.is_empty()),
            object_store_options: Vec::new(),
            public_url,
            url_ttl: Duration::from_secs(ttl),
            limits,
        })
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            object_store_url: None,
            object_store_options: Vec::new(),
            public_url: None,
            url_ttl: Duration::from_secs(3600),
            limits: vm0_storage::Limits::default(),
        }
    }
}

/// The control plane's TLS identity (PEM), from `VM0_GRPC_TLS_CERT` and
/// `VM0_GRPC_TLS_KEY`.
#[derive(Clone)]
pub struct GrpcTls {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for GrpcTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GrpcTls(..)")
    }
}

impl GrpcTls {
    /// A certificate for the loopback addresses from the CA kept in `dir` (made
    /// there first if absent): what `vm0 dev`, the tests and the benchmarks
    /// serve the control plane with. The CA certificate is `dir/ca.pem`.
    pub fn local(dir: &std::path::Path) -> Result<GrpcTls> {
        let ca = vm0_tls::authority_in(dir, "vm0 local CA")?;
        let names = ["127.0.0.1", "::1", "localhost"].map(String::from);
        let cert = ca.server(&names)?;
        vm0_tls::write_set(dir, &ca, "control-plane", &cert)?;
        Ok(GrpcTls {
            cert_pem: cert.cert_pem,
            key_pem: cert.key_pem,
        })
    }

    /// Reads the certificate (chain) and key files.
    pub fn from_files(cert: &std::path::Path, key: &std::path::Path) -> Result<GrpcTls> {
        Ok(GrpcTls {
            cert_pem: std::fs::read_to_string(cert)
                .with_context(|| format!("reading {}", cert.display()))?,
            key_pem: std::fs::read_to_string(key)
                .with_context(|| format!("reading {}", key.display()))?,
        })
    }
}

/// Settings of the dispatch path: NATS, the gRPC control plane, the reaper.
#[derive(Debug, Clone)]
pub struct DispatchConfig {
    /// `VM0_NATS_URL` (e.g. `nats://127.0.0.1:4222`), with the gateway role's
    /// `VM0_NATS_USER` / `VM0_NATS_PASSWORD` and `VM0_NATS_CA` (TLS).
    pub nats: NatsOptions,
    /// `VM0_GRPC_ADDR`, default `127.0.0.1:9090`: the control plane for workers.
    pub grpc_addr: SocketAddr,
    /// TLS of the control plane; required unless it listens on loopback only.
    pub grpc_tls: Option<GrpcTls>,
    /// `VM0_HEARTBEAT_INTERVAL_MS`, default 2000: asked of workers.
    pub heartbeat_interval: Duration,
    /// `VM0_WORKER_LOST_AFTER_SECS`, default 8 (four missed heartbeats): silence
    /// after which a worker's runs fail.
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
    /// `VM0_TELEMETRY_MAX_BYTES`, default 1 GiB: the size of `RUN_TELEMETRY`
    /// (telemetry not stored yet); full, it refuses new messages until the
    /// persisters catch up.
    pub telemetry_max_bytes: i64,
}

impl DispatchConfig {
    /// How often workers heartbeat, unless told otherwise.
    pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
    /// A worker silent this long is lost (with the reaper's 1 s tick, its runs end
    /// within 10 s of its death; Nomad takes 20 s to mark a node lost).
    pub const DEFAULT_WORKER_LOST_AFTER: Duration = Duration::from_secs(8);

    /// Defaults around a NATS connection (tests, `vm0 dev`).
    pub fn new(nats: NatsOptions) -> DispatchConfig {
        DispatchConfig {
            nats,
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 9090)),
            grpc_tls: None,
            heartbeat_interval: Self::DEFAULT_HEARTBEAT_INTERVAL,
            worker_lost_after: Self::DEFAULT_WORKER_LOST_AFTER,
            timeout_grace: Duration::from_secs(30),
            pending_republish_after: Duration::from_secs(30),
            reaper_interval: Duration::from_secs(1),
            cancel_wait: Duration::from_secs(3),
            telemetry_max_bytes: vm0_bus::TELEMETRY_MAX_BYTES,
        }
    }

    fn from_env() -> Result<Option<DispatchConfig>> {
        let Ok(nats_url) = std::env::var("VM0_NATS_URL") else {
            return Ok(None);
        };
        if std::env::var_os("VM0_WORKER_TOKEN").is_some() {
            tracing::warn!(
                "VM0_WORKER_TOKEN is not read by gateways any more: every worker has a \
                 credential of its own (vm0-gateway worker-token create --name W)"
            );
        }
        let nats = NatsOptions::new(nats_url)
            .with_env()
            .map_err(anyhow::Error::msg)?;
        let mut c = DispatchConfig::new(nats);
        c.grpc_addr = parse_or("VM0_GRPC_ADDR", c.grpc_addr)?;
        c.grpc_tls = match (
            std::env::var_os("VM0_GRPC_TLS_CERT"),
            std::env::var_os("VM0_GRPC_TLS_KEY"),
        ) {
            (Some(cert), Some(key)) => Some(GrpcTls::from_files(cert.as_ref(), key.as_ref())?),
            (None, None) => None,
            _ => anyhow::bail!("VM0_GRPC_TLS_CERT and VM0_GRPC_TLS_KEY go together"),
        };
        anyhow::ensure!(
            c.grpc_tls.is_some() || c.grpc_addr.ip().is_loopback(),
            "VM0_GRPC_ADDR {} is not a loopback address: workers' run secrets would cross the \
             network in clear. Set VM0_GRPC_TLS_CERT and VM0_GRPC_TLS_KEY (vm0-gateway tls \
             create makes a set)",
            c.grpc_addr
        );
        c.heartbeat_interval = Duration::from_millis(parse_or("VM0_HEARTBEAT_INTERVAL_MS", 2000)?);
        c.worker_lost_after = Duration::from_secs(parse_or("VM0_WORKER_LOST_AFTER_SECS", 8)?);
        c.timeout_grace = Duration::from_secs(parse_or("VM0_TIMEOUT_GRACE_SECS", 30)?);
        c.pending_republish_after =
            Duration::from_secs(parse_or("VM0_PENDING_REPUBLISH_SECS", 30)?);
        c.cancel_wait = Duration::from_millis(parse_or("VM0_CANCEL_WAIT_MS", 3000)?);
        c.telemetry_max_bytes = parse_or("VM0_TELEMETRY_MAX_BYTES", c.telemetry_max_bytes)?;
        anyhow::ensure!(
            c.telemetry_max_bytes >= 1 << 20,
            "VM0_TELEMETRY_MAX_BYTES must be at least 1 MiB"
        );
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
        let metrics_addr = vm0_env_config::parse_opt("VM0_METRICS_ADDR")?;
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
        let sse_max_streams_per_org: usize = parse_or("VM0_SSE_MAX_STREAMS_PER_ORG", 100)?;
        anyhow::ensure!(
            sse_max_streams_per_org >= 1,
            "VM0_SSE_MAX_STREAMS_PER_ORG must be at least 1"
        );
        let gap_wait_ms: u64 = parse_or("VM0_SSE_GAP_WAIT_MS", 15_000)?;
        anyhow::ensure!(
            (10..=600_000).contains(&gap_wait_ms),
            "VM0_SSE_GAP_WAIT_MS must be from 10 to 600000"
        );
        anyhow::ensure!(poll_ms >= 10, "VM0_SSE_POLL_MS must be at least 10");
        let auth_cache_secs: u64 = parse_or("VM0_AUTH_CACHE_SECS", 5)?;
        anyhow::ensure!(
            auth_cache_secs <= 300,
            "VM0_AUTH_CACHE_SECS must be at most 300"
        );
        let token_max_days: Option<u32> = vm0_env_config::parse_opt("VM0_TOKEN_MAX_DAYS")?;
        anyhow::ensure!(
            token_max_days
                .is_none_or(|d| (1..=vm0_api_types::tokens::MAX_EXPIRES_IN_DAYS).contains(&d)),
            "VM0_TOKEN_MAX_DAYS must be from 1 to {}",
            vm0_api_types::tokens::MAX_EXPIRES_IN_DAYS
        );
        let trusted_proxies = match std::env::var("VM0_TRUSTED_PROXIES") {
            Ok(list) => list
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| {
                    s.parse()
                        .map_err(|e: String| anyhow::anyhow!("VM0_TRUSTED_PROXIES: {e}"))
                })
                .collect::<Result<Vec<_>>>()?,
            Err(_) => Vec::new(),
        };
        let db_max_connections = parse_or("VM0_DB_MAX_CONNECTIONS", 16)?;
        anyhow::ensure!(
            db_max_connections >= 1,
            "VM0_DB_MAX_CONNECTIONS must be at least 1"
        );
        let retention_days: u32 = parse_or("VM0_RUN_RECORDS_RETENTION_DAYS", 90)?;
        anyhow::ensure!(
            retention_days <= 36_500,
            "VM0_RUN_RECORDS_RETENTION_DAYS must be at most 36500 (0 keeps records forever)"
        );
        Ok(GatewayConfig {
            records_retention: (retention_days > 0)
                .then(|| Duration::from_secs(u64::from(retention_days) * 86_400)),
            retention_interval: GatewayConfig::DEFAULT_RETENTION_INTERVAL,
            http_addr,
            metrics_addr,
            data_dir,
            database_url,
            db_max_connections,
            max_body_bytes,
            sse_heartbeat: Duration::from_secs(heartbeat_secs),
            auth_cache_ttl: Duration::from_secs(auth_cache_secs),
            sse_poll: Duration::from_millis(poll_ms),
            sse_gap_wait: Duration::from_millis(gap_wait_ms),
            sse_max_streams_per_org,
            token_max_days,
            auth_failures_per_minute: parse_or("VM0_AUTH_FAILURES_PER_MINUTE", 30)?,
            trusted_proxies,
            storage: StorageConfig::from_env()?,
            dispatch: DispatchConfig::from_env()?,
        })
    }

    /// How often retention looks for runs due, unless told otherwise.
    pub const DEFAULT_RETENTION_INTERVAL: Duration = Duration::from_secs(600);
    /// How long records are kept, unless told otherwise.
    pub const DEFAULT_RECORDS_RETENTION: Duration = Duration::from_secs(90 * 86_400);

    /// Defaults for tests and embedding: everything but the database URL.
    pub fn for_database(database_url: impl Into<String>) -> GatewayConfig {
        GatewayConfig {
            records_retention: Some(Self::DEFAULT_RECORDS_RETENTION),
            retention_interval: Self::DEFAULT_RETENTION_INTERVAL,
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_addr: None,
            data_dir: PathBuf::from(".vm0"),
            database_url: database_url.into(),
            db_max_connections: 8,
            max_body_bytes: 1024 * 1024,
            sse_heartbeat: Duration::from_secs(15),
            auth_cache_ttl: Duration::from_secs(5),
            sse_poll: Duration::from_millis(250),
            sse_gap_wait: Duration::from_secs(15),
            sse_max_streams_per_org: 100,
            token_max_days: None,
            auth_failures_per_minute: 30,
            trusted_proxies: Vec::new(),
            storage: StorageConfig::default(),
            dispatch: None,
        }
    }
}
