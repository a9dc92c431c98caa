//! Optional root filesystems: a directory (a debootstrap tree, say) made into an
//! ext4 image with `mkfs.ext4 -d`, attached to the VM read-only as a virtio-blk
//! disk. The guest agent mounts it and runs the command inside it (chroot), with
//! `/proc`, `/sys`, `/dev`, `/tmp`, `/run` and a writable `/work` mounted there,
//! and the run's `/etc/resolv.conf` bound over the image's.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::{ImageError, run};

/// Mount points the guest needs in the root filesystem, which is read-only there
/// (`state`: the session's state directory, `VM0_STATE_DIR`).
const MOUNT_POINTS: &[&str] = &["proc", "sys", "dev", "tmp", "run", "work", "state"];
/// Room beyond the tree's own size: ext4 metadata and inode tables.
const SLACK_BYTES: u64 = 32 * 1024 * 1024;

/// Bytes of the regular files under `dir`.
fn tree_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_size(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

/// A cheap fingerprint of the tree (paths, sizes, modification times), for the
/// image's recipe key.
pub(super) fn fingerprint(dir: &Path, h: &mut Sha256) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
            continue;
        };
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        h.update(format!("{}\0{}\0{mtime}\n", e.path().display(), meta.len()));
        if meta.is_dir() {
            fingerprint(&e.path(), h);
        }
    }
}

/// Makes `dir` into an ext4 image at `out`.
pub(super) fn build(dir: &Path, out: &Path) -> Result<(), ImageError> {
    if !dir.is_dir() {
        return Err(ImageError::Missing(format!(
            "root filesystem directory {}",
            dir.display()
        )));
    }
    // A staging copy gets the mount points the tree may lack.
    let scratch = tempfile::tempdir_in(out.parent().unwrap_or(Path::new(".")))?;
    let staging = scratch.path().join("tree");
    std::fs::create_dir_all(&staging)?;
    run(
        "copying the root filesystem tree",
        Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", dir.display()))
            .arg(&staging),
    )?;
    for point in MOUNT_POINTS {
        std::fs::create_dir_all(staging.join(point))?;
    }
    crate::run_user::add_to(&staging.join("etc"))?;
    // Where the guest binds the run's resolver configuration (the image is
    // read-only there): a tree without one gets an empty file to bind over. A
    // symlink (systemd-resolved's stub) is left as it is.
    let resolv = staging.join("etc/resolv.conf");
    if std::fs::symlink_metadata(&resolv).is_err() {
        std::fs::write(&resolv, "")?;
    }
    let size = (tree_size(&staging) * 5 / 4 + SLACK_BYTES).next_multiple_of(1024 * 1024);
    let file = std::fs::File::create(out)?;
    file.set_len(size)?;
    drop(file);
    // Debian keeps it in /usr/sbin, which a non-root PATH may lack.
    let mkfs = crate::find_on_path("mkfs.ext4")
        .or_else(|| Some(PathBuf::from("/usr/sbin/mkfs.ext4")).filter(|p| p.is_file()))
        .ok_or_else(|| ImageError::Missing("mkfs.ext4 (apt-get install e2fsprogs)".into()))?;
    run(
        "mkfs.ext4 -d",
        Command::new(mkfs)
            .args(["-q", "-F", "-L", "vm0-rootfs", "-d"])
            .arg(&staging)
            .arg(out),
    )?;
    Ok(())
}

/// SHA-256 of a file, streamed.
pub(super) fn digest(path: &Path) -> Result<Vec<u8>, ImageError> {
    let mut h = Sha256::new();
    let mut file = std::fs::File::open(path)?;
    std::io::copy(&mut file, &mut h)?;
    Ok(h.finalize().to_vec())
}
