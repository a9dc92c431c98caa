//! The gRPC control plane workers talk to: registration, heartbeats, claims (the
//! fence), status reports and finishes. Served by every gateway; all state is in
//! the store, so a worker may talk to any replica.
//!
//! Every call is authenticated by the worker's own credential
//! ([`crate::worker_auth`]), which fixes who it is: a request about another
//! worker is refused, and reports and finishes are fenced by attempt and owner, so
//! a worker touches only runs it holds.

use std::collections::BTreeMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};
use vm0_api_types::Timestamp;
use vm0_api_types::agents::AgentConfig;
use vm0_api_types::ids::{IdKind, is_id};
use vm0_api_types::runs::RunStatus;
use vm0_bus::Bus;
use vm0_db::{ClaimOutcome, FinishOutcome, FinishRun, NewLog, StorageKind, Store, convert};
use vm0_proto::worker::control_plane_server::{ControlPlane, ControlPlaneServer};
use vm0_proto::worker::{self as pb, ClaimOutcome as PbClaim, FinalStatus};

use crate::config::DispatchConfig;
use crate::dispatch::publish_events;
use crate::error::ErrorChain;
use crate::secrets::SecretBox;
use crate::storage::{Announced, StorageService};
use crate::worker_auth::{WorkerAuth, identity};

/// Agent versions cached at most.
const VERSION_CACHE: usize = 10_000;

pub struct ControlPlaneService {
    store: Store,
    versions: std::sync::Mutex<std::collections::HashMap<String, AgentConfig>>,
    bus: Bus,
    secrets: SecretBox,
    config: Arc<DispatchConfig>,
    auth: WorkerAuth,
    storage: Arc<StorageService>,
    instruments: Arc<crate::prometheus::Instruments>,
}

/// The service; each call authenticates its worker.
pub fn server(
    store: Store,
    bus: Bus,
    secrets: SecretBox,
    config: Arc<DispatchConfig>,
    storage: Arc<StorageService>,
    instruments: Arc<crate::prometheus::Instruments>,
) -> ControlPlaneServer<ControlPlaneService> {
    ControlPlaneServer::new(ControlPlaneService {
        auth: WorkerAuth::new(store.clone()),
        store,
        versions: Default::default(),
        bus,
        secrets,
        config,
        storage,
        instruments,
    })
}

impl ControlPlaneService {
    /// The calling worker's id: its credential's name, which the request's
    /// `worker_id` must match (or leave empty).
    async fn caller<T>(&self, req: &Request<T>, claimed: &str) -> Result<String, Status> {
        let name = self.auth.authenticate(req.metadata()).await?;
        identity(&name, claimed)
    }
}

/// The span of one control-plane call: a child of the worker's span when the call
/// carries a trace context, and none otherwise (heartbeats stay out of traces).
pub fn rpc_span(req: &axum::http::Request<()>) -> tracing::Span {
    let Some(parent) = vm0_telemetry::propagation::traceparent_of(req.headers()) else {
        return tracing::Span::none();
    };
    let method = req.uri().path().rsplit('/').next().unwrap_or_default();
    let span = tracing::info_span!("rpc", otel.name = %format!("ControlPlane/{method}"), otel.kind = "server", rpc.method = %method);
    vm0_telemetry::propagation::set_remote_parent(&span, parent);
    span
}

fn internal(e: &dyn std::error::Error) -> Status {
    tracing::error!(error = %ErrorChain(e), "control plane request failed");
    Status::internal("control plane error; see the gateway's log")
}

fn check_run_id(id: &str) -> Result<(), Status> {
    is_id(IdKind::Run, id)
        .then_some(())
        .ok_or_else(|| Status::invalid_argument("run_id is not a run id"))
}

fn capacity_json(c: Option<pb::Capacity>) -> String {
    let c = c.unwrap_or_default();
    serde_json::json!({"slots": c.slots, "vcpus": c.vcpus, "memoryMb": c.memory_mb, "diskMb": c.disk_mb}).to_string()
}

