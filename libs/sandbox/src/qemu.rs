//! The QEMU backend: `-M microvm`, KVM where it boots, TCG otherwise. The host
//! talks to the guest agent over a virtio-serial port named `vm0`, bound to a
//! unix-socket chardev in the VMM's jail directory (these hosts have no
//! `/dev/vhost-vsock`, so QEMU cannot offer vsock). A run with a network gets
//! one virtio-net card backed by the tap device the worker opened in the run's
//! namespace (passed as a descriptor: QEMU itself stays in an empty network
//! namespace and opens nothing); the guest agent addresses it as the kernel
//! command line says (`vm0.net=`). QEMU's
//! own seccomp filter is on (`-sandbox on`: no obsolete syscalls, no privilege
//! changes, no spawning, no resource control); the guest's serial console is
//! QEMU's stdout, kept in memory by the host.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::net::UnixStream;
use tokio::process::{Child, Command};

use crate::image::GuestImage;
use crate::microvm::{BootFailure, GuestLink, Vm, VmFiles, Vmm, VmmHost};
use crate::vmm_jail::{VmPaths, VmmLaunch};
use crate::{NetworkAttachment, RunNetwork, SandboxSpec};

/// The guest's network card (each VM's tap is its own link: one address does).
const GUEST_MAC: &str = "52:54:00:00:00:02";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Qemu {
    program: PathBuf,
    accel: Accel,
}

/// The sandbox: one QEMU microVM per run.
pub type QemuSandbox = crate::microvm::MicroVm<Qemu>;

impl Qemu {
    pub fn new(accel: Accel) -> Result<Qemu, crate::SandboxError> {
        let program = crate::find_on_path("qemu-system-x86_64").ok_or_else(|| {
            crate::SandboxError::Unavailable {
                backend: "qemu",
                reason: "qemu-system-x86_64 is not on PATH (apt-get install qemu-system-x86)"
                    .into(),
            }
        })?;
        Ok(Qemu { program, accel })
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    fn cmdline(&self, spec: &SandboxSpec, image: &GuestImage) -> String {
        let mut cmdline = format!(
            "console=ttyS0 panic=-1 quiet pci=off vm0.transport=serial:vm0 vm0.work_mb={}",
            spec.disk_mb
        );
        if let Some(RunNetwork::Tap(link)) = &spec.network {
            cmdline.push(' ');
            cmdline.push_str(&link.cmdline());
        }
        if image.rootfs.is_some() {
            cmdline.push_str(" vm0.rootfs=/dev/vda");
        }
        // Under TCG the kernel's early TSC calibration against the PIT sometimes
        // fails (emulated timing is jittery); with no HPET or PM timer on a microvm
        // the TSC is then marked unstable and the boot hangs before init. TCG's TSC
        // runs at the host's rate: tell the kernel instead of letting it measure.
        if self.accel == Accel::Tcg
            && let Some(khz) = host_tsc_khz()
        {
            cmdline.push_str(&format!(" tsc_early_khz={khz}"));
        }
        cmdline
    }

    /// QEMU's arguments for the VM, appended to its (jailed) command. `tap`:
    /// the descriptor number of the network card's tap, as QEMU inherits it.
    fn command(
        &self,
        spec: &SandboxSpec,
        image: &GuestImage,
        launch: VmmLaunch,
        tap: Option<i32>,
    ) -> Command {
        let VmmLaunch { mut cmd, paths } = launch;
        let VmPaths {
            kernel,
            initrd,
            rootfs,
            guest_socket,
            ..
        } = paths;
        cmd.args([
            "-M",
            &format!("microvm,accel={}", self.accel.as_str()),
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ])
        .args(["-m", &format!("{}M", spec.memory_mb.max(128))])
        .args(["-smp", &spec.vcpus.max(1).to_string()])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .arg("-append")
        .arg(self.cmdline(spec, image))
        // The console on stdout: the host keeps its end, bounded, in memory.
        .args([
            "-chardev",
            "stdio,id=console,signal=off",
            "-serial",
            "chardev:console",
        ])
        .args(["-device", "virtio-serial-device"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=vm0,path={},server=on,wait=off",
            guest_socket.display()
        ))
        .args(["-device", "virtserialport,chardev=vm0,name=vm0"]);
        if let Some(rootfs) = &rootfs {
            // Read-only: every run of the image shares the file.
            cmd.arg("-drive")
                .arg(format!(
                    "file={},if=none,id=rootfs,format=raw,readonly=on",
                    rootfs.display()
                ))
                .args(["-device", "virtio-blk-device,drive=rootfs"]);
        }
        if let Some(fd) = tap {
            cmd.arg("-netdev")
                .arg(format!("tap,id=net0,fd={fd}"))
                .args([
                    "-device",
                    &format!("virtio-net-device,netdev=net0,mac={GUEST_MAC}"),
                ]);
        }
        cmd
    }
}

/// The host CPU's clock in kHz, from `/proc/cpuinfo`.
fn host_tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    (mhz > 0.0).then(|| (mhz * 1000.0).round() as u64)
}

