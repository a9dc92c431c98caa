//! The QEMU backend: one microVM per run (`-M microvm`, KVM where it boots, TCG
//! otherwise), booting a [`GuestImage`] whose `/init` is the guest agent. The host
//! talks to it over a virtio-serial port named `vm0`, bound to a unix-socket chardev
//! in the run's scratch directory. No network device.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::UnixStream;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use vm0_proto::frame;
use vm0_proto::guest::{
    Cancel, GuestMessage, HostMessage, OutputStream, Start, guest_message, host_message,
};

use crate::image::GuestImage;
use crate::{
    ExitReport, ResourceSample, RunningSandbox, Sandbox, SandboxError, SandboxEvent, SandboxSpec,
};

/// Boot to guest agent ready, at most (TCG boots in ~4 s here). A boot that stalls
/// is retried: under TCG on these hosts an occasional guest never leaves early boot.
const BOOT_TIMEOUT: Duration = Duration::from_secs(20);
const BOOT_ATTEMPTS: u32 = 3;
/// After asking the guest to stop: SIGTERM grace inside, then the VM is killed.
const CANCEL_GRACE_MS: u32 = 1000;
const HARD_KILL_AFTER: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

#[derive(Debug, Clone)]
pub struct Qemu {
    program: PathBuf,
    image: GuestImage,
    accel: Accel,
}

impl Qemu {
    pub fn new(image: GuestImage, accel: Accel) -> Result<Qemu, SandboxError> {
        let program =
            crate::find_on_path("qemu-system-x86_64").ok_or_else(|| SandboxError::Unavailable {
                backend: "qemu",
                reason: "qemu-system-x86_64 is not on PATH (apt-get install qemu-system-x86)"
                    .into(),
            })?;
        Ok(Qemu {
            program,
            image,
            accel,
        })
    }

