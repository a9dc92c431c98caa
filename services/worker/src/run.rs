//! One run on this worker: claim, sandbox, telemetry, finish, ack.
//!
//! The job message stays unacked while the run lives (progress acks keep it from
//! being redelivered); it is acked once the control plane knows how the run ended,
//! or at once when the claim says the job is not ours to run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use vm0_api_types::Timestamp;
use vm0_api_types::runs::{LogLevel, LogType, RunEventType};
use vm0_bus::{RunJob, Telemetry};
use vm0_proto::worker::{self as pb, ClaimOutcome, FinalStatus};
use vm0_sandbox::slot_user::SlotUser;
use vm0_sandbox::{
    ExitReport, NetNamespace, RunNetwork, Sandbox, SandboxEvent, SandboxSpec, TapLink,
};

use crate::WorkerCtx;
use crate::control::retry;
use crate::mask::{Masker, Stream};

/// Telemetry messages sent but not yet acknowledged by JetStream, at most.
const MAX_PENDING_ACKS: usize = 256;
/// Progress acks are sent this often (well under the job's ack wait).
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

pub async fn execute<S: Sandbox>(
    ctx: Arc<WorkerCtx<S>>,
    msg: jetstream::Message,
    slot_user: Option<SlotUser>,
) {
    let job = match vm0_bus::decode_job(&msg.payload) {
        Ok(job) => job,
        Err(e) => {
            tracing::warn!(error = %e, "dropping an undecodable job");
            let _ = msg.ack_with(AckKind::Term).await;
            return;
        }
    };
    // One span per job, in the trace of the request that created the run.
    let span = tracing::info_span!(
        "run",
        otel.kind = "consumer",
        run_id = %job.run_id,
        attempt = tracing::field::Empty,
        status = tracing::field::Empty,
        exit_code = tracing::field::Empty,
    );
    vm0_telemetry::propagation::set_remote_parent(&span, &job.traceparent);
    execute_job(ctx, msg, job, slot_user).instrument(span).await
}

async fn execute_job<S: Sandbox>(
    ctx: Arc<WorkerCtx<S>>,
    msg: jetstream::Message,
    job: RunJob,
    slot_user: Option<SlotUser>,
) {
    // A job delivered again while its run lives here (a redelivery, a republish)
    // is not a second run.
    if ctx
        .running
        .lock()
        .is_ok_and(|running| running.contains_key(&job.run_id))
    {
        tracing::info!(run_id = %job.run_id, "job dropped: the run is already running here");
        let _ = msg.ack().await;
        return;
    }
    // The job stays in progress while it waits for room and while its run lives.
    let progress = CancellationToken::new();
    let keepalive = tokio::spawn(keep_in_progress(msg.clone(), progress.clone()));
    let admitted = ctx.admission.admit(job.vcpus.max(1), job.memory_mb).await;
    // One token per claim, kept by its retries (see `ClaimRequest.claim_token`).
    let claim_token = format!("{:032x}", rand::random::<u128>());
    let req = pb::ClaimRequest {
        run_id: job.run_id.clone(),
        worker_id: ctx.config.worker_id.clone(),
        claim_token,
    };
    let claim = retry("claim", || {
        let mut client = ctx.control.clone();
        let req = req.clone();
        async move { client.claim(req).await }
    })
    .instrument(tracing::info_span!("claim"))
    .await;
    let claim = match claim {
        Ok(c) => c,
        Err(status) => {
            // Let another delivery try later.
            progress.cancel();
            let _ = keepalive.await;
            tracing::warn!(run_id = %job.run_id, error = %status, "claim failed");
            let _ = msg
                .ack_with(AckKind::Nak(Some(Duration::from_secs(5))))
                .await;
            return;
        }
    };
    match (ClaimOutcome::try_from(claim.outcome), claim.spec) {
        (Ok(ClaimOutcome::Claimed), Some(spec)) => {
            run_claimed(&ctx, spec, claim.attempt, slot_user).await;
        }
        (outcome, _) => {
            tracing::info!(run_id = %job.run_id, ?outcome, message = %claim.message, "job dropped");
        }
    }
    drop(admitted);
    progress.cancel();
    let _ = keepalive.await;
    if let Err(e) = msg.ack().await {
        tracing::warn!(run_id = %job.run_id, error = %e, "job ack failed (a redelivery will find the run claimed)");
    }
}

