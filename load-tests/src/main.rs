//! `vm0-bench`: dispatch benchmarks on one machine. Starts nats-server, a gateway
//! (SQLite, or PostgreSQL with `--database-url`) and workers (bubblewrap sandbox, or
//! `--sandbox qemu` etc.) in this process, then measures through the HTTP API:
//!
//! - `dispatch`: runs created at a fixed rate; create → claimed (the run's
//!   `started_at` minus `created_at`, microseconds from the store), p50/p99.
//! - `first-output`: one run at a time; POST returned → first `output` event at an
//!   SSE client, p50/p99.
//! - `throughput`: N runs of a trivial agent as fast as they can be created;
//!   completed runs per second.
//! - `storage` (not in `all`): volumes and artifacts, see `storage.rs`; `--s3`
//!   puts them on a moto S3 server started here.
//!
//! Traffic stays on 127.0.0.1.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use vm0_db::Store;
use vm0_gateway::config::DispatchConfig;
use vm0_gateway::{Gateway, GatewayConfig};

mod stats;
mod storage;
use stats::summary;

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum Scenario {
    Dispatch,
    FirstOutput,
    Throughput,
    Storage,
    All,
}

#[derive(Parser)]
struct Args {
    #[arg(long, value_enum, default_value = "all")]
    scenario: Scenario,
    /// Runs created per second in `dispatch`.
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// Seconds of `dispatch` load.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// Runs measured in `first-output`.
    #[arg(long, default_value_t = 200)]
    samples: u32,
    /// Runs in `throughput`.
    #[arg(long, default_value_t = 2000)]
    runs: u32,
    /// Workers (in this process) and slots each.
    #[arg(long, default_value_t = 1)]
    workers: u32,
    #[arg(long, default_value_t = 32)]
    slots: u32,
    /// The workers' sandbox backend (`VM0_SANDBOX`'s values); microVM backends
    /// need `VM0_GUEST_AGENT`.
    #[arg(long, default_value = "bubblewrap")]
    sandbox: String,
    /// PostgreSQL instead of SQLite.
    #[arg(long)]
    database_url: Option<String>,
    /// The control plane without TLS (to measure what TLS costs; loopback only).
    #[arg(long)]
    plain_grpc: bool,
    /// Size of the files of `storage`, in MiB.
    #[arg(long, default_value_t = 100)]
    mib: usize,
    /// Volumes and artifacts on a moto S3 server (started here) instead of the
    /// local store.
    #[arg(long)]
    s3: bool,
}

struct Bench {
    base: String,
    token: String,
    store: Store,
    client: reqwest::Client,
}

impl Bench {
    async fn create(&self, agent: &str) -> Result<String> {
        let resp = self
            .client
            .post(format!("{}/v1/runs", self.base))
            .bearer_auth(&self.token)
            .json(&json!({"agent": agent, "prompt": "bench"}))
            .send()
            .await?;
        anyhow::ensure!(resp.status().as_u16() == 202, "create: {}", resp.status());
        let v: Value = resp.json().await?;
        Ok(v["id"].as_str().context("id")?.to_owned())
    }

