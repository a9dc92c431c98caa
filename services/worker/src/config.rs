//! Worker configuration from the environment.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// `VM0_WORKER_ID`, default `<hostname>-<random>`.
    pub worker_id: String,
    /// `VM0_NATS_URL`, default `nats://127.0.0.1:4222`.
    pub nats_url: String,
    /// `VM0_CONTROL_PLANE_URL`, default `http://127.0.0.1:9090`.
    pub control_plane_url: String,
    /// `VM0_WORKER_TOKEN` (required).
    pub worker_token: String,
    /// `VM0_WORKER_SLOTS`: runs at once, default the number of CPUs.
    pub slots: u32,
    /// Advertised capacity: CPUs and memory of the machine, `VM0_WORKER_DISK_MB`.
    pub vcpus: u32,
    pub memory_mb: u64,
    pub disk_mb: u64,
    /// `VM0_DATA_DIR`: scratch directories live under `<data dir>/worker/<id>/runs`.
    pub data_dir: PathBuf,
    /// `VM0_SAMPLE_INTERVAL_MS`, default 2000.
    pub sample_interval: Duration,
    /// `VM0_DRAIN_TIMEOUT_SECS`, default 60: on SIGTERM, how long running runs may
    /// take before they are stopped.
    pub drain_timeout: Duration,
    /// `VM0_SANDBOX`: `auto` or `bubblewrap` (the microVM backends come later).
    pub sandbox: String,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T>
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

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into())
}

/// Total memory of the machine in MB.
fn memory_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(1024, |kb| kb / 1024)
}

impl WorkerConfig {
    /// Defaults sized to this machine, with an empty token (for embedding: `vm0 dev`).
    pub fn defaults() -> WorkerConfig {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        WorkerConfig {
            worker_id: hostname(),
            nats_url: "nats://127.0.0.1:4222".into(),
            control_plane_url: "http://127.0.0.1:9090".into(),
            worker_token: String::new(),
            slots: std::env::var("VM0_WORKER_SLOTS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(cpus)
                .max(1),
            vcpus: cpus,
            memory_mb: memory_mb(),
            disk_mb: 100_000,
            data_dir: PathBuf::from(".vm0"),
            sample_interval: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(60),
            sandbox: std::env::var("VM0_SANDBOX").unwrap_or_else(|_| "auto".into()),
        }
    }

    pub fn from_env() -> Result<WorkerConfig> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let suffix: String = (0..6)
            .map(|_| char::from(b'a' + rand::random_range(0..26u8)))
            .collect();
        let worker_token = std::env::var("VM0_WORKER_TOKEN")
            .context("VM0_WORKER_TOKEN must be set (the token the gateway expects from workers)")?;
        let config = WorkerConfig {
            worker_id: env_or("VM0_WORKER_ID", format!("{}-{suffix}", hostname()))?,
            nats_url: env_or("VM0_NATS_URL", "nats://127.0.0.1:4222".to_owned())?,
            control_plane_url: env_or("VM0_CONTROL_PLANE_URL", "http://127.0.0.1:9090".to_owned())?,
            worker_token,
            slots: env_or("VM0_WORKER_SLOTS", cpus)?,
            vcpus: cpus,
            memory_mb: memory_mb(),
            disk_mb: env_or("VM0_WORKER_DISK_MB", 100_000)?,
            data_dir: PathBuf::from(env_or("VM0_DATA_DIR", ".vm0".to_owned())?),
            sample_interval: Duration::from_millis(env_or("VM0_SAMPLE_INTERVAL_MS", 2000)?),
            drain_timeout: Duration::from_secs(env_or("VM0_DRAIN_TIMEOUT_SECS", 60)?),
            sandbox: env_or("VM0_SANDBOX", "auto".to_owned())?,
        };
        anyhow::ensure!(config.slots >= 1, "VM0_WORKER_SLOTS must be at least 1");
        anyhow::ensure!(
            config.sample_interval >= Duration::from_millis(100),
            "VM0_SAMPLE_INTERVAL_MS must be at least 100"
        );
        Ok(config)
    }
}