async fn keep_in_progress(msg: jetstream::Message, done: CancellationToken) {
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    tick.reset();
    loop {
        tokio::select! {
            _ = done.cancelled() => return,
            _ = tick.tick() => {
                let _ = msg.ack_with(AckKind::Progress).await;
            }
        }
    }
}

/// Why a run stopped before its command ended by itself.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stop {
    Cancelled,
    Timeout,
    Shutdown,
}

/// Publishes a run's telemetry, numbering its events. A message is kept until
/// JetStream acknowledged it: what could not be sent, or was not acknowledged,
/// is sent again (under the same message id, so it is stored once) until it is,
/// for [`REPUBLISH_FOR`] at most. A sequence number is never skipped for a
/// message that can still be delivered.
struct RunTelemetry<'a, S> {
    ctx: &'a WorkerCtx<S>,
    /// When the run was claimed (its first output is timed from it).
    claimed: Instant,
    /// Sent messages whose acks are awaited before the finish is reported, so that
    /// everything the run produced is stored in JetStream first.
    pending: Vec<(Telemetry, async_nats::jetstream::context::PublishAckFuture)>,
    /// Messages not sent yet (the last send failed), oldest first.
    unsent: std::collections::VecDeque<Telemetry>,
    /// Output bytes kept and dropped (past `output_max_bytes`).
    output: OutputCount,
    run_id: String,
    attempt: u32,
    next_seq: i64,
    counter: u64,
    masker: Masker,
}

#[derive(Debug, Default)]
struct OutputCount {
    kept: u64,
    dropped: u64,
}

/// How long a message that cannot be stored is sent again before it is given up.
const REPUBLISH_FOR: Duration = Duration::from_secs(120);
/// Messages kept unsent at most; past it, the run waits for NATS (its output
/// pipe fills and its command blocks) rather than losing them.
const MAX_UNSENT: usize = 10_000;

