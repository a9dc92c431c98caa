//! File transfer between host and guest (`WriteFile`, `ReadFile`): the run's inputs
//! before the command starts, its outputs after it ended.

use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use vm0_proto::guest::{
    FileData, FileWritten, GuestError, GuestMessage, ReadFile, WriteFile, guest_message,
};

/// Parts of a file read for the host (well under the 1 MiB frame limit).
const READ_PART: usize = 256 * 1024;

fn msg(kind: guest_message::Kind) -> GuestMessage {
    GuestMessage { kind: Some(kind) }
}

fn error(message: String) -> GuestMessage {
    msg(guest_message::Kind::Error(GuestError { message }))
}

fn absolute(path: &str) -> Result<&Path, String> {
    let p = Path::new(path);
    if p.is_absolute() {
        Ok(p)
    } else {
        Err(format!("{path:?}: file paths must be absolute"))
    }
}

async fn write(w: &WriteFile) -> Result<u64, String> {
    let path = absolute(&w.path)?;
    let fail = |e: std::io::Error| format!("writing {}: {e}", w.path);
    if let Some(dir) = path.parent() {
        // The directories this creates belong to the run user, like the file.
        let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
        tokio::fs::create_dir_all(dir).await.map_err(fail)?;
        for d in missing {
            crate::run_user::give_to_run_user(d).map_err(fail)?;
        }
    }
    let mode = if w.mode == 0 { 0o644 } else { w.mode & 0o7777 };
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .append(w.append)
        .truncate(!w.append)
        .mode(mode)
        .open(path)
        .await
        .map_err(fail)?;
    file.write_all(&w.data).await.map_err(fail)?;
    file.flush().await.map_err(fail)?;
    crate::run_user::give_to_run_user(path).map_err(fail)?;
    Ok(file.metadata().await.map_err(fail)?.len())
}

/// Handles a `WriteFile`, answering on `out`.
pub async fn handle_write(w: WriteFile, out: &mpsc::Sender<GuestMessage>) {
    let answer = match write(&w).await {
        Ok(size) => msg(guest_message::Kind::FileWritten(FileWritten {
            path: w.path,
            size,
        })),
        Err(e) => error(e),
    };
    let _ = out.send(answer).await;
}

/// Handles a `ReadFile`: the file's parts, the last marked `eof`.
pub async fn handle_read(r: ReadFile, out: &mpsc::Sender<GuestMessage>) {
    let file = match absolute(&r.path) {
        Ok(p) => tokio::fs::File::open(p)
            .await
            .map_err(|e| format!("reading {}: {e}", r.path)),
        Err(e) => Err(e),
    };
    let mut file = match file {
        Ok(f) => f,
        Err(e) => {
            let _ = out.send(error(e)).await;
            return;
        }
    };
    let mut buf = vec![0u8; READ_PART];
    loop {
        // Fill a whole part unless the file ends, so that eof rides on the last.
        let mut filled = 0;
        while filled < buf.len() {
            match file.read(&mut buf[filled..]).await {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) => {
                    let _ = out.send(error(format!("reading {}: {e}", r.path))).await;
                    return;
                }
            }
        }
        let eof = filled < buf.len();
        let part = FileData {
            path: r.path.clone(),
            data: buf[..filled].to_vec(),
            eof,
        };
        if out
            .send(msg(guest_message::Kind::FileData(part)))
            .await
            .is_err()
            || eof
        {
            return;
        }
    }
}
