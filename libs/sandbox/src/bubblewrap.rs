//! The bubblewrap backend: the command runs on the host kernel in fresh pid, net,
//! ipc, uts and mount namespaces, with the host system mounted read-only, a private
//! `/tmp`, and the run's scratch directory as `/work`. `--die-with-parent` ties the
//! sandbox to the worker: if the worker dies, the kernel kills the sandbox.
//!
//! No VM: for development machines and load tests where boot cost is not measured.
//! Memory and CPU limits are not enforced here (that needs cgroup delegation); the
//! microVM backends enforce them.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};

use crate::find_on_path;
use crate::sample::{cpu_and_memory, cpu_percent, disk_usage, network, process_tree};
use crate::{
    ExitReport, ResourceSample, RunningSandbox, Sandbox, SandboxError, SandboxEvent, SandboxSpec,
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
const READ_CHUNK: usize = 16 * 1024;

#[derive(Debug, Clone)]
pub struct Bubblewrap {
    program: PathBuf,
    /// The sandbox's `/etc`, removed when the last clone is dropped.
    etc: std::sync::Arc<tempfile::TempDir>,
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
    std::fs::write(dir.path().join("hostname"), "vm0-sandbox\n")?;
    std::fs::write(
        dir.path().join("hosts"),
        "127.0.0.1 localhost vm0-sandbox\n::1 localhost\n",
    )?;
    Ok(dir)
}

impl Bubblewrap {
    /// Finds `bwrap` on `PATH` and checks that it can create namespaces here.
    pub async fn detect() -> Result<Bubblewrap, SandboxError> {
        let unavailable = |reason: String| SandboxError::Unavailable {
            backend: "bubblewrap",
            reason,
        };
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
        Ok(Bubblewrap {
            program,
            etc: std::sync::Arc::new(etc),
        })
    }

    fn command(&self, spec: &SandboxSpec, work: &Path) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args([
            "--die-with-parent",
            "--new-session",
            "--unshare-pid",
            "--unshare-net",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--hostname",
            "vm0-sandbox",
        ]);
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
        cmd.arg("--ro-bind").arg(self.etc.path()).arg("/etc");
        cmd.args(["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]);
        cmd.arg("--bind").arg(work).arg("/work");
        let cwd = spec.working_dir.clone().unwrap_or_else(|| "/work".into());
        if cwd != "/work" {
            cmd.args(["--dir", &cwd]);
        }
        cmd.args(["--chdir", &cwd, "--clearenv"]);
        let defaults = [
            (
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            ),
            ("HOME", "/work"),
            ("TMPDIR", "/tmp"),
            ("LANG", "C.UTF-8"),
        ];
        for (k, v) in defaults {
            cmd.args(["--setenv", k, v]);
        }
        for (k, v) in &spec.env {
            cmd.args(["--setenv", k, v]);
        }
        cmd.arg("--").args(&spec.argv);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        cmd
    }
}

impl Sandbox for Bubblewrap {
    fn name(&self) -> &'static str {
        "bubblewrap"
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
        let work = spec.scratch_dir.join("work");
        tokio::fs::create_dir_all(&work)
            .await
            .map_err(SandboxError::Prepare)?;
        place_inputs(&work, &spec.files).await?;
        let mut child = match self.command(&spec, &work).spawn() {
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
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let input = spec.stdin.clone();
        tokio::spawn(async move {
            if let Some(mut stdin) = stdin {
                // A command that never reads stdin closes it early: not an error.
                let _ = stdin.write_all(&input).await;
            }
        });
        let readers = [
            stdout.map(|s| tokio::spawn(pump(s, events_tx.clone(), SandboxEvent::Stdout))),
            stderr.map(|s| tokio::spawn(pump(s, events_tx.clone(), SandboxEvent::Stderr))),
        ];
        let _ = events_tx
            .send(SandboxEvent::Log(format!(
                "sandbox started (backend bubblewrap, pid {})",
                child.id().unwrap_or(0)
            )))
            .await;
        tokio::spawn(supervise(child, spec, kill_rx, events_tx, readers));
        Ok(RunningSandbox::new(events_rx, kill_tx))
    }
}

/// Input files go into the scratch directory, which the command sees as `/work`:
/// that is the only writable place a bubblewrap sandbox shares with the host.
async fn place_inputs(work: &Path, inputs: &[crate::GuestFile]) -> Result<(), SandboxError> {
    use std::os::unix::fs::PermissionsExt;
    for input in inputs {
        let fail = |reason: String| SandboxError::InputFile {
            path: input.path.clone(),
            reason,
        };
        let relative = Path::new(&input.path)
            .strip_prefix("/work")
            .map_err(|_| fail("bubblewrap sandboxes take input files under /work only".into()))?;
        if relative
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(fail("the path must not contain `..`".into()));
        }
        let target = work.join(relative);
        if let Some(dir) = target.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| fail(e.to_string()))?;
        }
        tokio::fs::write(&target, &input.data)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let mode = if input.mode == 0 {
            0o644
        } else {
            input.mode & 0o7777
        };
        tokio::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))
            .await
            .map_err(|e| fail(e.to_string()))?;
    }
    Ok(())
}