impl<S> RunTelemetry<'_, S> {
    /// The JetStream message id of `msg`: unique per run and message.
    fn msg_id(&self, msg: &Telemetry) -> String {
        match msg {
            Telemetry::Event { seq, .. } => format!("{}:e{seq}", self.run_id),
            Telemetry::Log { key, .. } | Telemetry::Metric { key, .. } => {
                format!("{}:{key}", self.run_id)
            }
        }
    }

    /// Sends `msg` after what is still unsent (order is kept per run).
    async fn publish(&mut self, msg: Telemetry) {
        self.unsent.push_back(msg);
        self.send_unsent().await;
        if self.unsent.len() > MAX_UNSENT {
            self.drain_unsent(REPUBLISH_FOR).await;
        }
        // Bound the acks in flight.
        if self.pending.len() >= MAX_PENDING_ACKS {
            self.settle().await;
        }
    }

    /// Sends what is unsent, in order, until one send fails.
    async fn send_unsent(&mut self) {
        while let Some(msg) = self.unsent.pop_front() {
            let id = self.msg_id(&msg);
            match self
                .ctx
                .bus
                .send_telemetry(&self.run_id, &msg, Some(&id))
                .await
            {
                Ok(ack) => self.pending.push((msg, ack)),
                Err(e) => {
                    tracing::warn!(run_id = %self.run_id, error = %e, "telemetry publish failed; kept to send again");
                    self.unsent.push_front(msg);
                    return;
                }
            }
        }
    }

    /// Keeps sending what is unsent, with a growing pause, for `patience`.
    async fn drain_unsent(&mut self, patience: Duration) {
        let give_up = tokio::time::Instant::now() + patience;
        let mut pause = Duration::from_millis(100);
        while !self.unsent.is_empty() && tokio::time::Instant::now() < give_up {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
            self.send_unsent().await;
        }
    }

    /// Waits until every message sent is stored; what was not (an ack that failed)
    /// is sent again, for [`REPUBLISH_FOR`] at most.
    async fn settle(&mut self) {
        let give_up = tokio::time::Instant::now() + REPUBLISH_FOR;
        loop {
            let acks = std::mem::take(&mut self.pending);
            let (msgs, futures): (Vec<_>, Vec<_>) = acks.into_iter().unzip();
            let results = futures::future::join_all(
                futures
                    .into_iter()
                    .map(std::future::IntoFuture::into_future),
            )
            .await;
            let mut failed = 0;
            for (msg, result) in msgs.into_iter().zip(results) {
                if let Err(e) = result {
                    failed += 1;
                    if failed == 1 {
                        tracing::warn!(run_id = %self.run_id, error = %e, "telemetry not stored; sending it again");
                    }
                    self.unsent.push_back(msg);
                }
            }
            if self.unsent.is_empty() {
                return;
            }
            let left = give_up.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                tracing::error!(run_id = %self.run_id, messages = self.unsent.len(), "telemetry could not be stored in JetStream; given up (streams report the missing events)");
                self.unsent.clear();
                return;
            }
            self.send_unsent().await;
            self.drain_unsent(left).await;
        }
    }

    fn key(&mut self, prefix: char) -> String {
        self.counter += 1;
        format!("{}:{prefix}{}", self.attempt, self.counter)
    }

    async fn output(&mut self, stream: Stream, content: String) {
        let len = content.len() as u64;
        let max = self.ctx.config.output_max_bytes;
        if self.output.kept + len > max || self.output.dropped > 0 {
            if self.output.dropped == 0 {
                let line = format!(
                    "the run's output passed {max} bytes (VM0_RUN_OUTPUT_MAX_BYTES): what follows is not kept"
                );
                self.system_log(LogLevel::Warn, &line).await;
                // Followers of the stream are told too.
                let data = serde_json::json!({"code": "output_truncated", "message": line});
                self.event(RunEventType::Error, data).await;
            }
            self.output.dropped += len;
            return;
        }
        if self.output.kept == 0 {
            self.ctx.instruments.first_output(self.claimed.elapsed());
        }
        self.output.kept += len;
        let data = serde_json::json!({"content": content, "stream": stream.as_str()});
        self.event(RunEventType::Output, data).await;
    }

    /// Publishes an event of the worker's own under the run's next number.
    async fn event(&mut self, event: RunEventType, data: serde_json::Value) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let msg = Telemetry::Event {
            seq,
            event,
            data,
            ts: Timestamp::now().micros(),
        };
        self.publish(msg).await;
    }

    async fn system_log(&mut self, level: LogLevel, message: &str) {
        let msg = Telemetry::Log {
            key: self.key('l'),
            ts: Timestamp::now().micros(),
            log_type: LogType::System,
            level,
            message: self.masker.mask(message),
            metadata: serde_json::json!({"workerId": self.ctx.config.worker_id}),
        };
        self.publish(msg).await;
    }

    /// One connection attempt through the proxy, as a `network` log.
    async fn network_log(&mut self, entry: vm0_egress::NetworkLog) {
        let level = if entry.is_error() {
            LogLevel::Error
        } else {
            LogLevel::Info
        };
        let msg = Telemetry::Log {
            key: self.key('l'),
            ts: Timestamp::now().micros(),
            log_type: LogType::Network,
            level,
            message: self.masker.mask(&entry.message()),
            metadata: entry.metadata(),
        };
        self.publish(msg).await;
    }

    /// A sample; with a network, its rx/tx are what the run moved through the
    /// proxy (the sandbox's own interface is loopback only).
    async fn sample(&mut self, mut s: vm0_sandbox::ResourceSample, net: Option<(u64, u64)>) {
        if let Some((rx, tx)) = net {
            s.network_rx_bytes = i64::try_from(rx).unwrap_or(i64::MAX);
            s.network_tx_bytes = i64::try_from(tx).unwrap_or(i64::MAX);
        }
        let msg = Telemetry::Metric {
            key: self.key('m'),
            ts: Timestamp::now().micros(),
            cpu_percent: s.cpu_percent,
            memory_used_bytes: s.memory_used_bytes,
            memory_total_bytes: s.memory_total_bytes,
            disk_used_bytes: s.disk_used_bytes,
            disk_total_bytes: s.disk_total_bytes,
            network_rx_bytes: s.network_rx_bytes,
            network_tx_bytes: s.network_tx_bytes,
        };
        self.publish(msg).await;
    }
}

