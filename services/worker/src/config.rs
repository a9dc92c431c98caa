//! Worker configuration from the environment.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use vm0_bus::NatsOptions;
use vm0_env_config::{parse_opt, parse_or};
use vm0_sandbox::cgroup::HostLimits;
use vm0_sandbox::select::{AccelChoice, SandboxKind, SelectOptions};
use vm0_sandbox::slot_user::UidRange;
use vm0_sandbox::vmm_jail::JailSetting;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// `VM0_WORKER_ID`: empty by default, meaning the name the credential was
    /// minted for (the control plane says it at registration); if set, it must
    /// be that name.
    pub worker_id: String,
    /// `VM0_NATS_URL` (default `nats://127.0.0.1:4222`) with the worker role's
    /// `VM0_NATS_USER`, `VM0_NATS_PASSWORD` and `VM0_NATS_CA`.
    pub nats: NatsOptions,
    /// `VM0_CONTROL_PLANE_URL`, default `http://127.0.0.1:9090`: `https://`
    /// anywhere but loopback.
    pub control_plane_url: String,
    /// `VM0_CONTROL_PLANE_CA`: the CA that signed the control plane's
    /// certificate (PEM); the system's roots when unset.
    pub control_plane_ca: Option<PathBuf>,
    /// `VM0_WORKER_TOKEN` (required): this worker's credential
    /// (`vm0-gateway worker-token create --name W`).
    pub worker_token: String,
    /// `VM0_WORKER_SLOTS`: runs at once, default the number of CPUs.
    pub slots: u32,
    /// Capacity, advertised and admitted against (`admission`):
    /// `VM0_WORKER_VCPUS` (default the larger of the machine's CPUs and the
    /// slots), `VM0_WORKER_MEMORY_MB` (default the machine's memory),
    /// `VM0_WORKER_DISK_MB`.
    pub vcpus: u32,
    pub memory_mb: u64,
    pub disk_mb: u64,
    /// `VM0_DATA_DIR`: scratch directories live under `<data dir>/worker/<id>/runs`.
    pub data_dir: PathBuf,
    /// `VM0_SAMPLE_INTERVAL_MS`, default 2000.
    pub sample_interval: Duration,
    /// `VM0_DRAIN_TIMEOUT_SECS`, default 60: on SIGTERM, how long running runs may
    /// take before they are stopped.
    pub drain_timeout: Duration,
    /// `VM0_METRICS_ADDR`: where `GET /metrics` (Prometheus) is served; unset,
    /// nowhere.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// `VM0_SANDBOX`: `auto` (default), `cloud-hypervisor`, `qemu` or `bubblewrap`.
    pub sandbox: SandboxKind,
    /// `VM0_QEMU_ACCEL`: `auto` (default: KVM if a probe VM boots, else TCG),
    /// `kvm` or `tcg`.
    pub qemu_accel: AccelChoice,
    /// `VM0_GUEST_AGENT`: the static guest agent for microVM images; default
    /// `vm0-guest-agent` next to this program, if that one is static.
    pub guest_agent: Option<PathBuf>,
    /// `VM0_KERNEL_PACKAGE`: the Debian kernel package of guest images (default:
    /// what `linux-image-amd64` depends on).
    pub kernel_package: Option<String>,
    /// `VM0_IMAGE_CACHE`: where guest images are built, default `<data dir>/images`.
    pub image_cache: Option<PathBuf>,
    /// `VM0_BUBBLEWRAP_LIMITS`: `auto` (default: a cgroup per run where the host
    /// allows) or `off`.
    pub bubblewrap_limits: HostLimits,
    /// `VM0_SLOT_UIDS`: the host uids a root worker's slots lease, one each
    /// (default 2000000-2000999).
    pub slot_uids: UidRange,
    /// `VM0_VMM_JAIL`: `on` (default: every VMM jailed, see `vmm_jail`) or `off`.
    pub vmm_jail: JailSetting,
    /// `VM0_VMM_LIMITS`: `auto` (default: a cgroup per VMM where the host
    /// allows) or `off`.
    pub vmm_limits: HostLimits,
    /// `VM0_RUN_OUTPUT_MAX_BYTES`, default 64 MiB: output a run may store (each
    /// line is stored twice, as an event and a log); past it, output is read
    /// and dropped, and the run's log says how much.
    pub output_max_bytes: u64,
    /// `VM0_VERSION_CACHE_MAX_BYTES`, default 10 GiB: the volume and artifact
    /// versions this worker keeps (least recently used go first; those runs
    /// use now stay).
    pub version_cache_max_bytes: u64,
    /// `VM0_NETWORK_TRUSTED_CIDRS` (default none): private ranges runs may reach
    /// (loopback, link-local, the worker's addresses, the control plane and
    /// NATS stay refused).
    pub network_trusted_cidrs: Vec<vm0_egress::policy::Cidr>,
    /// `VM0_NETWORK_MAX_CONNECTIONS`, default 256: connections a run has open
    /// through the proxy at once.
    pub network_max_connections: usize,
    /// `VM0_NETWORK_NEW_CONNECTIONS_PER_SEC`, default 1000: connections (and
    /// DNS queries) a run may start each second, bursts of twice that; 0 lifts
    /// it. What bounds the kernel memory its connection tracking holds.
    pub network_new_connections_per_sec: u32,
    /// `VM0_NETWORK_TLS_CA_FILE`: extra CA certificates (PEM) the proxy
    /// trusts, beside the system's, when it opens TLS to a host for a run's
    /// `secretHeaders`.
    pub network_tls_ca_pem: Option<String>,
}

