//! Sandboxes: where a run's command executes, isolated from the host.
//!
//! [`Sandbox::start`] takes a [`SandboxSpec`] and returns a [`RunningSandbox`]: a
//! stream of [`SandboxEvent`]s (output, resource samples, backend log lines, and
//! exactly one final `Exited`), and a kill switch. Whatever happens — normal exit,
//! kill, the worker dropping the handle — the backend's supervisor task removes
//! everything the run created (processes, scratch files) before `Exited` is sent.
//!
//! Backends: [`bubblewrap`] (namespaces on the host), and the microVM backends
//! [`qemu`] and [`cloud_hypervisor`], which share [`microvm`]. [`select`] picks one
//! for `VM0_SANDBOX=auto`.

/// The bubblewrap backend.
pub mod bubblewrap;
/// Per-run cgroups: resource limits where the sandbox shares the host kernel.
pub mod cgroup;
/// The Cloud Hypervisor backend.
pub mod cloud_hypervisor;
/// Guest images: kernel and initramfs, built from Debian packages.
pub mod image;
/// What the microVM backends share.
pub mod microvm;
/// The QEMU backend.
pub mod qemu;
/// The run user's `/etc` entry.
pub mod run_user;
/// Resource samples from `/proc`.
pub mod sample;
/// Choosing a backend (`VM0_SANDBOX`).
pub mod select;
/// Host uids of a worker's slots.
pub mod slot_user;
/// Spawning the processes around a run (bwrap, VMMs).
mod spawn;
/// Directory trees in and out through the guest agent.
mod trees;
/// A VMM's jail: its uid, mount namespace and files.
pub mod vmm_jail;

use std::path::PathBuf;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

pub use sample::ResourceSample;

/// What to run.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    pub run_id: String,
    /// argv; the first element is the program, looked up on `PATH` in the sandbox.
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Directory the command starts in, inside the sandbox (default `/work`).
    pub working_dir: Option<String>,
    /// Written to the command's stdin, which is then closed (unless `stdin_file`).
    pub stdin: Vec<u8>,
    /// The command's stdin is this file of the sandbox instead (one of `files`):
    /// a prompt of any size.
    pub stdin_file: Option<String>,
    pub vcpus: u32,
    pub memory_mb: u64,
    pub disk_mb: u64,
    /// Guest image name (`vm0 image build --name`); the backend's default when
    /// `None`. Only microVM backends have images.
    pub image: Option<String>,
    /// Files placed in the sandbox before the command starts.
    pub files: Vec<GuestFile>,
    /// Host directory for this run's files; created by the backend and removed
    /// when the run ends.
    pub scratch_dir: PathBuf,
    /// How often resource samples are taken.
    pub sample_interval: std::time::Duration,
    /// Run the command as root (microVMs only) instead of the run user.
    pub as_root: bool,
    /// The host uid and gid of the run's slot (a root worker has one per slot):
    /// what the command runs as in bubblewrap, and the VMM of a microVM. `None`:
    /// the worker's own user (a worker that is not root).
    pub slot_user: Option<slot_user::SlotUser>,
    /// Directory trees placed in the sandbox before the command starts.
    pub trees_in: Vec<TreeIn>,
    /// Directory trees taken out after the command ended (each reported by a
    /// [`SandboxEvent::TreeSaved`] before `Exited`).
    pub trees_out: Vec<TreeOut>,
    /// The run's network (the worker's egress: its only way out is the
    /// worker's proxy), attached as the backend asks
    /// ([`Sandbox::network_attachment`]). `None`: a namespace of its own with
    /// nothing in it, or a VM without a network card.
    pub network: Option<RunNetwork>,
}

/// How a backend's sandboxes are attached to a run's network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkAttachment {
    /// The sandbox's processes join a network namespace (bubblewrap).
    Namespace,
    /// A VM's network card is backed by a tap device (QEMU).
    Tap,
}

/// A run's network, as its sandbox is attached to it.
#[derive(Debug, Clone)]
pub enum RunNetwork {
    /// The network namespace the sandbox's processes join.
    Namespace(NetNamespace),
    /// The tap device the VM's network card is backed by.
    Tap(TapLink),
}

/// A network namespace, and the user namespace that owns it when that is not
/// the worker's own (an unprivileged worker's), joined first.
#[derive(Debug, Clone)]
pub struct NetNamespace {
    pub net: std::sync::Arc<std::os::fd::OwnedFd>,
    pub user: Option<std::sync::Arc<std::os::fd::OwnedFd>>,
}

/// A tap device, and the guest's addressing on it.
#[derive(Debug, Clone)]
pub struct TapLink {
    pub fd: std::sync::Arc<std::os::fd::OwnedFd>,
    pub address: std::net::Ipv4Addr,
    pub prefix: u8,
    pub gateway: std::net::Ipv4Addr,
}

impl TapLink {
    /// As the guest agent reads it from the kernel command line:
    /// `vm0.net=<address>/<prefix>,<gateway>`.
    pub fn cmdline(&self) -> String {
        format!("vm0.net={}/{},{}", self.address, self.prefix, self.gateway)
    }
}