    fn command(&self, spec: &SandboxSpec, socket: &Path, serial_log: &Path) -> Command {
        let accel = match self.accel {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        };
        let mut cmd = Command::new(&self.program);
        cmd.args([
            "-M",
            &format!("microvm,accel={accel}"),
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
        ])
        .args(["-m", &format!("{}M", spec.memory_mb.max(128))])
        .args(["-smp", &spec.vcpus.max(1).to_string()])
        .arg("-kernel")
        .arg(&self.image.kernel)
        .arg("-initrd")
        .arg(&self.image.initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet pci=off"])
        .arg("-serial")
        .arg(format!("file:{}", serial_log.display()))
        .args(["-device", "virtio-serial-device"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=vm0,path={},server=on,wait=off",
            socket.display()
        ))
        .args(["-device", "virtserialport,chardev=vm0,name=vm0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
        cmd
    }
}

/// A host-wide lock held while a TCG guest boots. On the 2-core machines this
/// project tests on, two TCG guests booting at once sometimes never reach the
/// guest agent (both vCPU threads spin; the serial console stays empty); booting
/// them one after the other does not show it. Running guests do not take the lock.
async fn boot_gate() -> Option<nix::fcntl::Flock<std::fs::File>> {
    let path = std::env::temp_dir().join("vm0-qemu-tcg-boot.lock");
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

async fn connect(socket: &Path, qemu: &mut Child) -> Result<UnixStream, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(s) = UnixStream::connect(socket).await {
            return Ok(s);
        }
        if let Ok(Some(status)) = qemu.try_wait() {
            return Err(format!("qemu exited at start ({status})"));
        }
        if Instant::now() > deadline {
            return Err("qemu's guest socket never appeared".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn serial_tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

impl Sandbox for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    async fn start(&self, spec: SandboxSpec) -> Result<RunningSandbox, SandboxError> {
        tokio::fs::create_dir_all(&spec.scratch_dir)
            .await
            .map_err(SandboxError::Prepare)?;
        let socket = spec.scratch_dir.join("guest.sock");
        let serial_log = spec.scratch_dir.join("serial.log");
        let (events_tx, events_rx) = mpsc::channel(256);
        let (kill_tx, kill_rx) = oneshot::channel();
        let qemu = self.clone();
        tokio::spawn(async move {
            let exit = supervise(&qemu, &spec, &socket, &serial_log, kill_rx, &events_tx).await;
            if let Err(e) = tokio::fs::remove_dir_all(&spec.scratch_dir).await
                && e.kind() != std::io::ErrorKind::NotFound
            {
                let _ = events_tx
                    .send(SandboxEvent::Log(format!(
                        "removing the scratch dir failed: {e}"
                    )))
                    .await;
            }
            let _ = events_tx.send(SandboxEvent::Exited(exit)).await;
        });
        Ok(RunningSandbox::new(events_rx, kill_tx))
    }
}

const LOST: ExitReport = ExitReport {
    code: None,
    signal: None,
    oom_killed: false,
};

/// A guest whose agent said Ready.
struct Booted {
    qemu: Child,
    rx: tokio::net::unix::OwnedReadHalf,
    tx: tokio::net::unix::OwnedWriteHalf,
    spawn: Duration,
    boot: Duration,
}

/// One boot: spawn QEMU, connect to the guest channel, wait for Ready. On failure,
/// the stage and reason (the QEMU process, if any, is killed).
async fn boot_once(
    q: &Qemu,
    spec: &SandboxSpec,
    socket: &Path,
    serial_log: &Path,
) -> Result<Booted, String> {
    let _ = std::fs::remove_file(socket);
    let started = Instant::now();
    let mut qemu = q.command(spec, socket, serial_log).spawn().map_err(|e| {
        format!(
            "stage vmm-spawn: starting {} failed: {e}",
            q.program.display()
        )
    })?;
    let stream = match connect(socket, &mut qemu).await {
        Ok(s) => s,
        Err(e) => {
            let _ = qemu.kill().await;
            return Err(format!("stage vmm-spawn: {e}"));
        }
    };
    let spawn = started.elapsed();
    let (mut rx, tx) = stream.into_split();
    let ready = tokio::time::timeout(BOOT_TIMEOUT, frame::read::<GuestMessage, _>(&mut rx)).await;
    let why = match ready {
        Ok(Ok(Some(GuestMessage {
            kind: Some(guest_message::Kind::Ready(_)),
        }))) => {
            return Ok(Booted {
                qemu,
                rx,
                tx,
                spawn,
                boot: started.elapsed() - spawn,
            });
        }
        Err(_) => format!("no guest agent after {} s", BOOT_TIMEOUT.as_secs()),
        Ok(Err(e)) => format!("garbage from the guest: {e}"),
        Ok(_) => "the guest closed the channel".into(),
    };
    let _ = qemu.kill().await;
    Err(format!(
        "stage kernel-boot: {why}; serial log tail:\n{}",
        serial_tail(serial_log)
    ))
}

async fn supervise(
    q: &Qemu,
    spec: &SandboxSpec,
    socket: &Path,
    serial_log: &Path,
    mut kill: oneshot::Receiver<()>,
    events: &mpsc::Sender<SandboxEvent>,
) -> ExitReport {
    let log = |line: String| async move {
        let _ = events.send(SandboxEvent::Log(line)).await;
    };
    let mut attempt = 1;
    let booted = loop {
        // Boots under TCG run one at a time on a host (see `boot_gate`).
        let gate = if q.accel == Accel::Tcg {
            boot_gate().await
        } else {
            None
        };
        let result = boot_once(q, spec, socket, serial_log).await;
        drop(gate);
        match result {
            Ok(b) => break b,
            Err(why) => {
                log(format!(
                    "VM boot attempt {attempt} of {BOOT_ATTEMPTS} failed at {why}"
                ))
                .await;
                if attempt == BOOT_ATTEMPTS || kill.try_recv().is_ok() {
                    return LOST;
                }
                attempt += 1;
            }
        }
    };
    let Booted {
        mut qemu,
        mut rx,
        mut tx,
        spawn,
        boot,
    } = booted;
    log(format!(
        "sandbox started: backend qemu ({}), vmm spawn {} ms, boot to guest agent ready {} ms",
        if q.accel == Accel::Kvm { "kvm" } else { "tcg" },
        spawn.as_millis(),
        boot.as_millis()
    ))
    .await;
    let start = Start {
        argv: spec.argv.clone(),
        env: spec.env.iter().cloned().collect(),
        working_dir: spec.working_dir.clone().unwrap_or_else(|| "/work".into()),
        stdin: spec.stdin.clone(),
        sample_interval_ms: u32::try_from(spec.sample_interval.as_millis()).unwrap_or(u32::MAX),
    };
    let host = |kind| HostMessage { kind: Some(kind) };
    if let Err(e) = frame::write(&mut tx, &host(host_message::Kind::Start(start))).await {
        log(format!("sending Start to the guest failed: {e}")).await;
        let _ = qemu.kill().await;
        return LOST;
    }
    let mut exit = None;
    let mut hard_kill_at: Option<tokio::time::Instant> = None;
    loop {
        let hard_kill = async {
            match hard_kill_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = frame::read::<GuestMessage, _>(&mut rx), if exit.is_none() => match msg {
                Ok(Some(GuestMessage { kind: Some(kind) })) => match kind {
                    guest_message::Kind::Output(o) => {
                        let data = Bytes::from(o.data);
                        let ev = match OutputStream::try_from(o.stream) {
                            Ok(OutputStream::Stderr) => SandboxEvent::Stderr(data),
                            _ => SandboxEvent::Stdout(data),
                        };
                        let _ = events.send(ev).await;
                    }
                    guest_message::Kind::Sample(s) => {
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
                    guest_message::Kind::Error(e) => log(format!("guest agent: {}", e.message)).await,
                    guest_message::Kind::Exited(x) => {
                        exit = Some(ExitReport { code: x.code, signal: x.signal, oom_killed: x.oom_killed });
                        // Everything of value has been streamed out; a graceful power-off
                        // under TCG takes seconds, so the VM is stopped now.
                        hard_kill_at = Some(tokio::time::Instant::now());
                    }
                    _ => {}
                },
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    if exit.is_none() {
                        log(format!("the guest channel closed before the command ended; serial log tail:\n{}", serial_tail(serial_log))).await;
                    }
                    hard_kill_at.get_or_insert(tokio::time::Instant::now());
                    exit.get_or_insert(LOST);
                }
            },
            _ = &mut kill, if hard_kill_at.is_none() => {
                let _ = frame::write(&mut tx, &host(host_message::Kind::Cancel(Cancel { grace_ms: CANCEL_GRACE_MS }))).await;
                hard_kill_at = Some(tokio::time::Instant::now() + HARD_KILL_AFTER);
            }
            status = qemu.wait() => {
                if exit.is_none() {
                    let status = status.map(|s| s.to_string()).unwrap_or_default();
                    log(format!("qemu exited ({status}) before the command ended; serial log tail:\n{}", serial_tail(serial_log))).await;
                }
                return exit.unwrap_or(LOST);
            }
            _ = hard_kill => {
                let _ = qemu.kill().await;
                return exit.unwrap_or(LOST);
            }
        }
    }
}