/// QEMU listens on the chardev socket once it has set the machine up.
async fn connect(files: &VmFiles, qemu: &mut Child) -> Result<UnixStream, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(s) = UnixStream::connect(&files.guest_socket).await {
            return Ok(s);
        }
        if let Ok(Some(status)) = qemu.try_wait() {
            // What it said is in the console log; give it a moment to arrive.
            tokio::time::sleep(Duration::from_millis(50)).await;
            return Err(format!(
                "qemu exited at start ({status}): {}",
                files.console.tail(5)
            ));
        }
        if Instant::now() > deadline {
            return Err("qemu's guest socket never appeared".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl Vmm for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn describe(&self) -> String {
        format!("qemu ({})", self.accel.as_str())
    }

    fn serialize_boots(&self) -> bool {
        self.accel == Accel::Tcg
    }

    fn network_attachment(&self) -> Option<NetworkAttachment> {
        Some(NetworkAttachment::Tap)
    }

    async fn launch(
        &self,
        host: &VmmHost<'_>,
        _deadline: tokio::time::Instant,
    ) -> Result<Vm, BootFailure> {
        let files = host.files;
        let _ = std::fs::remove_file(&files.guest_socket);
        let started = Instant::now();
        let fail = |e: std::io::Error| {
            let program = self.program.display();
            BootFailure::new("vmm-spawn", format!("starting {program} failed: {e}"))
        };
        let launch = host
            .launch(&self.program, self.accel == Accel::Kvm)
            .map_err(fail)?;
        // The tap's descriptor, inherited by QEMU (through its jail) alone.
        let fds = match &host.spec.network {
            Some(RunNetwork::Tap(link)) => vec![link.fd.try_clone().map_err(fail)?],
            Some(RunNetwork::Namespace(_)) => {
                return Err(BootFailure::new(
                    "vmm-spawn",
                    "a VM's network is a tap device, not a namespace to join",
                ));
            }
            None => Vec::new(),
        };
        let tap = fds.first().map(std::os::fd::AsRawFd::as_raw_fd);
        let mut cmd = self.command(host.spec, host.image, launch, tap);
        let mut process = host.spawn(&mut cmd, &fds).map_err(fail)?;
        drop(fds);
        let stream = match connect(files, &mut process).await {
            Ok(s) => s,
            Err(e) => {
                let _ = process.kill().await;
                return Err(BootFailure::new("vmm-spawn", e));
            }
        };
        Ok(Vm {
            process,
            link: GuestLink::unix(stream),
            vmm_spawn: started.elapsed(),
            vm_configure: Duration::ZERO,
        })
    }

    /// Everything of value has been streamed out by now: QEMU is killed rather
    /// than powered off (a graceful power-off under TCG takes seconds).
    async fn stop(&self, vm: &mut Vm, _files: &VmFiles) {
        let _ = vm.process.kill().await;
    }
}
