//! `vm0 agents`: agents from `vm0.yaml` files. A `vm0.yaml` is the body of
//! `POST /v1/agents` in YAML (`name:` and `config:`); the server validates it,
//! so this CLI accepts whatever the server of the day accepts.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use reqwest::Method;
use serde::Serialize;
use vm0_api_types::agents::{Agent, AgentVersion};

use crate::api::{Api, segment};
use crate::output::Output;

#[derive(Subcommand)]
pub enum AgentsCommand {
    /// Create the agent a vm0.yaml describes, or update it (a new version only
    /// when its config changed).
    Apply(ApplyArgs),
    /// List agents.
    Ls(ListArgs),
    /// Show an agent (by name or id) with its config, as YAML.
    Get { agent: String },
    /// List an agent's versions, newest first.
    Versions(VersionsArgs),
    /// Delete an agent.
    Rm { agent: String },
}

#[derive(Args)]
pub struct ApplyArgs {
    /// The file (`-` reads stdin).
    #[arg(short, long, default_value = "vm0.yaml")]
    file: PathBuf,
}

#[derive(Args)]
pub struct ListArgs {
    /// At most this many.
    #[arg(long, default_value_t = 100)]
    limit: usize,
}

#[derive(Args)]
pub struct VersionsArgs {
    agent: String,
    #[arg(long, default_value_t = 100)]
    limit: usize,
}

/// What `apply` did, for `--json`.
#[derive(Serialize)]
struct Applied {
    action: &'static str,
    agent: Agent,
}

/// The agent named or identified by `reference`, with its config.
pub async fn resolve(api: &Api, reference: &str) -> Result<Agent> {
    if let Some(found) = find_by_name(api, reference).await? {
        return api
            .get(&format!("/v1/agents/{}", segment(&found.id)), &[])
            .await;
    }
    if reference.starts_with("ag_") {
        return api
            .get(&format!("/v1/agents/{}", segment(reference)), &[])
            .await;
    }
    bail!("no agent named {reference}")
}

async fn find_by_name(api: &Api, name: &str) -> Result<Option<Agent>> {
    if name.starts_with("ag_") {
        return Ok(None);
    }
    let page: vm0_api_types::cursor::Page<Agent> = api
        .get(
            "/v1/agents",
            &[("name", name.to_owned()), ("limit", "1".into())],
        )
        .await?;
    Ok(page.data.into_iter().next())
}

/// `vm0.yaml` as the JSON the API takes.
fn read_manifest(file: &std::path::Path) -> Result<(String, serde_json::Value)> {
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading stdin")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    let doc: serde_json::Value =
        serde_norway::from_str(&text).with_context(|| format!("{} is not YAML", file.display()))?;
    let Some(map) = doc.as_object() else {
        bail!(
            "{}: expected a mapping with name: and config:",
            file.display()
        );
    };
    if let Some(other) = map.keys().find(|k| *k != "name" && *k != "config") {
        bail!(
            "{}: unknown field {other} (a vm0.yaml has name: and config:)",
            file.display()
        );
    }
    let name = map
        .get("name")
        .and_then(|n| n.as_str())
        .with_context(|| format!("{}: name: is missing or not a string", file.display()))?
        .to_owned();
    let config = map
        .get("config")
        .cloned()
        .with_context(|| format!("{}: config: is missing", file.display()))?;
    Ok((name, config))
}

pub async fn run(command: AgentsCommand, out: Output) -> Result<()> {
    let api = Api::from_config()?;
    match command {
        AgentsCommand::Apply(args) => {
            let (name, config) = read_manifest(&args.file)?;
            let applied = apply(&api, &name, config).await?;
            if out.json {
                return out.json(&applied);
            }
            let a = &applied.agent;
            match applied.action {
                "created" => println!(
                    "created agent {} ({}), version {}",
                    a.name, a.id, a.current_version_id
                ),
                "updated" => println!(
                    "updated agent {}: new version {}",
                    a.name, a.current_version_id
                ),
                _ => println!(
                    "agent {} unchanged (version {})",
                    a.name, a.current_version_id
                ),
            }
            Ok(())
        }
        AgentsCommand::Ls(args) => {
            let agents: Vec<Agent> = api.list_all("/v1/agents", &[], args.limit).await?;
            if out.json {
                return out.json(&agents);
            }
            let rows: Vec<Vec<String>> = agents
                .iter()
                .map(|a| {
                    vec![
                        a.name.clone(),
                        a.id.clone(),
                        a.current_version_id.clone(),
                        a.updated_at.to_rfc3339(),
                    ]
                })
                .collect();
            out.table(&["NAME", "ID", "VERSION", "UPDATED"], &rows);
            Ok(())
        }
        AgentsCommand::Get { agent } => {
            let agent = resolve(&api, &agent).await?;
            if out.json {
                return out.json(&agent);
            }
            println!(
                "# {} ({}), version {}",
                agent.name, agent.id, agent.current_version_id
            );
            // `name:` first, as a vm0.yaml has it; the rest applies as is.
            println!("name: {}", agent.name);
            let config = serde_json::json!({"config": agent.config});
            print!("{}", serde_norway::to_string(&config)?);
            Ok(())
        }
        AgentsCommand::Versions(args) => {
            let agent = resolve(&api, &args.agent).await?;
            let path = format!("/v1/agents/{}/versions", segment(&agent.id));
            let versions: Vec<AgentVersion> = api.list_all(&path, &[], args.limit).await?;
            if out.json {
                return out.json(&versions);
            }
            let rows: Vec<Vec<String>> = versions
                .iter()
                .map(|v| {
                    let current = if v.id == agent.current_version_id {
                        "*"
                    } else {
                        ""
                    };
                    vec![
                        format!("{}{current}", v.version_number),
                        v.id.clone(),
                        v.created_at.to_rfc3339(),
                    ]
                })
                .collect();
            out.table(&["VERSION", "ID", "CREATED"], &rows);
            Ok(())
        }
        AgentsCommand::Rm { agent } => {
            let agent = resolve(&api, &agent).await?;
            api.delete(&format!("/v1/agents/{}", segment(&agent.id)))
                .await?;
            if out.json {
                return out.json(&serde_json::json!({"deleted": agent.id}));
            }
            println!("deleted agent {} ({})", agent.name, agent.id);
            Ok(())
        }
    }
}

async fn apply(api: &Api, name: &str, config: serde_json::Value) -> Result<Applied> {
    let existing = match find_by_name(api, name).await? {
        Some(agent) => agent,
        None => {
            let body = serde_json::json!({"name": name, "config": &config});
            match api
                .send_json::<Agent>(Method::POST, "/v1/agents", &body)
                .await
            {
                Ok(agent) => {
                    return Ok(Applied {
                        action: "created",
                        agent,
                    });
                }
                // Created meanwhile by someone else: update it instead.
                Err(e) if e.to_string().contains("resource_already_exists") => {
                    find_by_name(api, name)
                        .await?
                        .with_context(|| format!("agent {name} exists and cannot be found"))?
                }
                Err(e) => return Err(e.context(format!("creating agent {name}"))),
            }
        }
    };
    let body = serde_json::json!({"config": config});
    let agent: Agent = api
        .send_json(
            Method::PUT,
            &format!("/v1/agents/{}", segment(&existing.id)),
            &body,
        )
        .await
        .with_context(|| format!("updating agent {name}"))?;
    let action = if agent.current_version_id == existing.current_version_id {
        "unchanged"
    } else {
        "updated"
    };
    Ok(Applied { action, agent })
}
