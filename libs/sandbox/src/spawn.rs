//! How the processes around a run are spawned (bwrap, VMMs): nothing of the
//! worker is inherited but what is named. No environment (the worker's holds its
//! credentials), only the descriptors passed explicitly ([`spawn`]); their own
//! process group (killed as a whole); `kill_on_drop` (the supervisor task ends on
//! every path). What must die with the worker even when it is killed with SIGKILL
//! (which no destructor survives) gets a parent-death signal: bwrap sets its own
//! (`--die-with-parent`), an unjailed VMM gets [`die_with_parent`].
//!
//! Speed: a command without `pre_exec` closures is started with `posix_spawn`
//! (vfork), one with them with `fork`, which copies the worker's page tables:
//! measured, 25-30 % of bubblewrap's throughput. So bwrap, started for every run,
//! has none; descriptors reach it by being inheritable for the moment of the
//! spawn, under a lock every spawn here takes.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::Stdio;

use tokio::process::Command;

/// Held while a child is spawned: descriptors made inheritable for one child
/// reach no other.
static SPAWNING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A command for `program` with an empty environment, stdin and stdout closed and
/// stderr piped (for failure reports), in a new process group. Callers set other
/// stdio where they need it.
pub(crate) fn command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    cmd
}

/// Spawns `cmd`; the child (and no other process) inherits `fds`, under the same
/// numbers. Every child spawned here goes through this function.
pub(crate) fn spawn(cmd: &mut Command, fds: &[OwnedFd]) -> std::io::Result<tokio::process::Child> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    let _only_us = SPAWNING.lock().unwrap_or_else(|p| p.into_inner());
    for fd in fds {
        fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty()))?;
    }
    let spawned = cmd.spawn();
    for fd in fds {
        // Closed by the caller right after; close-on-exec again meanwhile.
        let _ = fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    }
    spawned
}

/// The numbers of `fds`, as the child will see them.
pub(crate) fn numbers(fds: &[OwnedFd]) -> Vec<i32> {
    fds.iter().map(AsRawFd::as_raw_fd).collect()
}

/// SIGKILL the child when the thread that spawned it exits. Linux ties the signal
/// to the parent *thread*: the spawning threads here are tokio runtime workers,
/// which live as long as the worker process.
#[allow(unsafe_code)]
pub(crate) fn die_with_parent(cmd: &mut Command) {
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe syscalls (prctl, getppid, _exit); it allocates nothing and
    // touches no lock.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
            // The parent may have died between fork and prctl: then nobody would
            // ever send the signal.
            if nix::unistd::getppid() != parent {
                nix::libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// The child joins the cgroups whose `cgroup.procs` files are given before it
/// execs, so that it and everything it starts are born inside their limits (no
/// window in which the VMM runs outside them, and nothing to move later).
#[allow(unsafe_code)]
pub(crate) fn join_cgroups(cmd: &mut Command, procs_files: Vec<std::ffi::CString>) {
    // SAFETY: the closure runs in the forked child before exec and only calls
    // open, write and close (async-signal-safe) on paths made before the fork; it
    // allocates nothing (a CStr is passed as is) and touches no lock.
    unsafe {
        cmd.pre_exec(move || {
            for file in &procs_files {
                let fd = nix::fcntl::open(
                    file.as_c_str(),
                    nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
                    nix::sys::stat::Mode::empty(),
                )?;
                // "0": the writing process.
                nix::unistd::write(&fd, b"0")?;
            }
            Ok(())
        });
    }
}
