//! What every microVM backend shares: one VM per run booting a [`GuestImage`]
//! whose `/init` is the guest agent, the host side of the guest protocol over one
//! byte stream, boot retries, and cleanup. A backend ([`Vmm`]) only knows how to
//! start its VMM, connect the guest channel and stop the VM.
//!
//! Around every VMM: its jail ([`crate::vmm_jail`]: the slot's uid, a mount
//! namespace with only the VM's files), a cgroup of its own (the guest's memory
//! plus [`VMM_OVERHEAD_MB`], `vcpus` plus [`VMM_OVERHEAD_CPUS`] CPUs,
//! [`VMM_PIDS_MAX`] tasks) that it is born into, and its console and messages kept in memory, the last
//! [`CONSOLE_KEPT`] bytes only ([`ConsoleLog`]): a guest that floods its serial
//! port fills neither the worker's disk nor its memory.
//!
//! [`GuestImage`]: crate::image::GuestImage

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::process::Child;
use tokio::sync::{mpsc, oneshot};
use vm0_proto::frame;
use vm0_proto::guest::{
    Cancel, GuestMessage, HostMessage, OutputStream, Ready, Start, WriteFile, guest_message,
    host_message,
};

use crate::cgroup::{Hierarchy, Limits, RunCgroup};
use crate::image::{GuestImage, ImageCatalog};
use crate::vmm_jail::VmmJail;
use crate::{
    BootTimings, ExitReport, ResourceSample, RunningSandbox, Sandbox, SandboxError, SandboxEvent,
    SandboxSpec,
};

/// Host memory a VMM may use beyond its guest's RAM: its own code and heap, and
/// under TCG the translated-code cache (see docs/benchmarks.md for what was
/// measured).
pub const VMM_OVERHEAD_MB: u64 = 256;
/// CPUs a VMM may use beyond its guest's: its own threads (the main loop, I/O,
/// RCU) run beside the vCPUs'. Without it a TCG boot took 0.45 s longer at p50
/// (docs/benchmarks.md).
pub const VMM_OVERHEAD_CPUS: u32 = 1;
/// Tasks (processes and threads) a VMM's cgroup may hold.
pub const VMM_PIDS_MAX: u64 = 512;
/// What of a VMM's console and messages is kept.
pub const CONSOLE_KEPT: usize = 64 * 1024;

/// The end of what a VMM wrote on its stdout (the guest's serial console) and
/// stderr, in memory and bounded.
#[derive(Clone, Default)]
pub struct ConsoleLog(std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<u8>>>);

impl std::fmt::Debug for ConsoleLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ConsoleLog({} bytes)", self.len())
    }
}

