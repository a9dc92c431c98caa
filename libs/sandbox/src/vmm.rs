//! Spawning a VMM process (QEMU, Cloud Hypervisor) so that it cannot outlive the
//! run or the worker: its own process group (killed as a whole), `kill_on_drop`
//! (the supervisor task ends on every path), and a parent-death signal (the worker
//! itself is killed with SIGKILL, which no destructor survives).

use std::path::Path;
use std::process::Stdio;

use tokio::process::Command;

/// A command for a VMM binary: stdin/stdout closed, stderr piped (for the boot
/// failure report), in a new process group, killed with its parent.
pub(crate) fn command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.stdin(Stdio::null())
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
