//! `vm0`: the command-line entry point. `vm0 dev` runs the stack on one machine.

mod dev;

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
}

#[tokio::main]
async fn main() -> Result<()> {
    vm0_telemetry::init(vm0_telemetry::LogFormat::from_env());
    match Cli::parse().command {
        Command::Dev => dev::run().await,
    }
}