impl ConsoleLog {
    /// Appends what `reader` yields until it ends, keeping the last
    /// [`CONSOLE_KEPT`] bytes.
    pub fn follow(
        &self,
        mut reader: impl AsyncRead + Send + Unpin + 'static,
    ) -> tokio::task::JoinHandle<()> {
        use tokio::io::AsyncReadExt;
        let log = self.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            while let Ok(n) = reader.read(&mut buf).await {
                if n == 0 {
                    return;
                }
                if let Ok(mut kept) = log.0.lock() {
                    kept.extend(&buf[..n]);
                    let excess = kept.len().saturating_sub(CONSOLE_KEPT);
                    kept.drain(..excess);
                }
            }
        })
    }

    /// Bytes kept now.
    pub fn len(&self) -> usize {
        self.0.lock().map(|k| k.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The last `lines` lines.
    pub fn tail(&self, lines: usize) -> String {
        let text = match self.0.lock() {
            Ok(kept) => {
                String::from_utf8_lossy(&kept.iter().copied().collect::<Vec<u8>>()).into_owned()
            }
            Err(_) => String::new(),
        };
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// Boot to guest agent ready, at most (TCG boots in ~4 s here). A boot that stalls
/// is retried: under TCG on these hosts an occasional guest never leaves early boot.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(20);
const BOOT_ATTEMPTS: u32 = 3;
/// After asking the guest to stop: SIGTERM grace inside, then the VM is stopped.
const CANCEL_GRACE_MS: u32 = 1000;
const HARD_KILL_AFTER: Duration = Duration::from_secs(3);

/// The host's end of the guest channel.
pub struct GuestLink {
    pub rx: Box<dyn AsyncRead + Send + Unpin>,
    pub tx: Box<dyn AsyncWrite + Send + Unpin>,
}

impl GuestLink {
    /// Both directions of a unix socket (QEMU's chardev, the hybrid vsock).
    pub fn unix(stream: tokio::net::UnixStream) -> GuestLink {
        let (rx, tx) = stream.into_split();
        GuestLink {
            rx: Box::new(rx),
            tx: Box::new(tx),
        }
    }
}

/// Files of one VM, all inside the run's scratch directory (host paths).
#[derive(Debug, Clone)]
pub struct VmFiles {
    /// The VMM's one writable directory (its jail's `/jail`).
    pub jail_dir: PathBuf,
    /// The guest channel's unix socket (QEMU's chardev, Cloud Hypervisor's vsock).
    pub guest_socket: PathBuf,
    /// The VMM's control socket (Cloud Hypervisor's REST API).
    pub api_socket: PathBuf,
    /// The guest's serial console and the VMM's messages, for failure reports.
    pub console: ConsoleLog,
}

impl VmFiles {
    /// The files of a VM whose scratch directory is `dir`.
    pub fn in_dir(dir: &Path) -> VmFiles {
        let jail_dir = dir.join("vmm");
        VmFiles {
            guest_socket: jail_dir.join("guest.sock"),
            api_socket: jail_dir.join("vmm.sock"),
            jail_dir,
            console: ConsoleLog::default(),
        }
    }
}

/// A VM whose guest channel is connected (the agent may not be ready yet).
pub struct Vm {
    pub process: Child,
    pub link: GuestLink,
    /// VMM process start to its sockets answering.
    pub vmm_spawn: Duration,
    /// Configuring and starting the VM through the VMM's API (0 for QEMU).
    pub vm_configure: Duration,
}

/// Why a boot failed: the stage it reached and what went wrong.
#[derive(Debug)]
pub struct BootFailure {
    pub stage: &'static str,
    pub reason: String,
}

impl BootFailure {
    pub fn new(stage: &'static str, reason: impl Into<String>) -> BootFailure {
        BootFailure {
            stage,
            reason: reason.into(),
        }
    }
}

/// A virtual machine monitor that boots guest images.
pub trait Vmm: Send + Sync + 'static {
    /// Backend name, as logs and the run's system log show it.
    fn name(&self) -> &'static str;
    /// Name plus how it runs, e.g. `qemu (tcg)`.
    fn describe(&self) -> String;
    /// How a run's network reaches the VM; `None`: it gets no network card.
    fn network_attachment(&self) -> Option<crate::NetworkAttachment> {
        None
    }
    /// Software emulation: boots on one host are taken one at a time.
    fn serialize_boots(&self) -> bool {
        false
    }
    /// Starts the VMM (through `host`: its jail and cgroup) and the VM, and
    /// connects the guest channel, before `deadline`. On failure the VMM process
    /// must be gone.
    fn launch(
        &self,
        host: &VmmHost<'_>,
        deadline: tokio::time::Instant,
    ) -> impl Future<Output = Result<Vm, BootFailure>> + Send;
    /// Stops the VM and makes sure the VMM process is gone.
    fn stop(&self, vm: &mut Vm, files: &VmFiles) -> impl Future<Output = ()> + Send;
}

/// What a VMM is started with for one VM: the request, its jail (if any) and
/// its cgroup (if any).
pub struct VmmHost<'a> {
    pub spec: &'a SandboxSpec,
    pub image: &'a GuestImage,
    pub files: &'a VmFiles,
    pub jail: Option<&'a VmmJail>,
    pub cgroup: Option<&'a RunCgroup>,
}

impl VmmHost<'_> {
    /// The VMM's command for `program` (in its jail, born in its cgroup), with
    /// the paths its arguments must name.
    pub fn launch(&self, program: &Path, kvm: bool) -> std::io::Result<crate::vmm_jail::VmmLaunch> {
        let req = crate::vmm_jail::JailRequest {
            image: self.image,
            files: self.files,
            user: self.spec.slot_user,
            kvm,
        };
        let mut launch = crate::vmm_jail::VmmLaunch::new(self.jail, program, &req)?;
        // Its console and messages go to the bounded log.
        launch
            .cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if let Some(cgroup) = self.cgroup {
            let procs = cgroup
                .dirs()
                .iter()
                .map(|d| {
                    std::ffi::CString::new(
                        d.join("cgroup.procs").into_os_string().into_encoded_bytes(),
                    )
                    .map_err(std::io::Error::other)
                })
                .collect::<std::io::Result<Vec<_>>>()?;
            crate::spawn::join_cgroups(&mut launch.cmd, procs);
        }
        Ok(launch)
    }

    /// Spawns `cmd` (which inherits `fds`, under their numbers), its stdout
    /// and stderr followed into the console log.
    pub fn spawn(
        &self,
        cmd: &mut tokio::process::Command,
        fds: &[std::os::fd::OwnedFd],
    ) -> std::io::Result<Child> {
        let mut child = crate::spawn::spawn(cmd, fds)?;
        if let Some(out) = child.stdout.take() {
            self.files.console.follow(out);
        }
        if let Some(err) = child.stderr.take() {
            self.files.console.follow(err);
        }
        Ok(child)
    }
}

