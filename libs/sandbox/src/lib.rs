//! Sandboxes: where a run's command executes, isolated from the host.
//!
//! [`Sandbox::start`] takes a [`SandboxSpec`] and returns a [`RunningSandbox`]: a
//! stream of [`SandboxEvent`]s (output, resource samples, backend log lines, and
//! exactly one final `Exited`), and a kill switch. Whatever happens — normal exit,
//! kill, the worker dropping the handle — the backend's supervisor task removes
//! everything the run created (processes, scratch files) before `Exited` is sent.
//!
//! Backends: [`bubblewrap`] (namespaces on the host). The microVM backends implement
//! the same trait.

/// The bubblewrap backend.
pub mod bubblewrap;
/// Guest images: kernel and initramfs, built from Debian packages.
pub mod image;
/// The QEMU backend.
pub mod qemu;
/// Resource samples from `/proc`.
pub mod sample;

use std::path::PathBuf;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

pub use sample::ResourceSample;

/// What to run.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    pub run_id: String,
    /// argv; the first element is the program, looked up on `PATH` in the sandbox.
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Directory the command starts in, inside the sandbox (default `/work`).
    pub working_dir: Option<String>,
    /// Written to the command's stdin, which is then closed.
    pub stdin: Vec<u8>,
    pub vcpus: u32,
    pub memory_mb: u64,
    pub disk_mb: u64,
    /// Host directory for this run's files; created by the backend and removed
    /// when the run ends.
    pub scratch_dir: PathBuf,
    /// How often resource samples are taken.
    pub sample_interval: std::time::Duration,
}

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitReport {
    /// Exit code, when the command exited by itself.
    pub code: Option<i32>,
    /// Signal number, when it was killed.
    pub signal: Option<i32>,
    /// The kernel's OOM killer ended it.
    pub oom_killed: bool,
}

/// What a running sandbox reports.
#[derive(Debug, Clone, PartialEq)]
pub enum SandboxEvent {
    Stdout(Bytes),
    Stderr(Bytes),
    Sample(ResourceSample),
    /// A line about the sandbox itself (boot, backend), for the run's system log.
    Log(String),
    /// The last event: the command ended and everything was cleaned up.
    Exited(ExitReport),
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox backend {backend} is not usable here: {reason}")]
    Unavailable {
        backend: &'static str,
        reason: String,
    },
    #[error("preparing the sandbox's files failed")]
    Prepare(#[source] std::io::Error),
    #[error("starting {program} failed")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
}

/// A started sandbox.
#[derive(Debug)]
pub struct RunningSandbox {
    events: mpsc::Receiver<SandboxEvent>,
    kill: Option<oneshot::Sender<()>>,
}

impl RunningSandbox {
    pub(crate) fn new(events: mpsc::Receiver<SandboxEvent>, kill: oneshot::Sender<()>) -> Self {
        RunningSandbox {
            events,
            kill: Some(kill),
        }
    }

    /// The next event; `None` after `Exited`.
    pub async fn next_event(&mut self) -> Option<SandboxEvent> {
        self.events.recv().await
    }

    /// Stops the command now (idempotent). `Exited` follows once cleaned up.
    pub fn kill(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
    }
}

/// `name` in a directory of `PATH`.
pub(crate) fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// A place to run commands.
pub trait Sandbox: Send + Sync + 'static {
    /// Backend name, as the run's system log shows it.
    fn name(&self) -> &'static str;

    fn start(
        &self,
        spec: SandboxSpec,
    ) -> impl std::future::Future<Output = Result<RunningSandbox, SandboxError>> + Send;
}
