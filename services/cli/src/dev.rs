//! `vm0 dev`: the whole stack on one machine. A nats-server (JetStream, data under
//! the data dir), one gateway (SQLite under the data dir) and one worker in this
//! process, a bootstrap API key and an example agent. Ctrl-C stops everything:
//! the worker drains, the gateway stops, nats-server is terminated.
//!
//! It is set up as a fleet is: nats-server has the gateway's and the worker's
//! users with fresh passwords (no anonymous access), the control plane speaks TLS
//! with a certificate from a CA under the data dir, and the worker has a
//! credential of its own (`dev`, minted at every start).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;
use vm0_api_types::Timestamp;
use vm0_api_types::agents::AgentConfig;
use vm0_api_types::tokens::{display_prefix, is_token};
use vm0_bus::server::NatsServer;
use vm0_bus::{NatsOptions, Role};
use vm0_db::Store;
use vm0_gateway::config::{DispatchConfig, GrpcTls};
use vm0_gateway::{GatewayConfig, auth, routes};

/// Organization that owns what `vm0 dev` creates.
const DEV_ORG: &str = "default";
const EXAMPLE_AGENT: &str = "example";
/// The worker's name (and credential) in `vm0 dev`.
const DEV_WORKER: &str = "dev";

pub async fn run() -> Result<()> {
    let mut config = GatewayConfig::from_env()?;
    // One process: the gateway's metrics are on the API port (the worker takes
    // a port of its own below).
    config.metrics_addr = None;
    std::fs::create_dir_all(&config.data_dir)?;
    let data_dir = std::fs::canonicalize(&config.data_dir)?;
    let shutdown = CancellationToken::new();

    // NATS: the one given (its VM0_NATS_USER serves both roles), or our own.
    let (gateway_nats, worker_nats, nats) = match std::env::var("VM0_NATS_URL") {
        Ok(url) => {
            let options = NatsOptions::new(url)
                .with_env()
                .map_err(anyhow::Error::msg)?;
            (options.clone(), options, None)
        }
        Err(_) => {
            let server = start_nats(&data_dir).await?;
            (
                server.options(Role::Gateway),
                server.options(Role::Worker),
                Some(server),
            )
        }
    };
    let grpc_addr: SocketAddr = match std::env::var("VM0_GRPC_ADDR") {
        Ok(a) => a.parse().context("VM0_GRPC_ADDR")?,
        Err(_) => SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    let tls_dir = data_dir.join("tls");
    let mut dispatch = DispatchConfig::new(gateway_nats);
    dispatch.grpc_addr = grpc_addr;
    dispatch.grpc_tls = Some(GrpcTls::local(&tls_dir)?);
    config.dispatch = Some(dispatch);

    let secrets = vm0_gateway::secrets::SecretBox::from_env_or_file(&data_dir)?;
    let gateway = vm0_gateway::Gateway::open(config, secrets).await?;
    let store = gateway.store.clone();
    let org = store
        .ensure_organization(DEV_ORG, Timestamp::now().micros())
        .await?;
    let api_key = bootstrap_key(&store, &org.id).await?;
    ensure_example_agent(&store, &org.id).await?;
    // A fresh credential for this run's worker; the last run's is revoked.
    store
        .revoke_worker_credential(DEV_WORKER, Timestamp::now().micros())
        .await?;
    let worker_token = vm0_gateway::worker_auth::create_credential(&store, DEV_WORKER).await?;

    let http_addr = gateway.config.http_addr;
    let http = tokio::net::TcpListener::bind(http_addr)
        .await
        .with_context(|| {
            format!("binding {http_addr} (set VM0_HTTP_ADDR to use another address)")
        })?;
    let grpc = tokio::net::TcpListener::bind(grpc_addr).await?;
    let addr = http.local_addr()?;
    // By name, as the certificate says; the port is what the listener got.
    let control_plane = format!("https://127.0.0.1:{}", grpc.local_addr()?.port());
    let server = tokio::spawn(gateway.serve(http, Some(grpc), shutdown.clone()));

    // The gateway's metrics on the API port; the worker's on a port of its own.
    let worker_metrics = std::net::TcpListener::bind(("127.0.0.1", 0))?.local_addr()?;
    let worker_config = vm0_worker::WorkerConfig {
        worker_id: DEV_WORKER.into(),
        nats: worker_nats,
        control_plane_url: control_plane,
        control_plane_ca: Some(tls_dir.join("ca.pem")),
        worker_token,
        data_dir: data_dir.clone(),
        drain_timeout: Duration::from_secs(10),
        metrics_addr: Some(worker_metrics),
        ..vm0_worker::WorkerConfig::defaults().apply_env()?
    };
    let worker_stop = CancellationToken::new();
    let slots = vm0_worker::Slots::for_config(&worker_config)?;
    let sandbox = vm0_worker::sandbox(&worker_config, &slots).await?;
    let worker = tokio::spawn(vm0_worker::run(
        worker_config,
        sandbox,
        slots,
        worker_stop.clone(),
    ));

    println!(
        "vm0 dev is running (data in {}); Ctrl-C stops it",
        data_dir.display()
    );
    println!("  URL:      http://{addr}");
    println!("  API key:  {api_key}");
    // The CLI talks to this stack from now on.
    let creds = crate::auth::Credentials {
        url: format!("http://{addr}"),
        token: api_key.clone(),
    };
    match crate::auth::store(&creds) {
        Ok(file) => println!(
            "  CLI:      logged in ({}; vm0 auth setup-token prints the key)",
            file.display()
        ),
        Err(e) => println!("  CLI:      not logged in: {e:#}"),
    }
    println!(
        "  metrics:  http://{addr}/metrics (gateway), http://{worker_metrics}/metrics (worker)"
    );
    println!("  try:      export VM0_API_KEY={api_key}");
    println!(
        "            curl -s -X POST http://{addr}/v1/runs -H \"Authorization: Bearer $VM0_API_KEY\" -H 'Content-Type: application/json' -d '{{\"agent\": \"example\", \"prompt\": \"hello\"}}' | jq"
    );

    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    tracing::info!("stopping: draining the worker");
    worker_stop.cancel();
    let _ = worker.await;
    shutdown.cancel();
    server.await.context("gateway task")??;
    if let Some(mut nats) = nats {
        nats.kill().await;
    }
    Ok(())
}

/// Starts nats-server with JetStream on the first free port from 4222.
async fn start_nats(data_dir: &Path) -> Result<NatsServer> {
    let port = (4222..4322)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .context("no free port for nats-server in 4222-4321")?;
    let server = NatsServer::start(
        port,
        &data_dir.join("nats"),
        Some(&data_dir.join("nats.log")),
    )
    .await;
    server.context("starting nats-server (scripts/dev.sh installs it)")
}

/// `VM0_BOOTSTRAP_API_KEY` when set (registered once), otherwise a fresh key.
async fn bootstrap_key(store: &Store, org_id: &str) -> Result<String> {
    let Ok(key) = std::env::var("VM0_BOOTSTRAP_API_KEY") else {
        let created = routes::tokens::create_token(store, org_id, "vm0 dev", None, None).await?;
        return Ok(created.token);
    };
    anyhow::ensure!(
        is_token(&key),
        "VM0_BOOTSTRAP_API_KEY must look like vm0_live_<64 lowercase hex characters>"
    );
    let hash = auth::hash_token(&key);
    match store.find_token_by_hash(&hash).await? {
        Some(row) if row.org_id == org_id && row.revoked_at.is_none() => {}
        Some(_) => {
            anyhow::bail!("VM0_BOOTSTRAP_API_KEY is revoked or belongs to another organization")
        }
        None => {
            let now = Timestamp::now().micros();
            store
                .insert_token(
                    org_id,
                    "bootstrap",
                    &hash,
                    display_prefix(&key),
                    now,
                    None,
                    None,
                )
                .await?;
        }
    }
    Ok(key)
}

async fn ensure_example_agent(store: &Store, org_id: &str) -> Result<()> {
    if store
        .get_agent_by_name(org_id, EXAMPLE_AGENT)
        .await?
        .is_some()
    {
        return Ok(());
    }
    let config: AgentConfig = serde_json::from_value(serde_json::json!({
        "command": ["sh", "-c", "echo \"You said: $VM0_PROMPT\""],
        "timeoutSeconds": 60
    }))?;
    config.validate()?;
    let json = serde_json::to_string(&config)?;
    let hash = vm0_gateway::routes::agents::config_hash(&json);
    store
        .create_agent(
            org_id,
            EXAMPLE_AGENT,
            &json,
            &hash,
            Timestamp::now().micros(),
        )
        .await?;
    Ok(())
}
