//! The bubblewrap backend: the command runs on the host kernel in fresh pid, net,
//! ipc, uts and mount namespaces, with the host system mounted read-only, a private
//! `/tmp`, and a tmpfs of the run's `diskMb` as `/work`, as in a microVM (a bwrap
//! older than 0.7 cannot size one: the run's scratch directory is `/work` then).
//! `--die-with-parent` ties the sandbox to the worker: if the worker dies, the
//! kernel kills the sandbox.
//!
//! Nothing of the worker crosses in: bwrap itself starts with an empty
//! environment (its pid 1 keeps bwrap's, which the command could read in `/proc`)
//! and no descriptor but its pipes and the seccomp programs; the whole sandbox,
//! bwrap's pid 1 and the guest agent included, lives under the jail's syscall
//! policy (`vm0-seccomp`: no new namespaces, mounts, keyrings, bpf, ...). Under a
//! root worker the command runs as the host uid of its slot (`SandboxSpec::
//! slot_user`), never one another run or a host user has; `/tmp` and `/work` are
//! tmpfs of `diskMb` each.
//!
//! Inside, the guest agent (`vm0-guest-agent --stdio`, bound read-only into the
//! sandbox) runs the command and speaks the same protocol as in a microVM, over
//! bwrap's stdin and stdout: one host side (`microvm::relay`) for every backend.
//! Resource samples are taken from the host (the sandbox's process tree), since
//! `/proc/meminfo` inside shows the host's memory.
//!
//! No VM: for development machines and load tests where boot cost is not measured.
//! Memory and CPU limits are not enforced here (that needs cgroup delegation); the
//! microVM backends enforce them.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::process::{Child, ChildStderr, Command};
use tokio::sync::{mpsc, oneshot};
use vm0_proto::frame;

use crate::cgroup::{Hierarchy, HostLimits, Limits, RunCgroup};
use crate::find_on_path;
use crate::microvm::{GuestLink, LOST, Vm, relay, send_files, start_message, wait_ready};
use crate::sample::{cpu_and_memory, cpu_percent, disk_usage, network, process_tree};
use crate::slot_user::SlotUser;
use crate::{
    ResourceSample, RunNetwork, RunningSandbox, Sandbox, SandboxError, SandboxEvent, SandboxSpec,
};

/// Host paths made visible read-only (when they exist).
const RO_PATHS: &[&str] = &["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64"];

/// What of the host's `/etc` the sandbox sees: a copy made once per worker, mounted
/// as one read-only `/etc` (one bind instead of one per file; bwrap re-reads the
/// mount table for every bind), and without the host's secrets (`shadow`, keys).
const ETC_ENTRIES: &[&str] = &[
    "alternatives",
    "ca-certificates",
    "group",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "nsswitch.conf",
    "passwd",
    "ssl",
];

const EVENT_QUEUE: usize = 256;
/// Where the guest agent appears inside the sandbox.
const AGENT_PATH: &str = "/run/vm0-guest-agent";

/// The capabilities the guest agent keeps when the worker is root.
const AGENT_CAPS: &[&str] = &[
    "CAP_SETUID",
    "CAP_SETGID",
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_KILL",
];

/// The agent starts in milliseconds; this only bounds a broken setup.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// What of bwrap's own stderr is kept for a failure report.
const STDERR_KEPT: usize = 4096;

#[derive(Debug, Clone)]
pub struct Bubblewrap {
    program: PathBuf,
    /// The guest agent binary (static, or linked against the host's libraries,
    /// which the sandbox sees).
    agent: PathBuf,
    /// The sandbox's `/etc`, removed when the last clone is dropped.
    etc: std::sync::Arc<tempfile::TempDir>,
    /// The worker is root: capabilities must be dropped, and /work given to the
    /// run user. (Otherwise bwrap runs unprivileged and so does everything in it.)
    as_root_host: bool,
    /// Where runs get their cgroup, or why they run without limits.
    limits: std::sync::Arc<Result<Hierarchy, String>>,
    /// bwrap can size a tmpfs (`--size`, bubblewrap 0.7): `/work` is one.
    work_tmpfs: bool,
    /// The jail's seccomp programs, as bwrap reads them.
    seccomp: std::sync::Arc<[Vec<u8>; 2]>,
    /// Joins a run's network namespace before bwrap starts.
    nsenter: Option<PathBuf>,
}

