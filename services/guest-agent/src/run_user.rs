//! The user commands run as: unprivileged by default, whatever the sandbox.

/// The unprivileged user commands run as, and the owner of `/work` and of the files
/// the host writes (no passwd entry needed: ids are numeric).
pub const RUN_UID: u32 = 1000;
pub const RUN_GID: u32 = 1000;

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