fn final_status(s: i32) -> Result<RunStatus, Status> {
    match FinalStatus::try_from(s) {
        Ok(FinalStatus::Completed) => Ok(RunStatus::Completed),
        Ok(FinalStatus::Failed) => Ok(RunStatus::Failed),
        Ok(FinalStatus::Timeout) => Ok(RunStatus::Timeout),
        Ok(FinalStatus::Cancelled) => Ok(RunStatus::Cancelled),
        _ => Err(Status::invalid_argument("status must be a final status")),
    }
}

/// Beyond two heartbeats, how long a claimed run may go unreported by its worker
/// (the claim's answer in flight, a retried claim) before it is lost.
const RECONCILE_MARGIN_US: i64 = 5_000_000;

/// Why a run asking for `res` cannot run on `worker`, if it cannot.
fn too_large(
    res: &vm0_api_types::agents::Resources,
    worker: &vm0_db::entity::worker::Model,
) -> Option<String> {
    let capacity: serde_json::Value = serde_json::from_str(&worker.capacity).unwrap_or_default();
    let (vcpus, mem, disk) = (
        capacity["vcpus"].as_u64().unwrap_or(0),
        capacity["memoryMb"].as_u64().unwrap_or(0),
        capacity["diskMb"].as_u64().unwrap_or(0),
    );
    (u64::from(res.vcpus) > vcpus || res.memory_mb > mem || res.disk_mb > disk).then(|| {
        format!(
            "the agent asks for {} vCPUs, {} MB of memory and {} MB of disk, \
             more than worker {} has ({vcpus} vCPUs, {mem} MB, {disk} MB)",
            res.vcpus, res.memory_mb, res.disk_mb, worker.id
        )
    })
}

impl ControlPlaneService {
    /// Publishes stored events for live subscribers without holding up the worker's
    /// call (subscribers order events by sequence number, and read the store on a gap).
    fn publish_later(&self, events: Vec<vm0_db::entity::run_event::Model>) {
        if events.is_empty() {
            return;
        }
        let bus = self.bus.clone();
        tokio::spawn(async move { publish_events(&bus, &events).await });
    }

    /// An agent version's config. Versions never change, so they are cached.
    async fn agent_config(&self, version_id: &str) -> Result<Option<AgentConfig>, Status> {
        if let Some(config) = self
            .versions
            .lock()
            .ok()
            .and_then(|c| c.get(version_id).cloned())
        {
            return Ok(Some(config));
        }
        let Some(version) = self
            .store
            .get_agent_version_by_id(version_id)
            .await
            .map_err(|e| internal(&e))?
        else {
            return Ok(None);
        };
        let config = convert::agent_config(&version).map_err(|e| internal(&e))?;
        if let Ok(mut cache) = self.versions.lock() {
            if cache.len() >= VERSION_CACHE {
                cache.clear();
            }
            cache.insert(version_id.to_owned(), config.clone());
        }
        Ok(Some(config))
    }