/// A [`Sandbox`] that runs each command in its own microVM.
#[derive(Debug, Clone)]
pub struct MicroVm<V> {
    vmm: std::sync::Arc<V>,
    /// The image of runs that name none.
    default_image: GuestImage,
    /// Where named images are found.
    catalog: Option<ImageCatalog>,
    /// Every VMM's jail (`None`: VMMs run unjailed, `VM0_VMM_JAIL=off`).
    jail: Option<std::sync::Arc<VmmJail>>,
    /// Where VMMs get their cgroup, or why they get none.
    limits: std::sync::Arc<Result<Hierarchy, String>>,
}

impl<V: Vmm> MicroVm<V> {
    /// VMMs unjailed and without cgroups: add them with [`MicroVm::with_jail`]
    /// and [`MicroVm::with_limits`].
    pub fn new(vmm: V, default_image: GuestImage) -> MicroVm<V> {
        MicroVm {
            vmm: std::sync::Arc::new(vmm),
            default_image,
            catalog: None,
            jail: None,
            limits: std::sync::Arc::new(Err("not asked for".into())),
        }
    }

    /// Every VMM runs in a jail made with `jail`.
    pub fn with_jail(mut self, jail: VmmJail) -> MicroVm<V> {
        self.jail = Some(std::sync::Arc::new(jail));
        self
    }

    /// Every VMM gets a cgroup under `limits` (or, with the reason, none).
    pub fn with_limits(mut self, limits: Result<Hierarchy, String>) -> MicroVm<V> {
        self.limits = std::sync::Arc::new(limits);
        self
    }

    /// Whether VMMs are jailed.
    pub fn jailed(&self) -> bool {
        self.jail.is_some()
    }

    /// Runs may name images of this catalog.
    pub fn with_catalog(mut self, catalog: ImageCatalog) -> MicroVm<V> {
        self.catalog = Some(catalog);
        self
    }

    pub fn vmm(&self) -> &V {
        &self.vmm
    }

    fn image(&self, name: Option<&str>) -> Result<GuestImage, SandboxError> {
        match name {
            None | Some("default") => Ok(self.default_image.clone()),
            Some(name) => self
                .catalog
                .as_ref()
                .and_then(|c| c.find(name))
                .ok_or_else(|| SandboxError::UnknownImage { name: name.into() }),
        }
    }
}

