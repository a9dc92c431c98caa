//! Volumes' and artifacts' bytes: where they are in the object store, the
//! signed URLs that reach them, and the commit that turns an upload into a
//! version.
//!
//! Keys, all under the storage's own prefix (deleting it deletes them):
//! - `storages/<id>/uploads/<upl>/<n>`: file `n` of an upload, as the client
//!   PUT it; once committed, the version's file itself (per-file URLs point
//!   there: no copy is made);
//! - `storages/<id>/uploads/<upl>/archive.tar.gz`: the archive while a commit
//!   assembles it;
//! - `storages/<id>/versions/<version>.tar.gz` and `.json`: a version's
//!   archive and its file list ([`StoredVersion`]).
//!
//! With S3 the URLs are S3's presigned ones; with the local store the gateway
//! serves `/v1/objects/<key>` itself, signed with [`UrlSigner`] and checked in
//! [`crate::routes::objects`].

use std::time::Duration;

use axum::http::HeaderMap;
use futures::{StreamExt, TryStreamExt};
use vm0_api_types::Timestamp;
use vm0_db::entity::{storage, storage_upload, storage_version};
use vm0_db::{StorageKind, Store};
use vm0_storage::{
    Access, AssembleError, FileEntry, Grant, Limits, Manifest, ManifestError, Objects,
    ObjectsError, Part, UrlSigner, VersionPrefix,
};

use crate::error::{ApiError, ApiResult};

/// Where a version's pieces are.
pub mod keys {
    pub fn storage_dir(storage: &str) -> String {
        format!("storages/{storage}")
    }
    pub fn upload_dir(storage: &str, upload: &str) -> String {
        format!("storages/{storage}/uploads/{upload}")
    }
    pub fn staged(storage: &str, upload: &str, index: usize) -> String {
        format!("storages/{storage}/uploads/{upload}/{index}")
    }
    pub fn assembling(storage: &str, upload: &str) -> String {
        format!("storages/{storage}/uploads/{upload}/archive.tar.gz")
    }
    pub fn archive(storage: &str, version: &str) -> String {
        format!("storages/{storage}/versions/{version}.tar.gz")
    }
    pub fn manifest(storage: &str, version: &str) -> String {
        format!("storages/{storage}/versions/{version}.json")
    }

    /// `(upload id, file index)` of a staged file's key.
    pub fn parse_staged(key: &str) -> Option<(&str, usize)> {
        let rest = key.strip_prefix("storages/")?;
        let (_storage, rest) = rest.split_once("/uploads/")?;
        let (upload, index) = rest.split_once('/')?;
        Some((upload, index.parse().ok()?))
    }
}

/// What `versions/<version>.json` holds: the files, and the upload whose
/// objects are their bytes (file `index` of it).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StoredVersion {
    pub upload: String,
    pub files: Vec<StoredFile>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StoredFile {
    #[serde(flatten)]
    pub entry: FileEntry,
    /// Its object: file `index` of the upload (none for a link).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
}

/// The storage settings and handles every handler shares.
#[derive(Clone, Debug)]
pub struct StorageService {
    pub objects: Objects,
    pub signer: UrlSigner,
    pub limits: Limits,
    /// How long a signed URL (and an upload session) lasts.
    pub url_ttl: Duration,
    /// `VM0_PUBLIC_URL`: the base of the gateway's own signed URLs; without it,
    /// the `Host` the request came to, or (for workers) the address the API
    /// listens on.
    pub public_url: Option<String>,
    pub listen_addr: std::net::SocketAddr,
}

/// A file an upload announced (stored as JSON in `storage_uploads.files`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Announced {
    pub path: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// A symbolic link's target: no bytes to upload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

impl Announced {
    /// Whether a PUT brings its bytes (links and empty files have none).
    pub fn needs_upload(&self) -> bool {
        self.link.is_none() && self.size > 0
    }
}

pub fn objects_error(e: ObjectsError) -> ApiError {
    tracing::error!(error = %crate::error::ErrorChain(&e), "object store operation failed");
    ApiError::unavailable(
        "The object store did not answer as expected; retry shortly (the cause is logged)",
    )
}

