//! Agents: a named, versioned `config` that says how a run executes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ids::truncate_for_message;
use crate::{FieldError, Timestamp};

/// Bounds of an agent config. A run asking for more is rejected when the agent is
/// saved, not when a worker picks the run up.
pub mod limits {
    pub const MAX_NAME_LEN: usize = 100;
    pub const MAX_VCPUS: u32 = 64;
    pub const MIN_MEMORY_MB: u64 = 128;
    pub const MAX_MEMORY_MB: u64 = 262_144;
    pub const MIN_DISK_MB: u64 = 64;
    pub const MAX_DISK_MB: u64 = 1_048_576;
    pub const MAX_TIMEOUT_SECONDS: u64 = 86_400;
    pub const MAX_ARGS: usize = 1024;
    pub const MAX_ARG_LEN: usize = 8192;
    pub const MAX_ENV_VARS: usize = 256;
    pub const MAX_ENV_NAME_LEN: usize = 256;
    pub const MAX_ENV_VALUE_LEN: usize = 32_768;
    pub const MAX_IMAGE_LEN: usize = 200;
    pub const MAX_PATH_LEN: usize = 4096;
}

/// Sandbox resources of each run of the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resources {
    /// 1–64, default 1.
    #[serde(
        default = "default_vcpus",
        deserialize_with = "crate::integer::integer"
    )]
    pub vcpus: u32,
    /// 128–262144, default 512.
    #[serde(
        default = "default_memory_mb",
        alias = "memory_mb",
        deserialize_with = "crate::integer::integer"
    )]
    pub memory_mb: u64,
    /// 64–1048576, default 1024.
    #[serde(
        default = "default_disk_mb",
        alias = "disk_mb",
        deserialize_with = "crate::integer::integer"
    )]
    pub disk_mb: u64,
}

fn default_vcpus() -> u32 {
    1
}
fn default_memory_mb() -> u64 {
    512
}
fn default_disk_mb() -> u64 {
    1024
}
fn default_timeout_seconds() -> u64 {
    600
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            vcpus: default_vcpus(),
            memory_mb: default_memory_mb(),
            disk_mb: default_disk_mb(),
        }
    }
}

/// The run recipe: what a run of this agent executes and with what.
///
/// The prompt reaches the command in `VM0_PROMPT` and on stdin; run `variables` and
/// `secrets` are added to `env`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentConfig {
    /// Guest image name; the worker's default image when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// argv of the agent process; the first element is the program.
    pub command: Vec<String>,
    /// Environment of the agent process.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub resources: Resources,
    /// Wall-clock limit of a run, 1–86400, default 600.
    #[serde(
        default = "default_timeout_seconds",
        alias = "timeout_seconds",
        deserialize_with = "crate::integer::integer"
    )]
    pub timeout_seconds: u64,
    /// Absolute path the command starts in.
    #[serde(
        default,
        alias = "working_dir",
        skip_serializing_if = "Option::is_none"
    )]
    pub working_dir: Option<String>,
    /// Who runs the command: `agent` (default), or `root` on microVM workers.
    #[serde(default, skip_serializing_if = "RunAs::is_default")]
    pub user: RunAs,
    /// What the run may reach on the network (default: `open`).
    #[serde(default, skip_serializing_if = "NetworkConfig::is_default")]
    pub network: NetworkConfig,
}

/// A run's network egress, enforced by the worker (never inside the sandbox).
/// Whatever the policy, loopback, link-local (the cloud metadata address), the
/// worker's own addresses, the control plane and NATS are refused, and private
/// ranges unless the operator trusts them (`VM0_NETWORK_TRUSTED_CIDRS`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkConfig {
    /// `open` (default): everything but `deny`; `allowlist`: only `allow`,
    /// less `deny`; `none`: nothing.
    #[serde(default)]
    pub mode: NetworkMode,
    /// Host names (`api.anthropic.com`), subdomain wildcards (`*.github.com`),
    /// addresses or CIDR ranges (`203.0.113.0/24`), each with an optional
    /// `:port` (not ranges). At most 256.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// The same forms; a match is refused in every mode. At most 256.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    /// Names the worker resolves to these IPv4 addresses for this run.
    #[serde(
        default,
        alias = "extra_hosts",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub extra_hosts: BTreeMap<String, String>,
    /// Credentials the run uses but never sees: host name → header name → the
    /// name of one of the run's `secrets`. For HTTPS requests to that host the
    /// worker's proxy terminates TLS (with a certificate of the run's own CA,
    /// which the sandbox trusts) and sets the header to the secret's value; the
    /// secret is not in the sandbox's environment. At most 16 hosts of 16
    /// headers.
    #[serde(
        default,
        alias = "secret_headers",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub secret_headers: BTreeMap<String, BTreeMap<String, String>>,
}

