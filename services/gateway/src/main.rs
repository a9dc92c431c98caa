//! `vm0-gateway`: serves the API; the operator's commands mint and revoke API
//! tokens and worker credentials, and make TLS and NATS configuration for a fleet.

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
    /// Manage worker credentials: one per worker, fixing its identity.
    WorkerToken {
        #[command(subcommand)]
        action: WorkerTokenAction,
    },
    /// TLS certificates for the control plane (and NATS) from a private CA.
    Tls {
        #[command(subcommand)]
        action: TlsAction,
    },
    /// Write a nats-server configuration with the gateway and worker users
    /// (bcrypt passwords, subject permissions) and print their credentials.
    NatsConfig {
        /// The file to write (it is created; an existing file is not touched).
        #[arg(long)]
        out: std::path::PathBuf,
        /// The server's TLS certificate and key (PEM), e.g. from `tls create`.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<std::path::PathBuf>,
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<std::path::PathBuf>,
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
    /// Revoke a token of any organization, and every token it created.
    Revoke {
        /// The token's id (`tok_...`).
        id: String,
    },
}

#[derive(Subcommand)]
enum WorkerTokenAction {
    /// Mint a credential for worker NAME (its VM0_WORKER_TOKEN); printed once.
    Create {
        /// The worker's id in runs and logs: 1-128 characters of [A-Za-z0-9-_.].
        #[arg(long)]
        name: String,
    },
    /// List credentials (never the secrets).
    List,
    /// Revoke worker NAME's credential: it can no longer claim, report or finish.
    Revoke {
        #[arg(long)]
        name: String,
    },
}

#[derive(Subcommand)]
enum TlsAction {
    /// Make a server certificate for HOSTs, signed by the CA in DIR (made there
    /// first if DIR has none): DIR/ca.pem (give it to clients), DIR/ca.key (keep
    /// it offline), DIR/NAME.pem and DIR/NAME.key (the server's).
    Create {
        #[arg(long)]
        dir: std::path::PathBuf,
        /// DNS names or IP addresses clients reach the server by.
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        /// File name of the certificate and key.
        #[arg(long, default_value = "gateway")]
        name: String,
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
            println!(
                "{}",
                serde_json::to_string_pretty(&vm0_gateway::openapi::document(
                    &config.storage.limits
                ))?
            );
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
            let expires_at = expires_in_days.map(|d| routes::tokens::days_from(now, d));
            let created =
                routes::tokens::create_token(&store, &org.id, &name, expires_at, None).await?;
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
        Command::Token {
            action: TokenAction::Revoke { id },
        } => {
            let store = open_store(&config).await?;
            let token = store
                .find_token_by_id(&id)
                .await?
                .filter(|t| t.revoked_at.is_none())
                .with_context(|| format!("no live token {id}"))?;
            let revoked = store
                .revoke_token(&token.org_id, &id, vm0_api_types::Timestamp::now().micros())
                .await?;
            eprintln!(
                "revoked {} (and {} token(s) it created); gateways stop accepting them within VM0_AUTH_CACHE_SECS",
                id,
                revoked.len().saturating_sub(1)
            );
            Ok(())
        }
        Command::WorkerToken { action } => worker_token(&config, action).await,
        Command::Tls {
            action: TlsAction::Create { dir, hosts, name },
        } => {
            let ca = vm0_tls::authority_in(&dir, "vm0 fleet CA")?;
            let cert = ca.server(&hosts)?;
            vm0_tls::write_set(&dir, &ca, &name, &cert)?;
            eprintln!(
                "wrote {0}/{1}.pem and {0}/{1}.key for {2}, signed by {0}/ca.pem",
                dir.display(),
                name,
                hosts.join(", ")
            );
            Ok(())
        }
        Command::NatsConfig {
            out,
            tls_cert,
            tls_key,
        } => nats_config(&out, tls_cert.as_deref().zip(tls_key.as_deref())),
    }
}

async fn worker_token(config: &GatewayConfig, action: WorkerTokenAction) -> Result<()> {
    use vm0_gateway::worker_auth;
    let store = open_store(config).await?;
    let now = vm0_api_types::Timestamp::now().micros();
    match action {
        WorkerTokenAction::Create { name } => {
            anyhow::ensure!(
                worker_auth::valid_name(&name),
                "--name must be 1-128 characters of [A-Za-z0-9-_.]"
            );
            let (secret, hash) = worker_auth::mint();
            store
                .insert_worker_credential(&name, &hash, now)
                .await
                .map_err(|e| match e {
                    vm0_db::StoreError::NameTaken(_) => anyhow::anyhow!(
                        "worker {name} has a live credential; revoke it first \
                         (vm0-gateway worker-token revoke --name {name})"
                    ),
                    other => other.into(),
                })?;
            println!("{secret}");
            eprintln!("created the credential of worker {name}: give it as VM0_WORKER_TOKEN");
        }
        WorkerTokenAction::List => {
            for c in store.list_worker_credentials().await? {
                let state = match c.revoked_at {
                    Some(at) => format!("revoked {}", vm0_api_types::Timestamp(at).to_rfc3339()),
                    None => "live".into(),
                };
                println!(
                    "{}\t{}\tcreated {}",
                    c.name,
                    state,
                    vm0_api_types::Timestamp(c.created_at).to_rfc3339()
                );
            }
        }
        WorkerTokenAction::Revoke { name } => {
            anyhow::ensure!(
                store.revoke_worker_credential(&name, now).await?,
                "worker {name} has no live credential"
            );
            eprintln!(
                "revoked worker {name}'s credential; gateways refuse it within {} s, and its runs end when it is declared lost",
                worker_auth::CACHE_TTL.as_secs()
            );
        }
    }
    Ok(())
}

fn nats_config(
    out: &std::path::Path,
    tls: Option<(&std::path::Path, &std::path::Path)>,
) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    use vm0_bus::auth::{PasswordForm, authorization_block};
    use vm0_bus::{Credentials, Role};
    let (gateway, worker) = (
        Credentials::generate(Role::Gateway),
        Credentials::generate(Role::Worker),
    );
    let mut text = String::from(
        "# nats-server configuration from `vm0-gateway nats-config`: vm0's two users,\n\
         # each allowed only the subjects it needs. Add cluster and jetstream settings.\n",
    );
    text.push_str(&authorization_block(
        &[(Role::Gateway, &gateway), (Role::Worker, &worker)],
        PasswordForm::Bcrypt,
    )?);
    if let Some((cert, key)) = tls {
        text.push_str(&format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n}}\n",
            cert.display().to_string(),
            key.display().to_string()
        ));
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("writing {}", out.display()))?;
    println!("# gateways");
    println!("VM0_NATS_USER={}", gateway.user);
    println!("VM0_NATS_PASSWORD={}", gateway.password);
    println!("# workers");
    println!("VM0_NATS_USER={}", worker.user);
    println!("VM0_NATS_PASSWORD={}", worker.password);
    eprintln!(
        "wrote {} (passwords bcrypt-hashed); the passwords above are shown once",
        out.display()
    );
    Ok(())
}

async fn serve(config: GatewayConfig) -> Result<()> {
    let secrets = vm0_gateway::secrets::SecretBox::from_env_or_file(&config.data_dir)?;
    if let Some(d) = &config.dispatch
        && d.nats.credentials.is_none()
    {
        tracing::warn!(
            "VM0_NATS_USER is not set: connecting to NATS without a user (vm0-gateway nats-config makes a server configuration with users)"
        );
    }
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
