//! `vm0`: the command-line client of the API (`auth`, `agents`, `run`, `runs`,
//! `volumes`, `artifacts`), and `vm0 dev`, which runs the whole stack on one
//! machine, and `vm0 image build`, which builds guest images for microVM workers.
//! Everything but `dev` and `image` goes through the REST API only.

mod agents;
mod api;
mod auth;
mod dev;
mod follow;
mod image;
mod output;
mod plot;
mod run;
mod runs;
mod storage;

use std::process::ExitCode;

use anyhow::Result;
use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "vm0", version, about = "vm0 fleet: run AI agents in sandboxes")]
struct Cli {
    /// Print JSON for scripts instead of tables (every command).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole stack locally (SQLite, local data dir) and print the URL and an
    /// API key. Honours VM0_HTTP_ADDR, VM0_DATA_DIR and VM0_BOOTSTRAP_API_KEY.
    Dev,
    /// Guest images for the microVM backends.
    #[command(subcommand)]
    Image(ImageCommand),
    /// The API's URL and token: log in, print the token, log out.
    #[command(subcommand)]
    Auth(auth::AuthCommand),
    /// Agents: apply a vm0.yaml, list, show, versions.
    #[command(subcommand)]
    Agents(agents::AgentsCommand),
    /// Start a run of an agent; --follow streams it and exits with its outcome.
    Run(run::RunArgs),
    /// Runs: list, show, cancel, logs, events, metrics.
    #[command(subcommand)]
    Runs(runs::RunsCommand),
    /// Volumes (a run's inputs): push a directory, pull a version.
    #[command(subcommand)]
    Volumes(storage::StorageCommand),
    /// Artifacts (a run's /work): push a directory, pull a version.
    #[command(subcommand)]
    Artifacts(storage::StorageCommand),
    /// Print a shell completion script: `vm0 completion bash > /etc/bash_completion.d/vm0`.
    Completion { shell: clap_complete::Shell },
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Build a guest image from Debian packages and the static guest agent, into
    /// the image cache, under a name runs can ask for in `config.image`.
    Build(image::BuildArgs),
}

async fn dispatch(command: Command, out: output::Output) -> Result<ExitCode> {
    let done = |r: Result<()>| r.map(|()| ExitCode::SUCCESS);
    match command {
        Command::Dev => done(dev::run().await),
        Command::Auth(command) => done(auth::run(command).await),
        Command::Agents(command) => done(agents::run(command, out).await),
        Command::Run(args) => run::run(args, out).await,
        Command::Runs(command) => runs::run(command, out).await,
        Command::Volumes(command) => done(storage::run(storage::VOLUMES, command, out).await),
        Command::Artifacts(command) => done(storage::run(storage::ARTIFACTS, command, out).await),
        Command::Completion { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "vm0", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Image(ImageCommand::Build(args)) => {
            done(tokio::task::spawn_blocking(move || image::build(args)).await?)
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let out = output::Output::new(cli.json);
    let telemetry = match vm0_telemetry::init(vm0_telemetry::TelemetryOptions::from_env("vm0")) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(follow::exit::ERROR);
        }
    };
    let result = dispatch(cli.command, out).await;
    telemetry.shutdown().await;
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(follow::exit::ERROR)
        }
    }
}