impl<V: Vmm> Sandbox for MicroVm<V> {
    fn name(&self) -> &'static str {
        self.vmm.name()
    }

    fn network_attachment(&self) -> Option<crate::NetworkAttachment> {
        self.vmm.network_attachment()
    }

    async fn start(&self, spec: SandboxSpec) -> Result<RunningSandbox, SandboxError> {
        let image = self.image(spec.image.as_deref())?;
        tokio::fs::create_dir_all(&spec.scratch_dir)
            .await
            .map_err(SandboxError::Prepare)?;
        let (events_tx, events_rx) = mpsc::channel(256);
        let (kill_tx, kill_rx) = oneshot::channel();
        let vmm = self.vmm.clone();
        let jail = self.jail.clone();
        let (cgroup, limits_line) = match self.limits.as_ref() {
            Ok(hierarchy) => {
                let limits = Limits {
                    memory_mb: spec.memory_mb.max(128) + VMM_OVERHEAD_MB,
                    vcpus: spec.vcpus.max(1) + VMM_OVERHEAD_CPUS,
                    pids: VMM_PIDS_MAX,
                };
                let cgroup = hierarchy
                    .create(&spec.run_id, &limits)
                    .map_err(SandboxError::Limits)?;
                (Some(cgroup), format!("VMM {limits}"))
            }
            Err(why) => (None, format!("VMM without a cgroup: {why}")),
        };
        let jail_line = match &jail {
            Some(_) => match spec.slot_user {
                Some(u) => format!("VMM jailed as uid {}", u.uid),
                None => "VMM jailed as the worker's user".to_owned(),
            },
            None => "VMM not jailed (VM0_VMM_JAIL=off)".to_owned(),
        };
        // The hierarchy outlives the run's cgroup (dropping it removes its groups).
        let hierarchy = self.limits.clone();
        tokio::spawn(async move {
            let _hierarchy = hierarchy;
            let files = VmFiles::in_dir(&spec.scratch_dir);
            let vm = VmRequest {
                spec: &spec,
                image: &image,
                files: &files,
                jail: jail.as_deref(),
                cgroup: cgroup.as_ref(),
                about: format!("{jail_line}; {limits_line}"),
            };
            let mut exit = supervise(&*vmm, &vm, kill_rx, &events_tx).await;
            // The host's OOM killer ended the VMM at its cgroup's limit.
            if cgroup.as_ref().is_some_and(|c| c.oom_kills() > 0) {
                exit.oom_killed = true;
            }
            // Removing the cgroup may wait a moment for the kernel to let go of it.
            let _ = tokio::task::spawn_blocking(move || drop(cgroup)).await;
            if let Err(e) = tokio::fs::remove_dir_all(&spec.scratch_dir).await
                && e.kind() != std::io::ErrorKind::NotFound
            {
                let line = format!("removing the scratch dir failed: {e}");
                let _ = events_tx.send(SandboxEvent::Log(line)).await;
            }
            let _ = events_tx.send(SandboxEvent::Exited(exit)).await;
        });
        Ok(RunningSandbox::new(events_rx, kill_tx))
    }
}

/// What one VM is booted from.
#[derive(Clone)]
struct VmRequest<'a> {
    spec: &'a SandboxSpec,
    image: &'a GuestImage,
    files: &'a VmFiles,
    jail: Option<&'a VmmJail>,
    cgroup: Option<&'a RunCgroup>,
    /// How the VMM is confined, for the run's log.
    about: String,
}

impl VmRequest<'_> {
    fn host(&self) -> VmmHost<'_> {
        VmmHost {
            spec: self.spec,
            image: self.image,
            files: self.files,
            jail: self.jail,
            cgroup: self.cgroup,
        }
    }
}

/// A host-wide lock held while a TCG guest boots. On the 2-core machines this
/// project tests on, two TCG guests booting at once sometimes never reach the
/// guest agent (both vCPU threads spin; the serial console stays empty); booting
/// them one after the other does not show it. Running guests do not take the lock.
async fn boot_gate() -> Option<nix::fcntl::Flock<std::fs::File>> {
    let path = std::env::temp_dir().join("vm0-tcg-boot.lock");
    tokio::task::spawn_blocking(move || {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .ok()?;
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).ok()
    })
    .await
    .ok()
    .flatten()
}

pub(crate) const LOST: ExitReport = ExitReport {
    code: None,
    signal: None,
    oom_killed: false,
};

