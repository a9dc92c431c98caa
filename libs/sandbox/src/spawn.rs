//! How the processes around a run are spawned (bwrap, VMMs): nothing of the
//! worker is inherited but what is named. No environment (the worker's holds its
//! credentials), only the descriptors passed explicitly ([`pass_fds`]); their own
//! process group (killed as a whole); `kill_on_drop` (the supervisor task ends on
//! every path); and a parent-death signal (the worker itself may be killed with
//! SIGKILL, which no destructor survives).

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::Stdio;

use tokio::process::Command;

/// A command for `program` with an empty environment, stdin and stdout closed and
/// stderr piped (for failure reports), in a new process group, killed with its
/// parent. Callers set other stdio where they need it.
pub(crate) fn command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    die_with_parent(&mut cmd);
    cmd
}

/// SIGKILL the child when the thread that spawned it exits. Linux ties the signal
/// to the parent *thread*: the spawning threads here are tokio runtime workers,
/// which live as long as the worker process.
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
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

/// The child keeps `fds` open across exec, under the same numbers (the parent's
/// copies close when the command is dropped). Every other descriptor of the
/// worker is close-on-exec, as Rust opens them, and so is not inherited; these
/// are not inherited by any other child spawned meanwhile either.
#[allow(unsafe_code)]
pub(crate) fn pass_fds(cmd: &mut Command, fds: Vec<OwnedFd>) -> Vec<i32> {
    let numbers = fds.iter().map(AsRawFd::as_raw_fd).collect();
    // SAFETY: the closure runs in the forked child before exec and only calls
    // fcntl(F_SETFD) on descriptors it owns (moved into it, so open until the
    // command is dropped); fcntl is async-signal-safe and nothing is allocated.
    unsafe {
        cmd.pre_exec(move || {
            for fd in &fds {
                nix::fcntl::fcntl(
                    fd,
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
                )?;
            }
            Ok(())
        });
    }
    numbers
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