/// `vm0-guest-agent` installed beside this program (as `deploy/` does).
fn sibling_guest_agent() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let agent = exe.parent()?.join("vm0-guest-agent");
    agent.is_file().then_some(agent)
}

/// Total memory of the machine in MB.
fn memory_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(1024, |kb| kb / 1024)
}

impl WorkerConfig {
    /// Defaults sized to this machine, with an empty token.
    pub fn defaults() -> WorkerConfig {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        WorkerConfig {
            worker_id: String::new(),
            nats: NatsOptions::new("nats://127.0.0.1:4222"),
            control_plane_url: "http://127.0.0.1:9090".into(),
            control_plane_ca: None,
            worker_token: String::new(),
            slots: cpus,
            vcpus: cpus,
            memory_mb: memory_mb(),
            disk_mb: 100_000,
            data_dir: PathBuf::from(".vm0"),
            sample_interval: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(60),
            metrics_addr: None,
            sandbox: SandboxKind::Auto,
            qemu_accel: AccelChoice::Auto,
            guest_agent: sibling_guest_agent(),
            kernel_package: None,
            image_cache: None,
            bubblewrap_limits: HostLimits::Auto,
            slot_uids: UidRange::default(),
            vmm_jail: JailSetting::On,
            vmm_limits: HostLimits::Auto,
            output_max_bytes: 64 * 1024 * 1024,
            version_cache_max_bytes: 10 << 30,
            network_trusted_cidrs: Vec::new(),
            network_max_connections: 256,
            network_new_connections_per_sec: 1000,
            network_tls_ca_pem: None,
        }
    }

