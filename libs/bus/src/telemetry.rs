//! Telemetry messages, JSON on `runs.<id>.<channel>`. JSON rather than protobuf so
//! that `nats sub 'runs.>'` is readable while debugging; the volume is modest.

use serde::{Deserialize, Serialize};
use vm0_api_types::runs::{LogLevel, LogType, RunEventType};

use crate::subjects::Channel;

/// One message of a run's telemetry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Telemetry {
    /// An SSE event (`output`, `error`, `status`, `complete`) with its per-run
    /// sequence number: the worker numbers its events from the `next_event_seq`
    /// its claim returned; the control plane numbers the rest.
    Event {
        seq: i64,
        event: RunEventType,
        data: serde_json::Value,
        /// Microseconds since the epoch.
        ts: i64,
    },
    /// A log line. `key` is unique per run (dedupes redeliveries).
    Log {
        key: String,
        ts: i64,
        log_type: LogType,
        level: LogLevel,
        message: String,
        #[serde(default)]
        metadata: serde_json::Value,
    },
    /// A resource sample. `key` is unique per run.
    Metric {
        key: String,
        ts: i64,
        cpu_percent: f64,
        memory_used_bytes: i64,
        memory_total_bytes: i64,
        disk_used_bytes: i64,
        disk_total_bytes: i64,
        network_rx_bytes: i64,
        network_tx_bytes: i64,
    },
}

impl Telemetry {
    /// The subject channel this message goes to.
    pub fn channel(&self) -> Channel {
        match self {
            // A worker's own events (an `error` says its output was cut) travel
            // with its output; status and complete never do.
            Telemetry::Event {
                event: RunEventType::Output | RunEventType::Error,
                ..
            } => Channel::Output,
            Telemetry::Event { .. } => Channel::Status,
            Telemetry::Log { .. } => Channel::Logs,
            Telemetry::Metric { .. } => Channel::Metrics,
        }
    }

    pub fn decode(payload: &[u8]) -> Result<Telemetry, serde_json::Error> {
        serde_json::from_slice(payload)
    }

    /// The run id and message of a telemetry subject's payload, if the message
    /// belongs on that subject. A message's kind must match its channel: workers
    /// may publish output (and `error`) events, logs and metrics, never status, so
    /// a `complete` or `status` event on an output subject is someone's forgery.
    pub fn from_subject(subject: &str, payload: &[u8]) -> Result<(String, Telemetry), String> {
        let mut parts = subject.split('.');
        let (run_id, channel) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("runs"), Some(id), Some(channel), None) if !id.is_empty() => (id, channel),
            _ => return Err(format!("not a telemetry subject: {subject}")),
        };
        let msg = Telemetry::decode(payload).map_err(|e| format!("undecodable: {e}"))?;
        if msg.channel().as_str() != channel {
            return Err(format!(
                "a {} message on the {channel} subject",
                msg.channel().as_str()
            ));
        }
        Ok((run_id.to_owned(), msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_with_a_kind_tag() {
        let m = Telemetry::Event {
            seq: 3,
            event: RunEventType::Output,
            data: serde_json::json!({"content": "hi"}),
            ts: 1,
        };
        let json = serde_json::to_value(&m).expect("json");
        assert_eq!(json["kind"], "event");
        assert_eq!(json["event"], "output");
        assert_eq!(
            Telemetry::decode(&serde_json::to_vec(&m).expect("bytes")).expect("decode"),
            m
        );
        assert_eq!(m.channel(), Channel::Output);
        let truncated = Telemetry::Event {
            seq: 4,
            event: RunEventType::Error,
            data: serde_json::json!({"code": "output_truncated"}),
            ts: 1,
        };
        assert_eq!(truncated.channel(), Channel::Output, "a worker may send it");
        let bytes = serde_json::to_vec(&m).expect("bytes");
        assert_eq!(
            Telemetry::from_subject("runs.run_a.output", &bytes).map(|(id, _)| id),
            Ok("run_a".to_owned())
        );
        let complete = Telemetry::Event {
            seq: 9,
            event: RunEventType::Complete,
            data: serde_json::json!({"status": "completed"}),
            ts: 1,
        };
        let forged = serde_json::to_vec(&complete).expect("bytes");
        assert!(Telemetry::from_subject("runs.run_a.output", &forged).is_err());
        assert!(Telemetry::from_subject("runs.run_a.status", &forged).is_ok());
        assert!(Telemetry::from_subject("runs.run_a.output.x", &bytes).is_err());
    }
}