/// Where the prompt is in every sandbox (`VM0_PROMPT_FILE`), and the command's
/// stdin.
pub const PROMPT_FILE: &str = "/run/vm0/prompt";
/// The longest prompt `VM0_PROMPT` holds: Linux refuses an environment string
/// over 128 KiB (`MAX_ARG_STRLEN`), `VM0_PROMPT=` and its NUL included. Longer
/// prompts are only on stdin and in `VM0_PROMPT_FILE`.
pub const MAX_ENV_PROMPT: usize = 128 * 1024 - "VM0_PROMPT=".len() - 1;

fn sandbox_spec<S>(
    ctx: &WorkerCtx<S>,
    spec: &pb::RunSpec,
    slot_user: Option<SlotUser>,
    trees_in: Vec<vm0_sandbox::TreeIn>,
    network: Option<vm0_sandbox::RunNetwork>,
) -> SandboxSpec {
    let mut env: Vec<(String, String)> = spec
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    env.sort();
    if spec.prompt.len() <= MAX_ENV_PROMPT {
        env.push(("VM0_PROMPT".into(), spec.prompt.clone()));
    }
    env.push(("VM0_PROMPT_FILE".into(), PROMPT_FILE.into()));
    env.push(("VM0_RUN_ID".into(), spec.run_id.clone()));
    env.push(("VM0_STATE_DIR".into(), crate::transfer::STATE_DIR.into()));
    SandboxSpec {
        run_id: spec.run_id.clone(),
        argv: spec.argv.clone(),
        env,
        working_dir: (!spec.working_dir.is_empty()).then(|| spec.working_dir.clone()),
        stdin: Vec::new(),
        stdin_file: Some(PROMPT_FILE.into()),
        vcpus: spec.vcpus,
        memory_mb: spec.memory_mb,
        disk_mb: spec.disk_mb,
        image: (!spec.image.is_empty()).then(|| spec.image.clone()),
        // The prompt, as a file: any size, outside the guest protocol's frames.
        files: vec![vm0_sandbox::GuestFile {
            path: PROMPT_FILE.into(),
            data: spec.prompt.clone().into_bytes().into(),
            mode: 0o400,
        }],
        scratch_dir: ctx
            .config
            .data_dir
            .join("worker")
            .join(&ctx.config.worker_id)
            .join("runs")
            .join(&spec.run_id),
        sample_interval: ctx.config.sample_interval,
        as_root: spec.as_root,
        slot_user,
        trees_in,
        trees_out: ctx.transfers.outputs(spec),
        network,
    }
}

/// Where the sandbox finds the CA certificates it trusts when the proxy ends
/// its TLS for `secretHeaders`: the system's bundle with the run's CA added
/// (`SSL_CERT_FILE` and the variables curl, Python requests and git read), and
/// the run's CA alone (`NODE_EXTRA_CA_CERTS`, which Node adds to its own).
pub const CA_BUNDLE_FILE: &str = "/run/vm0/ca-certificates.crt";
pub const RUN_CA_FILE: &str = "/run/vm0/run-ca.crt";

/// The bundle the worker's own system trusts (Debian's path, then Fedora's),
/// read once.
fn system_ca_bundle() -> &'static str {
    static BUNDLE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BUNDLE.get_or_init(|| {
        [
            "/etc/ssl/certs/ca-certificates.crt",
            "/etc/pki/tls/certs/ca-bundle.crt",
        ]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default()
    })
}

fn trust_run_ca(spec: &mut SandboxSpec, ca_pem: &str) {
    let mut bundle = system_ca_bundle().to_owned();
    if !bundle.is_empty() && !bundle.ends_with('\n') {
        bundle.push('\n');
    }
    bundle.push_str(ca_pem);
    for (path, data) in [(CA_BUNDLE_FILE, bundle), (RUN_CA_FILE, ca_pem.to_owned())] {
        spec.files.push(vm0_sandbox::GuestFile {
            path: path.into(),
            data: data.into_bytes().into(),
            mode: 0o444,
        });
    }
    for var in [
        "SSL_CERT_FILE",
        "CURL_CA_BUNDLE",
        "REQUESTS_CA_BUNDLE",
        "GIT_SSL_CAINFO",
    ] {
        spec.env.push((var.into(), CA_BUNDLE_FILE.into()));
    }
    spec.env
        .push(("NODE_EXTRA_CA_CERTS".into(), RUN_CA_FILE.into()));
}

