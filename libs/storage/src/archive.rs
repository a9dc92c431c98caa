//! A version's bytes: one gzip-compressed tar of its files (regular files and
//! symbolic links, no directories of their own, no owners).
//!
//! [`pack_dir`] makes one from a directory (what a run left in `/work`): it
//! never follows a link, and skips what is not a file or a link (sockets,
//! FIFOs, devices) and names no path may have, saying so. [`unpack`] writes
//! one into an empty directory and trusts nothing in it: each path passes
//! [`crate::paths`], nothing is written through a link or outside the
//! directory, only files, links and directories are taken, and the limits hold
//! however the archive claims its sizes. Both are blocking: run them on a
//! blocking thread.

use std::io::{Read, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::manifest::{FileEntry, Limits, Manifest, ManifestError};
use crate::paths;

/// Why an archive could not be made or taken.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the archive is not a gzip-compressed tar")]
    Corrupt(#[source] std::io::Error),
    #[error("archive entry {path:?}: {why}")]
    Refused { path: String, why: String },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ArchiveError {
    let path = path.display().to_string();
    move |source| ArchiveError::Io { what, path, source }
}

/// What [`pack_dir`] made.
#[derive(Debug)]
pub struct Packed {
    pub manifest: Manifest,
    /// One line per entry left out, saying why (for the run's system log).
    pub skipped: Vec<String>,
}

/// Reads through to a hash.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
    read: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

/// Writes a version's archive entry by entry, in the order given (path order,
/// for an archive that is the same for the same content): regular files with
/// their executable bit and links, no owners, no times.
pub struct ArchiveWriter<W: Write> {
    tar: tar::Builder<flate2::write::GzEncoder<W>>,
}

impl<W: Write> ArchiveWriter<W> {
    pub fn new(out: W) -> ArchiveWriter<W> {
        Self::with_compression(out, flate2::Compression::fast())
    }

    /// Gzip's stored blocks, not compressed: still a `.tar.gz`, for a stream
    /// between processes where compressing costs more than it saves.
    pub fn stored(out: W) -> ArchiveWriter<W> {
        Self::with_compression(out, flate2::Compression::none())
    }

    fn with_compression(out: W, level: flate2::Compression) -> ArchiveWriter<W> {
        let gz = flate2::write::GzEncoder::new(out, level);
        let mut tar = tar::Builder::new(gz);
        tar.follow_symlinks(false);
        ArchiveWriter { tar }
    }

    /// Appends the file `path` of exactly `size` bytes read from `content`
    /// (fewer or more is an error); returns its SHA-256 (lowercase hex).
    pub fn add_file<R: Read>(
        &mut self,
        path: &str,
        size: u64,
        mode: u32,
        content: R,
    ) -> std::io::Result<String> {
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(size);
        header.set_mode(if mode & 0o111 != 0 { 0o755 } else { 0o644 });
        let mut reader = Hashing {
            inner: content.take(size),
            hash: Sha256::new(),
            read: 0,
        };
        self.tar.append_data(&mut header, path, &mut reader)?;
        // The header says `size`: a longer source is an error, not a cut file.
        let extra = reader.inner.into_inner().read(&mut [0u8; 1])?;
        if reader.read != size || extra != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{path}: {} {} bytes where {size} were expected",
                    if extra != 0 { "more than" } else { "only" },
                    reader.read
                ),
            ));
        }
        Ok(hex::encode(reader.hash.finalize()))
    }

    /// Appends the symbolic link `path` → `target`.
    pub fn add_link(&mut self, path: &str, target: &str) -> std::io::Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_size(0);
        header.set_mode(0o777);
        self.tar.append_link(&mut header, path, target)
    }

    /// Ends the archive and flushes it to the writer.
    pub fn finish(self) -> std::io::Result<W> {
        let mut out = self.tar.into_inner()?.finish()?;
        out.flush()?;
        Ok(out)
    }
}

/// Writes the files and links under `root` to `out` as a `.tar.gz`, in path
/// order; returns their manifest.
pub fn pack_dir<W: Write>(root: &Path, out: W, limits: &Limits) -> Result<Packed, ArchiveError> {
    pack_into(root, ArchiveWriter::new(out), limits)
}

