//! Host identities of a worker's slots: under a root worker every slot has a uid
//! and gid of its own, leased from a range (`VM0_SLOT_UIDS`), and whatever a run
//! starts on the host kernel (the command in bubblewrap, the VMM of a microVM)
//! runs as its slot's. Runs of different slots then never share a uid: they cannot
//! signal each other, share rlimits (`RLIMIT_NPROC`), keyrings or files.
//!
//! A lease is an exclusive `flock` on `<lock dir>/<uid>.lock`, held while the
//! worker lives, so that several workers on one host never lease the same uid.
//! Uids and gids that the host's `/etc/passwd` or `/etc/group` name are skipped:
//! a run must never be a real user of the host.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// The uid and gid a slot's processes run as on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SlotUser {
    pub uid: u32,
    pub gid: u32,
}

/// Inclusive range of host uids (and the same gids) slots may lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    pub first: u32,
    pub last: u32,
}

impl Default for UidRange {
    /// Above the ranges Debian gives to users (1000-59999) and well clear of the
    /// start of `/etc/subuid` allocations (100000 + 65536 per user).
    fn default() -> UidRange {
        UidRange {
            first: 2_000_000,
            last: 2_000_999,
        }
    }
}

impl std::str::FromStr for UidRange {
    type Err = String;

    fn from_str(s: &str) -> Result<UidRange, String> {
        let bad = || format!("{s:?} is not a uid range FIRST-LAST (e.g. 2000000-2000999)");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let (first, last): (u32, u32) = (
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        );
        if first == 0 || first > last || last == u32::MAX {
            return Err(format!(
                "uid range {s:?} must be non-empty, above 0 and below 4294967295"
            ));
        }
        Ok(UidRange { first, last })
    }
}

impl std::fmt::Display for UidRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SlotUserError {
    #[error("creating the slot lease directory {path}")]
    LockDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the slot uid range {range} has {free} uids free on this host (other workers hold or the host's users own the rest); {wanted} slots need {wanted}"
    )]
    Exhausted {
        range: UidRange,
        free: u32,
        wanted: u32,
    },
}

/// The uids a worker leased, one per slot; released when dropped.
#[derive(Debug)]
pub struct SlotUsers {
    users: Vec<SlotUser>,
    _leases: Vec<Flock<File>>,
}

/// Ids that name a user or group in this host's `/etc/passwd` or `/etc/group`.
fn taken_ids(file: &Path) -> std::collections::HashSet<u32> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(':').nth(2)?.parse().ok())
        .collect()
}

/// Whether this process may switch uids (it is root): then slots get uids.
pub fn can_switch_uids() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Where leases live: root's own directory under `/run` when it can be made,
/// otherwise one under the temporary directory.
pub fn default_lock_dir() -> PathBuf {
    let run = Path::new("/run");
    if run.is_dir() && nix::unistd::access(run, nix::unistd::AccessFlags::W_OK).is_ok() {
        run.join("vm0-slot-uids")
    } else {
        std::env::temp_dir().join("vm0-slot-uids")
    }
}

impl SlotUsers {
    /// No identities: every run is the worker's own user (a worker that is not
    /// root cannot switch uids).
    pub fn none() -> SlotUsers {
        SlotUsers {
            users: Vec::new(),
            _leases: Vec::new(),
        }
    }

    /// Leases `count` uids of `range` under `lock_dir`.
    pub fn lease(range: UidRange, count: u32, lock_dir: &Path) -> Result<SlotUsers, SlotUserError> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(lock_dir)
            .map_err(|source| SlotUserError::LockDir {
                path: lock_dir.display().to_string(),
                source,
            })?;
        let users = taken_ids(Path::new("/etc/passwd"));
        let groups = taken_ids(Path::new("/etc/group"));
        let mut leased = SlotUsers::none();
        for uid in range.first..=range.last {
            if leased.users.len() as u32 == count {
                break;
            }
            if users.contains(&uid) || groups.contains(&uid) {
                continue;
            }
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(lock_dir.join(format!("{uid}.lock")));
            let Ok(file) = file else { continue };
            if let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                leased.users.push(SlotUser { uid, gid: uid });
                leased._leases.push(lock);
            }
        }
        if (leased.users.len() as u32) < count {
            return Err(SlotUserError::Exhausted {
                range,
                free: leased.users.len() as u32,
                wanted: count,
            });
        }
        Ok(leased)
    }

    pub fn users(&self) -> &[SlotUser] {
        &self.users
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_refuse_nonsense() {
        assert_eq!(
            "10-20".parse::<UidRange>(),
            Ok(UidRange {
                first: 10,
                last: 20
            })
        );
        assert!("20-10".parse::<UidRange>().is_err());
        assert!("0-10".parse::<UidRange>().is_err());
        assert!("abc".parse::<UidRange>().is_err());
    }

    #[test]
    fn two_leases_never_share_a_uid_and_host_users_are_skipped() {
        let dir = tempfile::tempdir().expect("dir");
        // uid 0 (root) and the first user of the host are in the range but taken.
        let range = UidRange {
            first: 1,
            last: 70_000,
        };
        let a = SlotUsers::lease(range, 3, dir.path()).expect("lease a");
        let b = SlotUsers::lease(range, 3, dir.path()).expect("lease b");
        let taken = taken_ids(Path::new("/etc/passwd"));
        for u in a.users().iter().chain(b.users()) {
            assert!(!taken.contains(&u.uid), "{} is a host user", u.uid);
            assert!(
                !b.users().contains(u) || !a.users().contains(u),
                "{u:?} leased twice"
            );
        }
        let small = UidRange {
            first: 65_000,
            last: 65_001,
        };
        let held = SlotUsers::lease(small, 2, dir.path());
        assert!(held.is_ok() || taken.contains(&65_000) || taken.contains(&65_001));
        let err = SlotUsers::lease(small, 2, dir.path()).expect_err("exhausted");
        assert!(err.to_string().contains("65000-65001"), "{err}");
        drop(held);
    }
}