/// The run's share of the worker's proxy: `Ok(None)` when this worker gives
/// runs no network (said in the run's log), `Err` when it should and cannot.
async fn open_network<S: Sandbox>(
    ctx: &WorkerCtx<S>,
    spec: &pb::RunSpec,
) -> Result<(Option<vm0_egress::RunEgress>, Option<String>), String> {
    let policy = crate::network::policy(spec)?;
    let egress = match &ctx.egress {
        Ok(egress) => egress,
        Err(why) => return Ok((None, Some(format!("this run has no network: {why}")))),
    };
    let mode = policy.mode;
    let started = Instant::now();
    let secret_headers: std::collections::BTreeMap<_, _> = spec
        .network
        .iter()
        .flat_map(|n| &n.secret_headers)
        .map(|(host, h)| (host.clone(), h.headers.clone().into_iter().collect()))
        .collect();
    let intercept = if secret_headers.is_empty() {
        None
    } else {
        Some(
            egress
                .intercept(&spec.run_id, secret_headers)
                .map_err(|e| format!("the run's secret headers could not be set up: {e}"))?,
        )
    };
    let run = egress
        .open(policy, egress.link(), intercept)
        .await
        .map_err(|e| format!("the run's network could not be set up: {e}"))?;
    Ok((
        Some(run),
        Some(format!(
            "network: mode {} (set up in {} ms)",
            mode.as_str(),
            started.elapsed().as_millis()
        )),
    ))
}

/// The run's network as its sandbox is attached to it.
fn attach(run: &vm0_egress::RunEgress) -> RunNetwork {
    match run.tap() {
        Some(fd) => RunNetwork::Tap(TapLink {
            fd,
            address: vm0_egress::netns::TAP_GUEST,
            prefix: vm0_egress::netns::TAP_PREFIX,
            gateway: vm0_egress::netns::TAP_GATEWAY,
        }),
        None => RunNetwork::Namespace(NetNamespace {
            net: run.netns(),
            user: run.userns(),
        }),
    }
}

