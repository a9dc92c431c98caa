//! Backend selection on this host, whatever it offers: `auto` must end on a
//! backend that runs commands, with a reason for every backend it passed over.

use std::path::PathBuf;
use std::time::Duration;

use vm0_sandbox::select::{AccelChoice, AnySandbox, SandboxKind, SelectOptions, select};
use vm0_sandbox::slot_user::{SlotUser, SlotUsers};
use vm0_sandbox::{Sandbox, SandboxEvent, SandboxSpec};

/// A slot uid, as a root worker leases one per slot (none when not root).
fn slot_user() -> Option<SlotUser> {
    static LEASE: std::sync::OnceLock<Option<SlotUsers>> = std::sync::OnceLock::new();
    LEASE
        .get_or_init(|| {
            vm0_sandbox::slot_user::can_switch_uids().then(|| {
                SlotUsers::lease(
                    Default::default(),
                    1,
                    &vm0_sandbox::slot_user::default_lock_dir(),
                )
                .expect("a slot uid")
            })
        })
        .as_ref()
        .and_then(|l| l.users().first().copied())
}

fn options(kind: SandboxKind, scratch: &std::path::Path) -> SelectOptions {
    SelectOptions {
        kind,
        qemu_accel: AccelChoice::Auto,
        guest_agent: std::env::var_os("VM0_GUEST_AGENT").map(PathBuf::from),
        busybox: PathBuf::from("/bin/busybox"),
        kernel_package: None,
        image_cache: std::env::var_os("VM0_IMAGE_CACHE").map_or_else(
            || {
                PathBuf::from(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/../../target/vm0-images"
                ))
            },
            PathBuf::from,
        ),
        scratch_dir: scratch.to_owned(),
        bubblewrap_limits: Default::default(),
        slot_users: slot_user().into_iter().collect(),
        vmm_jail: Default::default(),
        vmm_limits: Default::default(),
    }
}

async fn echo(sandbox: &AnySandbox, scratch: &std::path::Path) -> String {
    let spec = SandboxSpec {
        run_id: "run_select".into(),
        argv: vec!["echo".into(), "chosen".into()],
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        working_dir: None,
        stdin: Vec::new(),
        stdin_file: None,
        vcpus: 1,
        memory_mb: 256,
        disk_mb: 256,
        image: None,
        files: Vec::new(),
        scratch_dir: scratch.join("run"),
        sample_interval: Duration::from_secs(1),
        as_root: false,
        slot_user: slot_user(),
        trees_in: Vec::new(),
        trees_out: Vec::new(),
        network: None,
    };
    let mut run = sandbox.start(spec).await.expect("start");
    let mut out = Vec::new();
    loop {
        match run.next_event().await.expect("events end with Exited") {
            SandboxEvent::Stdout(b) => out.extend_from_slice(&b),
            SandboxEvent::Exited(_) => return String::from_utf8_lossy(&out).into(),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_picks_a_backend_that_works_and_says_why() {
    assert!(
        std::env::var_os("VM0_GUEST_AGENT").is_some(),
        "VM0_GUEST_AGENT is not set: run scripts/test.sh, which builds the static guest agent"
    );
    let dir = tempfile::tempdir().expect("dir");
    let chosen = select(&options(SandboxKind::Auto, dir.path()))
        .await
        .expect("auto always finds a backend where bubblewrap works");
    eprintln!("auto chose {} because: {:?}", chosen.backend, chosen.why);
    let passed_over: &[&str] = match chosen.sandbox {
        AnySandbox::CloudHypervisor(_) => &[],
        AnySandbox::Qemu(_) => &["cloud-hypervisor: "],
        AnySandbox::Bubblewrap(_) => &["cloud-hypervisor: ", "qemu (kvm): "],
    };
    for backend in passed_over {
        assert!(
            chosen.why.iter().any(|w| w.starts_with(backend)),
            "no reason given for passing over {backend}: {:?}",
            chosen.why
        );
    }
    assert_eq!(echo(&chosen.sandbox, dir.path()).await, "chosen\n");
}

/// `qemu` with `VM0_QEMU_ACCEL=auto`: KVM if a probe VM boots, TCG otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_falls_back_to_tcg_only_when_kvm_cannot_boot() {
    assert!(
        std::env::var_os("VM0_GUEST_AGENT").is_some(),
        "VM0_GUEST_AGENT is not set"
    );
    let dir = tempfile::tempdir().expect("dir");
    let chosen = select(&options(SandboxKind::Qemu, dir.path()))
        .await
        .expect("qemu is installed");
    eprintln!("qemu runs as {} because: {:?}", chosen.backend, chosen.why);
    if chosen.backend == "qemu (tcg)" {
        assert!(
            chosen.why.iter().any(|w| w.starts_with("kvm: ")),
            "{:?}",
            chosen.why
        );
    } else {
        assert_eq!(chosen.backend, "qemu (kvm)");
    }
    assert_eq!(echo(&chosen.sandbox, dir.path()).await, "chosen\n");
}

#[tokio::test]
async fn an_unknown_backend_name_is_refused_with_the_choices() {
    let err = "firecracker".parse::<SandboxKind>().expect_err("unknown");
    assert!(
        err.contains("auto, cloud-hypervisor, qemu, bubblewrap"),
        "{err}"
    );
}
