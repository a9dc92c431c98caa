//! Subject names. Run ids contain only `[a-z0-9_]`, so they are safe subject tokens.

/// Jobs for workers (stream `RUN_JOBS`).
pub const JOBS: &str = "jobs.run";

/// Subjects captured by the `RUN_TELEMETRY` stream.
pub const TELEMETRY_WILDCARDS: [&str; 4] = [
    "runs.*.output",
    "runs.*.logs",
    "runs.*.metrics",
    "runs.*.status",
];

/// The telemetry channels of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Output,
    Logs,
    Metrics,
    Status,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Output => "output",
            Channel::Logs => "logs",
            Channel::Metrics => "metrics",
            Channel::Status => "status",
        }
    }
}

/// `runs.<id>.<channel>`
pub fn telemetry(run_id: &str, channel: Channel) -> String {
    format!("runs.{run_id}.{}", channel.as_str())
}

/// Every subject of a run (`runs.<id>.*`).
pub fn run_all(run_id: &str) -> String {
    format!("runs.{run_id}.*")
}

/// `runs.<id>.cancel`: not captured by any stream.
pub fn cancel(run_id: &str) -> String {
    format!("runs.{run_id}.cancel")
}

/// Where the persister sets aside what it cannot store (stream `RUN_DEADLETTER`).
pub const DEAD_LETTERS: &str = "deadletter.>";

/// `deadletter.<subject>`
pub fn dead_letter(subject: &str) -> String {
    format!("deadletter.{subject}")
}

/// Revoked API token ids, from the gateway that revoked them to every gateway
/// (core NATS, not captured: each replica drops the token from its auth cache).
pub const TOKENS_REVOKED: &str = "auth.tokens.revoked";

/// The run id of a `runs.<id>.<...>` subject.
pub fn run_id_of(subject: &str) -> Option<&str> {
    let mut parts = subject.split('.');
    match (parts.next(), parts.next()) {
        (Some("runs"), Some(id)) if !id.is_empty() => Some(id),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_round_trip() {
        let s = telemetry("run_abc", Channel::Output);
        assert_eq!(s, "runs.run_abc.output");
        assert_eq!(run_id_of(&s), Some("run_abc"));
        assert_eq!(run_id_of("jobs.run"), None);
        assert_eq!(cancel("run_abc"), "runs.run_abc.cancel");
    }
}