async fn run_claimed<S: Sandbox>(
    ctx: &WorkerCtx<S>,
    spec: pb::RunSpec,
    attempt: u32,
    slot_user: Option<SlotUser>,
) {
    let run_id = spec.run_id.clone();
    let cancel = CancellationToken::new();
    if let Ok(mut running) = ctx.running.lock() {
        running.insert(run_id.clone(), cancel.clone());
    }
    let started = Instant::now();
    tracing::Span::current().record("attempt", attempt);
    let mut t = RunTelemetry {
        ctx,
        claimed: started,
        pending: Vec::new(),
        unsent: std::collections::VecDeque::new(),
        output: OutputCount::default(),
        run_id: run_id.clone(),
        attempt,
        next_seq: spec.next_event_seq,
        counter: 0,
        masker: Masker::new(spec.secret_values.iter().cloned()),
    };
    if spec.prompt.len() > MAX_ENV_PROMPT {
        let line = format!(
            "the prompt ({} bytes) is longer than VM0_PROMPT holds ({MAX_ENV_PROMPT} bytes): it is on stdin and in VM0_PROMPT_FILE only",
            spec.prompt.len()
        );
        t.system_log(LogLevel::Info, &line).await;
    }
    let mut artifact_upload_id = String::new();
    let mut state_upload_id = String::new();
    let (status, exit_code, error) = match ctx.transfers.inputs(&spec).await {
        Err(why) => {
            let message = format!("the run's files could not be fetched: {why}");
            t.system_log(LogLevel::Error, &message).await;
            (FinalStatus::Failed, None, message)
        }
        Ok((trees_in, lines)) => {
            for line in lines {
                t.system_log(LogLevel::Info, &line).await;
            }
            let (mut network, line) = match open_network(ctx, &spec).await {
                Ok(opened) => opened,
                Err(why) => {
                    t.system_log(LogLevel::Error, &why).await;
                    (None, None)
                }
            };
            if let Some(line) = line {
                let level = if network.is_some() {
                    LogLevel::Info
                } else {
                    LogLevel::Warn
                };
                t.system_log(level, &line).await;
            }
            let attached = network.as_ref().map(attach);
            let run_ca = network.as_ref().and_then(vm0_egress::RunEgress::ca_pem);
            let mut sandbox_spec = sandbox_spec(ctx, &spec, slot_user, trees_in, attached);
            if let Some(ca) = run_ca {
                trust_run_ca(&mut sandbox_spec, &ca);
            }
            let started_sandbox = ctx
                .sandbox
                .start(sandbox_spec)
                .instrument(tracing::info_span!("sandbox.start"))
                .await;
            match started_sandbox {
                Ok(sandbox) => {
                    let timeout = Duration::from_secs(spec.timeout_seconds.max(1));
                    let mut saved = Vec::new();
                    let (exit, stop) = supervise(
                        &mut t,
                        sandbox,
                        &cancel,
                        &ctx.stop_runs,
                        timeout,
                        &mut saved,
                        network.as_mut(),
                    )
                    .instrument(tracing::info_span!("sandbox.run"))
                    .await;
                    if let Some(network) = network.take() {
                        let closed = network.close().await;
                        for entry in closed.rest {
                            t.network_log(entry).await;
                        }
                        if closed.dropped > 0 {
                            let line = format!(
                                "{} network log entries were dropped (more than the proxy's queue held)",
                                closed.dropped
                            );
                            t.system_log(LogLevel::Warn, &line).await;
                        }
                        match closed.over_rate {
                            Ok(0) => {}
                            Ok(n) => {
                                let line = format!(
                                    "{n} connection attempts and DNS queries were refused, not logged one by one: more than {} a second (VM0_NETWORK_NEW_CONNECTIONS_PER_SEC)",
                                    ctx.config.network_new_connections_per_sec
                                );
                                t.system_log(LogLevel::Warn, &line).await;
                            }
                            Err(why) => {
                                tracing::warn!(%why, "the run's refused connections could not be counted")
                            }
                        }
                    }
                    let (status, code, error) = outcome(exit, stop, spec.timeout_seconds);
                    // What the command left is kept however it ended by itself;
                    // not after a cancel or a sandbox that was lost.
                    let ended = stop.is_none() && (exit.code.is_some() || exit.signal.is_some());
                    let mut ending = (status, code, error);
                    let save = |tree: &'static str, saved: &[(String, Result<vm0_sandbox::TreeTaken, String>)]| {
                        let taken = saved
                            .iter()
                            .find(|(src, _)| *src == tree_src(tree))
                            .map(|(_, r)| r.clone());
                        save_tree(ctx, &spec, attempt, tree, taken)
                    };
                    if !spec.artifact_name.is_empty() && ended {
                        match save("work", &saved).await {
                            Ok((id, lines)) => {
                                for (level, line) in lines {
                                    t.system_log(level, &line).await;
                                }
                                artifact_upload_id = id;
                            }
                            Err(why) => {
                                t.system_log(LogLevel::Error, &why).await;
                                ending = (FinalStatus::Failed, code, why);
                            }
                        }
                    }
                    // A completed run's state makes its checkpoint.
                    if ending.0 == FinalStatus::Completed {
                        match save("state", &saved).await {
                            Ok((id, lines)) => {
                                for (level, line) in lines {
                                    t.system_log(level, &line).await;
                                }
                                state_upload_id = id;
                            }
                            Err(why) => {
                                t.system_log(LogLevel::Error, &why).await;
                                ending = (FinalStatus::Failed, code, why);
                            }
                        }
                    }
                    ending
                }
                Err(e) => {
                    let message = format!(
                        "the sandbox failed to start: {}",
                        vm0_telemetry::ErrorChain(&e)
                    );
                    t.system_log(LogLevel::Error, &message).await;
                    (FinalStatus::Failed, None, message)
                }
            }
        }
    };
    if t.output.dropped > 0 {
        let line = format!(
            "{} bytes of output were kept, {} dropped past the cap",
            t.output.kept, t.output.dropped
        );
        t.system_log(LogLevel::Warn, &line).await;
    }
    let span = tracing::Span::current();
    span.record(
        "status",
        status
            .as_str_name()
            .trim_start_matches("FINAL_STATUS_")
            .to_ascii_lowercase(),
    );
    if let Some(code) = exit_code {
        span.record("exit_code", code);
    }
    ctx.instruments
        .run_ended(final_status_name(status), end_reason(status, &error));
    t.settle().await;
    let finish = pb::FinishRequest {
        run_id: run_id.clone(),
        worker_id: ctx.config.worker_id.clone(),
        attempt,
        status: status.into(),
        exit_code,
        error,
        execution_time_ms: i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX),
        last_event_seq: t.next_seq - 1,
        artifact_upload_id,
        state_upload_id,
    };
    let done = retry("finish", || {
        let mut client = ctx.control.clone();
        let req = finish.clone();
        async move { client.finish(req).await }
    })
    .instrument(tracing::info_span!("finish"))
    .await;
    match done {
        Ok(resp) if !resp.accepted => {
            tracing::warn!(%run_id, "finish refused: the run was ended by the control plane meanwhile")
        }
        Ok(_) => tracing::info!(%run_id, ?status, "run finished"),
        Err(e) => {
            tracing::warn!(%run_id, error = %e, "finish failed; the control plane's reaper will end the run")
        }
    }
    ctx.transfers.done(&run_id).await;
    // Heartbeats name the run until its end is reported (its telemetry may take
    // a while to be stored): until then it is this worker's.
    if let Ok(mut running) = ctx.running.lock() {
        running.remove(&run_id);
    }
}

