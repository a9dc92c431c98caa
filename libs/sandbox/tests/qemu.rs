//! The QEMU backend booting real microVMs (TCG on machines where KVM cannot boot a
//! stock kernel). Needs the static guest agent: `scripts/test.sh` builds it and
//! sets `VM0_GUEST_AGENT`.

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vm0_sandbox::image::{GuestImage, ImageCatalog, ImageRecipe, build};
use vm0_sandbox::microvm::MicroVm;
use vm0_sandbox::qemu::{Accel, Qemu, QemuSandbox};
use vm0_sandbox::sample::{pids_matching, processes_matching};
use vm0_sandbox::slot_user::{SlotUser, SlotUsers, UidRange, default_lock_dir};
use vm0_sandbox::vmm_jail::VmmJail;
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

/// As a worker makes it: every VMM jailed, in a cgroup of its own where the host
/// allows.
fn qemu() -> QemuSandbox {
    jailed(MicroVm::new(
        Qemu::new(Accel::Tcg).expect("qemu is installed"),
        image(),
    ))
    .with_catalog(ImageCatalog::new(&cache()))
}

fn jailed(sandbox: QemuSandbox) -> QemuSandbox {
    sandbox
        .with_jail(VmmJail::detect().expect("the VMM jail works here (bwrap, setpriv)"))
        .with_limits(vm0_sandbox::cgroup::Hierarchy::detect().map_err(|e| e.to_string()))
}

/// This test process's slot uid (a root worker's VMM runs as one), leased for
/// the process's life.
fn slot_user() -> Option<SlotUser> {
    static LEASE: std::sync::OnceLock<Option<SlotUsers>> = std::sync::OnceLock::new();
    LEASE
        .get_or_init(|| {
            vm0_sandbox::slot_user::can_switch_uids().then(|| {
                SlotUsers::lease(UidRange::default(), 1, &default_lock_dir()).expect("a slot uid")
            })
        })
        .as_ref()
        .and_then(|l| l.users().first().copied())
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
        stdin_file: None,
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
        slot_user: slot_user(),
        trees_in: Vec::new(),
        trees_out: Vec::new(),
        network: None,
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
                SandboxEvent::TreeSaved { .. } => {}
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
    let sandbox = jailed(MicroVm::new(Qemu::new(Accel::Tcg).expect("qemu"), image));
    let mut s = spec(
        dir.path(),
        &[
            "sh",
            "-c",
            "cat /etc/vm0-rootfs-release; touch /etc/x 2>/dev/null && echo wrote-etc; \
             echo data > /work/f && cat /work/f; echo kept > $VM0_STATE_DIR/s && cat /state/s; whoami",
        ],
    );
    // The worker's session state directory: made writable in a read-only root.
    s.env.push(("VM0_STATE_DIR".into(), "/state".into()));
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
        "rootfs-ok\ndata\nkept\nagent\n",
        "the command ran in the root filesystem, read-only but /work and /state, as the \
         run user the image added to its /etc: {logs:?}"
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

fn status_field(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_owned()))
        .unwrap_or_default()
}

/// A guest escape owns its VMM: the VMM is the slot's uid (never root), without
/// capabilities or an environment, under QEMU's own seccomp filter, sees only its
/// VM's files, and is bounded by a cgroup of the guest's size plus overhead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vmm_is_jailed() {
    let dir = tempfile::tempdir().expect("dir");
    let mut s = spec(dir.path(), &["sh", "-c", "echo up; sleep 30"]);
    // A marker on QEMU's command line (vm0.work_mb=...): this test's VMM.
    s.disk_mb = 263;
    s.memory_mb = 192;
    let mut sb = qemu().start(s).await.expect("start");
    loop {
        match sb.next_event().await.expect("events") {
            SandboxEvent::Stdout(_) => break,
            SandboxEvent::Exited(x) => panic!("exited: {x:?}"),
            _ => {}
        }
    }
    let qemu: Vec<u32> = pids_matching("vm0.work_mb=263")
        .into_iter()
        .filter(|p| {
            std::fs::read_link(format!("/proc/{p}/exe"))
                .is_ok_and(|e| e.to_string_lossy().contains("qemu-system"))
        })
        .collect();
    assert_eq!(qemu.len(), 1, "one VMM: {qemu:?}");
    let pid = qemu[0];
    let uids = status_field(pid, "Uid:");
    match slot_user() {
        Some(user) => assert!(
            uids.split_whitespace().all(|u| u == user.uid.to_string()),
            "the VMM is the slot's uid {}: {uids}",
            user.uid
        ),
        None => eprintln!("this test runs as a user: the VMM is that user ({uids})"),
    }
    assert_eq!(status_field(pid, "CapEff:"), "0000000000000000");
    assert_eq!(status_field(pid, "NoNewPrivs:"), "1");
    assert_eq!(status_field(pid, "Seccomp:"), "2", "QEMU's -sandbox on");
    // Nothing of the worker's environment (bwrap sets PWD, to /jail).
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    let environ = String::from_utf8_lossy(&environ).into_owned();
    assert!(
        environ
            .split('\0')
            .filter(|v| !v.is_empty())
            .all(|v| v == "PWD=/jail"),
        "{environ}"
    );
    // Its root: libraries, a minimal /dev, the VM's files, its own directory.
    let root: std::collections::BTreeSet<String> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .expect("its root")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for absent in ["etc", "home", "root", "var", "work"] {
        assert!(
            !root.contains(absent),
            "/{absent} is visible to the VMM: {root:?}"
        );
    }
    for present in ["jail", "vm", "usr", "dev"] {
        assert!(root.contains(present), "/{present} missing: {root:?}");
    }
    let scratch_in_jail = std::fs::read_dir(format!("/proc/{pid}/root/jail"))
        .expect("jail")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect::<Vec<_>>();
    assert_eq!(scratch_in_jail, vec!["guest.sock".to_owned()]);
    // Its cgroup: the guest's 192 MB plus the VMM's overhead.
    if vm0_sandbox::cgroup::Hierarchy::detect().is_ok() {
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
        let memory = cgroups
            .lines()
            .find(|l| l.contains("memory") || l.starts_with("0::"))
            .expect("a memory cgroup");
        assert!(memory.contains("vm0-run-run_vm"), "{cgroups}");
        let path = memory.splitn(3, ':').nth(2).unwrap_or_default();
        let file = if memory.starts_with("0::") {
            format!("/sys/fs/cgroup{path}/memory.max")
        } else {
            format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes")
        };
        let limit: u64 = std::fs::read_to_string(&file)
            .expect("limit")
            .trim()
            .parse()
            .expect("bytes");
        assert_eq!(
            limit,
            (192 + vm0_sandbox::microvm::VMM_OVERHEAD_MB) << 20,
            "{file}"
        );
    } else {
        eprintln!("SKIPPED the cgroup check: no cgroup hierarchy this process may use");
    }
    sb.kill();
    while let Some(ev) = sb.next_event().await {
        if matches!(ev, SandboxEvent::Exited(_)) {
            break;
        }
    }
}

