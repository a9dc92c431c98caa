//! The vm0 worker: pulls run jobs from JetStream, claims each run from the control
//! plane, runs it in a sandbox, streams its output, logs and metrics to NATS, and
//! reports how it ended.
//!
//! Tasks (each ends on the shutdown token): the job loop (fetches at most as many
//! jobs as there are free slots), one task per run, the heartbeat, and the cancel
//! listener. On SIGTERM the job loop stops first; running runs get
//! `drain_timeout` to finish, then are stopped and reported failed.

/// The vCPUs and memory runs hold.
pub mod admission;
/// Configuration from the environment.
pub mod config;
/// The control plane client.
pub mod control;
/// Secret masking of output.
pub mod mask;
/// The runs' network egress.
pub mod network;
/// Prometheus metrics: what the worker counts for its operators.
pub mod prometheus;
/// One run, from claim to finish.
pub mod run;
/// Slots and their host uids.
pub mod slots;
pub mod transfer;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use vm0_bus::Bus;
use vm0_proto::worker as pb;
use vm0_sandbox::Sandbox;

pub use config::WorkerConfig;
pub use slots::Slots;

/// The sandbox backend the configuration asks for (`auto`: the best that works
/// here), logged with the reasons for the choice; it knows the slots' host uids.
pub async fn sandbox(
    config: &WorkerConfig,
    slots: &Slots,
) -> anyhow::Result<vm0_sandbox::select::AnySandbox> {
    let mut options = config.select_options();
    options.slot_users = slots.users().to_vec();
    let selection = vm0_sandbox::select::select(&options)
        .await
        .context("choosing the sandbox backend")?;
    tracing::info!(
        backend = %selection.backend,
        why = %selection.why.join("; "),
        "sandbox chosen"
    );
    Ok(selection.sandbox)
}

/// How long one fetch waits for jobs before asking again.
const FETCH_WAIT: Duration = Duration::from_secs(1);

/// What every task of a worker shares.
pub struct WorkerCtx<S> {
    pub config: WorkerConfig,
    pub bus: Bus,
    pub control: control::Client,
    pub sandbox: S,
    /// Runs in progress: run id → token that stops it.
    pub running: Mutex<HashMap<String, CancellationToken>>,
    pub slots: Slots,
    /// The vCPUs and memory runs hold.
    pub admission: admission::Admission,
    /// Cancelled when running runs must stop (drain timeout passed).
    pub stop_runs: CancellationToken,
    /// Volumes and artifacts in, `/work` out.
    pub transfers: transfer::Transfers,
    /// The runs' network (the egress proxy), or why this worker gives none.
    pub egress: Result<vm0_egress::Egress, String>,
    /// Prometheus instruments (`GET /metrics` on `VM0_METRICS_ADDR`).
    pub instruments: Arc<prometheus::Instruments>,
}