/// Where a tree of the run is in the sandbox.
fn tree_src(tree: &str) -> &'static str {
    match tree {
        "state" => crate::transfer::STATE_DIR,
        _ => "/work",
    }
}

/// Checks and uploads one tree the sandbox gave back (its `TreeSaved`):
/// `work` for the artifact, `state` for the checkpoint. Returns the upload's
/// id and the log lines to write, or the run's error.
async fn save_tree<S>(
    ctx: &WorkerCtx<S>,
    spec: &pb::RunSpec,
    attempt: u32,
    tree: &'static str,
    taken: Option<Result<vm0_sandbox::TreeTaken, String>>,
) -> Result<(String, Vec<(LogLevel, String)>), String> {
    let src = tree_src(tree);
    let fail = |why: String| match tree {
        "state" => format!("saving the state directory {src} failed: {why}"),
        _ => format!(
            "saving /work as artifact '{}' failed: {why}",
            spec.artifact_name
        ),
    };
    let taken = taken
        .unwrap_or_else(|| Err("the sandbox did not give it back".into()))
        .map_err(fail)?;
    // An empty state is no state: the checkpoint has none (nothing to upload).
    if tree == "state" && taken.files == 0 && taken.skipped.is_empty() {
        return Ok((String::new(), Vec::new()));
    }
    let mut lines: Vec<(LogLevel, String)> = taken
        .skipped
        .iter()
        .map(|skipped| (LogLevel::Warn, format!("{src}/{skipped}")))
        .collect();
    let (upload_id, line) = ctx
        .transfers
        .save_output(&ctx.control, &ctx.config.worker_id, spec, attempt, tree)
        .await
        .map_err(fail)?;
    lines.push((
        LogLevel::Info,
        format!(
            "{line} (taken out of the sandbox in {} ms)",
            taken.took.as_millis()
        ),
    ));
    Ok((upload_id, lines))
}

