//! A whole stack for end-to-end tests: a real nats-server on a free port (with the
//! gateway's and the workers' users), gateways in this process (HTTP, and gRPC
//! over TLS, on free ports) over SQLite or PostgreSQL, and workers as real
//! `vm0-worker` processes with credentials of their own, so that a test can
//! `kill -9` one. Workers run as root unless a test asks for another user.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use vm0_bus::{NatsOptions, Role};
use vm0_db::Store;
use vm0_gateway::config::{DispatchConfig, GrpcTls};
use vm0_gateway::{Gateway, GatewayConfig};

pub use vm0_db::testing::TestDb as Db;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A nats-server with JetStream, killed on drop.
pub struct Nats {
    server: vm0_bus::server::NatsServer,
}

impl Nats {
    pub async fn start(dir: &Path) -> Nats {
        let server = vm0_bus::server::NatsServer::start(free_port(), &dir.join("nats"), None)
            .await
            .expect("nats-server starts (scripts/test.sh installs it)");
        Nats { server }
    }

    /// How `role` connects (address, user, password).
    pub fn options(&self, role: Role) -> NatsOptions {
        self.server.options(role)
    }

    /// Starts the server again (same port, same JetStream store) after `stop`.
    pub async fn resume(&mut self) {
        self.server.restart().await.expect("nats-server restarts");
    }

    /// Kills the server, as an outage would.
    pub async fn stop(&mut self) {
        self.server.kill().await;
    }
}

/// A worker process.
pub struct WorkerProc {
    pub id: String,
    /// Its credential (`VM0_WORKER_TOKEN`), which no run may ever see.
    pub credential: String,
    child: Child,
}

