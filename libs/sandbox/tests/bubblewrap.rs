//! The bubblewrap backend on this machine: output, exit codes, isolation, kill, and
//! that nothing of a run remains afterwards.

use std::time::Duration;

mod support;

use support::tree_archive;
use vm0_sandbox::bubblewrap::Bubblewrap;
use vm0_sandbox::sample::{pids_matching, processes_matching};
use vm0_sandbox::{ExitReport, GuestFile, Sandbox, SandboxEvent, SandboxSpec};

fn guest_agent() -> std::path::PathBuf {
    std::env::var_os("VM0_GUEST_AGENT")
        .map(std::path::PathBuf::from)
        .expect("VM0_GUEST_AGENT is not set: run scripts/test.sh, which builds the guest agent")
}

fn spec(dir: &std::path::Path, argv: &[&str]) -> SandboxSpec {
    SandboxSpec {
        run_id: "run_test".into(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![
            ("VM0_PROMPT".into(), "hello prompt".into()),
            ("GREETING".into(), "hi".into()),
        ],
        working_dir: None,
        stdin: b"from stdin\n".to_vec(),
        stdin_file: None,
        vcpus: 1,
        memory_mb: 256,
        disk_mb: 256,
        image: None,
        files: Vec::new(),
        scratch_dir: dir.join("scratch"),
        sample_interval: Duration::from_millis(100),
        as_root: false,
        slot_user: None,
        trees_in: Vec::new(),
        trees_out: Vec::new(),
        network: None,
    }
}

struct Outcome {
    stdout: String,
    stderr: String,
    samples: usize,
    /// The largest network counters (rx, tx) the samples showed.
    network: (i64, i64),
    logs: Vec<String>,
    exit: ExitReport,
}

async fn run(spec: SandboxSpec, kill_after: Option<Duration>) -> Outcome {
    let bwrap = Bubblewrap::detect(&guest_agent())
        .await
        .expect("bubblewrap works on this machine (scripts/test.sh installs it)");
    run_on(&bwrap, spec, kill_after).await
}

async fn run_on(bwrap: &Bubblewrap, spec: SandboxSpec, kill_after: Option<Duration>) -> Outcome {
    let mut sb = bwrap.start(spec).await.expect("start");
    let (mut stdout, mut stderr, mut samples, mut logs) = (Vec::new(), Vec::new(), 0, Vec::new());
    let mut network = (0, 0);
    let killer = tokio::time::sleep(kill_after.unwrap_or(Duration::from_secs(3600)));
    tokio::pin!(killer);
    loop {
        tokio::select! {
            _ = &mut killer => sb.kill(),
            ev = sb.next_event() => match ev.expect("events end with Exited") {
                SandboxEvent::Stdout(b) => stdout.extend_from_slice(&b),
                SandboxEvent::Stderr(b) => stderr.extend_from_slice(&b),
                SandboxEvent::Sample(s) => {
                    samples += 1;
                    network.0 = network.0.max(s.network_rx_bytes);
                    network.1 = network.1.max(s.network_tx_bytes);
                }
                SandboxEvent::Log(l) => logs.push(l),
                SandboxEvent::Booted(_) | SandboxEvent::TreeSaved { .. } => {}
                SandboxEvent::Exited(exit) => {
                    return Outcome {
                        stdout: String::from_utf8_lossy(&stdout).into(),
                        stderr: String::from_utf8_lossy(&stderr).into(),
                        samples,
                        network,
                        logs,
                        exit,
                    };
                }
            },
        }
    }
}

#[tokio::test]
async fn runs_a_command_with_env_stdin_and_exit_code() {
    let dir = tempfile::tempdir().expect("dir");
    let out = run(
        spec(
            dir.path(),
            &[
                "sh",
                "-c",
                "echo \"$VM0_PROMPT $GREETING\"; cat; echo oops >&2; pwd; exit 3",
            ],
        ),
        None,
    )
    .await;
    assert_eq!(out.stdout, "hello prompt hi\nfrom stdin\n/work\n");
    assert_eq!(out.stderr, "oops\n");
    assert_eq!(out.exit.code, Some(3));
    assert!(!dir.path().join("scratch").exists(), "scratch dir removed");
}

#[tokio::test]
async fn the_host_is_read_only_and_the_network_is_gone() {
    let dir = tempfile::tempdir().expect("dir");
    let out = run(
        spec(
            dir.path(),
            &["sh", "-c", "touch /usr/x 2>/dev/null && echo wrote-usr; touch /work/ok && echo wrote-work; ls /sys/class/net 2>/dev/null | tr '\\n' ' '; cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' ' | tr '\\n' ' '; echo; test -e /etc/shadow && echo shadow-visible; echo pid=$$"],
        ),
        None,
    )
    .await;
    assert!(!out.stdout.contains("wrote-usr"), "{}", out.stdout);
    assert!(out.stdout.contains("wrote-work"), "{}", out.stdout);
    assert!(out.stdout.contains("lo"), "only loopback: {}", out.stdout);
    assert!(
        !out.stdout.contains("eth") && !out.stdout.contains("ens"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("shadow-visible"));
    // In its own pid namespace the command's pid is small: bwrap is 1, the guest
    // agent 2, then the agent's threads.
    let pid: u32 = out
        .stdout
        .split("pid=")
        .nth(1)
        .and_then(|p| p.trim().parse().ok())
        .expect("pid printed");
    assert!(pid < 50, "own pid namespace: {}", out.stdout);
    assert_eq!(out.exit.code, Some(0));
}

#[tokio::test]
async fn kill_leaves_nothing_behind() {
    let dir = tempfile::tempdir().expect("dir");
    let marker = "vm0-leak-marker-4711";
    let argv = [
        "sh",
        "-c",
        // Durations no other test uses: the children carry no marker.
        &format!("sleep 4711 & sleep 4712 & echo started; wait # {marker}"),
    ];
    let out = run(spec(dir.path(), &argv), Some(Duration::from_millis(500))).await;
    assert!(out.stdout.contains("started"));
    assert_eq!(out.exit.code, None);
    // The guest agent stops the command's process group with SIGTERM first.
    assert_eq!(out.exit.signal, Some(15));
    // The kernel tears the pid namespace down asynchronously.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let remaining = || processes_matching(marker) + processes_matching("sleep 471");
    while remaining() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(processes_matching(marker), 0, "processes of the run remain");
    assert_eq!(
        processes_matching("sleep 471"),
        0,
        "children of the run remain"
    );
    assert!(!dir.path().join("scratch").exists());
}

#[tokio::test]
async fn samples_resources_while_running() {
    let dir = tempfile::tempdir().expect("dir");
    let out = run(
        spec(
            dir.path(),
            &[
                "sh",
                "-c",
                "dd if=/dev/zero of=/work/f bs=1M count=2 2>/dev/null; sleep 0.5",
            ],
        ),
        None,
    )
    .await;
    assert!(out.samples >= 2, "{} samples", out.samples);
    assert_eq!(out.exit.code, Some(0));
}

/// The network counters are the run's interfaces', never its loopback's: 4 MiB
/// a command sends itself over `lo` are not network traffic.
#[tokio::test]
async fn loopback_traffic_is_not_counted_as_network() {
    let dir = tempfile::tempdir().expect("dir");
    let script = "import socket, threading, time
s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(1)
c = socket.create_connection(s.getsockname()); a, _ = s.accept()
got = [0]
def read():
    while (d := a.recv(1 << 16)): got[0] += len(d)
t = threading.Thread(target=read); t.start()
c.sendall(b'x' * (4 << 20)); c.close(); t.join()
print(got[0], flush=True)
time.sleep(0.5)
";
    let out = run(spec(dir.path(), &["python3", "-c", script]), None).await;
    assert_eq!(out.stdout, "4194304\n", "{}", out.stderr);
    assert!(out.samples >= 2, "{} samples", out.samples);
    assert!(
        out.network.0 < 1 << 20 && out.network.1 < 1 << 20,
        "loopback bytes counted as network: rx/tx {:?}",
        out.network
    );
}

#[tokio::test]
async fn a_named_image_is_refused_not_ignored() {
    let dir = tempfile::tempdir().expect("dir");
    let mut s = spec(dir.path(), &["true"]);
    s.image = Some("debian-full".into());
    let err = Bubblewrap::detect(&guest_agent())
        .await
        .expect("bwrap")
        .start(s)
        .await
        .expect_err("bubblewrap has no images");
    assert!(err.to_string().contains("needs a microVM worker"), "{err}");
}

#[tokio::test]
async fn input_files_appear_under_work() {
    let dir = tempfile::tempdir().expect("dir");
    let mut s = spec(
        dir.path(),
        &[
            "sh",
            "-c",
            "cat /work/in/a.txt; test -x /work/run.sh && echo exec",
        ],
    );
    s.files = vec![
        GuestFile {
            path: "/work/in/a.txt".into(),
            data: "input\n".into(),
            mode: 0,
        },
        GuestFile {
            path: "/work/run.sh".into(),
            data: "#!/bin/sh\n".into(),
            mode: 0o755,
        },
    ];
    let out = run(s, None).await;
    assert_eq!(out.stdout, "input\nexec\n");
    let sandbox = Bubblewrap::detect(&guest_agent()).await.expect("bwrap");

    // The host system is read-only inside: such an input fails the run, saying why.
    let mut s = spec(dir.path(), &["true"]);
    s.files = vec![GuestFile {
        path: "/usr/x".into(),
        data: "x".into(),
        mode: 0,
    }];
    let mut run = sandbox.start(s).await.expect("start");
    let mut logs = Vec::new();
    let exit = loop {
        match run.next_event().await.expect("events end with Exited") {
            SandboxEvent::Log(l) => logs.push(l),
            SandboxEvent::Exited(x) => break x,
            _ => {}
        }
    };
    assert_eq!(exit.code, None);
    assert!(
        logs.iter()
            .any(|l| l.contains("\"/usr/x\"") && l.contains("Read-only")),
        "{logs:?}"
    );
}

/// Whether runs get cgroups here; says why not when they do not.
fn limits_available() -> bool {
    match vm0_sandbox::cgroup::Hierarchy::detect() {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIPPED: bubblewrap runs get no resource limits on this host: {e}");
            false
        }
    }
}

/// The host directory of the cgroup named in a sandbox's `/proc/self/cgroup` line
/// (`id:controllers:path`). The sandbox has its own cgroup namespace, rooted where
/// this process (the worker) is; mounts are the conventional ones.
fn host_dir(line: &str) -> String {
    let mut parts = line.splitn(3, ':');
    let (_, controllers, path) = (
        parts.next(),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let own = std::fs::read_to_string("/proc/self/cgroup").expect("own cgroups");
    let root = own
        .lines()
        .find_map(|l| {
            let mut p = l.splitn(3, ':');
            let (_, c, path) = (p.next()?, p.next()?, p.next()?);
            (c == controllers).then(|| path.trim_end_matches('/').to_owned())
        })
        .unwrap_or_default();
    let mount = if controllers.is_empty() {
        "/sys/fs/cgroup".to_owned()
    } else {
        format!("/sys/fs/cgroup/{controllers}")
    };
    format!("{mount}{root}{path}")
}

fn limit(line: &str, file: &str) -> String {
    let at = format!("{}/{file}", host_dir(line));
    std::fs::read_to_string(&at)
        .unwrap_or_else(|e| panic!("reading {at}: {e}"))
        .trim()
        .to_owned()
}

#[tokio::test]
async fn a_run_gets_its_memory_cpu_and_process_limits() {
    if !limits_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    let mut s = spec(dir.path(), &["sh", "-c", "cat /proc/self/cgroup; sleep 2"]);
    s.memory_mb = 192;
    s.vcpus = 2;
    let bwrap = Bubblewrap::detect(&guest_agent())
        .await
        .expect("bubblewrap");
    let mut sb = bwrap.start(s).await.expect("start");
    let (mut out, mut logs, mut checked) = (String::new(), Vec::new(), Vec::new());
    loop {
        match sb.next_event().await.expect("events end with Exited") {
            SandboxEvent::Stdout(b) => out.push_str(&String::from_utf8_lossy(&b)),
            SandboxEvent::Log(l) => logs.push(l),
            SandboxEvent::Exited(exit) => {
                assert_eq!(exit.code, Some(0));
                break;
            }
            _ => {}
        }
        // Read the host's side of the run's cgroups while the run lives.
        if checked.is_empty() && out.ends_with('\n') {
            for line in out.lines().filter(|l| l.contains("/vm0-run-run_test")) {
                let controllers = line.split(':').nth(1).unwrap_or_default();
                let split: Vec<&str> = controllers.split(',').collect();
                if controllers.is_empty() {
                    assert_eq!(limit(line, "memory.max"), (192u64 << 20).to_string());
                    assert_eq!(limit(line, "cpu.max"), "200000 100000");
                    assert_eq!(limit(line, "pids.max"), "4096");
                    checked.push("v2");
                } else if split.contains(&"memory") {
                    assert_eq!(
                        limit(line, "memory.limit_in_bytes"),
                        (192u64 << 20).to_string()
                    );
                    checked.push("memory");
                } else if split.contains(&"cpu") {
                    assert_eq!(limit(line, "cpu.cfs_quota_us"), "200000");
                    checked.push("cpu");
                } else if split.contains(&"pids") {
                    assert_eq!(limit(line, "pids.max"), "4096");
                    checked.push("pids");
                }
            }
            assert!(
                checked.contains(&"v2") || checked.contains(&"memory"),
                "the command is in no run cgroup with a memory limit: {out}"
            );
        }
    }
    assert!(
        logs.iter()
            .any(|l| l.contains("limits: 192 MB memory, 2 vCPU, 4096 processes")),
        "the run's log says its limits: {logs:?}"
    );
    eprintln!("checked: {checked:?}");
    // The run's groups are gone with it.
    for line in out.lines().filter(|l| l.contains("/vm0-run-run_test")) {
        let dir = host_dir(line);
        assert!(
            !std::path::Path::new(&dir).exists(),
            "{dir} outlived its run"
        );
    }
}

#[tokio::test]
async fn memory_beyond_the_limit_is_reported_as_out_of_memory() {
    if !limits_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    let mut s = spec(
        dir.path(),
        &["sh", "-c", "echo filling; exec tail /dev/zero"],
    );
    s.memory_mb = 128;
    let out = tokio::time::timeout(Duration::from_secs(60), run(s, None))
        .await
        .expect("the kernel ends the run well within a minute");
    assert_eq!(out.stdout, "filling\n");
    assert!(out.exit.oom_killed, "{:?}", out.exit);
    assert_eq!(out.exit.signal, Some(9), "{:?}", out.exit);
}

#[tokio::test]
async fn limits_can_be_turned_off_and_the_run_says_so() {
    let dir = tempfile::tempdir().expect("dir");
    let bwrap = Bubblewrap::detect_with(&guest_agent(), vm0_sandbox::cgroup::HostLimits::Off)
        .await
        .expect("bubblewrap");
    let out = run_on(
        &bwrap,
        spec(dir.path(), &["sh", "-c", "cat /proc/self/cgroup"]),
        None,
    )
    .await;
    assert!(!out.stdout.contains("vm0-run-"), "{}", out.stdout);
    assert!(
        out.logs
            .iter()
            .any(|l| l.contains("no resource limits: turned off (VM0_BUBBLEWRAP_LIMITS=off)")),
        "{:?}",
        out.logs
    );
}

#[tokio::test]
async fn work_holds_disk_mb_and_no_more() {
    let dir = tempfile::tempdir().expect("dir");
    let mut s = spec(
        dir.path(),
        &[
            "sh",
            "-c",
            "dd if=/dev/zero of=/work/big bs=1M count=200 2>&1 | grep -o 'No space left on device'; \
             df -m /work | awk 'NR==2 {print $2}'; stat -c %u /work",
        ],
    );
    s.disk_mb = 64;
    s.memory_mb = 512;
    let out = run(s, None).await;
    // The run user's under a root worker; otherwise the worker's own user's.
    let me = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").expect("me"));
    let owner = if me == 0 { 1000 } else { me };
    assert_eq!(
        out.stdout,
        format!("No space left on device\n64\n{owner}\n"),
        "stderr: {}",
        out.stderr
    );
    assert!(
        !dir.path().join("scratch").exists(),
        "nothing left on the host"
    );
}

/// bwrap's pid 1 keeps bwrap's own environment for the sandbox's whole life, and
/// a command that shares its uid (an unprivileged worker) reads it in `/proc`: it
/// must hold nothing of the worker's.
#[tokio::test]
async fn bwrap_itself_starts_with_an_empty_environment() {
    let dir = tempfile::tempdir().expect("dir");
    let marker = "vm0-environ-marker-5813";
    let argv = ["sh", "-c", &format!("echo up; sleep 5 # {marker}")];
    let bwrap = Bubblewrap::detect(&guest_agent()).await.expect("bwrap");
    let mut sb = bwrap.start(spec(dir.path(), &argv)).await.expect("start");
    loop {
        match sb.next_event().await.expect("events") {
            SandboxEvent::Stdout(_) => break,
            SandboxEvent::Exited(x) => panic!("exited early: {x:?}"),
            _ => {}
        }
    }
    // The command's ancestors: the guest agent, bwrap's pid 1, the outer bwrap.
    let command = *pids_matching(marker).first().expect("the command runs");
    let mut bwraps = Vec::new();
    let mut pid = command;
    while pid > 1 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        pid = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .and_then(|p| p.trim().parse().ok())
            .expect("ppid");
        if std::fs::read_link(format!("/proc/{pid}/exe"))
            .is_ok_and(|e| e.to_string_lossy().ends_with("/bwrap"))
        {
            bwraps.push(pid);
        }
    }
    assert_eq!(bwraps.len(), 2, "outer bwrap and its pid 1: {bwraps:?}");
    assert!(
        std::env::vars().any(|(k, _)| k == "VM0_GUEST_AGENT"),
        "this test process has an environment to leak"
    );
    for pid in bwraps {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
        assert!(
            environ.is_empty(),
            "bwrap {pid} has an environment: {}",
            String::from_utf8_lossy(&environ).replace('\0', " ")
        );
    }
    sb.kill();
    while let Some(ev) = sb.next_event().await {
        if matches!(ev, SandboxEvent::Exited(_)) {
            break;
        }
    }
}

/// What a hostile command tries first: new user and mount namespaces (the way
/// into most kernel attack surface), mounts, keyrings, bpf, perf, userfaultfd,
/// io_uring and vsock. Each is refused by the seccomp policy.
#[tokio::test]
async fn the_jail_refuses_namespaces_mounts_keyrings_and_bpf() {
    let dir = tempfile::tempdir().expect("dir");
    let script = "unshare -U true 2>/dev/null && echo unshare-user-allowed; \
                  unshare -m true 2>/dev/null && echo unshare-mount-allowed; \
                  grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status; \
                  echo pid1 $(grep '^Seccomp:' /proc/1/status); \
                  /run/vm0-guest-agent probe";
    let out = run(spec(dir.path(), &["sh", "-c", script]), None).await;
    assert_eq!(out.exit.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert!(!out.stdout.contains("-allowed"), "{}", out.stdout);
    assert!(
        out.stdout.contains("Seccomp:\t2"),
        "filtered: {}",
        out.stdout
    );
    // bwrap loaded the policy into the whole sandbox, its own pid 1 included.
    assert!(
        out.stdout.contains("pid1 Seccomp: 2"),
        "bwrap's pid 1 is filtered: {}",
        out.stdout
    );
    let probes: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("probe "))
        .collect();
    for name in [
        "unshare-user",
        "unshare-mount",
        "unshare-net",
        "mount",
        "keyctl",
        "add_key",
        "bpf",
        "perf_event_open",
        "userfaultfd",
        "io_uring",
        "socket-vsock",
    ] {
        let line = format!("probe {name}: refused (EPERM)");
        assert!(probes.contains(&line.as_str()), "{line} not in {probes:?}");
    }
    assert!(
        probes.contains(&"probe clone3: absent (ENOSYS)"),
        "{probes:?}"
    );
}

/// `/tmp` is a tmpfs of `diskMb` like `/work`: filling it stops there, not at the
/// host's memory.
#[tokio::test]
async fn tmp_is_bounded_like_work() {
    let dir = tempfile::tempdir().expect("dir");
    let mut s = spec(
        dir.path(),
        &[
            "sh",
            "-c",
            "dd if=/dev/zero of=/tmp/big bs=1M count=200 2>&1 | grep -o 'No space left on device'; \
             df -m /tmp | awk 'NR==2 {print $2}'",
        ],
    );
    s.disk_mb = 48;
    let out = run(s, None).await;
    assert_eq!(
        out.stdout, "No space left on device\n48\n",
        "stderr: {}",
        out.stderr
    );
}

/// Under a root worker each slot has a host uid of its own: two runs of
/// different slots are different users, and neither is a user of the host (uid
/// 1000 is one on many machines).
#[tokio::test]
async fn runs_of_different_slots_are_different_host_users() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: slot uids need a root worker; this test runs as a user");
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    let leases = tempfile::tempdir().expect("leases");
    let slots = vm0_sandbox::slot_user::SlotUsers::lease(
        vm0_sandbox::slot_user::UidRange::default(),
        2,
        leases.path(),
    )
    .expect("two slot uids");
    let bwrap = Bubblewrap::detect(&guest_agent())
        .await
        .expect("bwrap")
        .with_slot_users(slots.users())
        .expect("etc");
    let mut seen = Vec::new();
    for user in slots.users() {
        let mut s = spec(
            dir.path(),
            &[
                "sh",
                "-c",
                "id -u; id -g; whoami; stat -c %u /work; touch /work/f && stat -c %u /work/f",
            ],
        );
        s.slot_user = Some(*user);
        let out = run_on(&bwrap, s, None).await;
        assert_eq!(
            out.stdout,
            format!("{0}\n{1}\nagent\n{0}\n{0}\n", user.uid, user.gid),
            "stderr: {}",
            out.stderr
        );
        seen.push(user.uid);
    }
    assert_ne!(seen[0], seen[1]);
    let host_users = std::fs::read_to_string("/etc/passwd").expect("passwd");
    for uid in seen {
        assert!(
            !host_users
                .lines()
                .any(|l| l.split(':').nth(2) == Some(&uid.to_string())),
            "{uid} is a host user"
        );
    }
}

