//! The guest agent's session: `Ready`, then one `Start`, then output, samples and
//! finally `Exited`; `Cancel` and `Ping` are answered at any time.

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::process::Command;
use tokio::sync::mpsc;
use vm0_proto::frame;
use vm0_proto::guest::{
    Exited, GuestError, GuestMessage, HostMessage, Output, OutputStream, Pong, Ready, Start,
    guest_message, host_message,
};

use crate::sample::{Sampler, oom_kills};
use crate::{files, run_user, trees};

/// Pid of the command being run (0: none), so that PID 1's orphan reaper leaves it
/// to tokio.
static MAIN_CHILD: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

pub fn main_child() -> Option<u32> {
    match MAIN_CHILD.load(std::sync::atomic::Ordering::SeqCst) {
        0 => None,
        pid => Some(pid),
    }
}

/// Grace between SIGTERM and SIGKILL when `Cancel` does not say.
const DEFAULT_GRACE: Duration = Duration::from_secs(10);
const READ_CHUNK: usize = 16 * 1024;

fn msg(kind: guest_message::Kind) -> GuestMessage {
    GuestMessage { kind: Some(kind) }
}

/// Writes frames in order from a queue (one writer for every task).
async fn writer_task<W: AsyncWrite + Unpin>(mut w: W, mut rx: mpsc::Receiver<GuestMessage>) {
    while let Some(m) = rx.recv().await {
        if frame::write(&mut w, &m).await.is_err() {
            return; // the host is gone
        }
    }
}

/// Reads host frames into a queue; ends (dropping the sender) at end of stream or
/// on a frame that does not decode, after reporting it.
async fn reader_task<R: AsyncRead + Unpin>(
    mut r: R,
    tx: mpsc::Sender<HostMessage>,
    out: mpsc::Sender<GuestMessage>,
) {
    loop {
        match frame::read_from_host::<HostMessage, _>(&mut r).await {
            Ok(Some(m)) => {
                if tx.send(m).await.is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                let _ = out
                    .send(msg(guest_message::Kind::Error(GuestError {
                        message: format!("unreadable host frame: {e}"),
                    })))
                    .await;
                return;
            }
        }
    }
}

async fn pump(
    mut from: impl AsyncRead + Unpin,
    stream: OutputStream,
    to: mpsc::Sender<(OutputStream, Vec<u8>)>,
) {
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.send((stream, buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// How the VM's boot went, for `Ready` (zeros outside a VM).
#[derive(Debug, Clone, Copy, Default)]
pub struct BootTimes {
    pub kernel_boot_ms: u64,
    pub init_ms: u64,
}

pub async fn serve<R, W>(reader: R, writer: W, boot: BootTimes) -> std::io::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (out_tx, out_rx) = mpsc::channel(256);
    let writer = tokio::spawn(writer_task(writer, out_rx));
    let (host_tx, mut host_rx) = mpsc::channel(16);
    let reader = tokio::spawn(reader_task(reader, host_tx, out_tx.clone()));
    let send = |m: GuestMessage| {
        let out = out_tx.clone();
        async move {
            let _ = out.send(m).await;
        }
    };
    send(msg(guest_message::Kind::Ready(Ready {
        version: env!("CARGO_PKG_VERSION").into(),
        kernel_boot_ms: boot.kernel_boot_ms,
        init_ms: boot.init_ms,
    })))
    .await;

    // Before Start: inputs and pings.
    let mut unpacking = None;
    let start = loop {
        match host_rx.recv().await {
            Some(HostMessage {
                kind: Some(host_message::Kind::Start(s)),
            }) => break Some(s),
            Some(m) => idle(m, &mut unpacking, &out_tx, "Start").await,
            None => break None,
        }
    };
    if let Some(start) = start {
        let exited = run(start, &mut host_rx, &out_tx).await;
        let _ = out_tx.send(msg(guest_message::Kind::Exited(exited))).await;
        // After Exited: outputs and pings, until the host closes the stream.
        while let Some(m) = host_rx.recv().await {
            idle(
                m,
                &mut unpacking,
                &out_tx,
                "nothing more than files and pings after Exited",
            )
            .await;
        }
    }
    // The reader holds a sender too: stop it so the writer ends once all is out.
    reader.abort();
    drop(out_tx);
    let _ = writer.await;
    Ok(())
}

/// A message while no command runs: files and pings are served, anything else
/// is refused saying what was `expected`.
async fn idle(
    m: HostMessage,
    unpacking: &mut Option<trees::Unpacking>,
    out: &mpsc::Sender<GuestMessage>,
    expected: &str,
) {
    match m.kind {
        Some(host_message::Kind::Ping(p)) => {
            let _ = out
                .send(msg(guest_message::Kind::Pong(Pong { nonce: p.nonce })))
                .await;
        }
        Some(host_message::Kind::WriteFile(w)) => files::handle_write(w, out).await,
        Some(host_message::Kind::ReadFile(r)) => files::handle_read(r, out).await,
        Some(host_message::Kind::UnpackTree(u)) => trees::handle_unpack(u, unpacking, out).await,
        Some(host_message::Kind::PackTree(p)) => trees::handle_pack(p, out).await,
        _ => {
            let message = format!("expected {expected}");
            let _ = out
                .send(msg(guest_message::Kind::Error(GuestError { message })))
                .await;
        }
    }
}

/// The jail's syscall policy, built once.
fn policy() -> Result<&'static vm0_seccomp::Programs, String> {
    static POLICY: std::sync::OnceLock<Result<vm0_seccomp::Programs, String>> =
        std::sync::OnceLock::new();
    POLICY
        .get_or_init(|| vm0_seccomp::Programs::build().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(Clone::clone)
}

/// Caps the processes the command may have at [`RUN_PROCESSES_MAX`] more than
/// its uid has now (the limit is inherited; root's own forks are not counted).
///
/// [`RUN_PROCESSES_MAX`]: vm0_proto::guest::RUN_PROCESSES_MAX
fn limit_processes() {
    use nix::sys::resource::{Resource, setrlimit};
    let now = std::fs::read_dir("/proc").map_or(0, |d| {
        d.flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .bytes()
                    .all(|b| b.is_ascii_digit())
            })
            .count() as u64
    });
    let max = now + vm0_proto::guest::RUN_PROCESSES_MAX;
    let _ = setrlimit(Resource::RLIMIT_NPROC, max, max);
}