impl WorkerProc {
    /// SIGKILL, as a crash would.
    pub fn kill_9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM: drain.
    pub fn terminate(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `vm0-gateway` process (the real binary) on the stack's store and NATS:
/// what a test kills with SIGKILL. Killed on drop.
pub struct GatewayChild {
    pub base: String,
    child: Child,
}

impl GatewayChild {
    pub fn kill_9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for GatewayChild {
    fn drop(&mut self) {
        self.kill_9();
    }
}

/// The `vm0-gateway` binary, which cargo builds beside the worker's for the
/// workspace's tests.
fn gateway_binary() -> std::path::PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_vm0-worker")).with_file_name("vm0-gateway");
    assert!(
        path.exists(),
        "{} is missing: run the whole workspace's tests (cargo nextest run --workspace), \
         or cargo build -p vm0-gateway first",
        path.display()
    );
    path
}

pub struct GatewayProc {
    pub base: String,
    /// `https://127.0.0.1:<port>`, signed by the stack's CA (`Stack::ca_file`).
    pub grpc: String,
    shutdown: CancellationToken,
}

impl Drop for GatewayProc {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Options of a stack.
#[derive(Clone)]
pub struct StackOptions {
    pub gateways: usize,
    pub workers: usize,
    pub worker_slots: u32,
    pub worker_lost_after: Duration,
    /// What the gateways ask of workers (300 ms unless a test wants the defaults).
    pub heartbeat_interval: Duration,
    /// How long a cancel waits for the worker before the control plane ends the
    /// run itself (`VM0_CANCEL_WAIT_MS`; the gateway's default unless set).
    pub cancel_wait: Option<Duration>,
    pub pending_republish_after: Duration,
    /// `VM0_SANDBOX` of the workers.
    pub sandbox: &'static str,
    /// More environment for the workers.
    pub worker_env: Vec<(&'static str, String)>,
    /// The gateways' `VM0_AUTH_CACHE_SECS`.
    pub auth_cache_ttl: Duration,
    /// Run the workers as this uid (and gid) instead of root: an unprivileged
    /// worker, as the Dockerfile's `USER vm0` or `vm0 dev` by a normal user.
    pub worker_uid: Option<u32>,
    /// The gateways' records retention (`VM0_RUN_RECORDS_RETENTION_DAYS`),
    /// looked at every 200 ms; the gateway's default unless set.
    pub records_retention: Option<Duration>,
    /// What a version may hold (the gateways' `VM0_STORAGE_MAX_*`).
    pub storage_limits: Option<vm0_storage::Limits>,
    /// Volumes and artifacts on a moto S3 server started for the stack (all
    /// gateways share it) instead of each gateway's local store.
    pub s3: bool,
}

impl Default for StackOptions {
    fn default() -> Self {
        StackOptions {
            gateways: 1,
            workers: 1,
            worker_slots: 4,
            worker_lost_after: Duration::from_secs(60),
            heartbeat_interval: Duration::from_millis(300),
            cancel_wait: None,
            pending_republish_after: Duration::from_secs(30),
            sandbox: "bubblewrap",
            worker_env: Vec::new(),
            auth_cache_ttl: Duration::from_secs(5),
            worker_uid: None,
            records_retention: None,
            storage_limits: None,
            s3: false,
        }
    }
}

pub struct Stack {
    pub dir: tempfile::TempDir,
    pub nats: Nats,
    pub store: Store,
    pub gateways: Vec<GatewayProc>,
    pub workers: Vec<WorkerProc>,
    pub token: String,
    pub client: reqwest::Client,
    database_url: String,
    secrets_key: [u8; 32],
    options: StackOptions,
    s3: Option<vm0_storage::testing::Moto>,
}

impl Stack {
    pub async fn start(db: Db, options: StackOptions) -> Stack {
        let dir = tempfile::tempdir().expect("dir");
        let nats = Nats::start(dir.path()).await;
        let database_url = vm0_db::testing::fresh_database_url(db, dir.path()).await;
        let store = Store::connect(&database_url, 4).await.expect("store");
        // Migrated here too: a stack may start without in-process gateways.
        store.migrate().await.expect("migrate");
        let mut stack = Stack {
            nats,
            store,
            gateways: Vec::new(),
            workers: Vec::new(),
            token: String::new(),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("client"),
            database_url,
            secrets_key: rand_key(),
            options: options.clone(),
            s3: options
                .s3
                .then(|| vm0_storage::testing::Moto::start("vm0-e2e")),
            dir,
        };
        for _ in 0..options.gateways {
            stack.add_gateway().await;
        }
        stack.token = stack.mint_token("acme").await;
        for _ in 0..options.workers {
            stack.add_worker().await;
        }
        stack
    }

    pub async fn add_gateway(&mut self) {
        let mut config = GatewayConfig::for_database(self.database_url.clone());
        config.data_dir = self.dir.path().join(format!("gw{}", self.gateways.len()));
        config.auth_cache_ttl = self.options.auth_cache_ttl;
        if let Some(keep) = self.options.records_retention {
            config.records_retention = Some(keep);
            config.retention_interval = Duration::from_millis(200);
        }
        if let Some(limits) = self.options.storage_limits {
            config.storage.limits = limits;
        }
        if let Some(moto) = &self.s3 {
            config.storage.object_store_url = Some(format!("s3://{}/e2e", moto.bucket));
            config.storage.object_store_options = moto.s3_config();
        }
        let mut dispatch = DispatchConfig::new(self.nats.options(Role::Gateway));
        dispatch.grpc_tls = Some(GrpcTls::local(&self.tls_dir()).expect("control plane TLS"));
        dispatch.worker_lost_after = self.options.worker_lost_after;
        dispatch.pending_republish_after = self.options.pending_republish_after;
        dispatch.heartbeat_interval = self.options.heartbeat_interval;
        dispatch.reaper_interval = Duration::from_millis(200);
        if let Some(wait) = self.options.cancel_wait {
            dispatch.cancel_wait = wait;
        }
        config.dispatch = Some(dispatch);
        let gateway = Gateway::open(
            config,
            vm0_gateway::secrets::SecretBox::new(self.secrets_key),
        )
        .await
        .expect("open gateway");
        let http = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", http.local_addr().expect("addr"));
        let grpc_url = format!(
            "https://127.0.0.1:{}",
            grpc.local_addr().expect("addr").port()
        );
        let shutdown = CancellationToken::new();
        tokio::spawn(gateway.serve(http, Some(grpc), shutdown.clone()));
        self.gateways.push(GatewayProc {
            base,
            grpc: grpc_url,
            shutdown,
        });
    }

    /// Starts a `vm0-gateway` process serving the stack (API, persister, reaper,
    /// control plane on loopback); returns once it is ready.
    pub async fn spawn_gateway_process(&self, env: &[(&str, &str)]) -> GatewayChild {
        let http = free_port();
        let nats = self.nats.options(Role::Gateway);
        let creds = nats.credentials.clone().expect("the gateway role's user");
        let mut cmd = Command::new(gateway_binary());
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "warn")
            .env("VM0_HTTP_ADDR", format!("127.0.0.1:{http}"))
            .env("VM0_GRPC_ADDR", format!("127.0.0.1:{}", free_port()))
            .env(
                "VM0_DATA_DIR",
                self.dir.path().join(format!("gwproc-{http}")),
            )
            .env("DATABASE_URL", &self.database_url)
            .env("VM0_SECRETS_KEY", hex::encode(self.secrets_key))
            .env("VM0_NATS_URL", &nats.url)
            .env("VM0_NATS_USER", &creds.user)
            .env("VM0_NATS_PASSWORD", &creds.password)
            .envs(env.iter().copied())
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if let Some(ca) = &nats.ca {
            cmd.env("VM0_NATS_CA", ca);
        }
        let mut child = GatewayChild {
            base: format!("http://127.0.0.1:{http}"),
            child: cmd.spawn().expect("start vm0-gateway"),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let ready = self
                .client
                .get(format!("{}/readyz", child.base))
                .send()
                .await
                .is_ok_and(|r| r.status() == StatusCode::OK);
            if ready {
                return child;
            }
            if let Ok(Some(status)) = child.child.try_wait() {
                panic!("vm0-gateway exited at start: {status}");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "vm0-gateway not ready in 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The stack's database, for another gateway.
    pub fn database_url(&self) -> String {
        self.database_url.clone()
    }

    /// The secrets key the stack's gateways share.
    /// A JetStream client with the gateways' NATS rights (streams may be changed).
    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        let nats = self.nats.options(Role::Gateway);
        let creds = nats.credentials.clone().expect("creds");
        let client = async_nats::ConnectOptions::new()
            .user_and_password(creds.user, creds.password)
            .custom_inbox_prefix(Role::Gateway.inbox_prefix())
            .connect(&nats.url)
            .await
            .expect("connect");
        async_nats::jetstream::new(client)
    }

    pub fn secrets_key(&self) -> [u8; 32] {
        self.secrets_key
    }

    /// The directory of the stack's CA and control-plane certificate.
    pub fn tls_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("tls")
    }

    /// The CA the control plane's certificate chains to.
    pub fn ca_file(&self) -> std::path::PathBuf {
        self.tls_dir().join("ca.pem")
    }

    /// Mints worker `name`'s credential.
    pub async fn worker_credential(&self, name: &str) -> String {
        vm0_gateway::worker_auth::create_credential(&self.store, name)
            .await
            .expect("worker credential")
    }

    /// Starts a worker process talking to gateway `i % n`, with a credential of
    /// its own.
    pub async fn add_worker(&mut self) -> usize {
        let n = self.workers.len();
        let id = format!("w{n}-{}", std::process::id());
        let credential = self.worker_credential(&id).await;
        let secret = credential.clone();
        let gateway = &self.gateways[n % self.gateways.len()];
        let nats = self.nats.options(Role::Worker);
        let creds = nats.credentials.clone().expect("the worker role's user");
        let data_dir = self.dir.path().join("workers");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vm0-worker"));
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env(
                "RUST_LOG",
                std::env::var("VM0_E2E_WORKER_LOG")
                    .unwrap_or_else(|_| "warn,vm0_worker=info".into()),
            )
            .env("VM0_WORKER_ID", &id)
            .env("VM0_NATS_URL", &nats.url)
            .env("VM0_NATS_USER", &creds.user)
            .env("VM0_NATS_PASSWORD", &creds.password)
            .env("VM0_CONTROL_PLANE_URL", &gateway.grpc)
            .env("VM0_CONTROL_PLANE_CA", self.ca_file())
            .env("VM0_WORKER_TOKEN", credential)
            .env("VM0_WORKER_SLOTS", self.options.worker_slots.to_string())
            .env("VM0_DATA_DIR", &data_dir)
            .env("VM0_SAMPLE_INTERVAL_MS", "200")
            .env("VM0_DRAIN_TIMEOUT_SECS", "20")
            .env("VM0_SANDBOX", self.options.sandbox)
            // CI hosts' KVM cannot boot a guest kernel: skip the KVM probe.
            .env("VM0_QEMU_ACCEL", "tcg")
            .envs(
                ["VM0_GUEST_AGENT", "VM0_IMAGE_CACHE"]
                    .iter()
                    .filter_map(|k| std::env::var(k).ok().map(|v| (*k, v))),
            )
            .envs(self.options.worker_env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if let Some(uid) = self.options.worker_uid {
            // The unprivileged worker's own directories; it reads the CA and the
            // test's binaries, which are world-readable.
            for dir in [self.dir.path().to_owned(), data_dir.clone()] {
                std::fs::create_dir_all(&dir).expect("dir");
                let _ = std::os::unix::fs::chown(&dir, Some(uid), Some(uid));
            }
            use std::os::unix::fs::PermissionsExt;
            let _ =
                std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o755));
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(uid).env("HOME", &data_dir);
        }
        let child = cmd.spawn().expect("start vm0-worker");
        self.workers.push(WorkerProc {
            id,
            credential: secret,
            child,
        });
        n
    }

    /// The scratch directories left under the workers' data dir.
    pub fn scratch_dirs(&self) -> usize {
        let root = self.dir.path().join("workers").join("worker");
        let Ok(workers) = std::fs::read_dir(root) else {
            return 0;
        };
        workers
            .flatten()
            .filter_map(|w| std::fs::read_dir(w.path().join("runs")).ok())
            .map(|runs| runs.count())
            .sum()
    }

    /// The versions cached by the workers (directory names: version ids), and
    /// the transfer directories of runs left behind.
    pub fn cached_versions(&self) -> (Vec<String>, usize) {
        let root = self.dir.path().join("workers").join("worker");
        let (mut versions, mut transfers) = (Vec::new(), 0);
        for w in std::fs::read_dir(root).into_iter().flatten().flatten() {
            for v in std::fs::read_dir(w.path().join("versions"))
                .into_iter()
                .flatten()
                .flatten()
            {
                versions.push(v.file_name().to_string_lossy().into_owned());
            }
            transfers += std::fs::read_dir(w.path().join("transfers")).map_or(0, |d| d.count());
        }
        versions.sort();
        (versions, transfers)
    }

    pub async fn mint_token(&self, org: &str) -> String {
        let now = vm0_api_types::Timestamp::now().micros();
        let org = self.store.ensure_organization(org, now).await.expect("org");
        vm0_gateway::routes::tokens::create_token(&self.store, &org.id, "e2e", None, None)
            .await
            .expect("token")
            .token
    }

    pub fn url(&self, gateway: usize, path: &str) -> String {
        format!("{}{}", self.gateways[gateway].base, path)
    }

    pub async fn call(
        &self,
        gateway: usize,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let base = self.gateways[gateway].base.clone();
        self.call_at(&base, method, path, body).await
    }

    /// [`Stack::call`] to the gateway at `base` (one of its own or a process).
    pub async fn call_at(
        &self,
        base: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .client
            .request(method, format!("{base}{path}"))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let bytes = resp.bytes().await.expect("body");
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("json")
        };
        (status, value)
    }

    pub async fn get(&self, path: &str) -> Value {
        let (status, body) = self.call(0, reqwest::Method::GET, path, None).await;
        assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
        body
    }

    pub async fn create_agent(&self, name: &str, config: Value) {
        let (status, body) = self
            .call(
                0,
                reqwest::Method::POST,
                "/v1/agents",
                Some(json!({"name": name, "config": config})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }

    pub async fn create_run(&self, gateway: usize, body: Value) -> String {
        let (status, run) = self
            .call(gateway, reqwest::Method::POST, "/v1/runs", Some(body))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{run}");
        run["id"].as_str().expect("id").to_owned()
    }

    pub async fn run(&self, id: &str) -> Value {
        self.get(&format!("/v1/runs/{id}")).await
    }

    /// Waits until the run's status satisfies `done`; returns the run.
    pub async fn wait_for(
        &self,
        id: &str,
        timeout: Duration,
        done: impl Fn(&str) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let run = self.run(id).await;
            if done(run["status"].as_str().unwrap_or_default()) {
                return run;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "run {id} stuck: {run}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn wait_finished(&self, id: &str, timeout: Duration) -> Value {
        self.wait_for(id, timeout, |s| !matches!(s, "pending" | "running"))
            .await
    }

    /// Every log line of a run.
    pub async fn logs(&self, id: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor = String::new();
        loop {
            let page = self
                .get(&format!("/v1/runs/{id}/logs?limit=100&cursor={cursor}"))
                .await;
            out.extend(page["data"].as_array().expect("data").iter().cloned());
            match page["pagination"]["nextCursor"].as_str() {
                Some(c) => cursor = c.to_owned(),
                None => return out,
            }
        }
    }

    /// The whole SSE stream of a finished run (or until it ends), from `gateway`.
    /// Every output line of a run's event stream, joined.
    pub async fn output(&self, id: &str) -> String {
        output_of(&self.events(0, id, None).await)
    }

    pub async fn events(
        &self,
        gateway: usize,
        id: &str,
        last_event_id: Option<&str>,
    ) -> Vec<(String, Option<String>, Value)> {
        let mut req = self
            .client
            .get(self.url(gateway, &format!("/v1/runs/{id}/events")))
            .bearer_auth(&self.token);
        if let Some(l) = last_event_id {
            req = req.header("last-event-id", l);
        }
        let text = tokio::time::timeout(Duration::from_secs(60), async {
            req.send().await.expect("send").text().await.expect("text")
        })
        .await
        .expect("the stream ends");
        parse_sse(&text)
    }
}

/// The output lines of `(event, id, data)` events, joined.
pub fn output_of(events: &[(String, Option<String>, Value)]) -> String {
    events
        .iter()
        .filter(|e| e.0 == "output")
        .map(|e| e.2["content"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// `(event, id, data)` of each event of a whole stream.
pub fn parse_sse(text: &str) -> Vec<(String, Option<String>, Value)> {
    vm0_api_types::sse::parse_stream(text)
        .into_iter()
        .map(|e| {
            let data = serde_json::from_str(&e.data).unwrap_or(Value::Null);
            (e.event, e.id, data)
        })
        .collect()
}

fn rand_key() -> [u8; 32] {
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = (std::process::id() as u8)
            .wrapping_mul(31)
            .wrapping_add(i as u8);
    }
    k
}

pub use vm0_sandbox::sample::processes_matching as processes_with;

/// Waits until no process has `marker` in its command line; fails saying
/// `what` if one still does after `within`.
pub async fn assert_gone_within(marker: &str, within: Duration, what: &str) {
    let deadline = tokio::time::Instant::now() + within;
    while processes_with(marker) > 0 {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The processes whose command line contains `marker`, and all their
/// descendants (a jailed VMM's command line does not name its run; its jail's
/// does).
pub fn process_trees_matching(marker: &str) -> Vec<u32> {
    let roots = vm0_sandbox::sample::pids_matching(marker);
    let mut all: Vec<u32> = roots
        .iter()
        .flat_map(|r| vm0_sandbox::sample::process_tree(*r))
        .collect();
    all.sort_unstable();
    all.dedup();
    all
}

/// Whether process `pid` runs a program whose path contains `name`.
pub fn is_program(pid: u32, name: &str) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| e.to_string_lossy().contains(name))
}

/// A string unique to one test invocation, to find its processes.
pub fn marker(what: &str) -> String {
    format!(
        "e2e-{what}-{}",
        vm0_api_types::ids::new_id(vm0_api_types::ids::IdKind::Request).trim_start_matches("req_")
    )
}
