//! Runs and what they produce: events, logs, metrics.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{FieldError, Timestamp};

/// Longest accepted prompt, in bytes.
pub const MAX_PROMPT_BYTES: usize = 262_144;

/// `pending → running → completed | failed | timeout | cancelled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Pending,
    Running,
    Completed,
    Failed,
    Timeout,
    Cancelled,
}

impl RunStatus {
    pub const ALL: [RunStatus; 6] = [
        RunStatus::Pending,
        RunStatus::Running,
        RunStatus::Completed,
        RunStatus::Failed,
        RunStatus::Timeout,
        RunStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Pending => "pending",
            RunStatus::Running => "running",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Timeout => "timeout",
            RunStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<RunStatus> {
        RunStatus::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// A terminal status never changes again.
    pub fn is_terminal(self) -> bool {
        !matches!(self, RunStatus::Pending | RunStatus::Running)
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Secret environment variables of a run. Its `Debug` shows names only, so a
/// request logged by mistake does not leak values.
#[derive(Clone, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(transparent)]
pub struct Secrets(pub BTreeMap<String, String>);

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// `POST /v1/runs`. One of `agent`, `agentId`, `sessionId`, `checkpointId` is required.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateRunRequest {
    /// Agent name.
    #[serde(default)]
    pub agent: Option<String>,
    #[serde(default, alias = "agent_id")]
    pub agent_id: Option<String>,
    /// Continue an existing session.
    #[serde(default, alias = "session_id")]
    pub session_id: Option<String>,
    /// Resume from a checkpoint.
    #[serde(default, alias = "checkpoint_id")]
    pub checkpoint_id: Option<String>,
    /// `latest` (default), a version id (`ver_…`) or a version number.
    #[serde(default, alias = "agent_version")]
    pub agent_version: Option<String>,
    #[serde(default)]
    pub prompt: Option<String>,
    /// Environment variables for the run.
    #[serde(default)]
    pub variables: Option<BTreeMap<String, String>>,
    /// Secret environment variables: never returned, logged or stored in clear text.
    #[serde(default)]
    pub secrets: Option<Secrets>,
    /// Volume name → `latest` or a version id.
    #[serde(default)]
    pub volumes: Option<BTreeMap<String, String>>,
    #[serde(default, alias = "artifact_name")]
    pub artifact_name: Option<String>,
    #[serde(default, alias = "artifact_version")]
    pub artifact_version: Option<String>,
}

impl CreateRunRequest {
    /// Checks what can be checked without the store.
    pub fn validate(&self) -> Result<(), FieldError> {
        let prompt = self
            .prompt
            .as_deref()
            .ok_or_else(|| FieldError::missing("prompt", "prompt is required"))?;
        if prompt.trim().is_empty() {
            return Err(FieldError::invalid("prompt", "prompt must not be empty"));
        }
        if prompt.len() > MAX_PROMPT_BYTES || prompt.contains('\0') {
            return Err(FieldError::invalid(
                "prompt",
                format!("prompt must be at most {MAX_PROMPT_BYTES} bytes without NUL"),
            ));
        }
        let targets = [
            self.agent.is_some(),
            self.agent_id.is_some(),
            self.session_id.is_some(),
            self.checkpoint_id.is_some(),
        ];
        match targets.iter().filter(|t| **t).count() {
            0 => {
                return Err(FieldError::missing(
                    "agent",
                    "one of agent, agentId, sessionId or checkpointId is required",
                ));
            }
            1 => {}
            _ => {
                return Err(FieldError::invalid(
                    "agent",
                    "give only one of agent, agentId, sessionId or checkpointId",
                ));
            }
        }
        if let Some(vars) = &self.variables {
            crate::agents::validate_env_map(vars, "variables")?;
        }
        if let Some(secrets) = &self.secrets {
            crate::agents::validate_env_map(&secrets.0, "secrets")?;
        }
        if let Some(volumes) = &self.volumes {
            if volumes.len() > 64 {
                return Err(FieldError::invalid("volumes", "at most 64 volumes per run"));
            }
            for name in volumes.keys() {
                crate::agents::validate_agent_name(name, &format!("volumes.{name}"))?;
            }
        }
        if let Some(name) = &self.artifact_name {
            crate::agents::validate_agent_name(name, "artifactName")?;
        }
        if self.artifact_version.is_some() && self.artifact_name.is_none() {
            return Err(FieldError::missing(
                "artifactName",
                "artifactVersion needs artifactName",
            ));
        }
        Ok(())
    }
}

/// A run, as every run endpoint returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Run {
    pub id: String,
    pub agent_id: String,
    pub agent_name: String,
    pub agent_version_id: String,
    pub status: RunStatus,
    pub prompt: String,
    /// Why the run failed, timed out or was cancelled.
    pub error: Option<String>,
    pub execution_time_ms: Option<i64>,
    pub checkpoint_id: Option<String>,
    pub session_id: String,
    pub artifact_name: Option<String>,
    pub artifact_version: Option<String>,
    /// Volume name → the exact version id the run mounts.
    pub volumes: BTreeMap<String, String>,
    pub created_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub completed_at: Option<Timestamp>,
}

/// Kinds of run events (the SSE `event:` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunEventType {
    Status,
    Output,
    Error,
    Complete,
    Metrics,
    Heartbeat,
}

impl RunEventType {
    pub fn as_str(self) -> &'static str {
        match self {
            RunEventType::Status => "status",
            RunEventType::Output => "output",
            RunEventType::Error => "error",
            RunEventType::Complete => "complete",
            RunEventType::Metrics => "metrics",
            RunEventType::Heartbeat => "heartbeat",
        }
    }