    async fn wait_all_started(&self, org: &str, ids: &[String]) -> Result<Vec<f64>> {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            loop {
                let run = self.store.get_run(org, id).await?.context("run")?;
                if let Some(started) = run.started_at {
                    out.push((started - run.created_at) as f64 / 1000.0);
                    break;
                }
                anyhow::ensure!(Instant::now() < deadline, "run {id} never started");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(out)
    }
}

async fn dispatch(b: &Bench, org: &str, rate: u32, seconds: u32) -> Result<()> {
    let total = rate * seconds;
    let every = Duration::from_secs_f64(1.0 / f64::from(rate));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut creates = Vec::with_capacity(total as usize);
    let started = Instant::now();
    for _ in 0..total {
        tick.tick().await;
        let client = Bench {
            base: b.base.clone(),
            token: b.token.clone(),
            store: b.store.clone(),
            client: b.client.clone(),
        };
        creates.push(tokio::spawn(
            async move { client.create("bench-trivial").await },
        ));
    }
    let mut ids = Vec::new();
    for c in creates {
        ids.push(c.await??);
    }
    let offered = f64::from(total) / started.elapsed().as_secs_f64();
    let latencies = b.wait_all_started(org, &ids).await?;
    println!("dispatch: offered {offered:.0} runs/s for {seconds} s");
    summary("dispatch create->claimed", latencies);
    Ok(())
}

async fn first_output(b: &Bench, org: &str, samples: u32) -> Result<()> {
    let mut from_create = Vec::new();
    let mut from_start = Vec::new();
    for _ in 0..samples {
        let t0 = Instant::now();
        let id = b.create("bench-echo").await?;
        let created = Instant::now();
        let resp = b
            .client
            .get(format!("{}/v1/runs/{id}/events", b.base))
            .bearer_auth(&b.token)
            .send()
            .await?;
        let mut stream = resp.bytes_stream();
        let mut decoder = vm0_api_types::sse::SseDecoder::default();
        let got_output = loop {
            let Some(chunk) = stream.next().await else {
                break None;
            };
            if decoder.push(&chunk?).iter().any(|e| e.event == "output") {
                break Some(Instant::now());
            }
        };
        let at = got_output.context("no output event")?;
        from_create.push(at.duration_since(created).as_secs_f64() * 1000.0);
        // Claim → first output, with the claim time from the store.
        let run = b.store.get_run(org, &id).await?.context("run")?;
        let wall_now = vm0_api_types::Timestamp::now().micros();
        let output_wall = wall_now - i64::try_from(at.elapsed().as_micros())?;
        if let Some(started) = run.started_at {
            from_start.push((output_wall - started) as f64 / 1000.0);
        }
        let _ = t0;
    }
    summary(
        "first output: POST returned -> output event at the SSE client",
        from_create,
    );
    summary(
        "first output: claimed -> output event at the SSE client",
        from_start,
    );
    Ok(())
}

async fn throughput(b: &Bench, org: &str, runs: u32) -> Result<()> {
    let started = Instant::now();
    let ids: Vec<String> = futures::stream::iter(0..runs)
        .map(|_| b.create("bench-trivial"))
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    let created = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut done = 0;
    for id in &ids {
        loop {
            let run = b.store.get_run(org, id).await?.context("run")?;
            if run.status == "completed" {
                done += 1;
                break;
            }
            anyhow::ensure!(
                run.status == "pending" || run.status == "running",
                "run {id} ended {}",
                run.status
            );
            anyhow::ensure!(Instant::now() < deadline, "runs did not finish");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let all = started.elapsed();
    println!(
        "throughput: {done} runs of `true` completed in {:.2} s = {:.0} completed runs/s (creating them took {:.2} s)",
        all.as_secs_f64(),
        f64::from(done) / all.as_secs_f64(),
        created.as_secs_f64()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let _logs = vm0_telemetry::init(vm0_telemetry::TelemetryOptions::logs_only(
        "vm0-bench",
        vm0_telemetry::LogFormat::Text,
    ))?;
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut nats = vm0_bus::server::NatsServer::start(port, &dir.path().join("nats"), None).await?;
    let db_url = args
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", dir.path().join("vm0.db").display()));
    let mut config = GatewayConfig::for_database(db_url.clone());
    config.data_dir = dir.path().to_owned();
    config.db_max_connections = 16;
    let mut dispatch_config = DispatchConfig::new(nats.options(vm0_bus::Role::Gateway));
    let tls_dir = dir.path().join("tls");
    if !args.plain_grpc {
        dispatch_config.grpc_tls = Some(vm0_gateway::config::GrpcTls::local(&tls_dir)?);
    }
    config.dispatch = Some(dispatch_config);
    let moto = args
        .s3
        .then(|| vm0_storage::testing::Moto::start("vm0-bench"));
    if let Some(m) = &moto {
        config.storage.object_store_url = Some(format!("s3://{}/bench", m.bucket));
        config.storage.object_store_options = m.s3_config();
    }
    let gateway = Gateway::open(config, vm0_gateway::secrets::SecretBox::random()).await?;
    let store = gateway.store.clone();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", http.local_addr()?);
    let scheme = if args.plain_grpc { "http" } else { "https" };
    let control = format!("{scheme}://127.0.0.1:{}", grpc.local_addr()?.port());
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(gateway.serve(http, Some(grpc), shutdown.clone()));
    let mut workers = Vec::new();
    let worker_stop = CancellationToken::new();
    for i in 0..args.workers {
        let name = format!("bench-{i}");
        let credential = vm0_gateway::worker_auth::create_credential(&store, &name).await?;
        let base = vm0_worker::WorkerConfig::defaults().apply_env()?;
        let wc = vm0_worker::WorkerConfig {
            // As VM0_WORKER_SLOTS does: slots alone bound runs of one vCPU.
            vcpus: base.vcpus.max(args.slots),
            worker_id: name,
            nats: nats.options(vm0_bus::Role::Worker),
            control_plane_url: control.clone(),
            control_plane_ca: (!args.plain_grpc).then(|| tls_dir.join("ca.pem")),
            worker_token: credential,
            slots: args.slots,
            data_dir: dir.path().to_owned(),
            sandbox: args.sandbox.parse().map_err(anyhow::Error::msg)?,
            ..base
        };
        let slots = vm0_worker::Slots::for_config(&wc)?;
        let sandbox = vm0_worker::sandbox(&wc, &slots).await?;
        workers.push(tokio::spawn(vm0_worker::run(
            wc,
            sandbox,
            slots,
            worker_stop.clone(),
        )));
    }
    let org = store
        .ensure_organization("bench", vm0_api_types::Timestamp::now().micros())
        .await?;
    let api_key = vm0_gateway::routes::tokens::create_token(&store, &org.id, "bench", None, None)
        .await?
        .token;
    let b = Bench {
        base,
        token: api_key,
        store,
        client: reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()?,
    };
    for (name, cmd) in [
        ("bench-trivial", json!(["true"])),
        ("bench-echo", json!(["echo", "hello"])),
    ] {
        let resp = b
            .client
            .post(format!("{}/v1/agents", b.base))
            .bearer_auth(&b.token)
            .json(
                &json!({"name": name, "config": {"command": cmd, "resources": {"memoryMb": 128}}}),
            )
            .send()
            .await?;
        anyhow::ensure!(resp.status().as_u16() == 201, "agent: {}", resp.status());
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // workers register
    println!(
        "stack: {} ({}), {} worker(s) x {} slots, {} sandbox, {} CPUs",
        if db_url.starts_with("sqlite") {
            "SQLite"
        } else {
            "PostgreSQL"
        },
        vm0_db::store::redact_url(&db_url),
        args.workers,
        args.slots,
        args.sandbox,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let s = args.scenario;
    if matches!(s, Scenario::Dispatch | Scenario::All) {
        dispatch(&b, &org.id, args.rate, args.seconds).await?;
    }
    if matches!(s, Scenario::FirstOutput | Scenario::All) {
        first_output(&b, &org.id, args.samples).await?;
    }
    if matches!(s, Scenario::Throughput | Scenario::All) {
        throughput(&b, &org.id, args.runs).await?;
    }
    if s == Scenario::Storage {
        let store = if moto.is_some() {
            "S3 (moto on loopback)"
        } else {
            "local directory"
        };
        storage::storage(&b, &org.id, args.mib, dir.path(), store).await?;
    }
    worker_stop.cancel();
    for w in workers {
        let _ = w.await;
    }
    shutdown.cancel();
    let _ = server.await;
    nats.kill().await;
    Ok(())
}