/// The API error of a file list that is not a version.
pub fn manifest_error(e: &ManifestError) -> ApiError {
    // One file's fault names its field; `files` alone is the list as a whole
    // (duplicates, a file that is also a directory, the totals).
    let field = match e {
        ManifestError::BadDigest { .. } => "sha256",
        ManifestError::BadLink { .. } => "link",
        ManifestError::FileTooLarge { .. } => "size",
        _ => "path",
    };
    let param = match e.index() {
        Some(index) => format!("files[{index}].{field}"),
        None => "files".to_owned(),
    };
    if e.is_too_large() {
        ApiError::payload_too_large(0)
            .with_message(format!("{e} (a limit of this deployment)"))
            .with_param(param)
    } else {
        ApiError::invalid(param, e.to_string())
    }
}

/// SHA-256 of no bytes: what an empty file's digest is.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// What one entry must be on its own, beyond the manifest's checks: a size
/// within `int64`, a digest given well formed even on a link (whose size and digest are its
/// target's, derived here), and an empty file's is that of nothing (no PUT
/// will come to prove otherwise).
fn check_announced(index: usize, f: &Announced) -> ApiResult<()> {
    // The document's `int64`, which is also what the store keeps.
    if i64::try_from(f.size).is_err() {
        return Err(ApiError::invalid(
            format!("files[{index}].size"),
            format!("file {:?}: size is at most {}", f.path, i64::MAX),
        ));
    }
    let Some(sha) = &f.sha256 else {
        return Ok(());
    };
    let param = || format!("files[{index}].sha256");
    if !vm0_storage::manifest::is_sha256_hex(sha) {
        return Err(ApiError::invalid(
            param(),
            format!(
                "file {:?}: sha256 must be 64 lowercase hex characters",
                f.path
            ),
        ));
    }
    if f.link.is_none() && f.size == 0 && sha != EMPTY_SHA256 {
        return Err(ApiError::invalid(
            param(),
            format!(
                "file {:?} is empty: its SHA-256 is {EMPTY_SHA256}, not {sha}",
                f.path
            ),
        ));
    }
    Ok(())
}

impl StorageService {
    /// The base of URLs this gateway serves: as the client reached it (its
    /// `Host`), or for a worker (`None`) where the API listens.
    pub fn base(&self, headers: Option<&HeaderMap>) -> String {
        if let Some(url) = &self.public_url {
            return url.trim_end_matches('/').to_owned();
        }
        match headers
            .and_then(|h| h.get(axum::http::header::HOST))
            .and_then(|h| h.to_str().ok())
        {
            Some(host) if !host.is_empty() => format!("http://{host}"),
            _ => format!("http://{}", self.listen_addr),
        }
    }

    /// A signed URL allowing `access` to `key` (of exactly `size` bytes, and
    /// digest `sha256` when known, for a PUT) until `expires_at` (seconds);
    /// `base` is where this gateway is reached ([`StorageService::base`]).
    pub async fn signed_url(
        &self,
        access: Access,
        key: &str,
        size: Option<u64>,
        sha256: Option<&str>,
        expires_at: i64,
        base: &str,
    ) -> ApiResult<String> {
        let left = (expires_at - Timestamp::now().micros() / 1_000_000).max(1) as u64;
        if let Some(url) = self
            .objects
            .presigned_url(access, key, Duration::from_secs(left))
            .await
            .map_err(objects_error)?
        {
            return Ok(url);
        }
        let grant = Grant {
            access,
            key: key.to_owned(),
            size,
            sha256: sha256.map(str::to_owned),
            expires_at,
        };
        let signature = self.signer.sign(&grant);
        let mut url = format!("{base}/v1/objects/{key}?expires={expires_at}");
        if let Some(size) = size {
            url.push_str(&format!("&size={size}"));
        }
        if let Some(sha256) = sha256 {
            url.push_str(&format!("&sha256={sha256}"));
        }
        url.push_str(&format!("&signature={signature}"));
        Ok(url)
    }