/// A tree the command finds in its sandbox: a version's `.tar.gz` on the host,
/// unpacked at `dest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeIn {
    /// Absolute path in the sandbox.
    pub dest: String,
    /// The archive on the host.
    pub archive: PathBuf,
    /// The same tree already unpacked on the host (checked), when the worker
    /// has it: bubblewrap binds it read-only instead of copying.
    pub unpacked: Option<PathBuf>,
    /// The command may not change it (a volume).
    pub read_only: bool,
    pub max_bytes: u64,
    pub max_files: u64,
}

/// A tree taken out of the sandbox as a `.tar.gz` written on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeOut {
    /// Absolute path in the sandbox.
    pub src: String,
    /// Where the archive is written on the host (the worker checks it: it
    /// comes from inside the sandbox).
    pub archive: PathBuf,
    pub max_bytes: u64,
    pub max_files: u64,
}

/// What taking a tree out gave: the archive's size, and the guest's own count
/// of it (to be checked) with what it left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeTaken {
    pub archive_bytes: u64,
    pub files: u64,
    pub bytes: u64,
    pub skipped: Vec<String>,
    pub took: std::time::Duration,
}

/// How long each phase of a microVM's boot took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BootTimings {
    /// VMM process start until its sockets answer.
    pub vmm_spawn: std::time::Duration,
    /// Creating and booting the VM through the VMM's API (0 for QEMU).
    pub vm_configure: std::time::Duration,
    /// Kernel start to the guest agent running as init (the guest's uptime then).
    pub kernel_boot: std::time::Duration,
    /// The agent's setup (mounts, modules, host channel) until Ready.
    pub agent_init: std::time::Duration,
    /// VMM process start to Ready, as the host saw it.
    pub ready: std::time::Duration,
}

impl BootTimings {
    /// One line for the run's system log.
    pub fn summary(&self) -> String {
        format!(
            "vmm spawn {} ms, vm configure {} ms, kernel boot {} ms, agent init {} ms, \
             boot to guest agent ready {} ms",
            self.vmm_spawn.as_millis(),
            self.vm_configure.as_millis(),
            self.kernel_boot.as_millis(),
            self.agent_init.as_millis(),
            self.ready.as_millis()
        )
    }
}

/// A file the command finds in its sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestFile {
    /// Absolute path in the sandbox.
    pub path: String,
    pub data: Bytes,
    /// Permission bits (0: 0644).
    pub mode: u32,
}

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitReport {
    /// Exit code, when the command exited by itself.
    pub code: Option<i32>,
    /// Signal number, when it was killed.
    pub signal: Option<i32>,
    /// The kernel's OOM killer ended it.
    pub oom_killed: bool,
}

/// What a running sandbox reports.
#[derive(Debug, Clone, PartialEq)]
pub enum SandboxEvent {
    Stdout(Bytes),
    Stderr(Bytes),
    Sample(ResourceSample),
    /// A line about the sandbox itself (boot, backend), for the run's system log.
    Log(String),
    /// The sandbox's guest agent is ready (sent once, before any output);
    /// bubblewrap's timings hold only `ready`.
    Booted(BootTimings),
    /// A tree of `trees_out` after the command ended: its archive, or why not.
    TreeSaved {
        src: String,
        result: Result<TreeTaken, String>,
    },
    /// The last event: the command ended and everything was cleaned up.
    Exited(ExitReport),
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox backend {backend} is not usable here: {reason}")]
    Unavailable {
        backend: &'static str,
        reason: String,
    },
    #[error("guest image {name:?} is not built on this worker (vm0 image build --name {name})")]
    UnknownImage { name: String },
    #[error("the {backend} backend has no guest images; image {name:?} needs a microVM worker")]
    NoImages { backend: &'static str, name: String },
    #[error(
        "the {backend} backend runs commands unprivileged on the host kernel; user \"root\" needs a microVM worker"
    )]
    RootOnHost { backend: &'static str },
    #[error("input file {path:?}: {reason}")]
    InputFile { path: String, reason: String },
    #[error("preparing the sandbox's files failed")]
    Prepare(#[source] std::io::Error),
    #[error("setting the run's resource limits failed")]
    Limits(#[source] cgroup::CgroupError),
    #[error("starting {program} failed")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
}

/// A started sandbox.
#[derive(Debug)]
pub struct RunningSandbox {
    events: mpsc::Receiver<SandboxEvent>,
    kill: Option<oneshot::Sender<()>>,
}

impl RunningSandbox {
    pub(crate) fn new(events: mpsc::Receiver<SandboxEvent>, kill: oneshot::Sender<()>) -> Self {
        RunningSandbox {
            events,
            kill: Some(kill),
        }
    }

    /// The next event; `None` after `Exited`.
    pub async fn next_event(&mut self) -> Option<SandboxEvent> {
        self.events.recv().await
    }

    /// Stops the command now (idempotent). `Exited` follows once cleaned up.
    pub fn kill(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
    }
}

/// `name` in a directory of `PATH`.
pub(crate) fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// A place to run commands.
pub trait Sandbox: Send + Sync + 'static {
    /// Backend name, as the run's system log shows it.
    fn name(&self) -> &'static str;

    /// How a run's network is attached to this backend's sandboxes; `None`:
    /// they cannot have one.
    fn network_attachment(&self) -> Option<NetworkAttachment> {
        None
    }

    fn start(
        &self,
        spec: SandboxSpec,
    ) -> impl std::future::Future<Output = Result<RunningSandbox, SandboxError>> + Send;
}
