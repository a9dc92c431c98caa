//! The run user's entry in a sandbox's `/etc`. Commands run as uid and gid
//! [`RUN_UID`]/[`RUN_GID`]; tools that look their user up (`whoami`, git's default
//! identity, ssh) fail without a `passwd` line for it.

use std::io::Write;
use std::path::Path;

use vm0_proto::guest::{RUN_GID, RUN_UID};

/// The run user's name where the sandbox's `/etc` has none for its uid.
pub const RUN_USER: &str = "agent";

pub fn passwd_line(uid: u32, gid: u32) -> String {
    format!("{RUN_USER}:x:{uid}:{gid}:vm0 run user:/work:/bin/sh\n")
}

pub fn group_line(gid: u32) -> String {
    format!("{RUN_USER}:x:{gid}:\n")
}

/// Adds the run user to `etc/passwd` and `etc/group` (creating them if absent)
/// where they have no entry for its ids; an existing entry is kept.
pub fn add_to(etc: &Path) -> std::io::Result<()> {
    add_ids(etc, RUN_UID, RUN_GID)
}

/// [`add_to`] for another uid and gid (a slot's host identity, bubblewrap): the
/// name is the same, `agent`.
pub fn add_ids(etc: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::fs::create_dir_all(etc)?;
    add_unless_present(&etc.join("passwd"), uid, &passwd_line(uid, gid))?;
    add_unless_present(&etc.join("group"), gid, &group_line(gid))
}

fn add_unless_present(file: &Path, id: u32, line: &str) -> std::io::Result<()> {
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    let id = id.to_string();
    if text
        .lines()
        .any(|l| l.split(':').nth(2) == Some(id.as_str()))
    {
        return Ok(());
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)?;
    if !text.is_empty() && !text.ends_with('\n') {
        f.write_all(b"\n")?;
    }
    f.write_all(line.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_entry_is_added_once_and_never_over_an_existing_one() {
        let dir = tempfile::tempdir().expect("dir");
        let etc = dir.path().join("etc");
        add_to(&etc).expect("add");
        add_to(&etc).expect("add again");
        let passwd = std::fs::read_to_string(etc.join("passwd")).expect("passwd");
        assert_eq!(passwd, "agent:x:1000:1000:vm0 run user:/work:/bin/sh\n");
        assert_eq!(
            std::fs::read_to_string(etc.join("group")).expect("group"),
            "agent:x:1000:\n"
        );

        std::fs::write(
            etc.join("passwd"),
            "root:x:0:0::/root:/bin/sh\ndev:x:1000:1000::/home/dev:/bin/bash",
        )
        .expect("write");
        add_to(&etc).expect("add");
        let passwd = std::fs::read_to_string(etc.join("passwd")).expect("passwd");
        assert!(
            !passwd.contains("agent"),
            "uid 1000 already has a name: {passwd}"
        );
    }
}