/// bwrap arguments that show the host's system directories read-only (the
/// sandbox's and a VMM jail's programs and libraries).
pub(crate) fn bind_host_system(cmd: &mut Command) {
    for path in RO_PATHS {
        match std::fs::symlink_metadata(path) {
            // Merged-/usr systems: /bin -> usr/bin and so on.
            Ok(m) if m.file_type().is_symlink() => {
                if let Ok(target) = std::fs::read_link(path) {
                    cmd.arg("--symlink").arg(target).arg(path);
                }
            }
            Ok(_) => {
                cmd.args(["--ro-bind", path, path]);
            }
            Err(_) => {}
        }
    }
}

/// Copies `from` to `to`, keeping symlinks as symlinks; unreadable entries are
/// skipped (the sandbox simply does not get them).
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(from)?;
    if meta.file_type().is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(from)?, to)
    } else if meta.is_dir() {
        std::fs::create_dir_all(to)?;
        for entry in std::fs::read_dir(from)?.flatten() {
            let _ = copy_tree(&entry.path(), &to.join(entry.file_name()));
        }
        Ok(())
    } else {
        std::fs::copy(from, to).map(|_| ())
    }
}

fn prepare_etc() -> std::io::Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix("vm0-sandbox-etc-")
        .tempdir()?;
    for name in ETC_ENTRIES {
        let _ = copy_tree(&Path::new("/etc").join(name), &dir.path().join(name));
    }
    crate::run_user::add_to(dir.path())?;
    std::fs::write(dir.path().join("hostname"), "vm0-sandbox\n")?;
    // Every lookup goes to the worker's resolver, whatever address this names.
    std::fs::write(dir.path().join("resolv.conf"), "nameserver 10.0.2.3\n")?;
    std::fs::write(
        dir.path().join("hosts"),
        "127.0.0.1 localhost vm0-sandbox\n::1 localhost\n",
    )?;
    Ok(dir)
}

impl Bubblewrap {
    /// Finds `bwrap` on `PATH` and checks that it can create namespaces here;
    /// commands run through `guest_agent`, with cgroup limits where the host allows.
    pub async fn detect(guest_agent: &Path) -> Result<Bubblewrap, SandboxError> {
        Bubblewrap::detect_with(guest_agent, HostLimits::Auto).await
    }

