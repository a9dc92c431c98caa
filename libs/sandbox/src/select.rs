//! Choosing a backend (`VM0_SANDBOX`). `auto` picks Cloud Hypervisor where it and
//! KVM work, QEMU with KVM next, bubblewrap last. "Works" is measured, not
//! assumed: a microVM backend counts only once a probe VM booted to guest agent
//! ready (on nested KVM such as PVM, `/dev/kvm` opens but a stock kernel never
//! boots). Every step's reason is kept, so the worker can log why it chose.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::bubblewrap::Bubblewrap;
use crate::cgroup::HostLimits;
use crate::cloud_hypervisor::{CloudHypervisor, CloudHypervisorSandbox};
use crate::image::{GuestImage, ImageCatalog, ImageRecipe};
use crate::microvm::{MicroVm, Vmm};
use crate::qemu::{Accel, Qemu, QemuSandbox};
use crate::vmm_jail::{JailSetting, VmmJail};
use crate::{RunningSandbox, Sandbox, SandboxError, SandboxSpec};

/// A probe VM must reach guest agent ready within this (a KVM boot takes < 1 s).
const PROBE_TIMEOUT: Duration = Duration::from_secs(8);

/// `VM0_SANDBOX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxKind {
    Auto,
    CloudHypervisor,
    Qemu,
    Bubblewrap,
}

impl std::str::FromStr for SandboxKind {
    type Err = String;

    fn from_str(s: &str) -> Result<SandboxKind, String> {
        match s {
            "auto" => Ok(SandboxKind::Auto),
            "cloud-hypervisor" => Ok(SandboxKind::CloudHypervisor),
            "qemu" => Ok(SandboxKind::Qemu),
            "bubblewrap" => Ok(SandboxKind::Bubblewrap),
            other => Err(format!(
                "unknown sandbox {other:?} (one of: auto, cloud-hypervisor, qemu, bubblewrap)"
            )),
        }
    }
}

/// `VM0_QEMU_ACCEL`: `auto` probes KVM and falls back to TCG.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

impl std::str::FromStr for AccelChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<AccelChoice, String> {
        match s {
            "auto" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Kvm),
            "tcg" => Ok(AccelChoice::Tcg),
            other => Err(format!(
                "unknown accelerator {other:?} (one of: auto, kvm, tcg)"
            )),
        }
    }
}

/// What the selection needs to know.
#[derive(Debug, Clone)]
pub struct SelectOptions {
    pub kind: SandboxKind,
    pub qemu_accel: AccelChoice,
    /// The static guest agent; without it only bubblewrap is possible.
    pub guest_agent: Option<PathBuf>,
    pub busybox: PathBuf,
    pub kernel_package: Option<String>,
    pub image_cache: PathBuf,
    /// Where probe VMs keep their sockets.
    pub scratch_dir: PathBuf,
    /// Whether bubblewrap runs get cgroup limits.
    pub bubblewrap_limits: crate::cgroup::HostLimits,
    /// The host uids of the worker's slots (none when it is not root).
    pub slot_users: Vec<crate::slot_user::SlotUser>,
    /// Whether VMMs run jailed (`VM0_VMM_JAIL`).
    pub vmm_jail: crate::vmm_jail::JailSetting,
    /// Whether VMMs get a cgroup each (`VM0_VMM_LIMITS`).
    pub vmm_limits: crate::cgroup::HostLimits,
}

/// Any backend, chosen at run time.
#[derive(Debug, Clone)]
pub enum AnySandbox {
    Bubblewrap(Bubblewrap),
    Qemu(QemuSandbox),
    CloudHypervisor(CloudHypervisorSandbox),
}

impl Sandbox for AnySandbox {
    fn name(&self) -> &'static str {
        match self {
            AnySandbox::Bubblewrap(s) => s.name(),
            AnySandbox::Qemu(s) => s.name(),
            AnySandbox::CloudHypervisor(s) => s.name(),
        }
    }

    fn network_attachment(&self) -> Option<crate::NetworkAttachment> {
        match self {
            AnySandbox::Bubblewrap(s) => s.network_attachment(),
            AnySandbox::Qemu(s) => s.network_attachment(),
            AnySandbox::CloudHypervisor(s) => s.network_attachment(),
        }
    }

    async fn start(&self, spec: SandboxSpec) -> Result<RunningSandbox, SandboxError> {
        match self {
            AnySandbox::Bubblewrap(s) => s.start(spec).await,
            AnySandbox::Qemu(s) => s.start(spec).await,
            AnySandbox::CloudHypervisor(s) => s.start(spec).await,
        }
    }
}

