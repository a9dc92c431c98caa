//! `vm0`: the command-line entry point. `vm0 dev` runs the stack on one machine;
//! `vm0 image build` builds and names guest images for microVM workers; `vm0
//! auth` stores where the API is and its token.

mod auth;
mod dev;
mod image;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "vm0", version, about = "vm0 fleet: run AI agents in sandboxes")]
struct Cli {
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
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Build a guest image from Debian packages and the static guest agent, into
    /// the image cache, under a name runs can ask for in `config.image`.
    Build(image::BuildArgs),
}

#[tokio::main]
async fn main() -> Result<()> {
    let command = Cli::parse().command;
    let telemetry = vm0_telemetry::init(vm0_telemetry::TelemetryOptions::from_env("vm0"))?;
    let result = match command {
        Command::Dev => dev::run().await,
        Command::Auth(command) => auth::run(command).await,
        Command::Image(ImageCommand::Build(args)) => {
            tokio::task::spawn_blocking(move || image::build(args)).await?
        }
    };
    telemetry.shutdown().await;
    result
}