/// Hosts in `secretHeaders`, and headers per host, at most.
pub const MAX_SECRET_HEADERS: usize = 16;

/// Headers a secret may not be: those that frame or route the request.
pub const RESERVED_HEADERS: [&str; 9] = [
    "host",
    "connection",
    "content-length",
    "transfer-encoding",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "proxy-connection",
];

/// An HTTP header name (RFC 9110 token) a secret may fill.
pub fn is_secret_header(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        && !RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str())
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    #[default]
    Open,
    Allowlist,
    None,
}

impl NetworkMode {
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::Open => "open",
            NetworkMode::Allowlist => "allowlist",
            NetworkMode::None => "none",
        }
    }
}

impl NetworkConfig {
    fn is_default(&self) -> bool {
        *self == NetworkConfig::default()
    }

    /// The policy the worker enforces; the error names its field under
    /// `config.network`.
    pub fn policy(&self) -> Result<vm0_egress::policy::Policy, FieldError> {
        vm0_egress::policy::Policy::parse(
            self.mode.as_str(),
            self.allow.iter().map(String::as_str),
            self.deny.iter().map(String::as_str),
            self.extra_hosts
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        )
        .map_err(|e| {
            FieldError::invalid(
                format!("config.network.{}", truncate_for_message(&e.param())),
                e.to_string(),
            )
        })
    }

    /// `secretHeaders`: host names, header names a secret may fill, secret names.
    fn check_secret_headers(&self) -> Result<(), FieldError> {
        let param = "config.network.secretHeaders";
        if self.secret_headers.len() > MAX_SECRET_HEADERS {
            return Err(FieldError::invalid(
                param,
                format!("at most {MAX_SECRET_HEADERS} hosts"),
            ));
        }
        for (host, headers) in &self.secret_headers {
            let at = format!("{param}.{}", truncate_for_message(host));
            if vm0_egress::policy::host_name(host).is_none() {
                return Err(FieldError::invalid(at, "not a host name"));
            }
            if headers.is_empty() || headers.len() > MAX_SECRET_HEADERS {
                return Err(FieldError::invalid(
                    at,
                    format!("1 to {MAX_SECRET_HEADERS} headers"),
                ));
            }
            for (header, secret) in headers {
                let at = format!("{at}.{}", truncate_for_message(header));
                if !is_secret_header(header) {
                    return Err(FieldError::invalid(
                        at,
                        "not a header a secret can fill (an HTTP header name, not one that frames or routes the request)",
                    ));
                }
                let one: BTreeMap<String, String> = [(secret.clone(), String::new())].into();
                validate_env_map(&one, &at).map_err(|_| {
                    FieldError::invalid(
                        at.clone(),
                        "the value names one of the run's secrets (letters, digits and '_', not VM0_)",
                    )
                })?;
            }
        }
        Ok(())
    }

    /// The secret names `secretHeaders` uses.
    pub fn secret_header_names(&self) -> std::collections::BTreeSet<&str> {
        self.secret_headers
            .values()
            .flat_map(|h| h.values().map(String::as_str))
            .collect()
    }
}

/// The user a run's command runs as.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RunAs {
    /// The unprivileged run user (uid and gid 1000, no capabilities).
    #[default]
    Agent,
    /// root inside the VM: for agents that install packages as they go. The
    /// bubblewrap backend refuses it (the host kernel would be its kernel).
    Root,
}

impl RunAs {
    fn is_default(&self) -> bool {
        *self == RunAs::Agent
    }
}

/// What a guest image name may be (`config.image`, `vm0 image build --name`).
pub const IMAGE_NAME_RULE: &str = "image must be 1-200 characters of lowercase letters, digits and ._:/-, starting with a letter or digit";

