//! Directory trees in and out of the sandbox as one `.tar.gz` stream
//! (`UnpackTree`, `PackTree`): a volume or the artifact's version before the
//! command starts, `/work` and the state directory after it ended. The
//! archive code is the storage library's, so the guest refuses what the host
//! would (and the host checks what comes out again: the guest is not trusted).

use std::path::{Path, PathBuf};

use tokio::sync::mpsc;
use vm0_proto::guest::{
    GuestError, GuestMessage, PackTree, TreeData, TreeUnpacked, UnpackTree, guest_message,
};
use vm0_storage::Limits;

/// Parts of a packed tree sent to the host (well under the 1 MiB frame limit).
const PART: usize = 256 * 1024;

fn msg(kind: guest_message::Kind) -> GuestMessage {
    GuestMessage { kind: Some(kind) }
}

fn error(message: String) -> GuestMessage {
    msg(guest_message::Kind::Error(GuestError { message }))
}

fn limits(max_bytes: u64, max_files: u64) -> Limits {
    let d = Limits::default();
    Limits {
        max_file_bytes: if max_bytes == 0 {
            d.max_file_bytes
        } else {
            max_bytes
        },
        max_total_bytes: if max_bytes == 0 {
            d.max_total_bytes
        } else {
            max_bytes
        },
        max_files: if max_files == 0 {
            d.max_files
        } else {
            usize::try_from(max_files).unwrap_or(usize::MAX)
        },
        ..d
    }
}

/// A `Read` over the parts the host sends.
struct Parts {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    at: usize,
}

impl std::io::Read for Parts {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.buf.len() {
            match self.rx.recv() {
                Ok(next) => {
                    self.buf = next;
                    self.at = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// An unpack under way: parts go to a blocking thread that writes the tree.
pub struct Unpacking {
    dest: String,
    parts: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    done: tokio::task::JoinHandle<Result<(u64, u64), String>>,
}

impl Unpacking {
    fn start(first: &UnpackTree) -> Result<Unpacking, String> {
        let dest = PathBuf::from(&first.dest);
        if !dest.is_absolute() {
            return Err(format!("{:?}: tree paths must be absolute", first.dest));
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(4);
        let limits = limits(first.max_bytes, first.max_files);
        let read_only = first.read_only;
        let done = tokio::task::spawn_blocking(move || {
            let parts = Parts {
                rx,
                buf: Vec::new(),
                at: 0,
            };
            let manifest = vm0_storage::unpack(parts, &dest, &limits)
                .map_err(|e| format!("unpacking into {}: {e}", dest.display()))?;
            if read_only {
                seal(&dest).map_err(|e| format!("making {} read-only: {e}", dest.display()))?;
            } else {
                give_tree(&dest).map_err(|e| format!("{}: {e}", dest.display()))?;
            }
            Ok((manifest.files().len() as u64, manifest.total_bytes()))
        });
        Ok(Unpacking {
            dest: first.dest.clone(),
            parts: Some(tx),
            done,
        })
    }
}

/// The run user owns what it may change.
fn give_tree(dir: &Path) -> std::io::Result<()> {
    crate::run_user::give_to_run_user(dir)?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            give_tree(&entry.path())?;
        } else if crate::run_user::drops_privileges(false) {
            let (uid, gid) = crate::run_user::ids();
            std::os::unix::fs::lchown(entry.path(), Some(uid), Some(gid))?;
        }
    }
    Ok(())
}

/// A read-only bind of `dir` onto itself: not even root's chmod makes it
/// writable for the command, which is not root anyway.
fn seal(dir: &Path) -> nix::Result<()> {
    use nix::mount::{MsFlags, mount};
    if std::process::id() != 1 {
        // Outside a VM (bubblewrap) the worker binds volumes read-only itself;
        // a tree unpacked here is the run user's-proof by ownership alone.
        return Ok(());
    }
    mount(
        Some(dir),
        dir,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )?;
    mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
}

/// Handles one `UnpackTree` part; `current` is the unpack under way.
pub async fn handle_unpack(
    part: UnpackTree,
    current: &mut Option<Unpacking>,
    out: &mpsc::Sender<GuestMessage>,
) {
    if current.as_ref().is_some_and(|u| u.dest != part.dest) {
        let _ = out
            .send(error(format!(
                "{:?}: another tree is still being unpacked",
                part.dest
            )))
            .await;
        return;
    }
    if current.is_none() {
        match Unpacking::start(&part) {
            Ok(u) => *current = Some(u),
            Err(e) => {
                let _ = out.send(error(e)).await;
                return;
            }
        }
    }
    let Some(unpacking) = current.as_mut() else {
        return;
    };
    if let Some(tx) = &unpacking.parts {
        let data = part.data;
        let tx = tx.clone();
        // The thread may have stopped early (a refused entry): its error says why.
        let _ = tokio::task::spawn_blocking(move || tx.send(data)).await;
    }
    if !part.eof {
        return;
    }
    let Some(mut done) = current.take() else {
        return;
    };
    done.parts = None;
    let answer = match (&mut done.done).await {
        Ok(Ok((files, bytes))) => msg(guest_message::Kind::TreeUnpacked(TreeUnpacked {
            dest: done.dest,
            files,
            bytes,
        })),
        Ok(Err(e)) => error(e),
        Err(e) => error(format!("unpacking {} failed: {e}", done.dest)),
    };
    let _ = out.send(answer).await;
}

/// A `Write` that sends full parts to the host.
struct ToHost {
    src: String,
    buf: Vec<u8>,
    out: mpsc::Sender<GuestMessage>,
}

impl ToHost {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(PART));
        self.out
            .blocking_send(msg(guest_message::Kind::TreeData(TreeData {
                src: self.src.clone(),
                data,
                ..TreeData::default()
            })))
            .map_err(|_| std::io::Error::other("the host is gone"))
    }
}

impl std::io::Write for ToHost {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(PART - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == PART {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

/// Handles a `PackTree`: the archive's parts, then the last (empty, `eof`)
/// with what it holds.
pub async fn handle_pack(p: PackTree, out: &mpsc::Sender<GuestMessage>) {
    let src = PathBuf::from(&p.src);
    if !src.is_absolute() {
        let _ = out
            .send(error(format!("{:?}: tree paths must be absolute", p.src)))
            .await;
        return;
    }
    let limits = limits(p.max_bytes, p.max_files);
    let sink = ToHost {
        src: p.src.clone(),
        buf: Vec::with_capacity(PART),
        out: out.clone(),
    };
    let packed =
        tokio::task::spawn_blocking(move || vm0_storage::pack_dir_stored(&src, sink, &limits))
            .await;
    let answer = match packed {
        Ok(Ok(packed)) => msg(guest_message::Kind::TreeData(TreeData {
            src: p.src,
            data: Vec::new(),
            eof: true,
            files: packed.manifest.files().len() as u64,
            bytes: packed.manifest.total_bytes(),
            skipped: packed.skipped,
        })),
        Ok(Err(e)) => error(format!("packing {}: {e}", p.src)),
        Err(e) => error(format!("packing {} failed: {e}", p.src)),
    };
    let _ = out.send(answer).await;
}