    /// Overrides every field its environment variable sets, then validates.
    /// `vm0 dev` starts from here and sets the addresses and token itself.
    pub fn apply_env(self) -> Result<WorkerConfig> {
        let d = self;
        let nats = match std::env::var("VM0_NATS_URL") {
            Ok(url) => NatsOptions::new(url),
            Err(_) => d.nats,
        }
        .with_env()
        .map_err(anyhow::Error::msg)?;
        let slots = parse_or("VM0_WORKER_SLOTS", d.slots)?;
        let config = WorkerConfig {
            worker_id: parse_or("VM0_WORKER_ID", d.worker_id)?,
            nats,
            control_plane_url: parse_or("VM0_CONTROL_PLANE_URL", d.control_plane_url)?,
            control_plane_ca: parse_opt("VM0_CONTROL_PLANE_CA")?.or(d.control_plane_ca),
            worker_token: parse_or("VM0_WORKER_TOKEN", d.worker_token)?,
            slots,
            // Unset, slots alone bound runs of one vCPU each.
            vcpus: parse_or("VM0_WORKER_VCPUS", d.vcpus.max(slots))?,
            memory_mb: parse_or("VM0_WORKER_MEMORY_MB", d.memory_mb)?,
            disk_mb: parse_or("VM0_WORKER_DISK_MB", d.disk_mb)?,
            data_dir: parse_or("VM0_DATA_DIR", d.data_dir)?,
            sample_interval: Duration::from_millis(parse_or(
                "VM0_SAMPLE_INTERVAL_MS",
                u64::try_from(d.sample_interval.as_millis()).unwrap_or(u64::MAX),
            )?),
            drain_timeout: Duration::from_secs(parse_or(
                "VM0_DRAIN_TIMEOUT_SECS",
                d.drain_timeout.as_secs(),
            )?),
            metrics_addr: parse_opt("VM0_METRICS_ADDR")?,
            sandbox: parse_or("VM0_SANDBOX", d.sandbox)?,
            qemu_accel: parse_or("VM0_QEMU_ACCEL", d.qemu_accel)?,
            guest_agent: parse_opt("VM0_GUEST_AGENT")?.or(d.guest_agent),
            kernel_package: parse_opt("VM0_KERNEL_PACKAGE")?.or(d.kernel_package),
            image_cache: parse_opt("VM0_IMAGE_CACHE")?.or(d.image_cache),
            bubblewrap_limits: parse_or("VM0_BUBBLEWRAP_LIMITS", d.bubblewrap_limits)?,
            slot_uids: parse_or("VM0_SLOT_UIDS", d.slot_uids)?,
            vmm_jail: parse_or("VM0_VMM_JAIL", d.vmm_jail)?,
            vmm_limits: parse_or("VM0_VMM_LIMITS", d.vmm_limits)?,
            output_max_bytes: parse_or("VM0_RUN_OUTPUT_MAX_BYTES", d.output_max_bytes)?,
            version_cache_max_bytes: parse_or(
                "VM0_VERSION_CACHE_MAX_BYTES",
                d.version_cache_max_bytes,
            )?,
            network_trusted_cidrs: match std::env::var("VM0_NETWORK_TRUSTED_CIDRS") {
                Ok(s) => crate::network::parse_cidrs(&s)?,
                Err(_) => d.network_trusted_cidrs,
            },
            network_max_connections: parse_or(
                "VM0_NETWORK_MAX_CONNECTIONS",
                d.network_max_connections,
            )?,
            network_new_connections_per_sec: parse_or(
                "VM0_NETWORK_NEW_CONNECTIONS_PER_SEC",
                d.network_new_connections_per_sec,
            )?,
            network_tls_ca_pem: match std::env::var_os("VM0_NETWORK_TLS_CA_FILE") {
                Some(path) => {
                    let pem = std::fs::read_to_string(&path).with_context(|| {
                        format!("reading VM0_NETWORK_TLS_CA_FILE {}", path.to_string_lossy())
                    })?;
                    vm0_egress::intercept::upstream_tls(Some(&pem))?;
                    Some(pem)
                }
                None => d.network_tls_ca_pem,
            },
        };
        anyhow::ensure!(config.vcpus >= 1, "VM0_WORKER_VCPUS must be at least 1");
        anyhow::ensure!(config.slots >= 1, "VM0_WORKER_SLOTS must be at least 1");
        anyhow::ensure!(
            config.sample_interval >= Duration::from_millis(100),
            "VM0_SAMPLE_INTERVAL_MS must be at least 100"
        );
        Ok(config)
    }

    /// The directory name of this worker's scratch files (its id, once known).
    pub fn scratch_name(&self) -> &str {
        if self.worker_id.is_empty() {
            "unregistered"
        } else {
            &self.worker_id
        }
    }

    /// What choosing the sandbox backend needs.
    pub fn select_options(&self) -> SelectOptions {
        SelectOptions {
            kind: self.sandbox,
            qemu_accel: self.qemu_accel,
            guest_agent: self.guest_agent.clone(),
            busybox: PathBuf::from("/bin/busybox"),
            kernel_package: self.kernel_package.clone(),
            image_cache: self
                .image_cache
                .clone()
                .unwrap_or_else(|| self.data_dir.join("images")),
            scratch_dir: self.data_dir.join("worker").join(self.scratch_name()),
            bubblewrap_limits: self.bubblewrap_limits,
            slot_users: Vec::new(),
            vmm_jail: self.vmm_jail,
            vmm_limits: self.vmm_limits,
        }
    }

    /// The whole configuration from the environment; `VM0_WORKER_TOKEN` is required.
    pub fn from_env() -> Result<WorkerConfig> {
        std::env::var("VM0_WORKER_TOKEN").context(
            "VM0_WORKER_TOKEN must be set: this worker's credential (vm0-gateway worker-token create --name W)",
        )?;
        WorkerConfig::defaults().apply_env()
    }
}