/// Starts the command under the jail's syscall policy, unless it runs as root
/// (a microVM's root is the tenant's own) or this agent already lives under it
/// (bubblewrap loads it into the whole sandbox). The policy is installed on a
/// thread of its own just before the fork: the command inherits it, the agent
/// (which still mounts, reaps and powers off) does not.
fn spawn(mut cmd: Command, as_root: bool) -> std::io::Result<tokio::process::Child> {
    if as_root {
        return cmd.spawn();
    }
    limit_processes();
    if vm0_seccomp::already_filtered() {
        return cmd.spawn();
    }
    let policy = policy().map_err(|why| {
        std::io::Error::other(format!("the syscall policy cannot be built: {why}"))
    })?;
    let runtime = tokio::runtime::Handle::current();
    std::thread::spawn(move || {
        let _entered = runtime.enter();
        policy
            .apply_to_this_thread()
            .map_err(std::io::Error::other)?;
        cmd.spawn()
    })
    .join()
    .map_err(|_| std::io::Error::other("the thread starting the command panicked"))?
}

fn signal_group(pgid: Option<u32>, sig: Signal) {
    if let Some(pid) = pgid.and_then(|p| i32::try_from(p).ok()) {
        let _ = killpg(Pid::from_raw(pid), sig);
    }
}

