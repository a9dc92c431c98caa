//! The QEMU backend booting real microVMs (TCG on machines where KVM cannot boot a
//! stock kernel). Needs the static guest agent: `scripts/test.sh` builds it and
//! sets `VM0_GUEST_AGENT`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vm0_sandbox::image::{GuestImage, ImageCatalog, ImageRecipe, build};
use vm0_sandbox::microvm::MicroVm;
use vm0_sandbox::qemu::{Accel, Qemu, QemuSandbox};
use vm0_sandbox::sample::processes_matching;
use vm0_sandbox::{ExitReport, GuestFile, Sandbox, SandboxEvent, SandboxSpec};

fn cache() -> PathBuf {
    std::env::var("VM0_IMAGE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../target/vm0-images"
            ))
        })
}

fn image() -> GuestImage {
    let agent = std::env::var("VM0_GUEST_AGENT").unwrap_or_else(|_| {
        panic!(
            "VM0_GUEST_AGENT is not set: run scripts/test.sh, which builds the static guest agent"
        )
    });
    build(&ImageRecipe {
        guest_agent: PathBuf::from(agent),
        busybox: PathBuf::from("/bin/busybox"),
        kernel_package: None,
        cache_dir: cache(),
        rootfs: None,
    })
    .expect("guest image builds")
}

fn qemu() -> QemuSandbox {
    MicroVm::new(Qemu::new(Accel::Tcg).expect("qemu is installed"), image())
        .with_catalog(ImageCatalog::new(&cache()))
}