/// One boot: launch, then wait for the agent's Ready. On failure the VM is stopped.
async fn boot_once<V: Vmm>(
    vmm: &V,
    req: &VmRequest<'_>,
    timeout: Duration,
) -> Result<(Vm, BootTimings), BootFailure> {
    let files = req.files;
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut vm = vmm.launch(&req.host(), deadline).await?;
    let why = match wait_ready(&mut vm.link, deadline).await {
        Ok(ready) => {
            let timings = timings(&vm, &ready, started.elapsed());
            return Ok((vm, timings));
        }
        Err(why) => why,
    };
    // A VMM that exited says why on its console (e.g. no access to /dev/kvm).
    let exited = vm.process.try_wait().ok().flatten();
    vmm.stop(&mut vm, files).await;
    Err(match exited {
        Some(status) => {
            tokio::time::sleep(Duration::from_millis(50)).await;
            BootFailure::new(
                "vmm-spawn",
                format!(
                    "{} exited ({status}) before the guest agent was ready: {}",
                    vmm.name(),
                    files.console.tail(5)
                ),
            )
        }
        None => BootFailure::new(
            "kernel-boot",
            format!("{why}; serial log tail:\n{}", files.console.tail(20)),
        ),
    })
}

/// Waits for the agent's `Ready` until `deadline`; why not, otherwise.
pub(crate) async fn wait_ready(
    link: &mut GuestLink,
    deadline: tokio::time::Instant,
) -> Result<Ready, String> {
    let started = tokio::time::Instant::now();
    let ready = tokio::time::timeout_at(deadline, frame::read::<GuestMessage, _>(&mut link.rx));
    match ready.await {
        Ok(Ok(Some(GuestMessage {
            kind: Some(guest_message::Kind::Ready(ready)),
        }))) => Ok(ready),
        Err(_) => Err(format!(
            "no guest agent after {:.1} s",
            deadline.duration_since(started).as_secs_f64()
        )),
        Ok(Err(e)) => Err(format!("garbage from the guest: {e}")),
        Ok(_) => Err("the guest closed the channel".into()),
    }
}

/// Boots one VM to guest agent ready and stops it: does this backend work here
/// (its VMM in `jail`, as `user`)?
pub async fn probe<V: Vmm>(
    vmm: &V,
    image: &GuestImage,
    jail: Option<&VmmJail>,
    user: Option<crate::slot_user::SlotUser>,
    scratch_dir: &Path,
    timeout: Duration,
) -> Result<BootTimings, BootFailure> {
    std::fs::create_dir_all(scratch_dir).map_err(|e| {
        BootFailure::new(
            "prepare",
            format!("creating {}: {e}", scratch_dir.display()),
        )
    })?;
    let spec = SandboxSpec {
        run_id: "probe".into(),
        argv: vec!["true".into()],
        env: Vec::new(),
        working_dir: None,
        stdin: Vec::new(),
        stdin_file: None,
        vcpus: 1,
        memory_mb: 128,
        disk_mb: 0,
        image: None,
        files: Vec::new(),
        scratch_dir: scratch_dir.to_owned(),
        sample_interval: Duration::ZERO,
        as_root: false,
        slot_user: user,
        trees_in: Vec::new(),
        trees_out: Vec::new(),
        network: None,
    };
    let files = VmFiles::in_dir(scratch_dir);
    let req = VmRequest {
        spec: &spec,
        image,
        files: &files,
        jail,
        cgroup: None,
        about: String::new(),
    };
    let outcome = match boot_once(vmm, &req, timeout).await {
        Ok((mut vm, timings)) => {
            vmm.stop(&mut vm, &files).await;
            Ok(timings)
        }
        Err(failure) => Err(failure),
    };
    let _ = std::fs::remove_dir_all(scratch_dir);
    outcome
}

fn timings(vm: &Vm, ready: &Ready, total: Duration) -> BootTimings {
    BootTimings {
        vmm_spawn: vm.vmm_spawn,
        vm_configure: vm.vm_configure,
        kernel_boot: Duration::from_millis(ready.kernel_boot_ms),
        agent_init: Duration::from_millis(ready.init_ms),
        ready: total,
    }
}

/// Boots with retries; `None` when every attempt failed or the run was killed.
async fn boot<V: Vmm>(
    vmm: &V,
    req: &VmRequest<'_>,
    kill: &mut oneshot::Receiver<()>,
    events: &mpsc::Sender<SandboxEvent>,
) -> Option<(Vm, BootTimings)> {
    for attempt in 1..=BOOT_ATTEMPTS {
        let gate = if vmm.serialize_boots() {
            boot_gate().await
        } else {
            None
        };
        let result = boot_once(vmm, req, BOOT_TIMEOUT).await;
        drop(gate);
        match result {
            Ok(booted) => return Some(booted),
            Err(failure) => {
                let line = format!(
                    "VM boot attempt {attempt} of {BOOT_ATTEMPTS} failed at stage {}: {}",
                    failure.stage, failure.reason
                );
                let _ = events.send(SandboxEvent::Log(line)).await;
                if kill.try_recv().is_ok() {
                    return None;
                }
            }
        }
    }
    None
}