/// [`pack_dir`] without compression (gzip's stored blocks): what a sandbox
/// sends the host, which checks it and compresses what it keeps once.
pub fn pack_dir_stored<W: Write>(
    root: &Path,
    out: W,
    limits: &Limits,
) -> Result<Packed, ArchiveError> {
    pack_into(root, ArchiveWriter::stored(out), limits)
}

fn pack_into<W: Write>(
    root: &Path,
    mut tar: ArchiveWriter<W>,
    limits: &Limits,
) -> Result<Packed, ArchiveError> {
    let mut found = Vec::new();
    let mut skipped = Vec::new();
    walk(root, "", &mut found, &mut skipped)?;
    found.sort();
    if found.len() > limits.max_files {
        return Err(ManifestError::TooManyFiles {
            count: found.len(),
            max: limits.max_files,
        }
        .into());
    }
    let mut entries = Vec::with_capacity(found.len());
    let mut total: u64 = 0;
    for rel in found {
        let full = root.join(&rel);
        let meta = std::fs::symlink_metadata(&full).map_err(io("reading", &full))?;
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&full).map_err(io("reading the link", &full))?;
            let Some(target) = target.to_str().filter(|t| !t.contains(char::is_control)) else {
                skipped.push(format!(
                    "{rel}: a link whose target is not printable text, skipped"
                ));
                continue;
            };
            tar.add_link(&rel, target).map_err(io("archiving", &full))?;
            entries.push(FileEntry::symlink(rel, target));
            continue;
        }
        use std::os::unix::fs::PermissionsExt;
        total = total.saturating_add(meta.len());
        if meta.len() > limits.max_file_bytes {
            return Err(ManifestError::FileTooLarge {
                index: entries.len(),
                path: rel,
                size: meta.len(),
                max: limits.max_file_bytes,
            }
            .into());
        }
        if total > limits.max_total_bytes {
            return Err(ManifestError::TotalTooLarge {
                size: total,
                max: limits.max_total_bytes,
            }
            .into());
        }
        let file = std::fs::File::open(&full).map_err(io("opening", &full))?;
        let sha256 = tar
            .add_file(&rel, meta.len(), meta.permissions().mode(), file)
            .map_err(io("archiving", &full))?;
        entries.push(FileEntry {
            path: rel,
            size: meta.len(),
            sha256,
            link: None,
        });
    }
    tar.finish().map_err(io("finishing the archive of", root))?;
    Ok(Packed {
        manifest: Manifest::new(entries, limits)?,
        skipped,
    })
}

/// Files and links under `dir`, relative to the root (`prefix`), not
/// following links.
fn walk(
    dir: &Path,
    prefix: &str,
    found: &mut Vec<String>,
    skipped: &mut Vec<String>,
) -> Result<(), ArchiveError> {
    let listing = std::fs::read_dir(dir).map_err(io("listing", dir))?;
    for entry in listing {
        let entry = entry.map_err(io("listing", dir))?;
        let name = entry.file_name();
        let shown = name.to_string_lossy().into_owned();
        let rel = match name.to_str() {
            Some(n) if prefix.is_empty() => n.to_owned(),
            Some(n) => format!("{prefix}/{n}"),
            None => {
                skipped.push(format!(
                    "{prefix}/{shown}: a name that is not UTF-8, skipped"
                ));
                continue;
            }
        };
        if let Err(why) = paths::check(&rel) {
            skipped.push(format!("{rel:?}: {why}, skipped"));
            continue;
        }
        let kind = entry.file_type().map_err(io("reading", &entry.path()))?;
        if kind.is_dir() {
            walk(&entry.path(), &rel, found, skipped)?;
        } else if kind.is_file() || kind.is_symlink() {
            found.push(rel);
        } else {
            skipped.push(format!("{rel}: not a file, a directory or a link, skipped"));
        }
    }
    Ok(())
}