/// Trees in (a writable /work from an archive, a read-only volume bound from
/// the host) and out (/work after the command, links kept, a FIFO skipped).
#[tokio::test]
async fn trees_go_in_and_come_out() {
    let dir = tempfile::tempdir().expect("dir");
    let (work, _) = tree_archive(
        dir.path(),
        "work",
        &[
            ("hello.txt", "hello\n"),
            ("sub/x.bin", "xx"),
            ("ln", "@hello.txt"),
        ],
    );
    let (vol, vol_dir) = tree_archive(dir.path(), "vol", &[("data.txt", "volume data\n")]);
    let mut s = spec(
        dir.path(),
        &[
            "sh",
            "-c",
            "cat /work/hello.txt /volumes/v/data.txt; touch /volumes/v/new 2>/dev/null && echo wrote-volume; readlink /work/ln; echo out > /work/result.txt; rm /work/sub/x.bin; mkfifo /work/fifo; ls -ld /work/sub | cut -c1-10",
        ],
    );
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
            unpacked: Some(vol_dir),
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
    let bwrap = Bubblewrap::detect(&guest_agent())
        .await
        .expect("bubblewrap");
    let support::Reported {
        output: stdout,
        logs,
        saved,
        exit,
    } = support::collect(bwrap.start(s).await.expect("start")).await;
    assert_eq!(exit.code, Some(0), "{stdout} {logs:?}");
    assert_eq!(
        stdout, "hello\nvolume data\nhello.txt\ndrwxr-xr-x\n",
        "{logs:?}"
    );
    assert!(
        logs.iter().any(|l| l.starts_with("/work: 3 files")),
        "{logs:?}"
    );
    assert_eq!(saved.len(), 1);
    let taken = saved[0].1.as_ref().expect("saved");
    assert_eq!(taken.files, 3, "{taken:?}");
    assert!(
        taken.skipped.iter().any(|s| s.contains("fifo")),
        "{taken:?}"
    );
    let back = dir.path().join("back");
    let manifest = vm0_storage::unpack(
        std::fs::File::open(&out_archive).expect("open"),
        &back,
        &vm0_storage::Limits::default(),
    )
    .expect("unpack");
    let paths: Vec<&str> = manifest.files().iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["hello.txt", "ln", "result.txt"]);
    assert_eq!(
        std::fs::read_link(back.join("ln")).expect("link"),
        std::path::Path::new("hello.txt")
    );
    assert_eq!(
        std::fs::read_to_string(back.join("result.txt")).expect("read"),
        "out\n"
    );
}