    /// Opens an upload session of `files` for `storage`: checked as a version
    /// would be first (paths, duplicates, a file that is also a directory,
    /// digests, links, limits). Returns the session and, per file, where to PUT
    /// its bytes (`None` when it has none to send).
    pub async fn begin_upload(
        &self,
        store: &Store,
        storage: &storage::Model,
        files: Vec<Announced>,
        message: Option<String>,
        created_by: &str,
        base: &str,
    ) -> ApiResult<(storage_upload::Model, Vec<Option<String>>)> {
        for (index, f) in files.iter().enumerate() {
            check_announced(index, f)?;
        }
        let placeholder = "0".repeat(64);
        let entries = files
            .iter()
            .map(|f| match &f.link {
                Some(target) => FileEntry::symlink(f.path.clone(), target),
                None => FileEntry {
                    path: f.path.clone(),
                    size: f.size,
                    sha256: f.sha256.clone().unwrap_or_else(|| placeholder.clone()),
                    link: None,
                },
            })
            .collect();
        Manifest::new(entries, &self.limits).map_err(|e| manifest_error(&e))?;
        let now = Timestamp::now().micros();
        let expires_at = self.expiry();
        let upload = store
            .create_upload(storage_upload::Model {
                id: vm0_api_types::ids::new_id(vm0_api_types::ids::IdKind::Upload),
                org_id: storage.org_id.clone(),
                storage_id: storage.id.clone(),
                files: serde_json::to_string(&files).map_err(|e| ApiError::internal(&e))?,
                message,
                created_by: created_by.to_owned(),
                expires_at: expires_at * 1_000_000,
                created_at: now,
            })
            .await?;
        let mut urls = Vec::with_capacity(files.len());
        for (i, f) in files.iter().enumerate() {
            urls.push(if f.needs_upload() {
                Some(
                    self.signed_url(
                        Access::Put,
                        &keys::staged(&storage.id, &upload.id, i),
                        Some(f.size),
                        f.sha256.as_deref(),
                        expires_at,
                        base,
                    )
                    .await?,
                )
            } else {
                None
            });
        }
        Ok((upload, urls))
    }

    /// When URLs made now expire (seconds since the epoch).
    pub fn expiry(&self) -> i64 {
        Timestamp::now().micros() / 1_000_000 + self.url_ttl.as_secs() as i64
    }

    /// The file list of a committed version.
    pub async fn read_version(&self, storage_id: &str, version: &str) -> ApiResult<StoredVersion> {
        let key = keys::manifest(storage_id, version);
        let chunks: Vec<bytes::Bytes> = self
            .objects
            .get_stream(&key)
            .await
            .map_err(objects_error)?
            .try_collect()
            .await
            .map_err(objects_error)?;
        serde_json::from_slice(&chunks.concat()).map_err(|e| ApiError::internal(&e))
    }

    /// The 409 of a commit with files not uploaded (S3: the client may have
    /// skipped a PUT), naming them.
    async fn missing_files(
        &self,
        storage: &storage::Model,
        upload: &storage_upload::Model,
        announced: &[Announced],
    ) -> ApiError {
        let wanted: Vec<(usize, String)> = announced
            .iter()
            .enumerate()
            .filter(|(_, f)| f.needs_upload())
            .map(|(i, _)| (i, keys::staged(&storage.id, &upload.id, i)))
            .collect();
        let found: Result<Vec<(usize, Option<u64>)>, ObjectsError> = futures::stream::iter(wanted)
            .map(|(i, key)| {
                let objects = self.objects.clone();
                async move { Ok((i, objects.size(&key).await?)) }
            })
            .buffered(16)
            .try_collect()
            .await;
        let found = match found {
            Ok(found) => found,
            Err(e) => return objects_error(e),
        };
        let missing: Vec<String> = found
            .iter()
            .filter(|(_, size)| size.is_none())
            .map(|(i, _)| format!("{:?}", announced[*i].path))
            .collect();
        let shown = &missing[..missing.len().min(20)];
        let more = missing.len() - shown.len();
        ApiError::conflict(format!(
            "{} of {} files were not uploaded: {}{}; PUT them to their uploadUrl, then commit again",
            missing.len(),
            announced.len(),
            shown.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        ))
        .with_param("files")
    }