pub fn is_image_name(image: &str) -> bool {
    image.len() <= limits::MAX_IMAGE_LEN
        && image
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && image
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._:/-".contains(&b))
}

impl AgentConfig {
    /// Checks every field against [`limits`]; the error names the offending field as
    /// a path under `config` (e.g. `config.resources.vcpus`).
    pub fn validate(&self) -> Result<(), FieldError> {
        use limits::*;
        if let Some(image) = &self.image
            && !is_image_name(image)
        {
            return Err(FieldError::invalid("config.image", IMAGE_NAME_RULE));
        }
        if self.command.is_empty() || self.command[0].is_empty() {
            return Err(FieldError::invalid(
                "config.command",
                "command must be a non-empty array whose first element names the program",
            ));
        }
        if self.command.len() > MAX_ARGS {
            return Err(FieldError::invalid(
                "config.command",
                format!("command has more than {MAX_ARGS} arguments"),
            ));
        }
        for (i, arg) in self.command.iter().enumerate() {
            if arg.len() > MAX_ARG_LEN || arg.contains('\0') {
                return Err(FieldError::invalid(
                    format!("config.command[{i}]"),
                    format!("arguments must be at most {MAX_ARG_LEN} bytes without NUL"),
                ));
            }
        }
        validate_env_map(&self.env, "config.env")?;
        let r = &self.resources;
        if !(1..=MAX_VCPUS).contains(&r.vcpus) {
            return Err(FieldError::invalid(
                "config.resources.vcpus",
                format!("vcpus must be from 1 to {MAX_VCPUS}"),
            ));
        }
        if !(MIN_MEMORY_MB..=MAX_MEMORY_MB).contains(&r.memory_mb) {
            return Err(FieldError::invalid(
                "config.resources.memoryMb",
                format!("memoryMb must be from {MIN_MEMORY_MB} to {MAX_MEMORY_MB}"),
            ));
        }
        if !(MIN_DISK_MB..=MAX_DISK_MB).contains(&r.disk_mb) {
            return Err(FieldError::invalid(
                "config.resources.diskMb",
                format!("diskMb must be from {MIN_DISK_MB} to {MAX_DISK_MB}"),
            ));
        }
        if !(1..=MAX_TIMEOUT_SECONDS).contains(&self.timeout_seconds) {
            return Err(FieldError::invalid(
                "config.timeoutSeconds",
                format!("timeoutSeconds must be from 1 to {MAX_TIMEOUT_SECONDS}"),
            ));
        }
        if let Some(dir) = &self.working_dir {
            let ok = dir.starts_with('/')
                && dir.len() <= MAX_PATH_LEN
                && !dir.contains('\0')
                && !dir.split('/').any(|c| c == "..");
            if !ok {
                return Err(FieldError::invalid(
                    "config.workingDir",
                    "workingDir must be an absolute path without '..'",
                ));
            }
        }
        self.network.policy()?;
        self.network.check_secret_headers()?;
        Ok(())
    }
}

/// Checks names and values of an environment map (agent `env`, run `variables` and
/// `secrets`). Names are POSIX-style; the `VM0_` prefix is reserved for the platform.
pub fn validate_env_map(env: &BTreeMap<String, String>, param: &str) -> Result<(), FieldError> {
    use limits::*;
    if env.len() > MAX_ENV_VARS {
        return Err(FieldError::invalid(
            param,
            format!("at most {MAX_ENV_VARS} entries are allowed"),
        ));
    }
    for (name, value) in env {
        let name_ok = !name.is_empty()
            && name.len() <= MAX_ENV_NAME_LEN
            && name
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !name_ok {
            return Err(FieldError::invalid(
                format!("{param}.{}", truncate_for_message(name)),
                "names must start with a letter or '_' and contain only letters, digits and '_'",
            ));
        }
        if name.to_ascii_uppercase().starts_with("VM0_") {
            return Err(FieldError::invalid(
                format!("{param}.{name}"),
                "names starting with VM0_ are reserved",
            ));
        }
        if value.len() > MAX_ENV_VALUE_LEN || value.contains('\0') {
            return Err(FieldError::invalid(
                format!("{param}.{name}"),
                format!("values must be at most {MAX_ENV_VALUE_LEN} bytes without NUL"),
            ));
        }
    }
    Ok(())
}