/// What every command's environment starts from; the run's variables win.
const DEFAULT_ENV: &[(&str, &str)] = &[
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("HOME", "/work"),
    ("TMPDIR", "/tmp"),
    ("LANG", "C.UTF-8"),
];

/// The `Start` for `spec`; `sample_interval` 0 when the host samples instead.
pub(crate) fn start_message(spec: &SandboxSpec, sample_interval: Duration) -> HostMessage {
    let env = DEFAULT_ENV
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .chain(spec.env.iter().cloned())
        .collect();
    HostMessage {
        kind: Some(host_message::Kind::Start(Start {
            argv: spec.argv.clone(),
            env,
            working_dir: spec.working_dir.clone().unwrap_or_else(|| "/work".into()),
            stdin: spec.stdin.clone(),
            stdin_path: spec.stdin_file.clone().unwrap_or_default(),
            sample_interval_ms: u32::try_from(sample_interval.as_millis()).unwrap_or(u32::MAX),
            as_root: spec.as_root,
        })),
    }
}

async fn supervise<V: Vmm>(
    vmm: &V,
    req: &VmRequest<'_>,
    mut kill: oneshot::Receiver<()>,
    events: &mpsc::Sender<SandboxEvent>,
) -> ExitReport {
    let (spec, files) = (req.spec, req.files);
    let Some((mut vm, timings)) = boot(vmm, req, &mut kill, events).await else {
        return LOST;
    };
    let line = format!(
        "sandbox started: backend {}, {}; {}",
        vmm.describe(),
        timings.summary(),
        req.about
    );
    let _ = events.send(SandboxEvent::Log(line)).await;
    let _ = events.send(SandboxEvent::Booted(timings)).await;
    let trees: Vec<&crate::TreeIn> = spec.trees_in.iter().collect();
    let placed = match send_files(&mut vm.link, &spec.files).await {
        Ok(()) => crate::trees::send_trees(&mut vm.link, &trees, events).await,
        Err(why) => Err(why),
    };
    if let Err(why) = placed {
        let _ = events.send(SandboxEvent::Log(why)).await;
        vmm.stop(&mut vm, files).await;
        return LOST;
    }
    if let Err(e) = frame::write(&mut vm.link.tx, &start_message(spec, spec.sample_interval)).await
    {
        let line = format!("sending Start to the guest failed: {e}");
        let _ = events.send(SandboxEvent::Log(line)).await;
        vmm.stop(&mut vm, files).await;
        return LOST;
    }
    let exit = relay(vmm.name(), &mut vm, Some(&files.console), &mut kill, events).await;
    if exit != LOST {
        crate::trees::take_trees(&mut vm.link, &spec.trees_out, events).await;
    }
    vmm.stop(&mut vm, files).await;
    exit
}

/// Parts of an input file (well under the 1 MiB frame limit).
const FILE_PART: usize = 512 * 1024;

/// Writes the run's input files into the guest, each part confirmed.
pub(crate) async fn send_files(
    link: &mut GuestLink,
    inputs: &[crate::GuestFile],
) -> Result<(), String> {
    for input in inputs {
        let fail = |why: String| format!("input file {:?}: {why}", input.path);
        let mut parts: Vec<&[u8]> = input.data.chunks(FILE_PART).collect();
        if parts.is_empty() {
            parts.push(&[]);
        }
        for (i, part) in parts.into_iter().enumerate() {
            let write = HostMessage {
                kind: Some(host_message::Kind::WriteFile(WriteFile {
                    path: input.path.clone(),
                    data: part.to_vec(),
                    append: i > 0,
                    mode: input.mode,
                })),
            };
            frame::write(&mut link.tx, &write)
                .await
                .map_err(|e| fail(e.to_string()))?;
            match frame::read::<GuestMessage, _>(&mut link.rx).await {
                Ok(Some(GuestMessage {
                    kind: Some(guest_message::Kind::FileWritten(_)),
                })) => {}
                Ok(Some(GuestMessage {
                    kind: Some(guest_message::Kind::Error(e)),
                })) => return Err(fail(e.message)),
                Ok(other) => return Err(fail(format!("unexpected answer {other:?}"))),
                Err(e) => return Err(fail(e.to_string())),
            }
        }
    }
    Ok(())
}

