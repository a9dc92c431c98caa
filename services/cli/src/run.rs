//! `vm0 run AGENT "prompt"`: creates a run (`POST /v1/runs`) and, with
//! `--follow`, streams it to the end and exits with its outcome.

use std::collections::BTreeMap;
use std::io::Read;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use reqwest::Method;
use vm0_api_types::runs::Run;

use crate::api::Api;
use crate::follow::Follow;
use crate::output::Output;

#[derive(Args)]
#[command(
    after_help = "Exit codes with --follow: 0 completed, 3 failed, 4 timeout, 5 cancelled, \
1 when the CLI itself failed (API errors, the API unreachable), 2 bad usage, 130 when following \
stopped on a second Ctrl-C."
)]
pub struct RunArgs {
    /// AGENT PROMPT, or only PROMPT with --session or --checkpoint. A prompt
    /// of `-` is read from stdin.
    #[arg(num_args = 1..=2, value_names = ["AGENT", "PROMPT"], required = true)]
    words: Vec<String>,
    /// An environment variable of the run: K=V (repeatable).
    #[arg(long = "var", value_name = "K=V")]
    vars: Vec<String>,
    /// A secret: K=V, or K alone to take the value of K from this environment
    /// (keeps it out of shell history and process lists).
    #[arg(long = "secret", value_name = "K[=V]")]
    secrets: Vec<String>,
    /// A volume to mount at /volumes/NAME: NAME or NAME:VERSION (repeatable).
    #[arg(long = "volume", value_name = "NAME[:VERSION]")]
    volumes: Vec<String>,
    /// The artifact whose version the run starts from in /work and commits to.
    #[arg(long, value_name = "NAME[:VERSION]")]
    artifact: Option<String>,
    /// The agent version: `latest`, a version id or a number.
    #[arg(long)]
    agent_version: Option<String>,
    /// Continue this session (`sess_…`).
    #[arg(long, conflicts_with = "checkpoint")]
    session: Option<String>,
    /// Start again from this checkpoint (`chk_…`).
    #[arg(long)]
    checkpoint: Option<String>,
    /// Stream the run's output until it ends; the exit code is its outcome.
    #[arg(short, long)]
    follow: bool,
}

/// `K=V` into its halves, naming the flag when it is not one.
fn pair(raw: &str, flag: &str) -> Result<(String, String)> {
    match raw.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => bail!("{flag} {raw}: expected K=V"),
    }
}

/// `NAME[:VERSION]`.
fn named_version(raw: &str) -> (String, Option<String>) {
    match raw.split_once(':') {
        Some((name, version)) => (name.to_owned(), Some(version.to_owned())),
        None => (raw.to_owned(), None),
    }
}

impl RunArgs {
    fn body(&self) -> Result<serde_json::Value> {
        let target_given = self.session.is_some() || self.checkpoint.is_some();
        let (agent, prompt) = match (self.words.as_slice(), target_given) {
            ([prompt], true) => (None, prompt.clone()),
            ([agent, prompt], false) => (Some(agent.clone()), prompt.clone()),
            ([_], false) => bail!("give the agent and the prompt: vm0 run AGENT \"prompt\""),
            (_, true) => bail!("with --session or --checkpoint, give only the prompt"),
            _ => bail!("give the agent and the prompt: vm0 run AGENT \"prompt\""),
        };
        let prompt = if prompt == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading the prompt from stdin")?;
            text
        } else {
            prompt
        };
        let mut body = serde_json::json!({"prompt": prompt});
        if let Some(agent) = agent {
            // An id (`ag_…`) or a name.
            let field = if agent.starts_with("ag_") {
                "agentId"
            } else {
                "agent"
            };
            body[field] = agent.into();
        }
        if let Some(session) = &self.session {
            body["sessionId"] = session.clone().into();
        }
        if let Some(checkpoint) = &self.checkpoint {
            body["checkpointId"] = checkpoint.clone().into();
        }
        if let Some(version) = &self.agent_version {
            body["agentVersion"] = version.clone().into();
        }
        if !self.vars.is_empty() {
            let vars: BTreeMap<String, String> = self
                .vars
                .iter()
                .map(|v| pair(v, "--var"))
                .collect::<Result<_>>()?;
            body["variables"] = serde_json::to_value(vars)?;
        }
        if !self.secrets.is_empty() {
            let mut secrets = BTreeMap::new();
            for raw in &self.secrets {
                let (k, v) = match raw.split_once('=') {
                    Some(_) => pair(raw, "--secret")?,
                    None => {
                        let v = std::env::var(raw).with_context(|| {
                            format!("--secret {raw}: {raw} is not set in this environment")
                        })?;
                        (raw.clone(), v)
                    }
                };
                secrets.insert(k, v);
            }
            body["secrets"] = serde_json::to_value(secrets)?;
        }
        if !self.volumes.is_empty() {
            let volumes: BTreeMap<String, String> = self
                .volumes
                .iter()
                .map(|raw| {
                    let (name, version) = named_version(raw);
                    (name, version.unwrap_or_else(|| "latest".into()))
                })
                .collect();
            body["volumes"] = serde_json::to_value(volumes)?;
        }
        if let Some(raw) = &self.artifact {
            let (name, version) = named_version(raw);
            body["artifactName"] = name.into();
            if let Some(version) = version {
                body["artifactVersion"] = version.into();
            }
        }
        Ok(body)
    }
}

pub async fn run(args: RunArgs, out: Output) -> Result<ExitCode> {
    let body = args.body()?;
    let api = Api::from_config()?;
    let run: Run = api
        .send_json(Method::POST, "/v1/runs", &body)
        .await
        .context("creating the run")?;
    if !args.follow {
        if out.json {
            out.json(&run)?;
        } else {
            println!("{}", run.id);
            eprintln!(
                "run {} {} (session {}); follow it with: vm0 runs events {}",
                run.id,
                out.status(run.status),
                run.session_id,
                run.id
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    if !out.json {
        eprintln!(
            "{}",
            out.paint(
                &format!(
                    "run {} of {} (session {})",
                    run.id, run.agent_name, run.session_id
                ),
                "2"
            )
        );
    }
    Follow {
        api: &api,
        run_id: run.id,
        out,
        after: None,
        verbose: false,
    }
    .run()
    .await
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: super::RunArgs,
    }

    fn body(args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut argv = vec!["run"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv)?.run.body()
    }

    #[test]
    fn flags_become_the_api_body() {
        let b = body(&[
            "coder",
            "fix it",
            "--var",
            "A=1",
            "--var",
            "B=x=y",
            "--volume",
            "data",
            "--volume",
            "cfg:abcdef12",
            "--artifact",
            "out:latest",
            "--secret",
            "TOKEN=s3cr3t",
        ])
        .expect("body");
        assert_eq!(
            b,
            serde_json::json!({
                "agent": "coder", "prompt": "fix it",
                "variables": {"A": "1", "B": "x=y"},
                "volumes": {"data": "latest", "cfg": "abcdef12"},
                "artifactName": "out", "artifactVersion": "latest",
                "secrets": {"TOKEN": "s3cr3t"}
            })
        );
        let b = body(&["--session", "sess_1", "again"]).expect("body");
        assert_eq!(
            b,
            serde_json::json!({"sessionId": "sess_1", "prompt": "again"})
        );
        assert!(body(&["only-a-prompt"]).is_err());
        assert!(body(&["a", "p", "--var", "=x"]).is_err());
        assert!(body(&["a", "p", "--secret", "VM0_CLI_TEST_SURELY_UNSET"]).is_err());
        assert!(body(&["p", "--session", "s", "--checkpoint", "c"]).is_err());
    }
}
