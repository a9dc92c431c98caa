//! The Cloud Hypervisor backend: one `cloud-hypervisor --api-socket` process per
//! run, driven over its REST API (`vm.create`, `vm.boot`, `vm.info`, then
//! `vm.shutdown`, `vm.delete`, `vmm.shutdown`, and SIGKILL if it is still there).
//! The guest agent listens on a vsock port; the host reaches it through Cloud
//! Hypervisor's hybrid vsock: connect to the unix socket given in the VM's vsock
//! config and write `CONNECT <port>\n` (answered `OK <host port>\n`). The
//! virtio console is off and the serial port goes to the VMM's stdout, which the
//! host keeps, bounded, in memory. The VMM runs in its jail (`vmm_jail`) with
//! Cloud Hypervisor's own seccomp filter (its default).

/// The REST API client and request bodies.
pub mod api;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::process::Child;

use crate::SandboxSpec;
use crate::image::GuestImage;
use crate::microvm::{BootFailure, GuestLink, Vm, VmFiles, Vmm, VmmHost};
use crate::vmm_jail::VmPaths;
use api::{
    ApiClient, ConsoleConfig, ConsoleMode, CpusConfig, DiskConfig, MemoryConfig, PayloadConfig,
    VmConfig, VsockConfig,
};

/// The vsock port the guest agent listens on.
pub const GUEST_PORT: u32 = 1024;
/// Every VM gets the same guest CID: each has its own VMM and vsock socket.
const GUEST_CID: u64 = 3;
/// One hybrid vsock handshake, at most.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(200);
/// Stopping a VM through the API, at most; then it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct CloudHypervisor {
    program: PathBuf,
}

/// The sandbox: one Cloud Hypervisor microVM per run.
pub type CloudHypervisorSandbox = crate::microvm::MicroVm<CloudHypervisor>;

impl CloudHypervisor {
    pub fn new() -> Result<CloudHypervisor, crate::SandboxError> {
        let program = crate::find_on_path("cloud-hypervisor").ok_or_else(|| {
            crate::SandboxError::Unavailable {
                backend: "cloud-hypervisor",
                reason: "cloud-hypervisor is not on PATH".into(),
            }
        })?;
        Ok(CloudHypervisor { program })
    }

