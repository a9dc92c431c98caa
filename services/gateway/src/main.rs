//! `vm0-gateway`: serves the API, or mints tokens (`vm0-gateway token create`).

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use vm0_gateway::{GatewayConfig, open_store, routes};
use vm0_telemetry::TelemetryOptions;

#[derive(Parser)]
#[command(
    name = "vm0-gateway",
    version,
    about = "vm0 gateway: the VM0 v1 REST API"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API (the default). Configured by VM0_HTTP_ADDR, VM0_DATA_DIR, DATABASE_URL.
    Serve,
    /// Manage API tokens.
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Print the OpenAPI document.
    Openapi,
}

#[derive(Subcommand)]
enum TokenAction {
    /// Create a token for an organization (created if new); prints the token once.
    Create {
        /// Organization (tenant) name.
        #[arg(long)]
        org: String,
        /// Label shown in token listings.
        #[arg(long, default_value = "admin")]
        name: String,
        /// Lifetime in days; no expiry when absent.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=3650))]
        expires_in_days: Option<u32>,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let telemetry = vm0_telemetry::init(TelemetryOptions::from_env("vm0-gateway"))?;
    let result = run(cli).await;
    telemetry.shutdown().await;
    result
}

async fn run(cli: Cli) -> Result<()> {
    let config = GatewayConfig::from_env()?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(config).await,
        Command::Migrate => {
            open_store(&config).await?;
            eprintln!("migrations applied");
            Ok(())
        }
        Command::Openapi => {
            println!("{}", vm0_gateway::openapi::document().to_pretty_json()?);
            Ok(())
        }
        Command::Token {
            action:
                TokenAction::Create {
                    org,
                    name,
                    expires_in_days,
                },
        } => {
            anyhow::ensure!(!org.trim().is_empty(), "--org must not be empty");
            let store = open_store(&config).await?;
            let now = vm0_api_types::Timestamp::now().micros();
            let org = store.ensure_organization(&org, now).await?;
            let created =
                routes::tokens::create_token(&store, &org.id, &name, expires_in_days).await?;
            // The token goes to stdout alone, so `$(vm0-gateway token create ...)` works.
            println!("{}", created.token);
            eprintln!(
                "created token {} for organization {}{}",
                created.token_info.id,
                org.name,
                created
                    .token_info
                    .expires_at
                    .map(|t| format!(", expires {}", t.to_rfc3339()))
                    .unwrap_or_default()
            );
            Ok(())
        }
    }
}

async fn serve(config: GatewayConfig) -> Result<()> {
    let secrets = vm0_gateway::secrets::SecretBox::from_env_or_file(&config.data_dir)?;
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("binding {}", config.http_addr))?;
    let grpc = match &config.dispatch {
        Some(d) => Some(
            tokio::net::TcpListener::bind(d.grpc_addr)
                .await
                .with_context(|| format!("binding {}", d.grpc_addr))?,
        ),
        None => {
            tracing::warn!(
                "VM0_NATS_URL is not set: runs are stored but not dispatched to workers"
            );
            None
        }
    };
    let addr = listener.local_addr()?;
    let gateway = vm0_gateway::Gateway::open(config, secrets).await?;
    tracing::info!(%addr, database = %vm0_db::store::redact_url(&gateway.config.database_url), "gateway listening");
    let shutdown = CancellationToken::new();
    tokio::spawn(wait_for_signal(shutdown.clone()));
    gateway.serve(listener, grpc, shutdown).await?;
    tracing::info!("gateway stopped");
    Ok(())
}

async fn wait_for_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}
