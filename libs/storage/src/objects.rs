//! Where versions' bytes live: a local directory (the default, under the data
//! dir) or an S3-compatible bucket (`VM0_OBJECT_STORE_URL=s3://bucket/prefix`,
//! with the usual `AWS_*` variables: `AWS_ENDPOINT_URL`, `AWS_REGION`,
//! `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ALLOW_HTTP`). Both are one
//! `object_store` behind the same calls, and every transfer streams: an
//! object is never whole in memory, only a few parts of it.

use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, WriteMultipart};
use sha2::{Digest, Sha256};

/// Parts written at once while an object streams in (each part is buffered).
const PARTS_IN_FLIGHT: usize = 4;
/// Size of a part (S3's minimum is 5 MiB, but for the last).
const PART_BYTES: usize = 8 << 20;

/// Why an object operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ObjectsError {
    #[error(
        "VM0_OBJECT_STORE_URL {0:?}: use s3://bucket[/prefix], or leave it unset for the local store"
    )]
    BadUrl(String),
    #[error("cannot open the object store at {at}")]
    Open {
        at: String,
        #[source]
        source: object_store::Error,
    },
    #[error("cannot create {0}")]
    LocalDir(String, #[source] std::io::Error),
    #[error("object {0} not found")]
    NotFound(String),
    #[error("object store operation on {key} failed")]
    Store {
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("reading the data for {key} failed")]
    Source {
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the data for {key} is {got} bytes, more than the {limit} allowed")]
    TooLarge { key: String, got: u64, limit: u64 },
}

/// An object written: its size and SHA-256 (lowercase hex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub size: u64,
    pub sha256: String,
}

/// The object store of a deployment.
#[derive(Clone, Debug)]
pub struct Objects {
    store: Arc<dyn ObjectStore>,
    /// The S3 store again, for presigned URLs; `None` for the local store,
    /// whose URLs the gateway serves and signs itself ([`crate::signed`]).
    presigner: Option<Arc<object_store::aws::AmazonS3>>,
    prefix: ObjectPath,
    /// Where, for logs (`local:/dir` or `s3://bucket/prefix`).
    pub describe: String,
}

impl Objects {
    /// The store `url` names (`s3://bucket/prefix`), or, without one, the
    /// directory `local_dir` (created if missing).
    pub fn open(url: Option<&str>, local_dir: &std::path::Path) -> Result<Objects, ObjectsError> {
        Self::open_with(url, local_dir, &[])
    }