fn spec(dir: &std::path::Path, argv: &[&str]) -> SandboxSpec {
    SandboxSpec {
        run_id: "run_vm".into(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![
            ("PATH".into(), "/bin".into()),
            ("VM0_PROMPT".into(), "hello vm".into()),
        ],
        working_dir: None,
        stdin: b"from stdin".to_vec(),
        vcpus: 1,
        memory_mb: 256,
        disk_mb: 256,
        image: None,
        files: vec![GuestFile {
            path: "/work/in/a.txt".into(),
            data: "input file\n".into(),
            mode: 0,
        }],
        scratch_dir: dir.join("scratch"),
        sample_interval: Duration::from_millis(500),
        as_root: false,
        slot_user: None,
    }
}

/// Runs `spec`; kills the sandbox once its output contains `kill_on` (if given).
async fn run(spec: SandboxSpec, kill_on: Option<&str>) -> (String, Vec<String>, ExitReport, usize) {
    let mut sb = qemu().start(spec).await.expect("start");
    let (mut out, mut logs, mut samples) = (Vec::new(), Vec::new(), 0);
    loop {
        tokio::select! {
            ev = sb.next_event() => match ev.expect("events end with Exited") {
                SandboxEvent::Stdout(b) | SandboxEvent::Stderr(b) => {
                    out.extend_from_slice(&b);
                    if kill_on.is_some_and(|k| String::from_utf8_lossy(&out).contains(k)) {
                        sb.kill();
                    }
                }
                SandboxEvent::Sample(_) => samples += 1,
                SandboxEvent::Log(l) => logs.push(l),
                SandboxEvent::Booted(t) => logs.push(format!("booted: {t:?}")),
                SandboxEvent::Exited(x) => return (String::from_utf8_lossy(&out).into(), logs, x, samples),
            },
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_a_vm_and_runs_the_command_inside() {
    let dir = tempfile::tempdir().expect("dir");
    let started = Instant::now();
    let (out, logs, exit, samples) = run(
        spec(
            dir.path(),
            &[
                "sh",
                "-c",
                "echo \"$VM0_PROMPT\"; cat; echo; cat /work/in/a.txt; uname -s; \
                 id -u; whoami; echo more >> /work/in/a.txt && echo appended; sleep 1; exit 5",
            ],
        ),
        None,
    )
    .await;
    assert_eq!(
        out, "hello vm\nfrom stdin\ninput file\nLinux\n1000\nagent\nappended\n",
        "the unprivileged run user owns the input files; logs: {logs:?}"
    );
    assert_eq!(exit.code, Some(5), "logs: {logs:?}");
    assert!(samples >= 1, "samples from inside the guest");
    assert!(logs.iter().any(|l| l.contains("backend qemu")), "{logs:?}");
    assert!(!dir.path().join("scratch").exists(), "scratch removed");
    eprintln!("boot + run took {:?}; {logs:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_the_vm() {
    let dir = tempfile::tempdir().expect("dir");
    let mut s = spec(dir.path(), &["sh", "-c", "echo up; sleep 600"]);
    s.scratch_dir = dir.path().join("run_vm_marker");
    let asked = Instant::now();
    let (out, logs, exit, _) = run(s, Some("up")).await;
    assert!(out.contains("up"), "{out} {logs:?}");
    let took = asked.elapsed();
    assert!(exit.code.is_none() || exit.signal.is_some(), "{exit:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while processes_matching("run_vm_marker") > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        processes_matching("run_vm_marker"),
        0,
        "no VMM process remains"
    );
    eprintln!("boot + cancel took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_memory_is_reported_as_such() {
    let dir = tempfile::tempdir().expect("dir");
    let mut s = spec(
        dir.path(),
        &["sh", "-c", "echo filling; exec tail /dev/zero"],
    );
    s.memory_mb = 192;
    let (out, logs, exit, _) = run(s, None).await;
    assert!(out.starts_with("filling"), "{out} {logs:?}");
    assert!(exit.oom_killed, "{exit:?} {out} {logs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_name_their_image() {
    let dir = tempfile::tempdir().expect("dir");
    let sandbox = qemu();
    ImageCatalog::new(&cache())
        .set_name("test/named:1", &image())
        .expect("name the image");
    let mut s = spec(dir.path(), &["echo", "named"]);
    s.image = Some("test/named:1".into());
    let mut run = sandbox.start(s).await.expect("a named image starts");
    let mut out = Vec::new();
    loop {
        match run.next_event().await.expect("events end with Exited") {
            SandboxEvent::Stdout(b) => out.extend_from_slice(&b),
            SandboxEvent::Exited(x) => {
                assert_eq!(x.code, Some(0));
                break;
            }
            _ => {}
        }
    }
    assert_eq!(String::from_utf8_lossy(&out), "named\n");

    let mut s = spec(dir.path(), &["true"]);
    s.image = Some("never-built".into());
    let err = sandbox.start(s).await.expect_err("an unknown image");
    assert!(
        err.to_string().contains("\"never-built\" is not built"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_in_a_root_filesystem() {
    let dir = tempfile::tempdir().expect("dir");
    // A minimal userland: busybox and a marker only the rootfs has.
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("bin")).expect("bin");
    std::fs::create_dir_all(tree.join("etc")).expect("etc");
    std::fs::copy("/bin/busybox", tree.join("bin/busybox")).expect("busybox");
    for applet in ["sh", "cat", "echo", "touch", "whoami"] {
        std::os::unix::fs::symlink("busybox", tree.join("bin").join(applet)).expect("link");
    }
    std::fs::write(tree.join("etc/vm0-rootfs-release"), "rootfs-ok\n").expect("marker");
    let image = build(&ImageRecipe {
        guest_agent: std::env::var("VM0_GUEST_AGENT")
            .expect("VM0_GUEST_AGENT")
            .into(),
        busybox: PathBuf::from("/bin/busybox"),
        kernel_package: None,
        cache_dir: cache(),
        rootfs: Some(tree),
    })
    .expect("an image with a root filesystem builds");
    assert!(image.rootfs.is_some());
    let sandbox = MicroVm::new(Qemu::new(Accel::Tcg).expect("qemu"), image);
    let s = spec(
        dir.path(),
        &[
            "sh",
            "-c",
            "cat /etc/vm0-rootfs-release; touch /etc/x 2>/dev/null && echo wrote-etc; \
             echo data > /work/f && cat /work/f; whoami",
        ],
    );
    let mut run = sandbox.start(s).await.expect("start");
    let (mut out, mut logs) = (Vec::new(), Vec::new());
    let exit = loop {
        match run.next_event().await.expect("events end with Exited") {
            SandboxEvent::Stdout(b) | SandboxEvent::Stderr(b) => out.extend_from_slice(&b),
            SandboxEvent::Log(l) => logs.push(l),
            SandboxEvent::Exited(x) => break x,
            _ => {}
        }
    };
    assert_eq!(
        String::from_utf8_lossy(&out),
        "rootfs-ok\ndata\nagent\n",
        "the command ran in the root filesystem, read-only but /work, as the run user \
         the image added to its /etc: {logs:?}"
    );
    assert_eq!(exit.code, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_runs_the_command_only_when_asked() {
    let dir = tempfile::tempdir().expect("dir");
    let mut s = spec(dir.path(), &["sh", "-c", "id -u; whoami"]);
    s.as_root = true;
    let (out, logs, exit, _) = run(s, None).await;
    assert_eq!(out, "0\nroot\n", "logs: {logs:?}");
    assert_eq!(exit.code, Some(0));
}

/// The command in a microVM lives under the same syscall policy as in
/// bubblewrap (the guest agent installs it for the command alone), unless the
/// agent config asked for root in its own VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_lives_under_the_jail_policy() {
    let dir = tempfile::tempdir().expect("dir");
    let s = spec(
        dir.path(),
        &[
            "sh",
            "-c",
            "grep '^Seccomp:' /proc/self/status; /run/vm0-guest-agent probe",
        ],
    );
    let (out, logs, exit, _) = run(s, None).await;
    assert_eq!(exit.code, Some(0), "{out}; logs: {logs:?}");
    assert!(out.contains("Seccomp:\t2"), "{out}");
    for name in [
        "unshare-user",
        "unshare-mount",
        "mount",
        "keyctl",
        "add_key",
        "bpf",
        "perf_event_open",
        "userfaultfd",
        "io_uring",
    ] {
        let line = format!("probe {name}: refused (EPERM)");
        assert!(out.lines().any(|l| l == line), "{line} not in {out}");
    }
    assert!(out.contains("probe clone3: absent (ENOSYS)"), "{out}");

    let mut s = spec(
        dir.path(),
        &["sh", "-c", "grep '^Seccomp:' /proc/self/status"],
    );
    s.as_root = true;
    let (out, _, _, _) = run(s, None).await;
    assert_eq!(out, "Seccomp:\t0\n", "root in its own VM is not filtered");
}