async fn pump(
    mut from: impl AsyncRead + Unpin,
    to: mpsc::Sender<SandboxEvent>,
    wrap: fn(Bytes) -> SandboxEvent,
) {
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to
                    .send(wrap(Bytes::copy_from_slice(&buf[..n])))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

/// Owns the process until it is gone: samples it, kills it on request, waits for
/// its output to drain, removes the scratch directory, then sends `Exited`.
async fn supervise(
    mut child: Child,
    spec: SandboxSpec,
    mut kill: oneshot::Receiver<()>,
    events: mpsc::Sender<SandboxEvent>,
    readers: [Option<tokio::task::JoinHandle<()>>; 2],
) {
    let pid = child.id().unwrap_or(0);
    let work = spec.scratch_dir.join("work");
    let mut tick = tokio::time::interval(spec.sample_interval);
    tick.reset();
    let mut last = (Instant::now(), 0u64);
    let mut killed = false;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            _ = &mut kill, if !killed => {
                killed = true;
                kill_tree(pid);
                let _ = child.start_kill();
            }
            _ = tick.tick() => {
                let sample = take_sample(pid, &work, &spec, &mut last);
                let _ = events.try_send(SandboxEvent::Sample(sample));
            }
        }
    };
    // Output still in the pipes comes before `Exited`; bounded, in case a
    // descendant holds a pipe open. After a kill the namespace's processes die
    // asynchronously and what they still print matters little: wait less.
    let drain = if killed {
        Duration::from_millis(250)
    } else {
        Duration::from_secs(2)
    };
    for reader in readers.into_iter().flatten() {
        let _ = tokio::time::timeout(drain, reader).await;
    }
    let report = match status {
        Ok(s) => ExitReport {
            code: s.code(),
            signal: s.signal(),
            oom_killed: false,
        },
        Err(e) => {
            let _ = events
                .send(SandboxEvent::Log(format!(
                    "waiting for the sandbox failed: {e}"
                )))
                .await;
            ExitReport {
                code: None,
                signal: None,
                oom_killed: false,
            }
        }
    };
    if let Err(e) = tokio::fs::remove_dir_all(&spec.scratch_dir).await
        && e.kind() != std::io::ErrorKind::NotFound
    {
        let _ = events
            .send(SandboxEvent::Log(format!(
                "removing {} failed: {e}",
                spec.scratch_dir.display()
            )))
            .await;
    }
    let _ = events.send(SandboxEvent::Exited(report)).await;
}

/// SIGKILL to bwrap's process group and every process under it. Killing bwrap
/// alone is not enough right after it started: its child may not have set its
/// parent-death signal yet, and would then outlive it.
fn kill_tree(pid: u32) {
    use nix::sys::signal::{Signal, kill, killpg};
    use nix::unistd::Pid;
    let Ok(raw) = i32::try_from(pid) else {
        return;
    };
    if raw <= 0 {
        return;
    }
    let _ = killpg(Pid::from_raw(raw), Signal::SIGKILL);
    for p in crate::sample::process_tree(pid) {
        if let Ok(p) = i32::try_from(p) {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
    }
}

fn take_sample(
    pid: u32,
    work: &Path,
    spec: &SandboxSpec,
    last: &mut (Instant, u64),
) -> ResourceSample {
    let tree = process_tree(pid);
    let (ticks, memory) = cpu_and_memory(&tree);
    let now = Instant::now();
    let cpu = cpu_percent(last.1, ticks, now.duration_since(last.0).as_secs_f64());
    *last = (now, ticks);
    // The command's own network namespace: any process of the tree but bwrap's outer one.
    let (rx, tx) = tree.get(1).map_or((0, 0), |p| network(*p));
    const MB: i64 = 1024 * 1024;
    ResourceSample {
        cpu_percent: cpu,
        memory_used_bytes: memory,
        memory_total_bytes: i64::try_from(spec.memory_mb).unwrap_or(i64::MAX / MB) * MB,
        disk_used_bytes: disk_usage(work),
        disk_total_bytes: i64::try_from(spec.disk_mb).unwrap_or(i64::MAX / MB) * MB,
        network_rx_bytes: rx,
        network_tx_bytes: tx,
    }
}