/// The chosen backend and why.
#[derive(Debug)]
pub struct Selection {
    pub sandbox: AnySandbox,
    /// Backend as the logs show it, e.g. `qemu (tcg)`.
    pub backend: String,
    /// One clause per backend considered.
    pub why: Vec<String>,
}

/// Is `/dev/kvm` there and openable? (Not whether it boots a guest.)
pub fn kvm_device() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| format!("/dev/kvm: {e}"))
}

async fn build_image(options: &SelectOptions) -> Result<GuestImage, String> {
    let Some(agent) = options.guest_agent.clone() else {
        return Err("no static guest agent (set VM0_GUEST_AGENT)".into());
    };
    let recipe = ImageRecipe {
        guest_agent: agent,
        busybox: options.busybox.clone(),
        kernel_package: options.kernel_package.clone(),
        cache_dir: options.image_cache.clone(),
        rootfs: None,
    };
    tokio::task::spawn_blocking(move || crate::image::build(&recipe))
        .await
        .map_err(|e| format!("image build task: {e}"))?
        .map_err(|e| format!("guest image: {}", chain(&e)))
}

/// An error and its sources, `: `-separated.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

/// The VMMs' jail as `VM0_VMM_JAIL` asks (an error when it is on but cannot
/// be made here).
fn vmm_jail(options: &SelectOptions) -> Result<Option<VmmJail>, String> {
    match options.vmm_jail {
        JailSetting::On => VmmJail::detect()
            .map(Some)
            .map_err(|e| format!("the VMM jail: {e} (VM0_VMM_JAIL=off runs VMMs unjailed)")),
        JailSetting::Off => {
            tracing::warn!("VM0_VMM_JAIL=off: VMMs run as this worker's user, unjailed");
            Ok(None)
        }
    }
}

fn microvm<V: Vmm>(
    vmm: V,
    image: &GuestImage,
    options: &SelectOptions,
    jail: Option<VmmJail>,
) -> MicroVm<V> {
    let limits = match options.vmm_limits {
        HostLimits::Auto => crate::cgroup::Hierarchy::detect().map_err(|e| e.to_string()),
        HostLimits::Off => Err("turned off (VM0_VMM_LIMITS=off)".into()),
    };
    if let Err(why) = &limits {
        tracing::warn!(%why, "VMMs get no cgroup: their memory and CPU are bounded by the guest's size only");
    }
    let sandbox = MicroVm::new(vmm, image.clone())
        .with_catalog(ImageCatalog::new(&options.image_cache))
        .with_limits(limits);
    match jail {
        Some(jail) => sandbox.with_jail(jail),
        None => sandbox,
    }
}

async fn probe<V: Vmm>(
    vmm: V,
    image: &GuestImage,
    options: &SelectOptions,
    dir: &Path,
) -> Result<MicroVm<V>, String> {
    let jail = vmm_jail(options)?;
    let user = options.slot_users.first().copied();
    match crate::microvm::probe(&vmm, image, jail.as_ref(), user, dir, PROBE_TIMEOUT).await {
        Ok(t) => {
            tracing::info!(backend = %vmm.describe(), boot_ms = t.ready.as_millis() as u64, "probe VM booted");
            Ok(microvm(vmm, image, options, jail))
        }
        Err(f) => {
            // The serial log tail is for a run's system log; one line is enough here.
            let first_line = f.reason.lines().next().unwrap_or_default();
            let reason = first_line.trim_end_matches("; serial log tail:");
            Err(format!("probe VM failed at stage {}: {reason}", f.stage))
        }
    }
}

async fn try_cloud_hypervisor(
    options: &SelectOptions,
    image: &GuestImage,
) -> Result<AnySandbox, String> {
    kvm_device()?;
    let vmm = CloudHypervisor::new().map_err(|e| e.to_string())?;
    let dir = options.scratch_dir.join("probe-cloud-hypervisor");
    Ok(AnySandbox::CloudHypervisor(
        probe(vmm, image, options, &dir).await?,
    ))
}