/// Writes the archive `input` into `dest` (created; it must not exist or be
/// empty); returns the manifest of what it held.
pub fn unpack<R: Read>(input: R, dest: &Path, limits: &Limits) -> Result<Manifest, ArchiveError> {
    std::fs::create_dir_all(dest).map_err(io("creating", dest))?;
    if std::fs::read_dir(dest)
        .map_err(io("listing", dest))?
        .next()
        .is_some()
    {
        return Err(ArchiveError::Refused {
            path: dest.display().to_string(),
            why: "the directory to unpack into is not empty".into(),
        });
    }
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(input));
    let mut entries = Vec::new();
    let mut total: u64 = 0;
    for entry in archive.entries().map_err(ArchiveError::Corrupt)? {
        let mut entry = entry.map_err(ArchiveError::Corrupt)?;
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let refused = |why: String| ArchiveError::Refused {
            path: shown.clone(),
            why,
        };
        let rel = std::str::from_utf8(&raw)
            .map_err(|_| refused("the path is not UTF-8".into()))?
            .trim_end_matches('/')
            .to_owned();
        let parts = paths::check(&rel).map_err(|why| refused(why.to_string()))?;
        if entries.len() >= limits.max_files {
            return Err(ManifestError::TooManyFiles {
                count: entries.len() + 1,
                max: limits.max_files,
            }
            .into());
        }
        let target = dest.join(&rel);
        let kind = entry.header().entry_type();
        match kind {
            tar::EntryType::Directory => {
                real_dirs(dest, &parts, parts.len()).map_err(&refused)?;
            }
            tar::EntryType::Regular | tar::EntryType::GNUSparse | tar::EntryType::Continuous => {
                real_dirs(dest, &parts, parts.len() - 1).map_err(&refused)?;
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&target)
                    .map_err(|e| match e.kind() {
                        std::io::ErrorKind::AlreadyExists => {
                            refused("listed twice, or a directory already".into())
                        }
                        _ => refused(format!("cannot be written: {e}")),
                    })?;
                let mode = entry.header().mode().unwrap_or(0o644) & 0o755;
                let claimed = entry.size();
                // The header's size is a claim: what is read counts.
                let room = limits
                    .max_file_bytes
                    .min(limits.max_total_bytes.saturating_sub(total));
                let mut reader = Hashing {
                    inner: (&mut entry).take(room.saturating_add(1)),
                    hash: Sha256::new(),
                    read: 0,
                };
                std::io::copy(&mut reader, &mut file).map_err(io("writing", &target))?;
                let (read, digest) = (reader.read, reader.hash.finalize());
                if read > room {
                    return Err(if read > limits.max_file_bytes {
                        ManifestError::FileTooLarge {
                            index: entries.len(),
                            path: rel,
                            size: read.max(claimed),
                            max: limits.max_file_bytes,
                        }
                    } else {
                        ManifestError::TotalTooLarge {
                            size: total.saturating_add(read),
                            max: limits.max_total_bytes,
                        }
                    }
                    .into());
                }
                total += read;
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode | 0o400))
                    .map_err(io("writing", &target))?;
                entries.push(FileEntry {
                    path: rel,
                    size: read,
                    sha256: hex::encode(digest),
                    link: None,
                });
            }
            tar::EntryType::Symlink => {
                real_dirs(dest, &parts, parts.len() - 1).map_err(&refused)?;
                let link = entry
                    .link_name_bytes()
                    .ok_or_else(|| refused("a link without a target".into()))?;
                let link = std::str::from_utf8(&link)
                    .ok()
                    .filter(|t| !t.is_empty() && !t.contains(char::is_control))
                    .ok_or_else(|| refused("a link's target is not printable text".into()))?
                    .to_owned();
                std::os::unix::fs::symlink(&link, &target)
                    .map_err(|e| refused(format!("cannot be written: {e}")))?;
                entries.push(FileEntry::symlink(rel, &link));
            }
            other => {
                return Err(refused(format!(
                    "a {other:?} entry: only files, links and directories are taken"
                )));
            }
        }
    }
    Ok(Manifest::new(entries, limits)?)
}

/// Makes `parts[..depth]` real directories under `dest`: each is created or
/// must already be a directory, never a link (a link made by an earlier entry
/// must not carry a later one elsewhere).
fn real_dirs(dest: &Path, parts: &[&str], depth: usize) -> Result<(), String> {
    let mut at = dest.to_path_buf();
    for part in &parts[..depth] {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_dir() => {}
            Ok(_) => {
                return Err(format!(
                    "{part:?} is already a file or a link, not a directory"
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&at).map_err(|e| format!("cannot be written: {e}"))?;
            }
            Err(e) => return Err(format!("cannot be written: {e}")),
        }
    }
    Ok(())
}