/// Agent names: 1–100 characters, lowercase letters, digits and hyphens, not
/// starting or ending with a hyphen.
pub fn validate_agent_name(name: &str, param: &str) -> Result<(), FieldError> {
    let ok = !name.is_empty()
        && name.len() <= limits::MAX_NAME_LEN
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(FieldError::invalid(
            param,
            format!(
                "'{}' is not a valid name: use 1-100 lowercase letters, digits and hyphens, not starting or ending with a hyphen",
                truncate_for_message(name)
            ),
        ))
    }
}

/// `POST /v1/agents`
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateAgentRequest {
    pub name: String,
    pub config: AgentConfig,
}

/// `PUT /v1/agents/:id`: replaces the config; a new version only if it changed.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateAgentRequest {
    pub config: AgentConfig,
}

/// An agent. `config` is present on create, get and update, absent in lists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Agent {
    pub id: String,
    pub name: String,
    pub current_version_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<AgentConfig>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// One saved config of an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentVersion {
    pub id: String,
    pub agent_id: String,
    pub version_number: i64,
    pub config: AgentConfig,
    pub created_at: Timestamp,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: serde_json::Value) -> AgentConfig {
        serde_json::from_value(json).expect("config parses")
    }

    #[test]
    fn defaults_fill_a_minimal_config() {
        let c = config(serde_json::json!({"command": ["echo", "hi"]}));
        assert_eq!(c.resources, Resources::default());
        assert_eq!(c.timeout_seconds, 600);
        c.validate().expect("valid");
    }

    #[test]
    fn out_of_range_values_name_their_field() {
        let cases = [
            (serde_json::json!({"command": []}), "config.command"),
            (serde_json::json!({"command": [""]}), "config.command"),
            (
                serde_json::json!({"command": ["x"], "resources": {"vcpus": 0}}),
                "config.resources.vcpus",
            ),
            (
                serde_json::json!({"command": ["x"], "resources": {"memoryMb": 1}}),
                "config.resources.memoryMb",
            ),
            (
                serde_json::json!({"command": ["x"], "timeoutSeconds": 0}),
                "config.timeoutSeconds",
            ),
            (
                serde_json::json!({"command": ["x"], "workingDir": "rel"}),
                "config.workingDir",
            ),
            (
                serde_json::json!({"command": ["x"], "env": {"1BAD": "v"}}),
                "config.env.1BAD",
            ),
            (
                serde_json::json!({"command": ["x"], "network": {"secretHeaders": {"not a host": {"X-Key": "K"}}}}),
                "config.network.secretHeaders.not a host",
            ),
            (
                serde_json::json!({"command": ["x"], "network": {"secretHeaders": {"api.test": {"Host": "K"}}}}),
                "config.network.secretHeaders.api.test.Host",
            ),
            (
                serde_json::json!({"command": ["x"], "network": {"secretHeaders": {"api.test": {"X-Key": "VM0_TOKEN"}}}}),
                "config.network.secretHeaders.api.test.X-Key",
            ),
            (
                serde_json::json!({"command": ["x"], "network": {"secretHeaders": {"api.test": {}}}}),
                "config.network.secretHeaders.api.test",
            ),
            (
                serde_json::json!({"command": ["x"], "env": {"VM0_PROMPT": "v"}}),
                "config.env.VM0_PROMPT",
            ),
            (
                serde_json::json!({"command": ["x"], "image": "Bad Image"}),
                "config.image",
            ),
        ];
        for (json, param) in cases {
            let err = config(json.clone()).validate().unwrap_err();
            assert_eq!(err.param, param, "for {json}");
        }
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let r: Result<AgentConfig, _> =
            serde_json::from_value(serde_json::json!({"command": ["x"], "comand": ["y"]}));
        assert!(r.is_err());
    }

    #[test]
    fn agent_names() {
        for ok in ["a", "my-agent", "agent-2", &"a".repeat(100)] {
            validate_agent_name(ok, "name").expect(ok);
        }
        for bad in ["", "-a", "a-", "My-Agent", "a_b", "a b", &"a".repeat(101)] {
            assert!(validate_agent_name(bad, "name").is_err(), "{bad} accepted");
        }
    }
}
