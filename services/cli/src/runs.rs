//! `vm0 runs`: list, inspect, cancel, and read what runs left behind (logs,
//! events, metrics).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use reqwest::Method;
use vm0_api_types::Timestamp;
use vm0_api_types::cursor::Page;
use vm0_api_types::runs::{LogEntry, MetricSample, MetricsResponse, Run};

use crate::api::{Api, segment};
use crate::follow::Follow;
use crate::output::{Output, bytes, or_dash};

#[derive(Subcommand)]
pub enum RunsCommand {
    /// List runs, newest first.
    Ls(ListArgs),
    /// Show a run.
    Get { run: String },
    /// Cancel a pending or running run.
    Cancel { run: String },
    /// A run's logs (agent, system and network lines).
    Logs(LogsArgs),
    /// A run's events from the start (or after --after), until it ends; the
    /// exit code is its outcome, as with `vm0 run --follow`.
    Events(EventsArgs),
    /// A run's resource samples and their summary.
    Metrics(MetricsArgs),
}

#[derive(Args)]
pub struct ListArgs {
    /// pending, running, completed, failed, timeout or cancelled.
    #[arg(long)]
    status: Option<String>,
    /// Only runs of this agent (name or id).
    #[arg(long)]
    agent: Option<String>,
    /// Created at or after: an RFC 3339 time, or an age such as 30m, 2h, 7d.
    #[arg(long)]
    since: Option<String>,
    #[arg(long, default_value_t = 20)]
    limit: usize,
}

#[derive(Args)]
pub struct LogsArgs {
    run: String,
    /// agent, system or network.
    #[arg(long = "type")]
    log_type: Option<String>,
    /// debug, info, warn or error.
    #[arg(long)]
    level: Option<String>,
    /// Keep printing new lines until the run ends.
    #[arg(short, long)]
    follow: bool,
}

#[derive(Args)]
pub struct EventsArgs {
    run: String,
    /// Start after this event id (`evt_N`).
    #[arg(long)]
    after: Option<String>,
}

#[derive(Args)]
pub struct MetricsArgs {
    run: String,
    /// Also draw cpu, memory and network over the run into this PNG file.
    #[arg(long, value_name = "FILE.png")]
    plot: Option<PathBuf>,
}

/// `30m`, `2h`, `7d`, `45s`, or an RFC 3339 time, as RFC 3339.
pub fn since(raw: &str) -> Result<String> {
    if Timestamp::parse(raw).is_some() {
        return Ok(raw.to_owned());
    }
    let (digits, unit) = raw.split_at(raw.len().saturating_sub(1));
    let n: i64 = digits.parse().ok().filter(|n| *n >= 0).with_context(|| {
        format!("--since {raw}: expected an RFC 3339 time or an age such as 30m, 2h, 7d")
    })?;
    let seconds = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => bail!("--since {raw}: an age ends in s, m, h or d"),
    };
    Ok(Timestamp(Timestamp::now().micros() - seconds.saturating_mul(1_000_000)).to_rfc3339())
}

fn duration(run: &Run) -> String {
    match run.execution_time_ms {
        Some(ms) => format!("{:.1}s", ms as f64 / 1000.0),
        None => "-".into(),
    }
}

fn run_path(run: &str, rest: &str) -> String {
    format!("/v1/runs/{}{rest}", segment(run))
}