    /// What the worker executes: the agent version's recipe plus the run's
    /// variables and secrets (`next_event_seq` is left for the claim to set). Err
    /// says why the run cannot run.
    fn spec(
        &self,
        run: &vm0_db::entity::run::Model,
        config: AgentConfig,
    ) -> Result<pb::RunSpec, String> {
        let variables: BTreeMap<String, String> =
            serde_json::from_str(&run.variables).unwrap_or_default();
        let secrets = match &run.secrets_sealed {
            Some(sealed) => self
                .secrets
                .open(&run.id, sealed)
                .map_err(|e| format!("the run's secrets cannot be opened: {}", ErrorChain(&e)))?,
            None => BTreeMap::new(),
        };
        let mut env: std::collections::HashMap<String, String> = config.env.into_iter().collect();
        env.extend(variables);
        let secret_values = secrets
            .values()
            .filter(|v| !v.is_empty())
            .cloned()
            .collect();
        // A secret a header carries goes to the proxy, never into the sandbox.
        let secret_headers = config
            .network
            .secret_headers
            .iter()
            .map(|(host, headers)| {
                let headers = headers
                    .iter()
                    .filter_map(|(header, name)| Some((header.clone(), secrets.get(name)?.clone())))
                    .collect();
                (host.clone(), pb::SecretHeaders { headers })
            })
            .collect();
        let hidden = config.network.secret_header_names();
        env.extend(
            secrets
                .iter()
                .filter(|(name, _)| !hidden.contains(name.as_str()))
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        Ok(pb::RunSpec {
            run_id: run.id.clone(),
            agent_id: run.agent_id.clone(),
            argv: config.command,
            env,
            secret_values,
            working_dir: config.working_dir.unwrap_or_default(),
            prompt: run.prompt.clone(),
            vcpus: config.resources.vcpus,
            memory_mb: config.resources.memory_mb,
            disk_mb: config.resources.disk_mb,
            timeout_seconds: config.timeout_seconds,
            image: config.image.unwrap_or_default(),
            next_event_seq: 0,
            as_root: config.user == vm0_api_types::agents::RunAs::Root,
            network: Some(pb::NetworkPolicy {
                mode: config.network.mode.as_str().into(),
                allow: config.network.allow,
                deny: config.network.deny,
                extra_hosts: config.network.extra_hosts.into_iter().collect(),
                secret_headers,
            }),
            artifact_name: run.artifact_name.clone().unwrap_or_default(),
            max_tree_bytes: self.storage.limits.max_total_bytes,
            max_tree_files: self.storage.limits.max_files as u64,
            ..Default::default()
        })
    }

    /// One version to fetch, with a signed URL of its archive; `None` when
    /// the storage or version is gone.
    async fn tree_version(
        &self,
        org_id: &str,
        kind: StorageKind,
        name: &str,
        version_id: &str,
    ) -> Result<Option<pb::TreeVersion>, Status> {
        let Some(storage) = self
            .store
            .find_storage(org_id, kind, name)
            .await
            .map_err(|e| internal(&e))?
        else {
            return Ok(None);
        };
        let Some(version) = self
            .store
            .find_storage_versions(&storage.id, version_id)
            .await
            .map_err(|e| internal(&e))?
            .into_iter()
            .find(|v| v.id == version_id)
        else {
            return Ok(None);
        };
        let url = self
            .storage
            .signed_url(
                vm0_storage::Access::Get,
                &crate::storage::keys::archive(&storage.id, &version.id),
                None,
                None,
                self.storage.expiry(),
                &self.storage.base(None),
            )
            .await
            .map_err(|e| Status::unavailable(e.body.message))?;
        Ok(Some(pb::TreeVersion {
            name: name.to_owned(),
            version_id: version.id,
            archive_url: url,
            size: u64::try_from(version.size).unwrap_or(0),
            file_count: u64::try_from(version.file_count).unwrap_or(0),
        }))
    }

    /// Adds the run's volumes and artifact version to `spec`; Err says why the
    /// run cannot run (a volume deleted since it was created).
    async fn with_trees(
        &self,
        run: &vm0_db::entity::run::Model,
        mut spec: pb::RunSpec,
    ) -> Result<Result<pb::RunSpec, String>, Status> {
        let volumes: BTreeMap<String, String> =
            serde_json::from_str(&run.volumes).unwrap_or_default();
        for (name, version) in volumes {
            match self
                .tree_version(&run.org_id, StorageKind::Volume, &name, &version)
                .await?
            {
                Some(tree) => spec.volumes.push(tree),
                None => {
                    return Ok(Err(format!(
                        "volume '{name}' version {version} was deleted before the run started"
                    )));
                }
            }
        }
        if let Some(chk) = &run.resumed_from {
            let state = self
                .store
                .get_checkpoint(&run.org_id, chk)
                .await
                .map_err(|e| internal(&e))?
                .and_then(|c| c.state_key);
            if let Some(version) = state {
                match self
                    .tree_version(&run.org_id, StorageKind::State, &run.session_id, &version)
                    .await?
                {
                    Some(tree) => spec.state = Some(tree),
                    None => {
                        return Ok(Err(format!(
                            "the state of checkpoint {chk} was deleted before the run started"
                        )));
                    }
                }
            }
        }
        if let (Some(name), Some(version)) = (&run.artifact_name, &run.artifact_version) {
            match self
                .tree_version(&run.org_id, StorageKind::Artifact, name, version)
                .await?
            {
                Some(tree) => spec.artifact = Some(tree),
                None => {
                    return Ok(Err(format!(
                        "artifact '{name}' version {version} was deleted before the run started"
                    )));
                }
            }
        }
        Ok(Ok(spec))
    }

    /// The storage a run's tree goes to: its artifact (`work`), or its
    /// session's state (`state`); created on first use.
    async fn output_storage(
        &self,
        run: &vm0_db::entity::run::Model,
        tree: &str,
    ) -> Result<vm0_db::entity::storage::Model, Status> {
        let (kind, name) = match tree {
            "" | "work" => (
                StorageKind::Artifact,
                run.artifact_name
                    .clone()
                    .ok_or_else(|| Status::failed_precondition("the run has no artifactName"))?,
            ),
            "state" => (StorageKind::State, run.session_id.clone()),
            other => {
                return Err(Status::invalid_argument(format!(
                    "tree {other:?} is neither \"work\" nor \"state\""
                )));
            }
        };
        if let Some(s) = self
            .store
            .find_storage(&run.org_id, kind, &name)
            .await
            .map_err(|e| internal(&e))?
        {
            return Ok(s);
        }
        match self
            .store
            .create_storage(&run.org_id, kind, &name, Timestamp::now().micros())
            .await
        {
            Ok(s) => Ok(s),
            // Made meanwhile by another run.
            Err(vm0_db::StoreError::NameTaken(_)) => self
                .store
                .find_storage(&run.org_id, kind, &name)
                .await
                .map_err(|e| internal(&e))?
                .ok_or_else(|| Status::unavailable("the storage was deleted meanwhile")),
            Err(e) => Err(internal(&e)),
        }
    }

    /// Commits an upload a worker made of one of the run's trees; Err is the
    /// run's error.
    async fn commit_output(
        &self,
        run: &vm0_db::entity::run::Model,
        tree: &str,
        upload_id: &str,
    ) -> Result<vm0_db::Committed, String> {
        let what = match tree {
            "state" => "the state directory".to_owned(),
            _ => format!(
                "/work as artifact '{}'",
                run.artifact_name.clone().unwrap_or_default()
            ),
        };
        let fail = |why: String| format!("saving {what} failed: {why}");
        let storage = self
            .output_storage(run, tree)
            .await
            .map_err(|s| fail(s.message().to_owned()))?;
        let upload = self
            .store
            .get_upload(upload_id)
            .await
            .map_err(|e| fail(e.to_string()))?
            .filter(|u| u.org_id == run.org_id && u.storage_id == storage.id)
            .ok_or_else(|| fail(format!("upload {upload_id} is not this run's")))?;
        self.storage
            .commit(&self.store, &storage, &upload, None)
            .await
            .map_err(|e| fail(e.body.message))
    }

    /// The run, if `worker_id` holds it at `attempt` (it is running there).
    async fn held_run(
        &self,
        run_id: &str,
        worker_id: &str,
        attempt: u32,
    ) -> Result<Option<vm0_db::entity::run::Model>, Status> {
        Ok(self
            .store
            .get_run_by_id(run_id)
            .await
            .map_err(|e| internal(&e))?
            .filter(|run| {
                run.status == RunStatus::Running.as_str()
                    && run.worker_id.as_deref() == Some(worker_id)
                    && i64::from(run.attempt) == i64::from(attempt)
            }))
    }

    async fn saved_line(&self, run_id: &str, message: String, version: &str) -> Result<(), Status> {
        let line = NewLog {
            key: None,
            ts: Timestamp::now().micros(),
            log_type: vm0_api_types::runs::LogType::System,
            level: vm0_api_types::runs::LogLevel::Info,
            message,
            metadata: serde_json::json!({"version": version}),
        };
        self.store
            .append_logs(run_id, &[line])
            .await
            .map_err(|e| internal(&e))
    }

    async fn reject(
        &self,
        run_id: &str,
        message: String,
    ) -> Result<Response<pb::ClaimResponse>, Status> {
        let now = Timestamp::now().micros();
        if let FinishOutcome::Finished { events, .. } = self
            .store
            .reject_pending_run(run_id, &message, now)
            .await
            .map_err(|e| internal(&e))?
        {
            publish_events(&self.bus, &events).await;
        }
        Ok(Response::new(pb::ClaimResponse {
            outcome: PbClaim::Rejected.into(),
            message,
            ..Default::default()
        }))
    }
}

#[tonic::async_trait]
impl ControlPlane for ControlPlaneService {
    async fn register_worker(
        &self,
        req: Request<pb::RegisterWorkerRequest>,
    ) -> Result<Response<pb::RegisterWorkerResponse>, Status> {
        let worker_id = self.caller(&req, &req.get_ref().worker_id).await?;
        let r = req.into_inner();
        self.store
            .register_worker(
                &worker_id,
                &r.hostname,
                &r.sandbox,
                &capacity_json(r.capacity),
                Timestamp::now().micros(),
            )
            .await
            .map_err(|e| internal(&e))?;
        tracing::info!(%worker_id, sandbox = %r.sandbox, capacity = ?r.capacity, "worker registered");
        Ok(Response::new(pb::RegisterWorkerResponse {
            worker_id,
            heartbeat_interval_ms: u32::try_from(self.config.heartbeat_interval.as_millis())
                .unwrap_or(u32::MAX),
            lost_after_ms: u32::try_from(self.config.worker_lost_after.as_millis())
                .unwrap_or(u32::MAX),
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let worker_id = self.caller(&req, &req.get_ref().worker_id).await?;
        let r = req.into_inner();
        let known = self
            .store
            .heartbeat_worker(
                &worker_id,
                &capacity_json(r.free),
                Timestamp::now().micros(),
            )
            .await
            .map_err(|e| internal(&e))?;
        if !known {
            return Ok(Response::new(pb::HeartbeatResponse {
                reregister: true,
                ..Default::default()
            }));
        }
        let cancel_run_ids = self
            .store
            .cancel_requested_runs(&worker_id)
            .await
            .map_err(|e| internal(&e))?;
        // A run is claimed, then the worker starts counting it: one that is
        // still unreported two heartbeats and a margin after its claim is lost.
        let now = Timestamp::now().micros();
        let margin = i64::try_from((self.config.heartbeat_interval * 2).as_micros())
            .unwrap_or(i64::MAX)
            .saturating_add(RECONCILE_MARGIN_US);
        let (stop_run_ids, ended) = self
            .store
            .reconcile_worker(
                &worker_id,
                &r.running_run_ids,
                now.saturating_sub(margin),
                now,
            )
            .await
            .map_err(|e| internal(&e))?;
        for outcome in ended {
            if let FinishOutcome::Finished { run, events } = outcome {
                tracing::warn!(run_id = %run.id, %worker_id, "run ended: its worker no longer runs it");
                self.publish_later(events);
            }
        }
        if !stop_run_ids.is_empty() {
            tracing::info!(%worker_id, runs = ?stop_run_ids, "telling a worker to stop runs that are not its own any more");
        }
        Ok(Response::new(pb::HeartbeatResponse {
            cancel_run_ids,
            reregister: false,
            stop_run_ids,
        }))
    }

    async fn claim(
        &self,
        req: Request<pb::ClaimRequest>,
    ) -> Result<Response<pb::ClaimResponse>, Status> {
        let worker_id = self.caller(&req, &req.get_ref().worker_id).await?;
        let r = req.into_inner();
        check_run_id(&r.run_id)?;
        let worker = self
            .store
            .get_worker(&worker_id)
            .await
            .map_err(|e| internal(&e))?
            .ok_or_else(|| Status::failed_precondition("unknown worker: register first"))?;
        // Everything that can refuse a pending run is decided before the
        // compare-and-set: a run is never left running with nothing to execute.
        let mut prepared = None;
        if let Some(run) = self
            .store
            .get_run_by_id(&r.run_id)
            .await
            .map_err(|e| internal(&e))?
            && run.status == RunStatus::Pending.as_str()
        {
            // From the store, not the version cache: a deleted agent is seen.
            let Some(version) = self
                .store
                .get_agent_version_by_id(&run.agent_version_id)
                .await
                .map_err(|e| internal(&e))?
            else {
                let why = format!(
                    "agent version {} was deleted before the run started",
                    run.agent_version_id
                );
                return self.reject(&r.run_id, why).await;
            };
            let config = match convert::agent_config(&version) {
                Ok(config) => config,
                Err(e) => {
                    let why = format!("the agent's config cannot be read: {e}");
                    return self.reject(&r.run_id, why).await;
                }
            };
            // A run that asks for more than this worker has would wait forever.
            if let Some(why) = too_large(&config.resources, &worker) {
                return self.reject(&r.run_id, why).await;
            }
            let spec = match self.spec(&run, config) {
                Ok(spec) => spec,
                Err(why) => return self.reject(&r.run_id, why).await,
            };
            match self.with_trees(&run, spec).await? {
                Ok(spec) => prepared = Some(spec),
                Err(why) => return self.reject(&r.run_id, why).await,
            }
        }
        let now = Timestamp::now().micros();
        let outcome = self
            .store
            .claim_run(&r.run_id, &worker_id, &r.claim_token, now)
            .await
            .map_err(|e| internal(&e))?;
        let (outcome, attempt, spec, events) = match outcome {
            ClaimOutcome::Claimed(c) => {
                // The first attempt's wait from created to claimed.
                if c.attempt == 1 {
                    self.instruments.run_dispatched(now - c.run.created_at);
                }
                // A lease given again (a retried claim) was not prepared above.
                let spec = match prepared {
                    Some(spec) => spec,
                    None => {
                        let config = self
                            .agent_config(&c.run.agent_version_id)
                            .await?
                            .ok_or_else(|| {
                                Status::failed_precondition("the run's agent version is gone")
                            })?;
                        let spec = self
                            .spec(&c.run, config)
                            .map_err(Status::failed_precondition)?;
                        self.with_trees(&c.run, spec)
                            .await?
                            .map_err(Status::failed_precondition)?
                    }
                };
                let spec = pb::RunSpec {
                    next_event_seq: c.next_event_seq,
                    ..spec
                };
                (PbClaim::Claimed, c.attempt, Some(spec), c.events)
            }
            ClaimOutcome::AlreadyClaimed => (PbClaim::AlreadyClaimed, 0, None, vec![]),
            ClaimOutcome::Cancelled => (PbClaim::Cancelled, 0, None, vec![]),
            ClaimOutcome::NotFound => (PbClaim::NotFound, 0, None, vec![]),
        };
        self.publish_later(events);
        tracing::debug!(run_id = %r.run_id, %worker_id, outcome = ?outcome, "claim");
        Ok(Response::new(pb::ClaimResponse {
            outcome: outcome.into(),
            attempt: u32::try_from(attempt).unwrap_or(0),
            spec,
            message: String::new(),
        }))
    }

    async fn report_status(
        &self,
        req: Request<pb::ReportStatusRequest>,
    ) -> Result<Response<pb::ReportStatusResponse>, Status> {
        let worker_id = self.caller(&req, &req.get_ref().worker_id).await?;
        let r = req.into_inner();
        check_run_id(&r.run_id)?;
        let current = self
            .held_run(&r.run_id, &worker_id, r.attempt)
            .await?
            .is_some();
        if current && !r.message.is_empty() {
            let line = NewLog {
                key: None,
                ts: Timestamp::now().micros(),
                log_type: vm0_api_types::runs::LogType::System,
                level: vm0_api_types::runs::LogLevel::Info,
                message: r.message.chars().take(4096).collect(),
                metadata: serde_json::json!({"workerId": worker_id}),
            };
            self.store
                .append_logs(&r.run_id, &[line])
                .await
                .map_err(|e| internal(&e))?;
        }
        Ok(Response::new(pb::ReportStatusResponse {
            accepted: current,
        }))
    }

    async fn finish(
        &self,
        req: Request<pb::FinishRequest>,
    ) -> Result<Response<pb::FinishResponse>, Status> {
        let worker_id = self.caller(&req, &req.get_ref().worker_id).await?;
        let r = req.into_inner();
        check_run_id(&r.run_id)?;
        let mut status = final_status(r.status)?;
        let mut error =
            (!r.error.is_empty()).then(|| r.error.chars().take(4096).collect::<String>());
        let mut artifact_version = None;
        let has_outputs = !r.artifact_upload_id.is_empty() || !r.state_upload_id.is_empty();
        // Only the run's current holder commits its outputs.
        let holder = if has_outputs {
            self.held_run(&r.run_id, &worker_id, r.attempt).await?
        } else {
            None
        };
        if let Some(run) = &holder
            && !r.artifact_upload_id.is_empty()
        {
            match self.commit_output(run, "work", &r.artifact_upload_id).await {
                Ok(c) => {
                    let message = format!(
                        "/work saved as artifact '{}' version {} ({} files, {} bytes{})",
                        c.storage.name,
                        c.version.id,
                        c.version.file_count,
                        c.version.size,
                        if c.created {
                            ""
                        } else {
                            "; the same content as before"
                        }
                    );
                    self.saved_line(&r.run_id, message, &c.version.id).await?;
                    artifact_version = Some(c.version.id);
                }
                Err(why) => {
                    status = RunStatus::Failed;
                    error = Some(why);
                }
            }
        }
        // A completed run leaves a checkpoint (with its state, when it had one),
        // written with the run's end.
        let mut state_version = None;
        if let Some(run) = &holder
            && status == RunStatus::Completed
            && !r.state_upload_id.is_empty()
        {
            match self.commit_output(run, "state", &r.state_upload_id).await {
                Ok(c) => {
                    let message = format!(
                        "the state directory saved as version {} ({} files, {} bytes)",
                        c.version.id, c.version.file_count, c.version.size
                    );
                    self.saved_line(&r.run_id, message, &c.version.id).await?;
                    state_version = Some(c.version.id);
                }
                Err(why) => {
                    status = RunStatus::Failed;
                    error = Some(why);
                }
            }
        }
        let checkpoint = (status == RunStatus::Completed).then(|| vm0_db::NewCheckpoint {
            id: vm0_api_types::ids::new_id(IdKind::Checkpoint),
            state_version,
        });
        let mut log = match (&error, r.exit_code) {
            (Some(e), _) => format!("run {status}: {e}"),
            (None, Some(code)) => format!("run {status} (exit code {code})"),
            (None, None) => format!("run {status}"),
        };
        if let Some(c) = &checkpoint {
            log.push_str(&format!("; checkpoint {} saved", c.id));
        }
        let finish = FinishRun {
            run_id: r.run_id.clone(),
            attempt: i32::try_from(r.attempt).unwrap_or(-1),
            worker_id: Some(worker_id.clone()),
            status,
            exit_code: r.exit_code,
            error,
            execution_time_ms: Some(r.execution_time_ms.max(0)),
            last_worker_seq: r.last_event_seq,
            log,
            now: Timestamp::now().micros(),
            artifact_version,
            checkpoint,
        };
        let accepted = match self
            .store
            .finish_run(finish)
            .await
            .map_err(|e| internal(&e))?
        {
            FinishOutcome::Finished { events, .. } => {
                self.instruments.run_finished(status, "worker");
                self.publish_later(events);
                true
            }
            FinishOutcome::Stale => false,
        };
        tracing::debug!(run_id = %r.run_id, %worker_id, %status, accepted, "finish");
        Ok(Response::new(pb::FinishResponse { accepted }))
    }

    async fn begin_output(
        &self,
        req: Request<pb::BeginOutputRequest>,
    ) -> Result<Response<pb::BeginOutputResponse>, Status> {
        let worker_id = self.caller(&req, &req.get_ref().worker_id).await?;
        let r = req.into_inner();
        check_run_id(&r.run_id)?;
        let run = self
            .held_run(&r.run_id, &worker_id, r.attempt)
            .await?
            .ok_or_else(|| Status::failed_precondition("the run is not this worker's attempt"))?;
        let storage = self.output_storage(&run, &r.tree).await?;
        let files = r
            .files
            .into_iter()
            .map(|f| Announced {
                path: f.path,
                size: f.size,
                sha256: (!f.sha256.is_empty()).then_some(f.sha256),
                link: (!f.link.is_empty()).then_some(f.link),
            })
            .collect();
        let (upload, urls) = self
            .storage
            .begin_upload(
                &self.store,
                &storage,
                files,
                Some(match r.tree.as_str() {
                    "state" => format!("the state directory of run {}", run.id),
                    _ => format!("/work of run {}", run.id),
                }),
                &run.id,
                &self.storage.base(None),
            )
            .await
            .map_err(|e| Status::invalid_argument(e.body.message))?;
        Ok(Response::new(pb::BeginOutputResponse {
            upload_id: upload.id,
            upload_urls: urls.into_iter().map(Option::unwrap_or_default).collect(),
        }))
    }
}
