//! `vm0-worker`: configured by environment variables (see `config.rs`).

use anyhow::Result;
use tokio_util::sync::CancellationToken;
use vm0_telemetry::TelemetryOptions;
use vm0_worker::WorkerConfig;

#[tokio::main]
async fn main() -> Result<()> {
    let telemetry = vm0_telemetry::init(TelemetryOptions::from_env("vm0-worker"))?;
    let result = serve().await;
    telemetry.shutdown().await;
    result
}

async fn serve() -> Result<()> {
    let config = WorkerConfig::from_env()?;
    let shutdown = CancellationToken::new();
    tokio::spawn(wait_for_signal(shutdown.clone()));
    let slots = vm0_worker::Slots::for_config(&config)?;
    let sandbox = vm0_worker::sandbox(&config, &slots).await?;
    vm0_worker::run(config, sandbox, slots, shutdown).await
}

async fn wait_for_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        tracing::error!("cannot listen for SIGTERM");
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down: no new jobs, draining running runs");
    shutdown.cancel();
}
