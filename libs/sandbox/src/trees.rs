//! The host side of moving directory trees through the guest agent
//! (`UnpackTree`, `PackTree`): every backend's inputs (a volume, the
//! artifact's version) before `Start`, and its outputs (`/work`, the state
//! directory) after `Exited`. What comes out is bounded here and checked
//! again by the worker: the guest is not trusted.

use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use vm0_proto::frame;
use vm0_proto::guest::{
    GuestMessage, HostMessage, PackTree, UnpackTree, guest_message, host_message,
};

use crate::microvm::GuestLink;
use crate::{SandboxEvent, TreeIn, TreeOut, TreeTaken};

/// Parts of an archive sent to the guest (well under the 1 MiB frame limit).
const PART: usize = 512 * 1024;
/// The longest one tree may take to move, either way (a guest that stalls
/// does not hold the run forever).
const TREE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// An archive a little larger than the files it holds (headers, incompressible
/// data) is fine; much larger is a guest misbehaving.
fn archive_limit(max_bytes: u64, max_files: u64) -> u64 {
    max_bytes
        .saturating_add(max_bytes / 16)
        .saturating_add(max_files.saturating_mul(1024))
        .saturating_add(1 << 20)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// Unpacks each tree into the guest; a log line for each, with size and time.
pub(crate) async fn send_trees(
    link: &mut GuestLink,
    trees: &[&TreeIn],
    events: &mpsc::Sender<SandboxEvent>,
) -> Result<(), String> {
    for tree in trees {
        tokio::time::timeout(TREE_TIMEOUT, send_tree(link, tree, events))
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "placing {} in the sandbox took over {} s",
                    tree.dest,
                    TREE_TIMEOUT.as_secs()
                ))
            })?;
    }
    Ok(())
}

async fn send_tree(
    link: &mut GuestLink,
    tree: &TreeIn,
    events: &mpsc::Sender<SandboxEvent>,
) -> Result<(), String> {
    {
        let started = Instant::now();
        let fail = |why: String| format!("placing {} in the sandbox failed: {why}", tree.dest);
        let mut file = tokio::fs::File::open(&tree.archive)
            .await
            .map_err(|e| fail(format!("{}: {e}", tree.archive.display())))?;
        let mut sent: u64 = 0;
        let mut buf = vec![0u8; PART];
        loop {
            let mut filled = 0;
            while filled < buf.len() {
                match file.read(&mut buf[filled..]).await {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) => return Err(fail(format!("reading the archive: {e}"))),
                }
            }
            let eof = filled < buf.len();
            sent += filled as u64;
            let part = HostMessage {
                kind: Some(host_message::Kind::UnpackTree(UnpackTree {
                    dest: tree.dest.clone(),
                    data: buf[..filled].to_vec(),
                    eof,
                    read_only: tree.read_only,
                    max_bytes: tree.max_bytes,
                    max_files: tree.max_files,
                })),
            };
            frame::write(&mut link.tx, &part)
                .await
                .map_err(|e| fail(e.to_string()))?;
            if eof {
                break;
            }
        }
        loop {
            match frame::read::<GuestMessage, _>(&mut link.rx).await {
                Ok(Some(GuestMessage {
                    kind: Some(guest_message::Kind::TreeUnpacked(done)),
                })) => {
                    let line = format!(
                        "{}: {} files, {} ({} archive) placed in {} ms",
                        tree.dest,
                        done.files,
                        mib(done.bytes),
                        mib(sent),
                        started.elapsed().as_millis()
                    );
                    let _ = events.send(SandboxEvent::Log(line)).await;
                    break;
                }
                Ok(Some(GuestMessage {
                    kind: Some(guest_message::Kind::Error(e)),
                })) => return Err(fail(e.message)),
                Ok(Some(GuestMessage {
                    kind: Some(guest_message::Kind::Pong(_)),
                })) => {}
                Ok(other) => return Err(fail(format!("unexpected answer {other:?}"))),
                Err(e) => return Err(fail(e.to_string())),
            }
        }
    }
    Ok(())
}

/// Takes one tree out of the guest into its host archive, bounded.
async fn take_tree(link: &mut GuestLink, tree: &TreeOut) -> Result<TreeTaken, String> {
    let started = Instant::now();
    let ask = HostMessage {
        kind: Some(host_message::Kind::PackTree(PackTree {
            src: tree.src.clone(),
            max_bytes: tree.max_bytes,
            max_files: tree.max_files,
        })),
    };
    frame::write(&mut link.tx, &ask)
        .await
        .map_err(|e| e.to_string())?;
    let mut file = tokio::fs::File::create(&tree.archive)
        .await
        .map_err(|e| format!("{}: {e}", tree.archive.display()))?;
    let limit = archive_limit(tree.max_bytes, tree.max_files);
    let mut written: u64 = 0;
    loop {
        let part = match frame::read::<GuestMessage, _>(&mut link.rx).await {
            Ok(Some(GuestMessage {
                kind: Some(guest_message::Kind::TreeData(part)),
            })) if part.src == tree.src => part,
            Ok(Some(GuestMessage {
                kind: Some(guest_message::Kind::Error(e)),
            })) => return Err(e.message),
            // Late output or a pong is not part of the archive.
            Ok(Some(GuestMessage {
                kind: Some(guest_message::Kind::Output(_) | guest_message::Kind::Pong(_)),
            })) => continue,
            Ok(other) => return Err(format!("unexpected message {other:?}")),
            Err(e) => return Err(e.to_string()),
        };
        written += part.data.len() as u64;
        if written > limit {
            return Err(format!(
                "the archive passed {} for files of at most {}",
                mib(limit),
                mib(tree.max_bytes)
            ));
        }
        file.write_all(&part.data)
            .await
            .map_err(|e| format!("{}: {e}", tree.archive.display()))?;
        if part.eof {
            file.flush()
                .await
                .map_err(|e| format!("{}: {e}", tree.archive.display()))?;
            return Ok(TreeTaken {
                archive_bytes: written,
                files: part.files,
                bytes: part.bytes,
                skipped: part.skipped.into_iter().take(100).collect(),
                took: started.elapsed(),
            });
        }
    }
}

/// Takes every tree out, reporting each; after a failure of the channel the
/// rest fail too (with the same reason).
pub(crate) async fn take_trees(
    link: &mut GuestLink,
    trees: &[TreeOut],
    events: &mpsc::Sender<SandboxEvent>,
) {
    for tree in trees {
        let result = tokio::time::timeout(TREE_TIMEOUT, take_tree(link, tree))
            .await
            .unwrap_or_else(|_| Err(format!("took over {} s", TREE_TIMEOUT.as_secs())));
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tree.archive).await;
        }
        let _ = events
            .send(SandboxEvent::TreeSaved {
                src: tree.src.clone(),
                result,
            })
            .await;
    }
}