/// Streams the sandbox's events until it exits, stopping it on cancel, timeout or
/// worker shutdown.
async fn supervise<S: Sandbox>(
    t: &mut RunTelemetry<'_, S>,
    mut sandbox: vm0_sandbox::RunningSandbox,
    cancel: &CancellationToken,
    shutdown: &CancellationToken,
    timeout: Duration,
    saved: &mut Vec<(String, Result<vm0_sandbox::TreeTaken, String>)>,
    mut network: Option<&mut vm0_egress::RunEgress>,
) -> (ExitReport, Option<Stop>) {
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut stop: Option<Stop> = None;
    loop {
        tokio::select! {
            ev = sandbox.next_event() => match ev {
                Some(SandboxEvent::Stdout(b)) => emit(t, Stream::Stdout, &b).await,
                Some(SandboxEvent::Stderr(b)) => emit(t, Stream::Stderr, &b).await,
                Some(SandboxEvent::Sample(s)) => {
                    let net = network.as_ref().map(|n| n.bytes());
                    t.sample(s, net).await
                }
                Some(SandboxEvent::Log(line)) => t.system_log(LogLevel::Info, &line).await,
                // The backend's "sandbox started" log line carries the timings;
                // the metric takes the time to the agent's Ready.
                Some(SandboxEvent::Booted(timings)) => {
                    t.ctx.instruments.sandbox_started(t.ctx.sandbox.name(), timings.ready);
                }
                Some(SandboxEvent::TreeSaved { src, result }) => saved.push((src, result)),
                Some(SandboxEvent::Exited(exit)) => {
                    for (stream, rest) in t.masker.flush() {
                        t.output(stream, rest).await;
                    }
                    return (exit, stop);
                }
                None => {
                    let lost = ExitReport { code: None, signal: None, oom_killed: false };
                    return (lost, stop);
                }
            },
            Some(entry) = async {
                match network.as_mut() {
                    Some(n) => n.next_log().await,
                    None => std::future::pending().await,
                }
            } => t.network_log(entry).await,
            _ = cancel.cancelled(), if stop.is_none() => {
                stop = Some(Stop::Cancelled);
                sandbox.kill();
            }
            _ = shutdown.cancelled(), if stop.is_none() => {
                stop = Some(Stop::Shutdown);
                sandbox.kill();
            }
            _ = &mut deadline, if stop.is_none() => {
                stop = Some(Stop::Timeout);
                sandbox.kill();
            }
        }
    }
}

async fn emit<S>(t: &mut RunTelemetry<'_, S>, stream: Stream, bytes: &[u8]) {
    for line in t.masker.push(stream, bytes) {
        t.output(stream, line).await;
    }
}

fn final_status_name(status: FinalStatus) -> &'static str {
    match status {
        FinalStatus::Completed => "completed",
        FinalStatus::Failed => "failed",
        FinalStatus::Timeout => "timeout",
        FinalStatus::Cancelled => "cancelled",
        _ => "unknown",
    }
}

/// Why a run ended, as `/metrics` counts it (from what [`outcome`] and the
/// start's failures say).
fn end_reason(status: FinalStatus, error: &str) -> &'static str {
    match status {
        FinalStatus::Timeout => "timeout",
        FinalStatus::Cancelled => "cancelled",
        _ if error == "worker_shutdown" => "shutdown",
        _ if error.starts_with("out of memory") => "oom",
        _ if error.starts_with("the sandbox failed to start")
            || error.starts_with("the run's files could not be fetched") =>
        {
            "sandbox"
        }
        _ => "exit",
    }
}

fn outcome(
    exit: ExitReport,
    stop: Option<Stop>,
    timeout_s: u64,
) -> (FinalStatus, Option<i32>, String) {
    match stop {
        Some(Stop::Cancelled) => (FinalStatus::Cancelled, None, "cancelled by user".into()),
        Some(Stop::Timeout) => (
            FinalStatus::Timeout,
            None,
            format!("timed out after {timeout_s} s"),
        ),
        Some(Stop::Shutdown) => (FinalStatus::Failed, None, "worker_shutdown".into()),
        None if exit.oom_killed => (
            FinalStatus::Failed,
            exit.code,
            "out of memory: the kernel killed the agent".into(),
        ),
        None => match (exit.code, exit.signal) {
            (Some(0), _) => (FinalStatus::Completed, Some(0), String::new()),
            (Some(code), _) => (
                FinalStatus::Failed,
                Some(code),
                format!("exited with code {code}"),
            ),
            (None, Some(sig)) => (FinalStatus::Failed, None, format!("killed by signal {sig}")),
            (None, None) => (
                FinalStatus::Failed,
                None,
                "the sandbox ended without an exit status".into(),
            ),
        },
    }
}
