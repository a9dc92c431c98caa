//! The telemetry persister: drains `RUN_TELEMETRY` through the durable consumer the
//! gateways share, and stores what it reads in batches — one transaction for
//! everything that arrived together, not one per line. Messages are acked only
//! after their batch committed; a crash before that means redelivery, which the
//! store's dedupe keys make harmless.
//!
//! A batch that fails is stored again message by message, so that one bad
//! message cannot hold the others back; a message that still fails is redelivered
//! with a growing delay, and after [`DEAD_LETTER_AFTER`] deliveries it is set aside
//! on the dead-letter stream (`deadletter.runs.<id>.<channel>`) with a `system`
//! log line on its run, and acked. Nothing is redelivered forever.

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
/// Deliveries of a message that cannot be stored before it is set aside.
pub const DEAD_LETTER_AFTER: i64 = 5;

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
pub async fn run(
    store: Store,
    bus: Bus,
    instruments: std::sync::Arc<crate::prometheus::Instruments>,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        if let Err(e) = drain(&store, &bus, &instruments, &shutdown).await {
            tracing::warn!(error = %e, "persister restarting");
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

/// When JetStream stored `msg`, in microseconds since the epoch.
fn published_us(msg: &async_nats::jetstream::Message) -> Option<i64> {
    let published = msg.info().ok()?.published;
    i64::try_from(published.unix_timestamp_nanos() / 1000).ok()
}

async fn drain(
    store: &Store,
    bus: &Bus,
    instruments: &crate::prometheus::Instruments,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
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
        let mut oldest: Option<i64> = None;
        for msg in chunk {
            let msg = msg.map_err(|e| anyhow::anyhow!("telemetry consumer: {e}"))?;
            if let Some(at) = published_us(&msg) {
                oldest = Some(oldest.map_or(at, |o| o.min(at)));
            }
            let subject = msg.subject.to_string();
            let parsed = match Telemetry::from_subject(&subject, &msg.payload) {
                Ok(parsed) => {
                    rows.add(&parsed.0, parsed.1.clone());
                    Some(parsed)
                }
                Err(why) => {
                    tracing::warn!(%subject, %why, "dropping telemetry");
                    None
                }
            };
            messages.push((msg, parsed));
        }
        match store
            .insert_telemetry(&rows.events, &rows.logs, &rows.metrics)
            .await
        {
            Ok(()) => {
                let lag_us = oldest.map(|o| vm0_api_types::Timestamp::now().micros() - o);
                instruments.batch_stored(messages.len(), lag_us);
                for (msg, _) in messages {
                    ack(&msg).await;
                }
            }
            Err(e) => {
                tracing::warn!(error = %ErrorChain(&e), messages = messages.len(), "telemetry batch not stored; storing its messages one by one");
                for (msg, parsed) in messages {
                    store_alone(store, bus, msg, parsed).await;
                }
            }
        }
    }
}

async fn ack(msg: &async_nats::jetstream::Message) {
    if let Err(e) = msg.ack().await {
        tracing::warn!(error = %e, "telemetry ack failed (it will be redelivered and deduped)");
    }
}

/// One message of a batch that failed: stored alone, or redelivered later, or,
/// after [`DEAD_LETTER_AFTER`] deliveries, set aside.
async fn store_alone(
    store: &Store,
    bus: &Bus,
    msg: async_nats::jetstream::Message,
    parsed: Option<(String, Telemetry)>,
) {
    let Some((run_id, telemetry)) = parsed else {
        ack(&msg).await;
        return;
    };
    let mut rows = Rows::default();
    rows.add(&run_id, telemetry);
    let Err(e) = store
        .insert_telemetry(&rows.events, &rows.logs, &rows.metrics)
        .await
    else {
        ack(&msg).await;
        return;
    };
    let delivered = msg.info().map(|i| i.delivered).unwrap_or(1);
    let subject = msg.subject.to_string();
    if delivered < DEAD_LETTER_AFTER {
        tracing::warn!(%subject, delivered, error = %ErrorChain(&e), "telemetry message not stored; it will be redelivered");
        let delay = Duration::from_millis(200 * u64::try_from(delivered.max(1)).unwrap_or(1));
        let _ = msg
            .ack_with(async_nats::jetstream::AckKind::Nak(Some(delay)))
            .await;
        return;
    }
    let why = ErrorChain(&e).to_string();
    let set_aside = bus.publish_dead_letter(&subject, &msg.payload, &why).await;
    let line = NewLog {
        key: None,
        ts: vm0_api_types::Timestamp::now().micros(),
        log_type: LogType::System,
        level: LogLevel::Error,
        message: format!(
            "a telemetry message ({}) could not be stored after {delivered} attempts and was set aside{}: {why}",
            subject.rsplit('.').next().unwrap_or_default(),
            match &set_aside {
                Ok(dead) => format!(" on {dead}"),
                Err(_) => String::new(),
            }
        ),
        metadata: serde_json::json!({}),
    };
    if let Err(log_error) = store.append_logs(&run_id, &[line]).await {
        tracing::warn!(%run_id, error = %ErrorChain(&log_error), "cannot log a dead-lettered message on its run");
    }
    match set_aside {
        Ok(dead) => {
            tracing::error!(%subject, %dead, delivered, error = %why, "telemetry message set aside")
        }
        Err(err) => {
            tracing::error!(%subject, delivered, error = %why, dead_letter_error = %ErrorChain(&err), "telemetry message dropped: it could neither be stored nor set aside")
        }
    }
    let _ = msg.ack_with(async_nats::jetstream::AckKind::Term).await;
}
