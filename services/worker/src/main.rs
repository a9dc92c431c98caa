//! `vm0-worker`: configured by environment variables (see `config.rs`).

use anyhow::Result;
use tokio_util::sync::CancellationToken;
use vm0_sandbox::bubblewrap::Bubblewrap;
use vm0_worker::WorkerConfig;

#[tokio::main]
async fn main() -> Result<()> {
    vm0_telemetry::init(vm0_telemetry::LogFormat::from_env());
    let config = WorkerConfig::from_env()?;
    let shutdown = CancellationToken::new();
    tokio::spawn(wait_for_signal(shutdown.clone()));
    match config.sandbox.as_str() {
        "auto" | "bubblewrap" => {
            let sandbox = Bubblewrap::detect().await?;
            tracing::info!(
                sandbox = "bubblewrap",
                reason = %"auto picks bubblewrap until the microVM backends can probe KVM; VM0_SANDBOX=qemu selects microVMs",
                "sandbox chosen"
            );
            vm0_worker::run(config, sandbox, shutdown).await
        }
        "qemu" => {
            let sandbox = vm0_worker::qemu_sandbox(&config)?;
            tracing::info!(sandbox = "qemu", accel = "tcg", "sandbox chosen");
            vm0_worker::run(config, sandbox, shutdown).await
        }
        other => anyhow::bail!(
            "VM0_SANDBOX={other} is not available (this build has: auto, bubblewrap, qemu)"
        ),
    }
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