    /// Turns upload `upload` into a version of `storage`: every announced file
    /// must be there with its size (and digest, when announced). One pass reads
    /// each file into the archive; the uploaded objects stay as the version's
    /// files. Identical content is the existing version (and the upload's
    /// objects go).
    pub async fn commit(
        &self,
        store: &Store,
        storage: &storage::Model,
        upload: &storage_upload::Model,
        message: Option<String>,
    ) -> ApiResult<vm0_db::Committed> {
        let announced: Vec<Announced> =
            serde_json::from_str(&upload.files).map_err(|e| ApiError::internal(&e))?;
        let mut order: Vec<usize> = (0..announced.len()).collect();
        order.sort_by(|a, b| announced[*a].path.cmp(&announced[*b].path));
        let parts = order
            .iter()
            .map(|&i| {
                let f = &announced[i];
                Part {
                    path: f.path.clone(),
                    size: f.link.as_ref().map_or(f.size, |t| t.len() as u64),
                    key: f
                        .needs_upload()
                        .then(|| keys::staged(&storage.id, &upload.id, i)),
                    link: f.link.clone(),
                }
            })
            .collect();
        let assembling = keys::assembling(&storage.id, &upload.id);
        let digests = match vm0_storage::archive_objects(&self.objects, parts, &assembling).await {
            Ok(digests) => digests,
            Err(AssembleError::Objects(ObjectsError::NotFound(_))) => {
                return Err(self.missing_files(storage, upload, &announced).await);
            }
            Err(AssembleError::File { path, source })
                if source.kind() == std::io::ErrorKind::InvalidData =>
            {
                return Err(ApiError::invalid(
                    "files",
                    format!("{path:?} was not uploaded with the size announced: {source}"),
                ));
            }
            Err(AssembleError::Objects(e)) => return Err(objects_error(e)),
            Err(e) => return Err(ApiError::internal(&e)),
        };
        let mut files = Vec::with_capacity(order.len());
        for (&i, digest) in order.iter().zip(digests) {
            let f = &announced[i];
            if let Some(want) = &f.sha256
                && *want != digest
            {
                let _ = self.objects.delete(&assembling).await;
                return Err(ApiError::invalid(
                    format!("files[{i}].sha256"),
                    format!(
                        "{:?} was uploaded with SHA-256 {digest}, not the {want} announced",
                        f.path
                    ),
                ));
            }
            files.push(match &f.link {
                Some(target) => StoredFile {
                    entry: FileEntry::symlink(f.path.clone(), target),
                    index: None,
                },
                None => StoredFile {
                    entry: FileEntry {
                        path: f.path.clone(),
                        size: f.size,
                        sha256: digest,
                        link: None,
                    },
                    index: Some(i),
                },
            });
        }
        let manifest = Manifest::new(
            files.iter().map(|f| f.entry.clone()).collect(),
            &self.limits,
        )
        .map_err(|e| manifest_error(&e))?;
        let version_id = manifest.version_id();
        let exists = !store
            .find_storage_versions(&storage.id, version_id.as_str())
            .await?
            .is_empty();
        if exists {
            // The bytes are those of the version there: this upload's go.
            if let Err(e) = self
                .objects
                .delete_prefix(&keys::upload_dir(&storage.id, &upload.id))
                .await
            {
                tracing::warn!(error = %crate::error::ErrorChain(&e), upload = %upload.id, "an upload's objects were not deleted");
            }
        } else {
            self.place_version(storage, &upload.id, version_id.as_str(), files)
                .await?;
        }
        let now = Timestamp::now().micros();
        Ok(store
            .commit_storage_version(
                storage_version::Model {
                    storage_id: storage.id.clone(),
                    id: version_id.to_string(),
                    size: manifest.total_bytes() as i64,
                    file_count: manifest.files().len() as i64,
                    message: message.or_else(|| upload.message.clone()),
                    created_by: upload.created_by.clone(),
                    created_at: now,
                },
                Some(&upload.id),
                now,
            )
            .await?)
    }

