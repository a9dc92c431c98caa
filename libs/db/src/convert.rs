//! Conversions from rows to the wire types of `vm0-api-types`. A row that does not
//! parse (hand-edited JSON, unknown status) is a [`StoreError::Corrupt`], never a panic.

use std::collections::BTreeMap;

use vm0_api_types::Timestamp;
use vm0_api_types::agents::{Agent, AgentConfig, AgentVersion};
use vm0_api_types::runs::{
    LogEntry, LogLevel, LogType, MetricSample, Run, RunEventType, RunStatus,
};
use vm0_api_types::tokens::Token;

use crate::StoreError;
use crate::entity::{
    agent, agent_version, api_token, run, run_event, run_log, run_metric, storage, storage_version,
};
use vm0_api_types::storage::StorageVersion;

const MB: i64 = 1024 * 1024;

fn json<T: serde::de::DeserializeOwned>(what: &str, raw: &str) -> Result<T, StoreError> {
    serde_json::from_str(raw).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

pub fn agent_config(v: &agent_version::Model) -> Result<AgentConfig, StoreError> {
    json("agent_versions.config", &v.config)
}

pub fn agent(a: &agent::Model, config: Option<AgentConfig>) -> Agent {
    Agent {
        id: a.id.clone(),
        name: a.name.clone(),
        current_version_id: a.current_version_id.clone(),
        config,
        created_at: Timestamp(a.created_at),
        updated_at: Timestamp(a.updated_at),
    }
}

pub fn agent_version(v: &agent_version::Model) -> Result<AgentVersion, StoreError> {
    Ok(AgentVersion {
        id: v.id.clone(),
        agent_id: v.agent_id.clone(),
        version_number: v.version_number,
        config: agent_config(v)?,
        created_at: Timestamp(v.created_at),
    })
}

pub fn run_status(raw: &str) -> Result<RunStatus, StoreError> {
    RunStatus::parse(raw).ok_or_else(|| StoreError::Corrupt(format!("runs.status '{raw}'")))
}

pub fn run(r: &run::Model) -> Result<Run, StoreError> {
    let volumes: BTreeMap<String, String> = json("runs.volumes", &r.volumes)?;
    Ok(Run {
        id: r.id.clone(),
        agent_id: r.agent_id.clone(),
        agent_name: r.agent_name.clone(),
        agent_version_id: r.agent_version_id.clone(),
        status: run_status(&r.status)?,
        prompt: r.prompt.clone(),
        error: r.error.clone(),
        execution_time_ms: r.execution_time_ms,
        checkpoint_id: r.checkpoint_id.clone(),
        session_id: r.session_id.clone(),
        artifact_name: r.artifact_name.clone(),
        artifact_version: r.artifact_version.clone(),
        volumes,
        created_at: Timestamp(r.created_at),
        started_at: r.started_at.map(Timestamp),
        completed_at: r.completed_at.map(Timestamp),
    })
}

/// A stored run event: its SSE name, id and payload.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub seq: i64,
    pub event_type: RunEventType,
    pub data: serde_json::Value,
}

pub fn run_event(e: &run_event::Model) -> Result<StoredEvent, StoreError> {
    Ok(StoredEvent {
        seq: e.seq,
        event_type: RunEventType::parse(&e.event_type).ok_or_else(|| {
            StoreError::Corrupt(format!("run_events.event_type '{}'", e.event_type))
        })?,
        data: json("run_events.data", &e.data)?,
    })
}

pub fn run_log(l: &run_log::Model) -> Result<LogEntry, StoreError> {
    Ok(LogEntry {
        timestamp: Timestamp(l.ts),
        log_type: LogType::parse(&l.log_type)
            .ok_or_else(|| StoreError::Corrupt(format!("run_logs.log_type '{}'", l.log_type)))?,
        level: LogLevel::parse(&l.level)
            .ok_or_else(|| StoreError::Corrupt(format!("run_logs.level '{}'", l.level)))?,
        message: l.message.clone(),
        metadata: json("run_logs.metadata", &l.metadata)?,
    })
}

pub fn run_metric(m: &run_metric::Model) -> MetricSample {
    MetricSample {
        timestamp: Timestamp(m.ts),
        cpu_percent: m.cpu_percent,
        memory_used_mb: m.memory_used_bytes / MB,
        memory_total_mb: m.memory_total_bytes / MB,
        disk_used_mb: m.disk_used_bytes / MB,
        disk_total_mb: m.disk_total_bytes / MB,
        memory_bytes: m.memory_used_bytes,
        network_rx_bytes: m.network_rx_bytes,
        network_tx_bytes: m.network_tx_bytes,
    }
}

pub fn token(t: &api_token::Model) -> Token {
    Token {
        id: t.id.clone(),
        name: t.name.clone(),
        prefix: t.prefix.clone(),
        created_at: Timestamp(t.created_at),
        expires_at: t.expires_at.map(Timestamp),
    }
}

pub fn storage(
    s: &storage::Model,
    current: Option<Option<StorageVersion>>,
) -> vm0_api_types::storage::Storage {
    vm0_api_types::storage::Storage {
        id: s.id.clone(),
        name: s.name.clone(),
        current_version_id: s.current_version_id.clone(),
        size: s.size,
        file_count: s.file_count,
        created_at: Timestamp(s.created_at),
        updated_at: Timestamp(s.updated_at),
        current_version: current,
    }
}

/// A version of a storage of `kind`.
pub fn storage_version(kind: crate::StorageKind, v: &storage_version::Model) -> StorageVersion {
    let owner = Some(v.storage_id.clone());
    let (volume_id, artifact_id) = match kind {
        crate::StorageKind::Volume => (owner, None),
        crate::StorageKind::Artifact | crate::StorageKind::State => (None, owner),
    };
    StorageVersion {
        id: v.id.clone(),
        volume_id,
        artifact_id,
        size: v.size,
        file_count: v.file_count,
        message: v.message.clone(),
        created_by: v.created_by.clone(),
        created_at: Timestamp(v.created_at),
    }
}
