//! The telemetry persister: drains `RUN_TELEMETRY` through the durable consumer the
//! gateways share, and stores what it reads in batches — one transaction for
//! everything that arrived together, not one per line. Messages are acked only
//! after their batch committed; a crash before that means redelivery, which the
//! store's dedupe keys make harmless.

use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use vm0_api_types::runs::{LogLevel, LogType, RunEventType};
use vm0_bus::{Bus, Telemetry};
use vm0_db::entity::run_event;
use vm0_db::{NewLog, NewMetric, Store};

use crate::error::ErrorChain;

/// Messages stored per transaction at most.
const BATCH: usize = 512;

/// What one batch of messages becomes.
#[derive(Default)]
struct Rows {
    events: Vec<run_event::Model>,
    logs: Vec<(String, NewLog)>,
    metrics: Vec<(String, NewMetric)>,
}

impl Rows {
    fn add(&mut self, run_id: &str, msg: Telemetry) {
        match msg {
            Telemetry::Event {
                seq,
                event,
                data,
                ts,
            } => {
                // Agent output is also an `agent` log line.
                if event == RunEventType::Output {
                    let stderr = data["stream"] == "stderr";
                    self.logs.push((
                        run_id.to_owned(),
                        NewLog {
                            key: Some(format!("evt:{seq}")),
                            ts,
                            log_type: LogType::Agent,
                            level: if stderr { LogLevel::Warn } else { LogLevel::Info },
                            message: data["content"].as_str().unwrap_or_default().to_owned(),
                            metadata: serde_json::json!({"stream": if stderr { "stderr" } else { "stdout" }}),
                        },
                    ));
                }
                self.events.push(run_event::Model {
                    run_id: run_id.to_owned(),
                    seq,
                    event_type: event.as_str().to_owned(),
                    data: data.to_string(),
                    created_at: ts,
                });
            }
            Telemetry::Log {
                key,
                ts,
                log_type,
                level,
                message,
                metadata,
            } => self.logs.push((
                run_id.to_owned(),
                NewLog {
                    key: Some(key),
                    ts,
                    log_type,
                    level,
                    message,
                    metadata: if metadata.is_object() {
                        metadata
                    } else {
                        serde_json::json!({})
                    },
                },
            )),
            Telemetry::Metric {
                key,
                ts,
                cpu_percent,
                memory_used_bytes,
                memory_total_bytes,
                disk_used_bytes,
                disk_total_bytes,
                network_rx_bytes,
                network_tx_bytes,
            } => self.metrics.push((
                run_id.to_owned(),
                NewMetric {
                    key: Some(key),
                    ts,
                    cpu_percent,
                    memory_used_bytes,
                    memory_total_bytes,
                    disk_used_bytes,
                    disk_total_bytes,
                    network_rx_bytes,
                    network_tx_bytes,
                },
            )),
        }
    }
}

/// Runs until `shutdown`; reconnects its consumer after errors.
pub async fn run(store: Store, bus: Bus, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        if let Err(e) = drain(&store, &bus, &shutdown).await {
            tracing::warn!(error = %e, "persister restarting");
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

async fn drain(store: &Store, bus: &Bus, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let consumer = bus.persister_consumer().await?;
    let mut chunks = consumer.messages().await?.ready_chunks(BATCH);
    loop {
        let chunk = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            chunk = chunks.next() => chunk,
        };
        let Some(chunk) = chunk else {
            anyhow::bail!("telemetry consumer ended");
        };
        let mut rows = Rows::default();
        let mut messages = Vec::with_capacity(chunk.len());
        for msg in chunk {
            let msg = msg.map_err(|e| anyhow::anyhow!("telemetry consumer: {e}"))?;
            let subject = msg.subject.to_string();
            match Telemetry::from_subject(&subject, &msg.payload) {
                Ok((run_id, t)) => rows.add(&run_id, t),
                Err(why) => tracing::warn!(%subject, %why, "dropping telemetry"),
            }
            messages.push(msg);
        }
        if let Err(e) = store
            .insert_telemetry(&rows.events, &rows.logs, &rows.metrics)
            .await
        {
            // Not acked: JetStream redelivers after its ack wait.
            tracing::warn!(error = %ErrorChain(&e), messages = messages.len(), "telemetry batch not stored");
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        for msg in messages {
            if let Err(e) = msg.ack().await {
                tracing::warn!(error = %e, "telemetry ack failed (it will be redelivered and deduped)");
            }
        }
    }
}