    /// Spawns the VMM (in its jail) and waits until its API answers.
    async fn spawn(&self, host: &VmmHost<'_>) -> Result<(Child, ApiClient, VmPaths), BootFailure> {
        let fail = |reason: String| BootFailure::new("vmm-spawn", reason);
        let start_failed =
            |e: std::io::Error| fail(format!("starting {} failed: {e}", self.program.display()));
        let mut launch = host.launch(&self.program, true).map_err(start_failed)?;
        launch
            .cmd
            .arg("--api-socket")
            .arg(format!("path={}", launch.paths.api_socket.display()));
        let mut process = host.spawn(&mut launch.cmd, &[]).map_err(start_failed)?;
        let files = host.files;
        let api = ApiClient::new(&files.api_socket);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if api.ping().await.is_ok() {
                return Ok((process, api, launch.paths));
            }
            if let Ok(Some(status)) = process.try_wait() {
                return Err(fail(format!("cloud-hypervisor exited at start ({status})")));
            }
            if Instant::now() > deadline {
                let _ = process.kill().await;
                return Err(fail("the API socket never answered vmm.ping".into()));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// The `vm.create` body for a run whose files the VMM sees at `paths`.
pub fn vm_config(image: &GuestImage, spec: &SandboxSpec, paths: &VmPaths) -> VmConfig {
    let vcpus = spec.vcpus.max(1);
    VmConfig {
        cpus: CpusConfig {
            boot_vcpus: vcpus,
            max_vcpus: vcpus,
        },
        memory: MemoryConfig {
            size: spec.memory_mb.max(128) * 1024 * 1024,
        },
        payload: PayloadConfig {
            kernel: paths.kernel.clone(),
            initramfs: paths.initrd.clone(),
            cmdline: format!(
                "console=ttyS0 panic=-1 quiet vm0.transport=vsock:{GUEST_PORT} vm0.work_mb={}{}",
                spec.disk_mb,
                if image.rootfs.is_some() {
                    " vm0.rootfs=/dev/vda"
                } else {
                    ""
                }
            ),
        },
        // Read-only: every run of the image shares the file.
        disks: paths
            .rootfs
            .iter()
            .map(|path| DiskConfig {
                path: path.clone(),
                readonly: true,
            })
            .collect(),
        vsock: VsockConfig {
            cid: GUEST_CID,
            socket: paths.guest_socket.clone(),
        },
        console: ConsoleConfig {
            mode: ConsoleMode::Off,
            file: None,
        },
        serial: ConsoleConfig {
            mode: ConsoleMode::Tty,
            file: None,
        },
    }
}

/// Creates and boots the VM, and checks that it runs.
async fn create_and_boot(api: &ApiClient, config: &VmConfig) -> Result<(), BootFailure> {
    api.create(config)
        .await
        .map_err(|e| BootFailure::new("vm-create", e.to_string()))?;
    api.boot()
        .await
        .map_err(|e| BootFailure::new("vm-boot", e.to_string()))?;
    let info = api
        .info()
        .await
        .map_err(|e| BootFailure::new("vm-boot", e.to_string()))?;
    if info.state != "Running" {
        return Err(BootFailure::new(
            "vm-boot",
            format!("vm.info says {} after vm.boot", info.state),
        ));
    }
    Ok(())
}

/// One attempt at the hybrid vsock handshake.
async fn vsock_connect(files: &VmFiles) -> std::io::Result<Option<UnixStream>> {
    let mut stream = UnixStream::connect(&files.guest_socket).await?;
    stream
        .write_all(format!("CONNECT {GUEST_PORT}\n").as_bytes())
        .await?;
    // Byte by byte: the guest's first frame may follow the answer at once.
    let mut line = Vec::new();
    while line.len() < 64 {
        match stream.read_u8().await {
            Ok(b'\n') => break,
            Ok(b) => line.push(b),
            // Nobody listens on the port yet: the VMM closes the connection.
            Err(_) => return Ok(None),
        }
    }
    Ok(line.starts_with(b"OK ").then_some(stream))
}

/// Connects to the guest agent once it listens (that is, once the guest booted).
async fn connect_guest(
    files: &VmFiles,
    process: &mut Child,
    deadline: tokio::time::Instant,
) -> Result<UnixStream, BootFailure> {
    loop {
        // Until the guest's vsock driver is up, the VMM may hold a connection
        // without answering: each attempt is bounded.
        let attempt = tokio::time::timeout(HANDSHAKE_TIMEOUT, vsock_connect(files));
        if let Ok(Ok(Some(stream))) = attempt.await {
            return Ok(stream);
        }
        if let Ok(Some(status)) = process.try_wait() {
            return Err(BootFailure::new(
                "kernel-boot",
                format!("cloud-hypervisor exited during boot ({status})"),
            ));
        }
        if tokio::time::Instant::now() > deadline {
            return Err(BootFailure::new(
                "kernel-boot",
                format!("the guest agent never listened on vsock port {GUEST_PORT}"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl Vmm for CloudHypervisor {
    fn name(&self) -> &'static str {
        "cloud-hypervisor"
    }

    fn describe(&self) -> String {
        "cloud-hypervisor (kvm)".into()
    }

    async fn launch(
        &self,
        host: &VmmHost<'_>,
        deadline: tokio::time::Instant,
    ) -> Result<Vm, BootFailure> {
        let files = host.files;
        for stale in [&files.api_socket, &files.guest_socket] {
            let _ = std::fs::remove_file(stale);
        }
        let started = Instant::now();
        let (mut process, api, paths) = self.spawn(host).await?;
        let vmm_spawn = started.elapsed();
        let stage = async {
            create_and_boot(&api, &vm_config(host.image, host.spec, &paths)).await?;
            let vm_configure = started.elapsed() - vmm_spawn;
            let stream = connect_guest(files, &mut process, deadline).await?;
            Ok((vm_configure, stream))
        };
        match stage.await {
            Ok((vm_configure, stream)) => Ok(Vm {
                process,
                link: GuestLink::unix(stream),
                vmm_spawn,
                vm_configure,
            }),
            Err(failure) => {
                shut_down(&mut process, files).await;
                Err(failure)
            }
        }
    }

    async fn stop(&self, vm: &mut Vm, files: &VmFiles) {
        shut_down(&mut vm.process, files).await;
    }
}

/// `vm.shutdown`, `vm.delete`, `vmm.shutdown`, each bounded; then SIGKILL if the
/// process is still there.
async fn shut_down(process: &mut Child, files: &VmFiles) {
    if let Ok(None) = process.try_wait() {
        let api = ApiClient::new(&files.api_socket);
        let steps = async {
            let _ = api.shutdown().await;
            let _ = api.delete().await;
            let _ = api.shutdown_vmm().await;
            let _ = process.wait().await;
        };
        if tokio::time::timeout(STOP_TIMEOUT, steps).await.is_err() {
            tracing::warn!("cloud-hypervisor did not stop through its API; killing it");
        }
    }
    let _ = process.kill().await;
}
