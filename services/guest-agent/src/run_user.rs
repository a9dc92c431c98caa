//! The user commands run as: unprivileged by default, whatever the sandbox.

pub use vm0_proto::guest::{RUN_GID, RUN_UID};

/// Whether the command gives up root: only an agent that is root can, and does
/// unless the host asked for root.
pub fn drops_privileges(as_root: bool) -> bool {
    !as_root && nix::unistd::geteuid().is_root()
}

/// Gives `path` to the run user when this agent is root (otherwise the agent's own
/// files are already the command's).
pub fn give_to_run_user(path: &std::path::Path) -> std::io::Result<()> {
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::chown(path, Some(RUN_UID), Some(RUN_GID))?;
    }
    Ok(())
}
