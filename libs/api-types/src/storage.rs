//! Volumes (a run's inputs) and artifacts (its outputs): one shape for both.
//! A version's id is the SHA-256 of its content (64 lowercase hex); wherever a
//! version is named, a unique prefix of at least 8 characters will do.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::Timestamp;

/// A volume or an artifact. `currentVersion` is present on get only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Storage {
    /// `vol_…` or `art_…`.
    pub id: String,
    pub name: String,
    /// The newest committed version, `null` before the first commit.
    pub current_version_id: Option<String>,
    /// Bytes of the current version.
    pub size: i64,
    /// Files of the current version.
    pub file_count: i64,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// The current version, on `GET /:id` (`null` before the first commit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_version: Option<Option<StorageVersion>>,
}

/// One committed content of a volume or artifact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageVersion {
    /// SHA-256 of the content: 64 lowercase hex.
    #[schema(pattern = "^[0-9a-f]{64}$")]
    pub id: String,
    /// On a volume's versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_id: Option<String>,
    /// On an artifact's versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_id: Option<String>,
    pub size: i64,
    pub file_count: i64,
    pub message: Option<String>,
    /// The token (`tok_…`) or run (`run_…`) that committed it.
    pub created_by: String,
    pub created_at: Timestamp,
}

/// `POST /v1/volumes`, `POST /v1/artifacts`
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateStorageRequest {
    /// 1-100 lowercase letters, digits and hyphens.
    #[schema(pattern = "^[a-z0-9]([a-z0-9-]{0,98}[a-z0-9])?$")]
    pub name: String,
}

/// One file an upload announces.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UploadFile {
    /// Relative, `/`-separated; no `.`, `..`, empty components or control characters.
    pub path: String,
    /// Exact size in bytes; the PUT must send this many.
    #[serde(deserialize_with = "crate::integer::integer")]
    pub size: u64,
    /// SHA-256 of the content (64 lowercase hex); when given, content that
    /// does not match is refused.
    #[serde(default)]
    #[schema(pattern = "^[0-9a-f]{64}$")]
    pub sha256: Option<String>,
    /// Makes the entry a symbolic link to this target (never followed; no
    /// control characters). Its size and SHA-256 are the target's, derived by
    /// the server: what `size` and `sha256` say is not compared. Nothing is PUT.
    #[serde(default)]
    pub link: Option<String>,
}

/// `POST /:id/upload`: the files of the next version.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UploadRequest {
    pub files: Vec<UploadFile>,
    #[serde(default)]
    pub message: Option<String>,
}

/// Where to PUT one file's bytes.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UploadTarget {
    pub path: String,
    /// A signed URL: `PUT` exactly `size` bytes to it, before `expiresAt`.
    /// `null` for empty files and links, which need no PUT.
    pub upload_url: Option<String>,
}

/// The answer to `POST /:id/upload`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UploadSession {
    /// `upl_…`: give it to `POST /:id/commit`.
    pub upload_session_id: String,
    /// In the order of the request.
    pub files: Vec<UploadTarget>,
    pub expires_at: Timestamp,
}

/// `POST /:id/commit`
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CommitRequest {
    #[serde(alias = "upload_session_id")]
    pub upload_session_id: String,
    /// Replaces the upload's message.
    #[serde(default)]
    pub message: Option<String>,
}

/// One file of a version, with where to read it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DownloadFile {
    pub path: String,
    pub size: u64,
    pub sha256: String,
    /// A symbolic link's target (no `downloadUrl` then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// A signed `GET` URL of the file's bytes, valid until `expiresAt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download_url: Option<String>,
}

/// `GET /:id/download?format=json`: the files of a version, each with a signed URL.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DownloadListing {
    pub version_id: String,
    /// In path order.
    pub files: Vec<DownloadFile>,
    /// A signed `GET` URL of the whole version as one `.tar.gz`.
    pub archive_url: String,
    pub expires_at: Timestamp,
}
