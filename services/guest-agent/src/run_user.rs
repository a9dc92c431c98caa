//! The user commands run as: unprivileged by default, whatever the sandbox. In a
//! microVM it is uid/gid [`RUN_UID`]/[`RUN_GID`]; bubblewrap names another
//! (`--run-as UID:GID`, the host uid of the run's slot), so that runs sharing a
//! host kernel never share a uid.

use std::sync::OnceLock;

pub use vm0_proto::guest::{RUN_GID, RUN_UID};

static RUN_AS: OnceLock<(u32, u32)> = OnceLock::new();

/// Sets the run user for this agent's life (from `--run-as`); only the first
/// call counts.
pub fn set(uid: u32, gid: u32) {
    let _ = RUN_AS.set((uid, gid));
}

/// Parses `UID:GID`.
pub fn parse(value: &str) -> Option<(u32, u32)> {
    let (uid, gid) = value.split_once(':')?;
    Some((uid.parse().ok()?, gid.parse().ok()?))
}

/// The run user's uid and gid.
pub fn ids() -> (u32, u32) {
    RUN_AS.get().copied().unwrap_or((RUN_UID, RUN_GID))
}

/// Whether the command gives up root: only an agent that is root can, and does
/// unless the host asked for root.
pub fn drops_privileges(as_root: bool) -> bool {
    !as_root && nix::unistd::geteuid().is_root()
}

/// Gives `path` to the run user when this agent is root (otherwise the agent's own
/// files are already the command's).
pub fn give_to_run_user(path: &std::path::Path) -> std::io::Result<()> {
    if nix::unistd::geteuid().is_root() {
        let (uid, gid) = ids();
        std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn run_as_is_uid_colon_gid() {
        assert_eq!(super::parse("200001:200001"), Some((200001, 200001)));
        assert_eq!(super::parse("200001"), None);
        assert_eq!(super::parse("a:1"), None);
    }
}