    /// [`Objects::open`], with S3 settings given here (`aws_endpoint`,
    /// `aws_access_key_id`, ...: `object_store`'s config keys) over those of
    /// the environment.
    pub fn open_with(
        url: Option<&str>,
        local_dir: &std::path::Path,
        s3_config: &[(&str, &str)],
    ) -> Result<Objects, ObjectsError> {
        match url.filter(|u| !u.is_empty()) {
            None => {
                std::fs::create_dir_all(local_dir)
                    .map_err(|e| ObjectsError::LocalDir(local_dir.display().to_string(), e))?;
                let store = object_store::local::LocalFileSystem::new_with_prefix(local_dir)
                    .map_err(|source| ObjectsError::Open {
                        at: local_dir.display().to_string(),
                        source,
                    })?;
                Ok(Objects {
                    store: Arc::new(store),
                    presigner: None,
                    prefix: ObjectPath::default(),
                    describe: format!("local:{}", local_dir.display()),
                })
            }
            Some(url) => {
                let rest = url
                    .strip_prefix("s3://")
                    .ok_or_else(|| ObjectsError::BadUrl(url.to_owned()))?;
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(ObjectsError::BadUrl(url.to_owned()));
                }
                let mut builder =
                    object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
                for (key, value) in s3_config {
                    let key: object_store::aws::AmazonS3ConfigKey =
                        key.parse().map_err(|source| ObjectsError::Open {
                            at: url.to_owned(),
                            source,
                        })?;
                    builder = builder.with_config(key, *value);
                }
                let store = builder.build().map_err(|source| ObjectsError::Open {
                    at: url.to_owned(),
                    source,
                })?;
                let store = Arc::new(store);
                Ok(Objects {
                    store: store.clone(),
                    presigner: Some(store),
                    prefix: ObjectPath::from(prefix.trim_matches('/')),
                    describe: format!("s3://{bucket}/{}", prefix.trim_matches('/')),
                })
            }
        }
    }

    fn path(&self, key: &str) -> ObjectPath {
        let mut path = self.prefix.clone();
        for part in key.split('/') {
            path = path.child(part);
        }
        path
    }

    /// Writes `data` to `key`, streaming it in parts; refuses more than
    /// `limit` bytes (nothing is left at `key` then). Returns size and digest.
    /// Data shorter than one part is written in one request.
    pub async fn put_stream<S, E>(
        &self,
        key: &str,
        data: S,
        limit: u64,
    ) -> Result<Stored, ObjectsError>
    where
        S: Stream<Item = Result<Bytes, E>>,
        E: Into<std::io::Error>,
    {
        let store_err = |source| ObjectsError::Store {
            key: key.to_owned(),
            source,
        };
        let mut hash = Sha256::new();
        let mut size: u64 = 0;
        let mut data = std::pin::pin!(data);
        let mut next = async || -> Result<Option<Bytes>, ObjectsError> {
            let Some(chunk) = data.next().await else {
                return Ok(None);
            };
            let chunk = chunk.map_err(|e| ObjectsError::Source {
                key: key.to_owned(),
                source: e.into(),
            })?;
            size += chunk.len() as u64;
            if size > limit {
                return Err(ObjectsError::TooLarge {
                    key: key.to_owned(),
                    got: size,
                    limit,
                });
            }
            hash.update(&chunk);
            Ok(Some(chunk))
        };
        // Up to one part: one request.
        let mut head = Vec::new();
        let mut head_len = 0;
        let mut more = true;
        while head_len <= PART_BYTES {
            match next().await? {
                Some(chunk) => {
                    head_len += chunk.len();
                    head.push(chunk);
                }
                None => {
                    more = false;
                    break;
                }
            }
        }
        if !more {
            let payload: object_store::PutPayload = head.into_iter().collect();
            self.store
                .put(&self.path(key), payload)
                .await
                .map_err(store_err)?;
            return Ok(Stored {
                size,
                sha256: hex::encode(hash.finalize()),
            });
        }
        let upload = self
            .store
            .put_multipart(&self.path(key))
            .await
            .map_err(store_err)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        for chunk in head {
            writer.put(chunk);
        }
        let outcome: Result<(), ObjectsError> = async {
            while let Some(chunk) = next().await? {
                writer
                    .wait_for_capacity(PARTS_IN_FLIGHT)
                    .await
                    .map_err(store_err)?;
                writer.put(chunk);
            }
            Ok(())
        }
        .await;
        match outcome {
            Ok(()) => {
                writer.finish().await.map_err(store_err)?;
                Ok(Stored {
                    size,
                    sha256: hex::encode(hash.finalize()),
                })
            }
            Err(e) => {
                let _ = writer.abort().await;
                Err(e)
            }
        }
    }

    /// Writes `data` to `key` at once (manifests and other small objects).
    pub async fn put(&self, key: &str, data: Bytes) -> Result<(), ObjectsError> {
        self.store
            .put(&self.path(key), data.into())
            .await
            .map_err(|source| ObjectsError::Store {
                key: key.to_owned(),
                source,
            })?;
        Ok(())
    }

    /// The bytes of `key`, as they stream from the store.
    pub async fn get_stream(
        &self,
        key: &str,
    ) -> Result<impl Stream<Item = Result<Bytes, ObjectsError>> + use<>, ObjectsError> {
        let got = self.store.get(&self.path(key)).await.map_err(|e| match e {
            object_store::Error::NotFound { .. } => ObjectsError::NotFound(key.to_owned()),
            source => ObjectsError::Store {
                key: key.to_owned(),
                source,
            },
        })?;
        let owned = key.to_owned();
        Ok(got
            .into_stream()
            .map_err(move |source| ObjectsError::Store {
                key: owned.clone(),
                source,
            }))
    }

    /// The size of `key`, or `None` when it does not exist.
    pub async fn size(&self, key: &str) -> Result<Option<u64>, ObjectsError> {
        match self.store.head(&self.path(key)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(source) => Err(ObjectsError::Store {
                key: key.to_owned(),
                source,
            }),
        }
    }

    /// A presigned URL allowing `access` to `key` for `expires_in`, when the
    /// store makes them (S3); `None` for the local store.
    pub async fn presigned_url(
        &self,
        access: crate::signed::Access,
        key: &str,
        expires_in: std::time::Duration,
    ) -> Result<Option<String>, ObjectsError> {
        use object_store::signer::Signer;
        let Some(s3) = &self.presigner else {
            return Ok(None);
        };
        let method = match access {
            crate::signed::Access::Get => http::Method::GET,
            crate::signed::Access::Put => http::Method::PUT,
        };
        let url = s3
            .signed_url(method, &self.path(key), expires_in)
            .await
            .map_err(|source| ObjectsError::Store {
                key: key.to_owned(),
                source,
            })?;
        Ok(Some(url.to_string()))
    }

    /// Moves `from` to `to`, replacing what is there (S3: a copy inside the
    /// store, no bytes through this process).
    pub async fn rename(&self, from: &str, to: &str) -> Result<(), ObjectsError> {
        self.store
            .rename(&self.path(from), &self.path(to))
            .await
            .map_err(|e| match e {
                object_store::Error::NotFound { .. } => ObjectsError::NotFound(from.to_owned()),
                source => ObjectsError::Store {
                    key: from.to_owned(),
                    source,
                },
            })
    }

    /// Deletes every object under `prefix/` (none is fine).
    pub async fn delete_prefix(&self, prefix: &str) -> Result<(), ObjectsError> {
        let store_err = |source| ObjectsError::Store {
            key: prefix.to_owned(),
            source,
        };
        let listed = self
            .store
            .list(Some(&self.path(prefix)))
            .map_ok(|meta| meta.location)
            .boxed();
        let mut deleted = self.store.delete_stream(listed);
        while let Some(done) = deleted.next().await {
            match done {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(source) => return Err(store_err(source)),
            }
        }
        Ok(())
    }

    /// Deletes `key` (absent is fine).
    pub async fn delete(&self, key: &str) -> Result<(), ObjectsError> {
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(ObjectsError::Store {
                key: key.to_owned(),
                source,
            }),
        }
    }
}