    /// Puts an assembled version in place: its file list, an object for each
    /// empty file (so that every file has a URL), its archive.
    async fn place_version(
        &self,
        storage: &storage::Model,
        upload_id: &str,
        version: &str,
        files: Vec<StoredFile>,
    ) -> ApiResult<()> {
        let empty: Vec<String> = files
            .iter()
            .filter(|f| f.entry.size == 0 && f.entry.link.is_none())
            .filter_map(|f| f.index)
            .map(|i| keys::staged(&storage.id, upload_id, i))
            .collect();
        futures::stream::iter(empty)
            .map(|key| {
                let objects = self.objects.clone();
                async move { objects.put(&key, bytes::Bytes::new()).await }
            })
            .buffer_unordered(16)
            .try_collect::<Vec<()>>()
            .await
            .map_err(objects_error)?;
        let stored = StoredVersion {
            upload: upload_id.to_owned(),
            files,
        };
        let json = serde_json::to_vec(&stored).map_err(|e| ApiError::internal(&e))?;
        self.objects
            .put(&keys::manifest(&storage.id, version), json.into())
            .await
            .map_err(objects_error)?;
        self.objects
            .rename(
                &keys::assembling(&storage.id, upload_id),
                &keys::archive(&storage.id, version),
            )
            .await
            .map_err(objects_error)
    }
}

/// The version of `storage` that `spec` names: a full id or a unique prefix
/// of at least 8 hex characters. `param` names the request field for errors.
pub async fn resolve_version(
    store: &Store,
    kind: StorageKind,
    storage: &storage::Model,
    spec: &str,
    param: &str,
) -> ApiResult<storage_version::Model> {
    let prefix = VersionPrefix::parse(spec).ok_or_else(|| {
        ApiError::invalid(
            param,
            format!(
                "'{}' is not a version: give its id (64 hex characters) or a prefix of at least 8",
                vm0_api_types::ids::truncate_for_message(spec)
            ),
        )
    })?;
    let mut found = store
        .find_storage_versions(&storage.id, prefix.as_str())
        .await?;
    match found.len() {
        0 => Err(
            ApiError::not_found(&format!("{} version", kind.as_str()), spec, Some(param))
                .with_message(format!(
                    "No version '{spec}' of {} '{}'",
                    kind.as_str(),
                    storage.name
                )),
        ),
        1 => Ok(found.remove(0)),
        _ => Err(ApiError::invalid(
            param,
            format!(
                "'{spec}' is the start of more than one version of '{}': give more characters",
                storage.name
            ),
        )),
    }
}

/// How long past its expiry an upload session's files stay: a commit that
/// began before the expiry is long done by then.
const EXPIRED_UPLOAD_GRACE: Duration = Duration::from_secs(3600);
/// Sessions swept per query.
const SWEEP_PAGE: u64 = 100;

/// Every gateway, now and then: upload sessions never committed, expired, go
/// with the files they received.
pub async fn sweep_uploads(
    store: Store,
    service: std::sync::Arc<StorageService>,
    every: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match sweep_pass(&store, &service, &shutdown).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(uploads = n, "expired upload sessions deleted"),
            Err(e) => {
                tracing::warn!(error = %crate::error::ErrorChain(&e), "upload sweep failed")
            }
        }
    }
}

/// Deletes every upload session expired (past the grace) and its files;
/// returns how many.
pub async fn sweep_pass(
    store: &Store,
    service: &StorageService,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<usize, vm0_db::StoreError> {
    let grace = i64::try_from(EXPIRED_UPLOAD_GRACE.as_micros()).unwrap_or(i64::MAX);
    let cutoff = Timestamp::now().micros().saturating_sub(grace);
    let mut total = 0;
    while !shutdown.is_cancelled() {
        let expired = store.take_expired_uploads(cutoff, SWEEP_PAGE).await?;
        for upload in &expired {
            let dir = keys::upload_dir(&upload.storage_id, &upload.id);
            if let Err(e) = service.objects.delete_prefix(&dir).await {
                tracing::warn!(error = %crate::error::ErrorChain(&e), %dir, "an expired upload's files were not deleted");
            }
        }
        total += expired.len();
        if (expired.len() as u64) < SWEEP_PAGE {
            break;
        }
    }
    Ok(total)
}