    pub fn parse(s: &str) -> Option<RunEventType> {
        [
            RunEventType::Status,
            RunEventType::Output,
            RunEventType::Error,
            RunEventType::Complete,
            RunEventType::Metrics,
            RunEventType::Heartbeat,
        ]
        .into_iter()
        .find(|t| t.as_str() == s)
    }
}

/// The SSE `id:` of the event with sequence number `seq`.
pub fn event_id(seq: i64) -> String {
    format!("evt_{seq}")
}

/// Parses a resume position: `evt_<n>` or a bare `<n>`.
pub fn parse_event_id(raw: &str) -> Option<i64> {
    let digits = raw.strip_prefix("evt_").unwrap_or(raw);
    if digits.is_empty() || digits.len() > 18 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Log stream of a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LogType {
    /// The agent's stdout and stderr.
    Agent,
    /// Worker, VMM and guest lifecycle.
    System,
    Network,
}

impl LogType {
    pub fn as_str(self) -> &'static str {
        match self {
            LogType::Agent => "agent",
            LogType::System => "system",
            LogType::Network => "network",
        }
    }

    pub fn parse(s: &str) -> Option<LogType> {
        [LogType::Agent, LogType::System, LogType::Network]
            .into_iter()
            .find(|t| t.as_str() == s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }

    pub fn parse(s: &str) -> Option<LogLevel> {
        [
            LogLevel::Debug,
            LogLevel::Info,
            LogLevel::Warn,
            LogLevel::Error,
        ]
        .into_iter()
        .find(|t| t.as_str() == s)
    }
}

/// One log line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LogEntry {
    pub timestamp: Timestamp,
    #[serde(rename = "type")]
    pub log_type: LogType,
    pub level: LogLevel,
    pub message: String,
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
}

/// One resource sample. Sizes appear both in MB (reference) and bytes (usage guide).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetricSample {
    pub timestamp: Timestamp,
    pub cpu_percent: f64,
    pub memory_used_mb: i64,
    pub memory_total_mb: i64,
    pub disk_used_mb: i64,
    pub disk_total_mb: i64,
    pub memory_bytes: i64,
    pub network_rx_bytes: i64,
    pub network_tx_bytes: i64,
}

/// Aggregate over every sample of the run (not only the returned page).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetricsSummary {
    pub sample_count: i64,
    pub avg_cpu_percent: f64,
    /// Same as `avgCpuPercent` (usage-guide name).
    pub cpu_avg_percent: f64,
    pub max_memory_used_mb: i64,
    pub memory_max_bytes: i64,
    /// Network bytes received over the run (the last cumulative sample).
    pub network_rx_bytes: i64,
    pub network_tx_bytes: i64,
    /// Run wall-clock time so far, or in total once finished.
    pub total_duration_ms: i64,
}

/// `GET /v1/runs/:id/metrics`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MetricsResponse {
    pub data: Vec<MetricSample>,
    pub summary: MetricsSummary,
    pub pagination: crate::cursor::Pagination,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: serde_json::Value) -> CreateRunRequest {
        serde_json::from_value(json).expect("request parses")
    }

    #[test]
    fn snake_and_camel_case_are_both_accepted() {
        let a = req(serde_json::json!({"agent_id": "ag_x", "prompt": "p", "artifact_name": "out"}));
        let b = req(serde_json::json!({"agentId": "ag_x", "prompt": "p", "artifactName": "out"}));
        assert_eq!(a.agent_id, b.agent_id);
        assert_eq!(a.artifact_name, b.artifact_name);
    }

    #[test]
    fn validation_names_the_parameter() {
        let cases = [
            (serde_json::json!({"agent": "a"}), "prompt"),
            (serde_json::json!({"prompt": "p"}), "agent"),
            (serde_json::json!({"prompt": " ", "agent": "a"}), "prompt"),
            (
                serde_json::json!({"prompt": "p", "agent": "a", "agentId": "ag_x"}),
                "agent",
            ),
            (
                serde_json::json!({"prompt": "p", "agent": "a", "variables": {"A-B": "x"}}),
                "variables.A-B",
            ),
            (
                serde_json::json!({"prompt": "p", "agent": "a", "artifactVersion": "latest"}),
                "artifactName",
            ),
        ];
        for (json, param) in cases {
            assert_eq!(
                req(json.clone()).validate().unwrap_err().param,
                param,
                "{json}"
            );
        }
    }

    #[test]
    fn secrets_debug_hides_values() {
        let r = req(
            serde_json::json!({"prompt": "p", "agent": "a", "secrets": {"API_KEY": "hunter2"}}),
        );
        let shown = format!("{r:?}");
        assert!(shown.contains("API_KEY"));
        assert!(!shown.contains("hunter2"));
    }

    #[test]
    fn event_ids() {
        assert_eq!(parse_event_id(&event_id(42)), Some(42));
        assert_eq!(parse_event_id("7"), Some(7));
        for bad in ["", "evt_", "evt_x", "-1", "evt_99999999999999999999"] {
            assert_eq!(parse_event_id(bad), None, "{bad}");
        }
    }
}
