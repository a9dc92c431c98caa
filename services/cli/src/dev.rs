//! `vm0 dev`: one gateway on SQLite under the data dir, a bootstrap API key and an
//! example agent. Ctrl-C (or SIGTERM) stops everything.

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;
use vm0_api_types::Timestamp;
use vm0_api_types::agents::AgentConfig;
use vm0_api_types::tokens::{display_prefix, is_token};
use vm0_db::Store;
use vm0_gateway::{GatewayConfig, auth, routes};

/// Organization that owns what `vm0 dev` creates.
const DEV_ORG: &str = "default";
const EXAMPLE_AGENT: &str = "example";

pub async fn run() -> Result<()> {
    let config = GatewayConfig::from_env()?;
    let secrets = vm0_gateway::secrets::SecretBox::from_env_or_file(&config.data_dir)?;
    let gateway = vm0_gateway::Gateway::open(config, secrets).await?;
    let store = gateway.store.clone();
    let now = Timestamp::now().micros();
    let org = store.ensure_organization(DEV_ORG, now).await?;
    let api_key = bootstrap_key(&store, &org.id).await?;
    ensure_example_agent(&store, &org.id).await?;

    let http_addr = gateway.config.http_addr;
    let listener = tokio::net::TcpListener::bind(http_addr)
        .await
        .with_context(|| {
            format!("binding {http_addr} (set VM0_HTTP_ADDR to use another address)")
        })?;
    let addr = listener.local_addr()?;
    let data_dir = gateway.config.data_dir.display().to_string();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(gateway.serve(listener, None, shutdown.clone()));

    println!("vm0 dev is running (data in {data_dir}); Ctrl-C stops it");
    println!("  URL:      http://{addr}");
    println!("  API key:  {api_key}");
    println!("  try:      export VM0_API_KEY={api_key}");
    println!(
        "            curl -s http://{addr}/v1/agents -H \"Authorization: Bearer $VM0_API_KEY\" | jq"
    );

    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    tracing::info!("stopping");
    shutdown.cancel();
    server.await.context("gateway task")??;
    Ok(())
}

/// `VM0_BOOTSTRAP_API_KEY` when set (registered once), otherwise a fresh key.
async fn bootstrap_key(store: &Store, org_id: &str) -> Result<String> {
    let Ok(key) = std::env::var("VM0_BOOTSTRAP_API_KEY") else {
        let created = routes::tokens::create_token(store, org_id, "vm0 dev", None).await?;
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
                .insert_token(org_id, "bootstrap", &hash, display_prefix(&key), now, None)
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
