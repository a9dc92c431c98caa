//! `vm0-boot-bench`: how long a microVM takes to boot and to run a command, per
//! phase, on one backend, without the rest of the stack:
//!
//! - image prepare: building the guest image, cold (empty cache: kernel package
//!   download + unpack + initramfs) once, then warm (cached) for every run;
//! - VMM spawn: process start until its sockets answer;
//! - VM configure: `vm.create` + `vm.boot` (Cloud Hypervisor; 0 for QEMU);
//! - kernel boot: the guest's uptime when the guest agent starts as init;
//! - agent init: mounts, modules, host channel, until the agent says Ready;
//! - ready: VMM spawn to Ready, as the host sees it;
//! - first output: `Sandbox::start` to the command's first output;
//! - run: `Sandbox::start` to the sandbox's end (command `echo`, then VM stopped).
//!
//! `vm0-boot-bench --backend qemu --accel tcg --runs 20`;
//! `vm0-boot-bench --backend cloud-hypervisor --runs 50` on a KVM host.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use vm0_sandbox::cloud_hypervisor::CloudHypervisor;
use vm0_sandbox::image::{GuestImage, ImageRecipe};
use vm0_sandbox::microvm::{MicroVm, Vmm};
use vm0_sandbox::qemu::{Accel, Qemu};
use vm0_sandbox::{BootTimings, Sandbox, SandboxEvent, SandboxSpec};