pub async fn run(command: RunsCommand, out: Output) -> Result<ExitCode> {
    let api = Api::from_config()?;
    match command {
        RunsCommand::Ls(args) => {
            let mut query = Vec::new();
            if let Some(status) = args.status {
                query.push(("status", status));
            }
            if let Some(agent) = args.agent {
                let agent = crate::agents::resolve(&api, &agent).await?;
                query.push(("agentId", agent.id));
            }
            if let Some(raw) = args.since {
                query.push(("since", since(&raw)?));
            }
            let runs: Vec<Run> = api.list_all("/v1/runs", &query, args.limit).await?;
            if out.json {
                out.json(&runs)?;
            } else {
                let rows: Vec<Vec<String>> = runs
                    .iter()
                    .map(|r| {
                        vec![
                            r.id.clone(),
                            r.agent_name.clone(),
                            out.status(r.status),
                            r.created_at.to_rfc3339(),
                            duration(r),
                        ]
                    })
                    .collect();
                out.table(&["ID", "AGENT", "STATUS", "CREATED", "TIME"], &rows);
            }
        }
        RunsCommand::Get { run } => {
            let run: Run = api.get(&run_path(&run, ""), &[]).await?;
            if out.json {
                out.json(&run)?;
            } else {
                print_run(&run, out);
            }
        }
        RunsCommand::Cancel { run } => {
            let run: Run = api
                .send(api.request(Method::POST, &run_path(&run, "/cancel")))
                .await
                .map(crate::api::decode)?
                .await?;
            if out.json {
                out.json(&run)?;
            } else {
                println!("run {} {}", run.id, out.status(run.status));
            }
        }
        RunsCommand::Logs(args) => logs(&api, args, out).await?,
        RunsCommand::Events(args) => {
            return Follow {
                api: &api,
                run_id: args.run,
                out,
                after: args.after,
                verbose: true,
            }
            .run()
            .await;
        }
        RunsCommand::Metrics(args) => {
            let (samples, summary) = metrics(&api, &args.run).await?;
            if let Some(file) = &args.plot {
                crate::plot::draw(file, &args.run, &samples)?;
                if !out.json {
                    eprintln!("drew {} samples into {}", samples.len(), file.display());
                }
            }
            if out.json {
                out.json(&serde_json::json!({"data": samples, "summary": summary}))?;
            } else {
                println!(
                    "{} samples over {:.1} s: cpu avg {:.1}%, memory max {}, network rx {} tx {}",
                    summary.sample_count,
                    summary.total_duration_ms as f64 / 1000.0,
                    summary.avg_cpu_percent,
                    bytes(summary.memory_max_bytes),
                    bytes(summary.network_rx_bytes),
                    bytes(summary.network_tx_bytes)
                );
                let rows: Vec<Vec<String>> = samples
                    .iter()
                    .map(|s| {
                        vec![
                            s.timestamp.to_rfc3339(),
                            format!("{:.1}", s.cpu_percent),
                            bytes(s.memory_bytes),
                            bytes(s.network_rx_bytes),
                            bytes(s.network_tx_bytes),
                        ]
                    })
                    .collect();
                out.table(&["TIME", "CPU%", "MEMORY", "RX", "TX"], &rows);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_run(run: &Run, out: Output) {
    let field = |name: &str, value: String| println!("{:<14}{value}", format!("{name}:"));
    field("id", run.id.clone());
    field("agent", format!("{} ({})", run.agent_name, run.agent_id));
    field("version", run.agent_version_id.clone());
    field("status", out.status(run.status));
    if let Some(error) = &run.error {
        field("error", error.clone());
    }
    field("session", run.session_id.clone());
    field("checkpoint", or_dash(run.checkpoint_id.as_ref()));
    field("created", run.created_at.to_rfc3339());
    field("started", or_dash(run.started_at.map(|t| t.to_rfc3339())));
    field(
        "completed",
        or_dash(run.completed_at.map(|t| t.to_rfc3339())),
    );
    field("time", duration(run));
    if let Some(name) = &run.artifact_name {
        field(
            "artifact",
            format!("{name}:{}", or_dash(run.artifact_version.as_ref())),
        );
    }
    for (name, version) in &run.volumes {
        field("volume", format!("{name}:{version}"));
    }
    field("prompt", run.prompt.clone());
}

/// Every sample of the run, in time order, and the summary.
async fn metrics(
    api: &Api,
    run: &str,
) -> Result<(Vec<MetricSample>, vm0_api_types::runs::MetricsSummary)> {
    let path = run_path(run, "/metrics");
    let mut samples = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut query = vec![("limit", "100".to_owned())];
        if let Some(c) = &cursor {
            query.push(("cursor", c.clone()));
        }
        let page: MetricsResponse = api.get(&path, &query).await?;
        samples.extend(page.data);
        match page.pagination.next_cursor {
            Some(next) if page.pagination.has_more => cursor = Some(next),
            _ => return Ok((samples, page.summary)),
        }
    }
}

async fn logs(api: &Api, args: LogsArgs, out: Output) -> Result<()> {
    let path = run_path(&args.run, "/logs");
    let mut base = Vec::new();
    if let Some(t) = &args.log_type {
        base.push(("type", t.clone()));
    }
    if let Some(l) = &args.level {
        base.push(("level", l.clone()));
    }
    // Following polls with `since` (inclusive, millisecond precision): lines
    // of the last millisecond already printed are skipped by count.
    let mut last: Option<(String, usize)> = None;
    let mut ended_polls = 0;
    loop {
        let mut query = base.clone();
        if let Some((ts, _)) = &last {
            query.push(("since", ts.clone()));
        }
        let mut skip = last.as_ref().map_or(0, |(_, n)| *n);
        let mut cursor: Option<String> = None;
        loop {
            let mut q = query.clone();
            q.push(("limit", "100".into()));
            if let Some(c) = &cursor {
                q.push(("cursor", c.clone()));
            }
            let page: Page<LogEntry> = api.get(&path, &q).await?;
            for entry in &page.data {
                let ts = entry.timestamp.to_rfc3339();
                if let Some((last_ts, _)) = &last
                    && ts == *last_ts
                    && skip > 0
                {
                    skip -= 1;
                    continue;
                }
                skip = 0;
                print_log(entry, out)?;
                match &mut last {
                    Some((last_ts, n)) if *last_ts == ts => *n += 1,
                    _ => last = Some((ts, 1)),
                }
            }
            match page.pagination.next_cursor {
                Some(next) if page.pagination.has_more => cursor = Some(next),
                _ => break,
            }
        }
        if !args.follow {
            return Ok(());
        }
        // One more poll after the run ended: lines still on their way land.
        let run: Run = api.get(&run_path(&args.run, ""), &[]).await?;
        if run.status.is_terminal() {
            ended_polls += 1;
            if ended_polls > 1 {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn print_log(entry: &LogEntry, out: Output) -> Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if out.json {
        writeln!(stdout, "{}", serde_json::to_string(entry)?)?;
    } else {
        let level = entry.level.as_str();
        let painted = match level {
            "error" => out.paint(level, "31"),
            "warn" => out.paint(level, "33"),
            _ => out.paint(level, "2"),
        };
        writeln!(
            stdout,
            "{} {:<7} {painted:<5} {}",
            entry.timestamp.to_rfc3339(),
            entry.log_type.as_str(),
            entry.message.trim_end_matches(['\n', '\r'])
        )?;
    }
    stdout.flush()?;
    Ok(())
}