/// Runs the command until it ends; returns how it ended.
async fn run(
    start: Start,
    host_rx: &mut mpsc::Receiver<HostMessage>,
    out: &mpsc::Sender<GuestMessage>,
) -> Exited {
    let failed = |message: String| {
        let out = out.clone();
        async move {
            let _ = out
                .send(msg(guest_message::Kind::Error(GuestError { message })))
                .await;
            Exited {
                code: Some(127),
                signal: None,
                oom_killed: false,
            }
        }
    };
    if let Some(why) = crate::init::SETUP_ERROR.get() {
        return failed(format!("the machine is not set up: {why}")).await;
    }
    let Some(program) = start.argv.first() else {
        return failed("Start has an empty argv".into()).await;
    };
    // The prompt as a file the host wrote (any size), or the bytes of `Start`.
    let stdin = if start.stdin_path.is_empty() {
        Stdio::piped()
    } else {
        match std::fs::File::open(&start.stdin_path) {
            Ok(f) => Stdio::from(f),
            Err(e) => {
                return failed(format!("cannot open stdin {}: {e}", start.stdin_path)).await;
            }
        }
    };
    let mut cmd = Command::new(program);
    cmd.args(&start.argv[1..])
        .env_clear()
        .envs(&start.env)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    // The session's state directory: given by the host (a checkpoint's), or
    // made empty here, the run user's.
    if let Some(dir) = start
        .env
        .get("VM0_STATE_DIR")
        .filter(|d| d.starts_with('/'))
    {
        let dir = std::path::Path::new(dir);
        let made = std::fs::create_dir_all(dir).and_then(|()| run_user::give_to_run_user(dir));
        if let Err(e) = made {
            return failed(format!("cannot make {}: {e}", dir.display())).await;
        }
    }
    if !start.working_dir.is_empty() {
        cmd.current_dir(&start.working_dir);
    }
    if run_user::drops_privileges(start.as_root) {
        let (uid, gid) = run_user::ids();
        cmd.uid(uid).gid(gid);
    }
    let oom_before = oom_kills();
    let mut child = match spawn(cmd, start.as_root) {
        Ok(c) => c,
        Err(e) => return failed(format!("cannot start {program}: {e}")).await,
    };
    let pgid = child.id();
    MAIN_CHILD.store(pgid.unwrap_or(0), std::sync::atomic::Ordering::SeqCst);
    if let Some(mut stdin) = child.stdin.take() {
        let input = start.stdin.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let _ = stdin.write_all(&input).await;
        });
    }
    let (chunk_tx, mut chunk_rx) = mpsc::channel(64);
    let readers = [
        child
            .stdout
            .take()
            .map(|s| tokio::spawn(pump(s, OutputStream::Stdout, chunk_tx.clone()))),
        child
            .stderr
            .take()
            .map(|s| tokio::spawn(pump(s, OutputStream::Stderr, chunk_tx.clone()))),
    ];
    drop(chunk_tx);
    let sampling = start.sample_interval_ms > 0;
    // Not even a baseline read when the host samples (bubblewrap).
    let mut sampler = sampling.then(|| Sampler::new(&start.working_dir));
    let interval = Duration::from_millis(u64::from(start.sample_interval_ms.max(100)));
    let mut tick = tokio::time::interval(interval);
    tick.reset();
    let mut seq = 0u64;
    let mut kill_at: Option<tokio::time::Instant> = None;
    let mut host_open = true;
    let status = loop {
        let kill_deadline = async {
            match kill_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            status = child.wait() => break status,
            Some((stream, data)) = chunk_rx.recv() => {
                let _ = out.send(msg(guest_message::Kind::Output(Output { stream: stream.into(), seq, data }))).await;
                seq += 1;
            }
            _ = tick.tick(), if sampling => {
                if let Some(sampler) = sampler.as_mut() {
                    let _ = out.send(msg(guest_message::Kind::Sample(sampler.sample()))).await;
                }
            }
            m = host_rx.recv(), if host_open => match m {
                Some(HostMessage { kind: Some(host_message::Kind::Cancel(c)) }) => {
                    signal_group(pgid, Signal::SIGTERM);
                    let grace = if c.grace_ms == 0 { DEFAULT_GRACE } else { Duration::from_millis(u64::from(c.grace_ms)) };
                    kill_at.get_or_insert(tokio::time::Instant::now() + grace);
                }
                Some(HostMessage { kind: Some(host_message::Kind::Ping(p)) }) => {
                    let _ = out.send(msg(guest_message::Kind::Pong(Pong { nonce: p.nonce }))).await;
                }
                Some(_) => {
                    let message = "while the command runs only Cancel and Ping are served (files move before Start or after Exited)".into();
                    let _ = out.send(msg(guest_message::Kind::Error(GuestError { message }))).await;
                }
                None => {
                    // The host is gone: nobody will read the result.
                    host_open = false;
                    signal_group(pgid, Signal::SIGKILL);
                }
            },
            _ = kill_deadline => {
                signal_group(pgid, Signal::SIGKILL);
                kill_at = None;
            }
        }
    };
    // Whatever is still in the pipes comes before Exited (bounded: a descendant
    // may keep a pipe open).
    signal_group(pgid, Signal::SIGKILL);
    let drain = async {
        while let Some((stream, data)) = chunk_rx.recv().await {
            let _ = out
                .send(msg(guest_message::Kind::Output(Output {
                    stream: stream.into(),
                    seq,
                    data,
                })))
                .await;
            seq += 1;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
    for r in readers.into_iter().flatten() {
        r.abort();
    }
    // Every run has a sample, however short: the last one, before Exited.
    if let Some(sampler) = sampler.as_mut() {
        let _ = out
            .send(msg(guest_message::Kind::Sample(sampler.sample())))
            .await;
    }
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => Exited {
            code: s.code(),
            signal: s.signal(),
            oom_killed: s.signal() == Some(9) && oom_kills() > oom_before,
        },
        Err(e) => failed(format!("waiting for the command failed: {e}")).await,
    }
}