mod stats;
use stats::summary;

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum Backend {
    Qemu,
    CloudHypervisor,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum AccelArg {
    Kvm,
    Tcg,
}

#[derive(Parser)]
struct Args {
    #[arg(long, value_enum, default_value = "qemu")]
    backend: Backend,
    /// QEMU's accelerator (Cloud Hypervisor always uses KVM).
    #[arg(long, value_enum, default_value = "tcg")]
    accel: AccelArg,
    /// VMs booted one after the other.
    #[arg(long, default_value_t = 20)]
    runs: u32,
    /// The static guest agent (default: `VM0_GUEST_AGENT`).
    #[arg(long, env = "VM0_GUEST_AGENT")]
    guest_agent: PathBuf,
    /// Also time a cold image build into an empty cache (downloads the kernel).
    #[arg(long)]
    cold_image: bool,
    #[arg(long, default_value_t = 256)]
    memory_mb: u64,
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Run each VMM unjailed and without a cgroup (what the hardening costs).
    #[arg(long)]
    no_jail: bool,
}

fn recipe(args: &Args, cache_dir: PathBuf) -> ImageRecipe {
    ImageRecipe {
        guest_agent: args.guest_agent.clone(),
        busybox: PathBuf::from("/bin/busybox"),
        kernel_package: std::env::var("VM0_KERNEL_PACKAGE").ok(),
        cache_dir,
        rootfs: None,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Builds the image `times` times; the durations and the image.
fn prepare(recipe: &ImageRecipe, times: u32) -> Result<(Vec<f64>, GuestImage)> {
    let mut took = Vec::new();
    let mut image = None;
    for _ in 0..times.max(1) {
        let t = Instant::now();
        image = Some(vm0_sandbox::image::build(recipe).context("building the guest image")?);
        took.push(ms(t.elapsed()));
    }
    Ok((took, image.context("built")?))
}

/// One run: boot timings, start → first output, start → end.
async fn one_run<V: Vmm>(
    sandbox: &MicroVm<V>,
    scratch: PathBuf,
    args: &Args,
    slot_user: Option<vm0_sandbox::slot_user::SlotUser>,
) -> Result<(BootTimings, Duration, Duration)> {
    let spec = SandboxSpec {
        run_id: "bench".into(),
        argv: vec!["echo".into(), "hello".into()],
        env: vec![("PATH".into(), "/bin".into())],
        working_dir: None,
        stdin: Vec::new(),
        stdin_file: None,
        vcpus: args.vcpus,
        memory_mb: args.memory_mb,
        disk_mb: 0,
        image: None,
        files: Vec::new(),
        scratch_dir: scratch,
        sample_interval: Duration::ZERO,
        as_root: false,
        slot_user,
        trees_in: Vec::new(),
        trees_out: Vec::new(),
        network: None,
    };
    let started = Instant::now();
    let mut run = sandbox.start(spec).await?;
    let (mut timings, mut first_output, mut logs) = (None, None, Vec::new());
    loop {
        match run.next_event().await.context("events end with Exited")? {
            SandboxEvent::Booted(t) => timings = Some(t),
            SandboxEvent::Stdout(_) | SandboxEvent::Stderr(_) => {
                first_output.get_or_insert_with(|| started.elapsed());
            }
            SandboxEvent::Log(line) => logs.push(line),
            SandboxEvent::Exited(exit) => {
                anyhow::ensure!(exit.code == Some(0), "run failed: {exit:?}: {logs:#?}");
                break;
            }
            SandboxEvent::Sample(_) | SandboxEvent::TreeSaved { .. } => {}
        }
    }
    let total = started.elapsed();
    Ok((
        timings.with_context(|| format!("no boot timings: {logs:#?}"))?,
        first_output.context("no output")?,
        total,
    ))
}

async fn measure<V: Vmm>(
    vmm: V,
    image: GuestImage,
    args: &Args,
    dir: &std::path::Path,
) -> Result<()> {
    println!(
        "backend: {}, {} runs, {} vCPU(s), {} MB, {}",
        vmm.describe(),
        args.runs,
        args.vcpus,
        args.memory_mb,
        if args.no_jail {
            "VMM unjailed, no cgroup"
        } else {
            "VMM jailed, in a cgroup"
        }
    );
    let mut sandbox = MicroVm::new(vmm, image);
    // As a worker runs them: jailed, as a slot's uid under root, in a cgroup.
    let leases = dir.join("leases");
    let slots = (!args.no_jail && vm0_sandbox::slot_user::can_switch_uids())
        .then(|| vm0_sandbox::slot_user::SlotUsers::lease(Default::default(), 1, &leases))
        .transpose()?;
    let slot_user = slots.as_ref().and_then(|s| s.users().first().copied());
    if !args.no_jail {
        sandbox = sandbox
            .with_jail(vm0_sandbox::vmm_jail::VmmJail::detect().map_err(anyhow::Error::msg)?)
            .with_limits(vm0_sandbox::cgroup::Hierarchy::detect().map_err(|e| e.to_string()));
    }
    let mut rows: Vec<(BootTimings, Duration, Duration)> = Vec::new();
    for i in 0..args.runs {
        rows.push(one_run(&sandbox, dir.join(format!("run-{i}")), args, slot_user).await?);
    }
    let column = |f: &dyn Fn(&(BootTimings, Duration, Duration)) -> Duration| {
        rows.iter().map(|r| ms(f(r))).collect::<Vec<_>>()
    };
    summary("vmm spawn", column(&|r| r.0.vmm_spawn));
    summary("vm configure", column(&|r| r.0.vm_configure));
    summary(
        "kernel boot (guest uptime at init)",
        column(&|r| r.0.kernel_boot),
    );
    summary("agent init", column(&|r| r.0.agent_init));
    summary("boot to guest agent ready", column(&|r| r.0.ready));
    summary("sandbox start -> first output", column(&|r| r.1));
    summary("sandbox start -> VM gone", column(&|r| r.2));
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let _logs = vm0_telemetry::init(vm0_telemetry::TelemetryOptions::logs_only(
        "vm0-bench",
        vm0_telemetry::LogFormat::Text,
    ))?;
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    if args.cold_image {
        let (cold, _) = prepare(&recipe(&args, dir.path().join("cold-images")), 1)?;
        summary("image prepare, cold (download + unpack + initramfs)", cold);
    }
    let cache = std::env::var("VM0_IMAGE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| dir.path().join("images"));
    let (warm, image) = prepare(&recipe(&args, cache), 5)?;
    summary(
        "image prepare, warm (cached image; includes apt-cache naming the kernel package)",
        warm,
    );
    match args.backend {
        Backend::Qemu => {
            let accel = match args.accel {
                AccelArg::Kvm => Accel::Kvm,
                AccelArg::Tcg => Accel::Tcg,
            };
            measure(Qemu::new(accel)?, image, &args, dir.path()).await
        }
        Backend::CloudHypervisor => {
            measure(CloudHypervisor::new()?, image, &args, dir.path()).await
        }
    }
}