impl<S> WorkerCtx<S> {
    fn running_ids(&self) -> Vec<String> {
        self.running
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn cancel(&self, run_id: &str) {
        if let Some(token) = self
            .running
            .lock()
            .ok()
            .and_then(|m| m.get(run_id).cloned())
        {
            tracing::info!(%run_id, "cancel requested");
            token.cancel();
        }
    }
}

/// Runs a worker until `shutdown` is cancelled, then drains.
pub async fn run<S: Sandbox>(
    config: WorkerConfig,
    sandbox: S,
    slots: Slots,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut config = config;
    let control = control::connect(
        &config.control_plane_url,
        &config.worker_token,
        config.control_plane_ca.as_deref(),
    )?;
    // Who we are is what our credential says.
    let registered = register(&control, &config, sandbox.name()).await?;
    config.worker_id = registered.worker_id.clone();
    let heartbeat_every =
        Duration::from_millis(u64::from(registered.heartbeat_interval_ms.max(100)));
    let bus = Bus::connect(
        &config.nats,
        vm0_bus::Role::Worker,
        &format!("vm0-worker {}", config.worker_id),
    )
    .await?;
    let transfers = transfer::Transfers::new(
        &config.data_dir.join("worker").join(config.scratch_name()),
        config.version_cache_max_bytes,
    );
    let egress = match network::link(sandbox.network_attachment()) {
        Some(link) => network::egress(&config, link).await,
        None => Err(format!("the {} backend has none yet", sandbox.name())),
    };
    if let Err(why) = &egress {
        tracing::warn!(%why, "runs on this worker get no network");
    }
    let ctx = Arc::new(WorkerCtx {
        transfers,
        egress,
        slots,
        admission: admission::Admission::new(config.vcpus, config.memory_mb),
        config,
        bus,
        control,
        sandbox,
        running: Mutex::new(HashMap::new()),
        stop_runs: CancellationToken::new(),
        instruments: Arc::new(prometheus::Instruments::default()),
    });
    let background = CancellationToken::new();
    let metrics = match ctx.config.metrics_addr {
        Some(addr) => {
            use anyhow::Context;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding VM0_METRICS_ADDR {addr}"))?;
            tracing::info!(addr = %listener.local_addr()?, "serving metrics");
            let refreshed = ctx.clone();
            let scrape = vm0_prometheus::Scrape {
                registry: ctx.instruments.registry.clone(),
                refresh: Some(Arc::new(move || {
                    refreshed
                        .instruments
                        .set_slots(refreshed.config.slots as usize, refreshed.slots.available());
                })),
            };
            Some(tokio::spawn(vm0_prometheus::serve(
                listener,
                scrape,
                background.clone(),
            )))
        }
        None => None,
    };
    tracing::info!(
        worker_id = %ctx.config.worker_id,
        slots = ctx.config.slots,
        sandbox = ctx.sandbox.name(),
        "worker ready"
    );
    let heartbeat = tokio::spawn(heartbeat_loop(
        ctx.clone(),
        heartbeat_every,
        background.clone(),
    ));
    let cancels = tokio::spawn(cancel_listener(ctx.clone(), background.clone()));
    let mut runs = tokio::task::JoinSet::new();
    let pulled = job_loop(&ctx, &mut runs, &shutdown).await;

    // Drain: no new jobs; let running runs finish, then stop them.
    let in_flight = runs.len();
    if in_flight > 0 {
        tracing::info!(
            runs = in_flight,
            timeout_s = ctx.config.drain_timeout.as_secs(),
            "draining"
        );
    }
    let drained = tokio::time::timeout(ctx.config.drain_timeout, async {
        while runs.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            runs = runs.len(),
            "drain timeout: stopping the remaining runs"
        );
        ctx.stop_runs.cancel();
        while runs.join_next().await.is_some() {}
    }
    background.cancel();
    let _ = heartbeat.await;
    let _ = cancels.await;
    if let Some(metrics) = metrics {
        let _ = metrics.await;
    }
    tracing::info!("worker stopped");
    pulled
}

async fn register(
    control: &control::Client,
    c: &WorkerConfig,
    sandbox: &str,
) -> anyhow::Result<pb::RegisterWorkerResponse> {
    let req = pb::RegisterWorkerRequest {
        worker_id: c.worker_id.clone(),
        hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        capacity: Some(pb::Capacity {
            slots: c.slots,
            vcpus: c.vcpus,
            memory_mb: c.memory_mb,
            disk_mb: c.disk_mb,
        }),
        sandbox: sandbox.to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let resp = control::retry("register", || {
        let mut client = control.clone();
        let req = req.clone();
        async move { client.register_worker(req).await }
    })
    .await
    .context("registering with the control plane")?;
    anyhow::ensure!(
        !resp.worker_id.is_empty(),
        "the control plane did not say who this worker is (an older gateway?)"
    );
    Ok(resp)
}

async fn heartbeat_loop<S: Sandbox>(
    ctx: Arc<WorkerCtx<S>>,
    every: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let free = u32::try_from(ctx.slots.available()).unwrap_or(0);
        let req = pb::HeartbeatRequest {
            worker_id: ctx.config.worker_id.clone(),
            free: Some({
                let (vcpus, memory_mb) = ctx.admission.free();
                pb::Capacity {
                    slots: free,
                    vcpus,
                    memory_mb,
                    ..Default::default()
                }
            }),
            running_run_ids: ctx.running_ids(),
        };
        // A heartbeat that hangs must not hold up the next ones.
        let mut control = ctx.control.clone();
        let patience = every.max(Duration::from_secs(1)) * 2;
        let Ok(sent) = tokio::time::timeout(patience, control.heartbeat(req)).await else {
            tracing::warn!("heartbeat timed out");
            continue;
        };
        match sent {
            Ok(resp) => {
                let resp = resp.into_inner();
                for id in resp.cancel_run_ids.iter().chain(&resp.stop_run_ids) {
                    ctx.cancel(id);
                }
                if resp.reregister
                    && let Err(e) = register(&ctx.control, &ctx.config, ctx.sandbox.name()).await
                {
                    tracing::warn!(error = %e, "re-registering failed");
                }
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
    }
}

/// Cancel requests over NATS (the heartbeat answer repeats them as a backstop).
async fn cancel_listener<S: Sandbox>(ctx: Arc<WorkerCtx<S>>, stop: CancellationToken) {
    let sub = match ctx.bus.subscribe_cancels().await {
        Ok(sub) => sub,
        Err(e) => {
            tracing::warn!(error = %e, "cannot subscribe to cancel requests; relying on heartbeats");
            return;
        }
    };
    vm0_bus::each_message(sub, &stop, |msg| {
        if let Some(run_id) = vm0_bus::subjects::run_id_of(msg.subject.as_str()) {
            ctx.cancel(run_id);
        }
    })
    .await;
}

/// Fetches jobs while there are free slots, until shutdown.
async fn job_loop<S: Sandbox>(
    ctx: &Arc<WorkerCtx<S>>,
    runs: &mut tokio::task::JoinSet<()>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    // The gateways make the consumer; a worker started first waits for it.
    let consumer = loop {
        match ctx.bus.jobs_consumer().await {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(error = %e, "the jobs consumer is not there yet (gateways create it); retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    loop {
        // Wait for a free slot (or shutdown) before asking for work.
        let first = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            slot = ctx.slots.acquire() => slot?,
        };
        let free = ctx.slots.available() + 1;
        let batch = consumer
            .batch()
            .max_messages(free)
            .expires(FETCH_WAIT)
            .messages()
            .await;
        let mut batch = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "fetching jobs failed");
                drop(first);
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let mut permit = Some(first);
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                msg = batch.next() => msg,
            };
            let Some(msg) = msg else { break };
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "job fetch error");
                    break;
                }
            };
            let slot = match permit.take() {
                Some(p) => p,
                None => ctx.slots.acquire().await?,
            };
            let ctx = ctx.clone();
            runs.spawn(async move {
                run::execute(ctx, msg, slot.user()).await;
                drop(slot);
            });
        }
        // Reap finished run tasks so the set does not grow.
        while runs.try_join_next().is_some() {}
    }
}