/// Relays the guest's messages until the command's end is known: `Exited`, the
/// channel closing, the VMM exiting, or a cancel whose grace ran out.
pub(crate) async fn relay(
    name: &str,
    vm: &mut Vm,
    console: Option<&ConsoleLog>,
    kill: &mut oneshot::Receiver<()>,
    events: &mpsc::Sender<SandboxEvent>,
) -> ExitReport {
    let tail = || {
        console.map_or_else(String::new, |c| {
            format!("; serial log tail:\n{}", c.tail(20))
        })
    };
    let log = |line: String| async move {
        let _ = events.send(SandboxEvent::Log(line)).await;
    };
    let mut give_up_at: Option<tokio::time::Instant> = None;
    loop {
        let give_up = async {
            match give_up_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = frame::read::<GuestMessage, _>(&mut vm.link.rx) => match msg {
                Ok(Some(GuestMessage { kind: Some(kind) })) => {
                    // Everything of value has been streamed out once the guest says
                    // Exited; a graceful power-off under TCG takes seconds, so the
                    // VM is stopped right away.
                    if let Some(exit) = forward(kind, events).await {
                        return exit;
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    log(format!("the guest channel closed before the command ended{}", tail())).await;
                    return LOST;
                }
            },
            _ = &mut *kill, if give_up_at.is_none() => {
                let cancel = HostMessage { kind: Some(host_message::Kind::Cancel(Cancel { grace_ms: CANCEL_GRACE_MS })) };
                let _ = frame::write(&mut vm.link.tx, &cancel).await;
                give_up_at = Some(tokio::time::Instant::now() + HARD_KILL_AFTER);
            }
            status = vm.process.wait() => {
                let status = status.map(|s| s.to_string()).unwrap_or_default();
                log(format!("{name} exited ({status}) before the command ended{}", tail())).await;
                return LOST;
            }
            _ = give_up => return LOST,
        }
    }
}

/// Passes one guest message on; the exit report when it is the last.
async fn forward(
    kind: guest_message::Kind,
    events: &mpsc::Sender<SandboxEvent>,
) -> Option<ExitReport> {
    match kind {
        guest_message::Kind::Output(o) => {
            let data = Bytes::from(o.data);
            let ev = match OutputStream::try_from(o.stream) {
                Ok(OutputStream::Stderr) => SandboxEvent::Stderr(data),
                _ => SandboxEvent::Stdout(data),
            };
            let _ = events.send(ev).await;
        }
        guest_message::Kind::Sample(s) => {
            // Samples are droppable: output must never wait behind them.
            let _ = events.try_send(SandboxEvent::Sample(ResourceSample {
                cpu_percent: s.cpu_percent,
                memory_used_bytes: s.memory_used_bytes,
                memory_total_bytes: s.memory_total_bytes,
                disk_used_bytes: s.disk_used_bytes,
                disk_total_bytes: s.disk_total_bytes,
                network_rx_bytes: s.network_rx_bytes,
                network_tx_bytes: s.network_tx_bytes,
            }));
        }
        guest_message::Kind::Error(e) => {
            let line = format!("guest agent: {}", e.message);
            let _ = events.send(SandboxEvent::Log(line)).await;
        }
        guest_message::Kind::Exited(x) => {
            return Some(ExitReport {
                code: x.code,
                signal: x.signal,
                oom_killed: x.oom_killed,
            });
        }
        guest_message::Kind::Ready(_)
        | guest_message::Kind::Pong(_)
        | guest_message::Kind::FileWritten(_)
        | guest_message::Kind::FileData(_)
        | guest_message::Kind::TreeUnpacked(_)
        | guest_message::Kind::TreeData(_) => {}
    }
    None
}
