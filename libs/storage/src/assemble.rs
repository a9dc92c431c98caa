//! A version's archive assembled from objects already in the store (the files
//! of an upload): one pass that reads each object, hashes it and writes it into
//! the `.tar.gz`, which streams into the store as it is made. Memory stays a few
//! buffers, whatever the sizes.

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::io::{StreamReader, SyncIoBridge};

use crate::archive::ArchiveWriter;
use crate::objects::{Objects, ObjectsError};

/// Bytes handed to the store at a time.
const CHUNK_BYTES: usize = 1 << 20;
/// Chunks between the archiver and the store.
const CHUNKS_IN_FLIGHT: usize = 4;

/// One file of the archive: its path in the version, its size, and where its
/// bytes are (`None` for an empty file, which has no object), or the target of
/// a symbolic link.
#[derive(Debug, Clone, Default)]
pub struct Part {
    pub path: String,
    pub size: u64,
    pub key: Option<String>,
    pub link: Option<String>,
}

/// Why the archive could not be made.
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error(transparent)]
    Objects(#[from] ObjectsError),
    #[error("{path}: {source}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the archiver stopped: {0}")]
    Archiver(String),
}

/// A `Write` that hands full chunks to an async receiver (blocking when it
/// is behind).
struct ChunkSender {
    buf: Vec<u8>,
    tx: mpsc::Sender<std::io::Result<Bytes>>,
}

impl ChunkSender {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(CHUNK_BYTES),
        ));
        self.tx.blocking_send(Ok(chunk)).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the store stopped reading")
        })
    }
}

impl std::io::Write for ChunkSender {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(CHUNK_BYTES - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK_BYTES {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

/// Files at most this big are read whole ahead of the archiver, several at a
/// time (with S3 a small file costs a round trip, not bandwidth); larger ones
/// stream when their turn comes.
const SMALL_FILE_BYTES: u64 = 256 << 10;
/// Files fetched ahead of the one being archived.
const FETCH_AHEAD: usize = 16;

/// A part's bytes as the archiver gets them.
enum Source {
    Link(String),
    Empty,
    Whole(Bytes),
    Stream(std::pin::Pin<Box<dyn futures::Stream<Item = Result<Bytes, ObjectsError>> + Send>>),
}

/// Writes the archive of `parts` (in the order given: path order) to
/// `dest`; returns each part's SHA-256 in the same order. A part whose object
/// is missing or not of its size fails the whole (nothing is left at `dest`).
pub async fn archive_objects(
    objects: &Objects,
    parts: Vec<Part>,
    dest: &str,
) -> Result<Vec<String>, AssembleError> {
    let expected = parts.len();
    let (tx, rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
    let (src_tx, mut src_rx) = mpsc::channel::<Result<(Part, Source), ObjectsError>>(FETCH_AHEAD);
    let handle = tokio::runtime::Handle::current();
    // Fetches ahead, in order, while the archiver works.
    let fetcher = {
        let objects = objects.clone();
        tokio::spawn(async move {
            let mut fetched = futures::stream::iter(parts)
                .map(|part| {
                    let objects = objects.clone();
                    async move {
                        let source = match (&part.link, &part.key) {
                            (Some(target), _) => Source::Link(target.clone()),
                            (None, None) => Source::Empty,
                            (None, Some(key)) if part.size <= SMALL_FILE_BYTES => {
                                let chunks: Vec<Bytes> =
                                    objects.get_stream(key).await?.try_collect().await?;
                                Source::Whole(Bytes::from(chunks.concat()))
                            }
                            (None, Some(key)) => {
                                Source::Stream(Box::pin(objects.get_stream(key).await?))
                            }
                        };
                        Ok((part, source))
                    }
                })
                .buffered(FETCH_AHEAD);
            while let Some(next) = fetched.next().await {
                let failed = next.is_err();
                if src_tx.send(next).await.is_err() || failed {
                    break;
                }
            }
        })
    };
    let archiver = tokio::task::spawn_blocking(move || -> Result<Vec<String>, AssembleError> {
        let mut out = ArchiveWriter::new(ChunkSender {
            buf: Vec::with_capacity(CHUNK_BYTES),
            tx,
        });
        let mut digests = Vec::new();
        while let Some(next) = src_rx.blocking_recv() {
            let (part, source) = next?;
            let file_err = |source| AssembleError::File {
                path: part.path.clone(),
                source,
            };
            let digest = match source {
                Source::Link(target) => out.add_link(&part.path, &target).map(|()| {
                    use sha2::Digest;
                    hex::encode(sha2::Sha256::digest(target.as_bytes()))
                }),
                Source::Empty => out.add_file(&part.path, part.size, 0o644, std::io::empty()),
                Source::Whole(bytes) => out.add_file(&part.path, part.size, 0o644, &bytes[..]),
                Source::Stream(stream) => {
                    let reader = StreamReader::new(stream.map_err(std::io::Error::other));
                    let reader = SyncIoBridge::new_with_handle(reader, handle.clone());
                    out.add_file(&part.path, part.size, 0o644, reader)
                }
            }
            .map_err(file_err)?;
            digests.push(digest);
        }
        if digests.len() != expected {
            return Err(AssembleError::Archiver(format!(
                "the fetcher stopped after {} of {expected} files",
                digests.len()
            )));
        }
        out.finish()
            .map_err(|e| AssembleError::Archiver(e.to_string()))?;
        Ok(digests)
    });
    let written = objects
        .put_stream(dest, ReceiverStream::new(rx), u64::MAX)
        .await;
    let digests = archiver
        .await
        .map_err(|e| AssembleError::Archiver(e.to_string()));
    fetcher.abort();
    let digests = digests.and_then(|d| d);
    let failed = match (digests, written) {
        (Ok(digests), Ok(_)) => return Ok(digests),
        // The archiver stops when the store stops reading: the store's error
        // is the cause then.
        (Err(e), Err(store)) if e.is_broken_pipe() => AssembleError::Objects(store),
        (Err(e), _) => e,
        (Ok(_), Err(store)) => AssembleError::Objects(store),
    };
    let _ = objects.delete(dest).await;
    Err(failed)
}

impl AssembleError {
    fn is_broken_pipe(&self) -> bool {
        matches!(self, AssembleError::File { source, .. } if source.kind() == std::io::ErrorKind::BrokenPipe)
            || matches!(self, AssembleError::Archiver(_))
    }
}