async fn try_qemu(
    options: &SelectOptions,
    image: &GuestImage,
    accel: Accel,
) -> Result<AnySandbox, String> {
    if accel == Accel::Kvm {
        kvm_device()?;
    }
    let vmm = Qemu::new(accel).map_err(|e| e.to_string())?;
    if accel == Accel::Tcg {
        // TCG boots wherever QEMU runs; probing costs a slow boot for nothing.
        let jail = vmm_jail(options)?;
        return Ok(AnySandbox::Qemu(microvm(vmm, image, options, jail)));
    }
    let dir = options.scratch_dir.join("probe-qemu");
    Ok(AnySandbox::Qemu(probe(vmm, image, options, &dir).await?))
}

fn describe(sandbox: &AnySandbox) -> String {
    match sandbox {
        AnySandbox::Bubblewrap(_) => "bubblewrap".into(),
        AnySandbox::Qemu(s) => s.vmm().describe(),
        AnySandbox::CloudHypervisor(s) => s.vmm().describe(),
    }
}

fn chosen(sandbox: AnySandbox, why: Vec<String>) -> Selection {
    Selection {
        backend: describe(&sandbox),
        sandbox,
        why,
    }
}

/// Bubblewrap runs commands through the guest agent too.
async fn bubblewrap(options: &SelectOptions) -> Result<Bubblewrap, SandboxError> {
    let agent = options
        .guest_agent
        .as_deref()
        .ok_or_else(|| SandboxError::Unavailable {
            backend: "bubblewrap",
            reason: "no guest agent (set VM0_GUEST_AGENT; scripts/guest-agent.sh builds it)".into(),
        })?;
    Bubblewrap::detect_with(agent, options.bubblewrap_limits)
        .await?
        .with_slot_users(&options.slot_users)
}

/// Picks the backend `options.kind` asks for. An explicit backend that does not
/// work is an error; `auto` moves on to the next and says why.
pub async fn select(options: &SelectOptions) -> Result<Selection, SandboxError> {
    let unavailable =
        |backend: &'static str, reason: String| SandboxError::Unavailable { backend, reason };
    match options.kind {
        SandboxKind::Bubblewrap => Ok(chosen(
            AnySandbox::Bubblewrap(bubblewrap(options).await?),
            vec!["VM0_SANDBOX=bubblewrap".into()],
        )),
        SandboxKind::CloudHypervisor => {
            let image = build_image(options)
                .await
                .map_err(|r| unavailable("cloud-hypervisor", r))?;
            let sandbox = try_cloud_hypervisor(options, &image)
                .await
                .map_err(|r| unavailable("cloud-hypervisor", r))?;
            Ok(chosen(sandbox, vec!["VM0_SANDBOX=cloud-hypervisor".into()]))
        }
        SandboxKind::Qemu => select_qemu(options).await,
        SandboxKind::Auto => select_auto(options).await,
    }
}

async fn select_qemu(options: &SelectOptions) -> Result<Selection, SandboxError> {
    let image = build_image(options)
        .await
        .map_err(|reason| SandboxError::Unavailable {
            backend: "qemu",
            reason,
        })?;
    let mut why = vec!["VM0_SANDBOX=qemu".to_owned()];
    if options.qemu_accel != AccelChoice::Tcg {
        match try_qemu(options, &image, Accel::Kvm).await {
            Ok(sandbox) => return Ok(chosen(sandbox, why)),
            Err(reason) if options.qemu_accel == AccelChoice::Kvm => {
                return Err(SandboxError::Unavailable {
                    backend: "qemu",
                    reason,
                });
            }
            Err(reason) => why.push(format!("kvm: {reason}, so tcg (software emulation)")),
        }
    }
    let sandbox = try_qemu(options, &image, Accel::Tcg)
        .await
        .map_err(|reason| SandboxError::Unavailable {
            backend: "qemu",
            reason,
        })?;
    Ok(chosen(sandbox, why))
}

async fn select_auto(options: &SelectOptions) -> Result<Selection, SandboxError> {
    let mut why = Vec::new();
    match build_image(options).await {
        Err(reason) => why.push(format!("microVMs: {reason}")),
        Ok(image) => {
            match try_cloud_hypervisor(options, &image).await {
                Ok(sandbox) => return Ok(chosen(sandbox, why)),
                Err(reason) => why.push(format!("cloud-hypervisor: {reason}")),
            }
            match try_qemu(options, &image, Accel::Kvm).await {
                Ok(sandbox) => return Ok(chosen(sandbox, why)),
                Err(reason) => why.push(format!("qemu (kvm): {reason}")),
            }
        }
    }
    let sandbox = AnySandbox::Bubblewrap(bubblewrap(options).await?);
    why.push("bubblewrap: available".into());
    Ok(chosen(sandbox, why))
}