/// The guest's console is kept in memory, bounded: a guest root flooding its
/// serial port writes nothing to the worker's disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_flooding_its_console_fills_no_disk() {
    let dir = tempfile::tempdir().expect("dir");
    let mut s = spec(
        dir.path(),
        &[
            "sh",
            "-c",
            "head -c 600000 /dev/zero | tr '\\0' x > /dev/ttyS0; echo flooded",
        ],
    );
    s.as_root = true;
    let scratch = s.scratch_dir.clone();
    let mut sb = qemu().start(s).await.expect("start");
    let mut largest = 0u64;
    let mut out = String::new();
    let exit = loop {
        tokio::select! {
            ev = sb.next_event() => match ev.expect("events") {
                SandboxEvent::Stdout(b) => out.push_str(&String::from_utf8_lossy(&b)),
                SandboxEvent::Exited(x) => break x,
                _ => {}
            },
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                largest = largest.max(disk_use(&scratch));
            }
        }
    };
    assert_eq!(out, "flooded\n", "{exit:?}");
    assert!(
        largest < 64 * 1024,
        "the run's scratch dir grew to {largest} bytes"
    );
}

fn disk_use(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_use(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Trees through the guest agent of a VM: a writable /work from an archive, a
/// volume unpacked read-only (root's, and mounted read-only), /work out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trees_go_in_and_come_out() {
    let dir = tempfile::tempdir().expect("dir");
    let (work, _) = support::tree_archive(
        dir.path(),
        "work",
        &[("hello.txt", "hello\n"), ("ln", "@hello.txt")],
    );
    let (vol, _) = support::tree_archive(dir.path(), "vol", &[("d/data.txt", "volume data\n")]);
    let mut s = spec(
        dir.path(),
        &[
            "sh",
            "-c",
            "cat /work/hello.txt /volumes/v/d/data.txt; touch /volumes/v/new 2>/dev/null && echo wrote-volume; \
             (echo x >> /volumes/v/d/data.txt) 2>/dev/null && echo changed-volume; echo out > /work/result.txt",
        ],
    );
    // An archive goes into an empty directory: no input files in /work.
    s.files.clear();
    s.trees_in = vec![
        vm0_sandbox::TreeIn {
            dest: "/work".into(),
            archive: work,
            unpacked: None,
            read_only: false,
            max_bytes: 1 << 20,
            max_files: 100,
        },
        vm0_sandbox::TreeIn {
            dest: "/volumes/v".into(),
            archive: vol,
            unpacked: None,
            read_only: true,
            max_bytes: 1 << 20,
            max_files: 100,
        },
    ];
    let out_archive = dir.path().join("out.tar.gz");
    s.trees_out = vec![vm0_sandbox::TreeOut {
        src: "/work".into(),
        archive: out_archive.clone(),
        max_bytes: 1 << 20,
        max_files: 100,
    }];
    let support::Reported {
        output: out,
        logs,
        saved,
        exit,
    } = support::collect(qemu().start(s).await.expect("start")).await;
    assert_eq!(exit.code, Some(0), "{out} {logs:?}");
    assert_eq!(
        out, "hello\nvolume data\n",
        "the volume is read-only; {logs:?}"
    );
    assert!(
        logs.iter().any(|l| l.starts_with("/volumes/v: 1 files")),
        "{logs:?}"
    );
    let taken = saved[0].1.as_ref().expect("saved");
    assert_eq!(taken.files, 3, "{taken:?}");
    let back = dir.path().join("back");
    let manifest = vm0_storage::unpack(
        std::fs::File::open(&out_archive).expect("open"),
        &back,
        &vm0_storage::Limits::default(),
    )
    .expect("unpack");
    let paths: Vec<&str> = manifest.files().iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["hello.txt", "ln", "result.txt"]);
}