    /// [`Bubblewrap::detect`], with cgroup limits as `setting` says.
    pub async fn detect_with(
        guest_agent: &Path,
        setting: HostLimits,
    ) -> Result<Bubblewrap, SandboxError> {
        let unavailable = |reason: String| SandboxError::Unavailable {
            backend: "bubblewrap",
            reason,
        };
        if !guest_agent.is_file() {
            return Err(unavailable(format!(
                "the guest agent {} does not exist (scripts/guest-agent.sh builds it)",
                guest_agent.display()
            )));
        }
        let program = find_on_path("bwrap").ok_or_else(|| {
            unavailable("bwrap is not on PATH (apt-get install bubblewrap)".into())
        })?;
        let out = Command::new(&program)
            .args([
                "--die-with-parent",
                "--unshare-pid",
                "--unshare-net",
                "--ro-bind",
                "/",
                "/",
                "true",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .await
            .map_err(|e| unavailable(format!("running bwrap failed: {e}")))?;
        if !out.status.success() {
            return Err(unavailable(format!(
                "bwrap cannot create namespaces: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let etc = prepare_etc().map_err(SandboxError::Prepare)?;
        let help = Command::new(&program).arg("--help").output().await;
        let help = help.map_or_else(
            |_| String::new(),
            |h| String::from_utf8_lossy(&h.stdout).into_owned(),
        );
        let work_tmpfs = help.contains("--size");
        // Two programs (EPERM and ENOSYS answers) need the repeatable option.
        if !help.contains("--add-seccomp-fd") {
            return Err(unavailable(
                "this bwrap has no --add-seccomp-fd (bubblewrap 0.5 or later is needed for the syscall policy)".into(),
            ));
        }
        let seccomp = vm0_seccomp::Programs::build()
            .map_err(|e| unavailable(format!("the syscall policy: {e}")))?
            .as_bytes();
        let limits = match setting {
            HostLimits::Auto => Hierarchy::detect().map_err(|e| e.to_string()),
            HostLimits::Off => Err("turned off (VM0_BUBBLEWRAP_LIMITS=off)".into()),
        };
        match (&limits, setting) {
            (Err(why), HostLimits::Auto) => {
                tracing::warn!(%why, "bubblewrap runs get no memory, CPU or process limits")
            }
            (Err(why), HostLimits::Off) => tracing::info!(%why, "bubblewrap runs get no limits"),
            (Ok(_), _) => {}
        }
        Ok(Bubblewrap {
            program,
            agent: guest_agent.to_owned(),
            etc: std::sync::Arc::new(etc),
            as_root_host: nix::unistd::geteuid().is_root(),
            limits: std::sync::Arc::new(limits),
            work_tmpfs,
            seccomp: std::sync::Arc::new(seccomp),
            nsenter: find_on_path("nsenter"),
        })
    }

    /// Names the slots' host uids `agent` in the sandbox's `/etc` (as uid 1000 is
    /// in a microVM), so that `whoami` and git's default identity work for them.
    pub fn with_slot_users(self, users: &[SlotUser]) -> Result<Bubblewrap, SandboxError> {
        for user in users {
            crate::run_user::add_ids(self.etc.path(), user.uid, user.gid)
                .map_err(SandboxError::Prepare)?;
        }
        Ok(self)
    }

    /// The seccomp programs on pipes bwrap reads them from (each well under a
    /// pipe's buffer, so writing cannot block).
    fn seccomp_fds(&self) -> std::io::Result<Vec<std::os::fd::OwnedFd>> {
        use std::io::Write;
        let mut fds = Vec::new();
        for program in self.seccomp.iter() {
            let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
            std::fs::File::from(write).write_all(program)?;
            fds.push(read);
        }
        Ok(fds)
    }

    /// bwrap's command for `spec`, and the descriptors it must inherit.
    fn command(
        &self,
        spec: &SandboxSpec,
        work: &Path,
    ) -> std::io::Result<(Command, Vec<std::os::fd::OwnedFd>)> {
        let mut fds = Vec::new();
        // No environment: bwrap's pid 1 keeps bwrap's own for the sandbox's life.
        let mut cmd = match (&spec.network, &self.nsenter) {
            // The run's namespace, joined by nsenter, which then execs bwrap
            // (a pre_exec setns would make every spawn a fork).
            // Under an unprivileged worker its user namespace first: bwrap, not
            // uid 0 there, starts with no capability in it.
            (Some(RunNetwork::Namespace(netns)), Some(nsenter)) => {
                let mut cmd = crate::spawn::command(nsenter);
                if let Some(user) = &netns.user {
                    let fd = user.try_clone()?;
                    cmd.arg(format!("--user=/proc/self/fd/{}", fd.as_raw_fd()))
                        .arg("--preserve-credentials");
                    fds.push(fd);
                }
                let fd = netns.net.try_clone()?;
                cmd.arg(format!("--net=/proc/self/fd/{}", fd.as_raw_fd()))
                    .arg("--")
                    .arg(&self.program);
                fds.push(fd);
                cmd
            }
            (Some(RunNetwork::Namespace(_)), None) => {
                return Err(std::io::Error::other(
                    "the run has a network but nsenter is not installed (util-linux)",
                ));
            }
            (Some(RunNetwork::Tap(_)), _) => {
                return Err(std::io::Error::other(
                    "bubblewrap joins a network namespace; a tap device is a VM's",
                ));
            }
            (None, _) => {
                let mut cmd = crate::spawn::command(&self.program);
                cmd.arg("--unshare-net");
                cmd
            }
        };
        cmd.args([
            "--die-with-parent",
            "--new-session",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--hostname",
            "vm0-sandbox",
        ]);
        bind_host_system(&mut cmd);
        cmd.arg("--ro-bind").arg(self.etc.path()).arg("/etc");
        cmd.args(["--proc", "/proc", "--dev", "/dev"]);
        let disk_bytes = spec.disk_mb.saturating_mul(1024 * 1024).to_string();
        // Writable by the run user, like any /tmp, and as large as /work.
        if self.work_tmpfs {
            cmd.args(["--size", &disk_bytes]);
        }
        cmd.args(["--perms", "1777", "--tmpfs", "/tmp"]);
        if self.as_root_host {
            // bwrap keeps every capability of a root caller. The agent keeps only
            // what it needs to hand the command to the run user, to write and read
            // the run's files and to signal the command; the command, no longer
            // root, has none (and no_new_privs keeps it so).
            cmd.args(["--cap-drop", "ALL"]);
            for cap in AGENT_CAPS {
                cmd.args(["--cap-add", cap]);
            }
        }
        if self.work_tmpfs {
            cmd.args(["--size", &disk_bytes, "--perms", "0755", "--tmpfs", "/work"]);
        } else {
            cmd.arg("--bind").arg(work).arg("/work");
        }
        let cwd = spec.working_dir.clone().unwrap_or_else(|| "/work".into());
        if cwd != "/work" {
            cmd.args(["--dir", &cwd]);
        }
        // Reachable by the command too (`vm0-guest-agent probe`); bwrap would make
        // the directory root's own.
        cmd.args(["--perms", "0755", "--dir", "/run"]);
        // The session's state directory (`VM0_STATE_DIR`): the agent gives it
        // to the run user, or unpacks a checkpoint's state into it.
        cmd.args(["--perms", "0755", "--dir", "/state"]);
        for tree in spec.trees_in.iter().filter(|t| bound_read_only(t)) {
            if let Some(dir) = &tree.unpacked {
                // bwrap would make missing parents 0700: the run user could not
                // reach the tree.
                let parents: Vec<_> = std::path::Path::new(&tree.dest)
                    .ancestors()
                    .skip(1)
                    .filter(|p| p.parent().is_some())
                    .collect();
                for parent in parents.into_iter().rev() {
                    cmd.args(["--perms", "0755", "--dir"]).arg(parent);
                }
                cmd.arg("--ro-bind").arg(dir).arg(&tree.dest);
            }
        }
        cmd.arg("--ro-bind").arg(&self.agent).arg(AGENT_PATH);
        let seccomp = self.seccomp_fds()?;
        for fd in crate::spawn::numbers(&seccomp) {
            cmd.args(["--add-seccomp-fd", &fd.to_string()]);
        }
        fds.extend(seccomp);
        // The agent sets the command's environment from `Start`, and gives /work
        // to the run user.
        cmd.args(["--chdir", &cwd, "--clearenv", "--", AGENT_PATH, "--stdio"]);
        cmd.args(["--work", "/work"]);
        if self.as_root_host
            && let Some(user) = spec.slot_user
        {
            cmd.args(["--run-as", &format!("{}:{}", user.uid, user.gid)]);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Ok((cmd, fds))
    }
}

impl Sandbox for Bubblewrap {
    fn name(&self) -> &'static str {
        "bubblewrap"
    }

    fn network_attachment(&self) -> Option<crate::NetworkAttachment> {
        Some(crate::NetworkAttachment::Namespace)
    }

    async fn start(&self, spec: SandboxSpec) -> Result<RunningSandbox, SandboxError> {
        // The command runs on the host's userland: a run that needs another one
        // must not silently get this one.
        if let Some(name) = spec.image.as_ref().filter(|n| *n != "default") {
            return Err(SandboxError::NoImages {
                backend: "bubblewrap",
                name: name.clone(),
            });
        }
        if spec.as_root {
            return Err(SandboxError::RootOnHost {
                backend: "bubblewrap",
            });
        }
        let work = spec.scratch_dir.join("work");
        if !self.work_tmpfs {
            tokio::fs::create_dir_all(&work)
                .await
                .map_err(SandboxError::Prepare)?;
        }
        let limits = match self.limits.as_ref() {
            Ok(hierarchy) => {
                let wanted = Limits::of(&spec);
                let cgroup = hierarchy
                    .create(&spec.run_id, &wanted)
                    .map_err(SandboxError::Limits)?;
                RunLimits {
                    cgroup: Some(std::sync::Arc::new(cgroup)),
                    line: wanted.to_string(),
                }
            }
            Err(why) => RunLimits {
                cgroup: None,
                line: format!("no resource limits: {why}"),
            },
        };
        let spawned = self
            .command(&spec, &work)
            .and_then(|(mut cmd, fds)| crate::spawn::spawn(&mut cmd, &fds));
        let mut child = match spawned {
            Ok(child) => child,
            Err(source) => {
                let _ = tokio::fs::remove_dir_all(&spec.scratch_dir).await;
                return Err(SandboxError::Spawn {
                    program: self.program.display().to_string(),
                    source,
                });
            }
        };
        let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
        let (kill_tx, kill_rx) = oneshot::channel();
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill().await;
            return Err(SandboxError::Prepare(std::io::Error::other(
                "bwrap's stdin and stdout were not piped",
            )));
        };
        let link = GuestLink {
            rx: Box::new(stdout),
            tx: Box::new(stdin),
        };
        let stderr = child.stderr.take().map(|e| tokio::spawn(keep_tail(e)));
        // The hierarchy outlives the run's cgroup (dropping it removes its groups).
        let hierarchy = self.limits.clone();
        tokio::spawn(async move {
            let _hierarchy = hierarchy;
            supervise(child, link, stderr, spec, limits, kill_rx, events_tx).await
        });
        Ok(RunningSandbox::new(events_rx, kill_tx))
    }
}

/// The end of bwrap's own stderr (the agent's and bwrap's complaints).
async fn keep_tail(mut stderr: ChildStderr) -> String {
    let mut kept = Vec::new();
    let mut buf = [0u8; 1024];
    while let Ok(n) = stderr.read(&mut buf).await {
        if n == 0 {
            break;
        }
        kept.extend_from_slice(&buf[..n]);
        let excess = kept.len().saturating_sub(STDERR_KEPT);
        kept.drain(..excess);
    }
    String::from_utf8_lossy(&kept).trim().to_owned()
}

/// Samples the sandbox's process tree from the host every `sample_interval`,
/// and once more, the last sample, when `done` fires (or its sender is gone).
async fn sample_from_host(
    pid: u32,
    spec: std::sync::Arc<SandboxSpec>,
    events: mpsc::Sender<SandboxEvent>,
    mut done: oneshot::Receiver<()>,
) {
    let mut tick = tokio::time::interval(spec.sample_interval);
    tick.reset();
    let mut last = (Instant::now(), 0u64);
    let mut peak_memory = 0i64;
    loop {
        let last_one = tokio::select! {
            _ = tick.tick() => false,
            _ = &mut done => true,
        };
        // Walking a run's processes and its /work reads /proc and the disk: off
        // the runtime's threads, which a fork bomb's tree would otherwise hold.
        let spec = spec.clone();
        let taken = tokio::task::spawn_blocking(move || {
            let sample = take_sample(pid, &spec, &mut last);
            (sample, last)
        })
        .await;
        let Ok((mut sample, taken_at)) = taken else {
            return;
        };
        last = taken_at;
        peak_memory = peak_memory.max(sample.memory_used_bytes);
        if last_one {
            // The command has ended (its CPU is in its parent's counters, its
            // memory is gone): the last sample shows the most it held.
            sample.memory_used_bytes = peak_memory;
            let _ = events.send(SandboxEvent::Sample(sample)).await;
            return;
        }
        // Droppable: output must never wait behind samples.
        let _ = events.try_send(SandboxEvent::Sample(sample));
    }
}

/// A run's cgroup, and how its limits are described in the run's log.
struct RunLimits {
    cgroup: Option<std::sync::Arc<RunCgroup>>,
    line: String,
}

impl RunLimits {
    /// Puts the guest agent, the leaf of bwrap's tree once it is ready, into the
    /// run's cgroup; the command it starts later is born there. (bwrap's own two
    /// processes stay out: they hold next to nothing, and each move waits for an
    /// RCU grace period under a global lock, milliseconds on a virtual machine.)
    async fn enclose(&self, pid: u32) -> Result<(), String> {
        let Some(cgroup) = self.cgroup.clone() else {
            return Ok(());
        };
        let moved = tokio::task::spawn_blocking(move || {
            let tree = process_tree(pid);
            for p in tree.into_iter().filter(|p| process_tree(*p).len() == 1) {
                if let Err(e) = cgroup.add(p)
                    && Path::new(&format!("/proc/{p}")).exists()
                {
                    return Err(format!("the run's resource limits: {e}"));
                }
            }
            Ok(())
        })
        .await;
        moved.map_err(|e| format!("the run's resource limits: {e}"))?
    }
}

/// Owns the sandbox until it is gone: waits for the agent, hands it the input
/// files and the command, relays until the command ended, kills what is left,
/// removes the scratch directory, then sends `Exited`.
/// A read-only tree the worker has unpacked: bound, not copied.
fn bound_read_only(tree: &crate::TreeIn) -> bool {
    tree.read_only && tree.unpacked.is_some()
}

async fn supervise(
    child: Child,
    mut link: GuestLink,
    stderr: Option<tokio::task::JoinHandle<String>>,
    spec: SandboxSpec,
    limits: RunLimits,
    mut kill: oneshot::Receiver<()>,
    events: mpsc::Sender<SandboxEvent>,
) {
    let pid = child.id().unwrap_or(0);
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    let mut vm = Vm {
        process: child,
        link: GuestLink {
            rx: Box::new(tokio::io::empty()),
            tx: Box::new(tokio::io::sink()),
        },
        vmm_spawn: Duration::ZERO,
        vm_configure: Duration::ZERO,
    };
    let setup = async {
        wait_ready(&mut link, deadline)
            .await
            .map_err(|why| format!("the guest agent did not start: {why}"))?;
        limits.enclose(pid).await?;
        let ready = started.elapsed();
        let line = format!(
            "sandbox started (backend bubblewrap, pid {pid}, guest agent ready in {} ms; {})",
            ready.as_millis(),
            limits.line
        );
        let _ = events.send(SandboxEvent::Log(line)).await;
        // No VMM and no kernel of its own: only the time to the agent's Ready.
        let timings = crate::BootTimings {
            ready,
            ..Default::default()
        };
        let _ = events.send(SandboxEvent::Booted(timings)).await;
        send_files(&mut link, &spec.files).await?;
        // Read-only trees the worker unpacked are bound (see `command`).
        let copied: Vec<&crate::TreeIn> = spec
            .trees_in
            .iter()
            .filter(|t| !bound_read_only(t))
            .collect();
        crate::trees::send_trees(&mut link, &copied, &events).await?;
        // The host samples (see the module doc): the agent does not.
        let start = start_message(&spec, Duration::ZERO);
        frame::write(&mut link.tx, &start)
            .await
            .map_err(|e| format!("sending Start to the guest agent failed: {e}"))
    };
    let exit = match setup.await {
        Ok(()) => {
            vm.link = link;
            let (sampled, last_sample) = oneshot::channel();
            let sampler = tokio::spawn(sample_from_host(
                pid,
                std::sync::Arc::new(spec.clone()),
                events.clone(),
                last_sample,
            ));
            let mut exit = relay("bwrap", &mut vm, None, &mut kill, &events).await;
            if exit != LOST {
                crate::trees::take_trees(&mut vm.link, &spec.trees_out, &events).await;
            }
            // The last sample, taken now, is every run's, however short.
            let _ = sampled.send(());
            if tokio::time::timeout(Duration::from_secs(2), sampler)
                .await
                .is_err()
            {
                tracing::warn!(pid, "the last resource sample took over 2 s; skipped");
            }
            // The run's own count is exact; the agent only sees the host's.
            if let Some(cgroup) = &limits.cgroup {
                exit.oom_killed = cgroup.oom_kills() > 0;
            }
            exit
        }
        Err(why) => {
            kill_sandbox(pid).await;
            let said = match stderr {
                Some(task) => tokio::time::timeout(Duration::from_secs(1), task)
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or_default(),
                None => String::new(),
            };
            let line = format!("{why}; bwrap said: {said}");
            let _ = events.send(SandboxEvent::Log(line)).await;
            LOST
        }
    };
    // Closing the agent's stdin ends it, and bwrap with it; the process tree is
    // hunted down (a /proc scan) only when that does not happen promptly.
    let Vm {
        mut process, link, ..
    } = vm;
    drop(link);
    if tokio::time::timeout(Duration::from_secs(1), process.wait())
        .await
        .is_err()
    {
        kill_sandbox(pid).await;
        let _ = process.kill().await;
    }
    if let Err(e) = tokio::fs::remove_dir_all(&spec.scratch_dir).await
        && e.kind() != std::io::ErrorKind::NotFound
    {
        let line = format!("removing {} failed: {e}", spec.scratch_dir.display());
        let _ = events.send(SandboxEvent::Log(line)).await;
    }
    // Removing the cgroup may wait a moment for the kernel to let go of it.
    let _ = tokio::task::spawn_blocking(move || drop(limits)).await;
    let _ = events.send(SandboxEvent::Exited(exit)).await;
}

/// SIGKILL to the sandbox: first the pid namespace's init (bwrap's child), whose
/// death makes the kernel kill every process in the namespace at once (a fork
/// bomb's tree cannot be outrun by walking it), then bwrap's process group and
/// whatever of its tree a walk still finds (a child that had not entered its
/// namespace yet). Blocking: /proc is read.
fn kill_tree(pid: u32) {
    use nix::sys::signal::{Signal, kill, killpg};
    use nix::unistd::Pid;
    let Ok(raw) = i32::try_from(pid) else {
        return;
    };
    if raw <= 0 {
        return;
    }
    let sigkill = |p: u32| {
        if let Ok(p) = i32::try_from(p) {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
    };
    crate::sample::children(pid).into_iter().for_each(sigkill);
    let _ = killpg(Pid::from_raw(raw), Signal::SIGKILL);
    crate::sample::process_tree(pid)
        .into_iter()
        .for_each(sigkill);
}

/// [`kill_tree`] off the runtime's threads.
async fn kill_sandbox(pid: u32) {
    let _ = tokio::task::spawn_blocking(move || kill_tree(pid)).await;
}

fn take_sample(pid: u32, spec: &SandboxSpec, last: &mut (Instant, u64)) -> ResourceSample {
    let tree = process_tree(pid);
    // /work as the sandbox sees it (a tmpfs of its own, or the scratch directory),
    // through a process inside: any of the tree but bwrap's outer one, which sees
    // the host's.
    let work = tree.get(1).map_or_else(
        || spec.scratch_dir.join("work"),
        |p| PathBuf::from(format!("/proc/{p}/root/work")),
    );
    let (ticks, memory) = cpu_and_memory(&tree);
    let now = Instant::now();
    let cpu = cpu_percent(last.1, ticks, now.duration_since(last.0).as_secs_f64());
    *last = (now, ticks);
    // The command's own network namespace, seen the same way.
    let (rx, tx) = tree.get(1).map_or((0, 0), |p| network(*p));
    const MB: i64 = 1024 * 1024;
    ResourceSample {
        cpu_percent: cpu,
        memory_used_bytes: memory,
        memory_total_bytes: i64::try_from(spec.memory_mb).unwrap_or(i64::MAX / MB) * MB,
        disk_used_bytes: disk_usage(&work),
        disk_total_bytes: i64::try_from(spec.disk_mb).unwrap_or(i64::MAX / MB) * MB,
        network_rx_bytes: rx,
        network_tx_bytes: tx,
    }
}
