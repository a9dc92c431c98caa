//! `/v1/volumes` and `/v1/artifacts`: one set of handlers for both kinds
//! (`volumes` and `artifacts` below are the routes, each handler a one-line
//! call with its own OpenAPI annotation).

use axum::Json;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use vm0_api_types::Timestamp;
use vm0_api_types::agents::validate_agent_name;
use vm0_api_types::cursor::Page;
use vm0_api_types::storage::{
    CommitRequest, CreateStorageRequest, DownloadFile, DownloadListing, Storage, StorageVersion,
    UploadRequest, UploadSession, UploadTarget,
};
use vm0_db::entity::storage;
use vm0_db::{StorageKind, convert};
use vm0_storage::Access;

use super::{PageRequest, cursor};
use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::{QueryParams, path_id};
use crate::storage::{Announced, keys, resolve_version};

/// Longest version message, in bytes.
const MAX_MESSAGE_BYTES: usize = 1000;

fn scope(kind: StorageKind) -> &'static str {
    match kind {
        StorageKind::Volume => "volumes",
        StorageKind::Artifact => "artifacts",
        StorageKind::State => "states",
    }
}

fn check_message(message: &Option<String>) -> ApiResult<()> {
    match message {
        Some(m) if m.len() > MAX_MESSAGE_BYTES => Err(ApiError::invalid(
            "message",
            format!(
                "message is {} bytes, more than {MAX_MESSAGE_BYTES}",
                m.len()
            ),
        )),
        Some(m) if m.contains('\0') => Err(ApiError::invalid("message", "message has a NUL")),
        _ => Ok(()),
    }
}

async fn load(
    kind: StorageKind,
    state: &AppState,
    caller: &Caller,
    id: &str,
) -> ApiResult<storage::Model> {
    path_id(kind.id_kind(), id)?;
    state
        .store
        .get_storage(&caller.org_id, kind, id)
        .await?
        .ok_or_else(|| ApiError::not_found(kind.as_str(), id, None))
}

pub async fn list(
    kind: StorageKind,
    caller: Caller,
    state: AppState,
    q: QueryParams,
) -> ApiResult<Json<Page<Storage>>> {
    q.only(&["limit", "cursor", "name"])?;
    let page = PageRequest::from_query(&q, scope(kind))?;
    let name = q.get("name");
    if let Some(name) = name {
        validate_agent_name(name, "name")?;
    }
    let rows = state
        .store
        .list_storages(&caller.org_id, kind, name, page.after.as_ref(), page.limit)
        .await?;
    let items = rows.iter().map(|s| convert::storage(s, None)).collect();
    Ok(Json(Page::from_overfetch(
        items,
        page.limit,
        |s: &Storage| cursor(scope(kind), s.created_at.micros(), s.id.clone()),
    )))
}

pub async fn create(
    kind: StorageKind,
    caller: Caller,
    state: AppState,
    req: CreateStorageRequest,
) -> ApiResult<(StatusCode, Json<Storage>)> {
    validate_agent_name(&req.name, "name")?;
    let row = state
        .store
        .create_storage(&caller.org_id, kind, &req.name, Timestamp::now().micros())
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(convert::storage(&row, Some(None))),
    ))
}

pub async fn get(
    kind: StorageKind,
    caller: Caller,
    state: AppState,
    id: String,
) -> ApiResult<Json<Storage>> {
    let row = load(kind, &state, &caller, &id).await?;
    let current = match &row.current_version_id {
        None => None,
        Some(v) => state
            .store
            .find_storage_versions(&row.id, v)
            .await?
            .first()
            .map(|v| convert::storage_version(kind, v)),
    };
    Ok(Json(convert::storage(&row, Some(current))))
}

pub async fn delete(
    kind: StorageKind,
    caller: Caller,
    state: AppState,
    id: String,
) -> ApiResult<StatusCode> {
    path_id(kind.id_kind(), &id)?;
    let Some(uploads) = state
        .store
        .delete_storage(&caller.org_id, kind, &id)
        .await?
    else {
        return Err(ApiError::not_found(kind.as_str(), &id, None));
    };
    // The rows are gone: the bytes follow (a failure here leaves unreachable
    // objects, never a reachable version without its bytes).
    // Every object of it is under its prefix, uploads included.
    let _ = uploads;
    let dir = keys::storage_dir(&id);
    if let Err(e) = state.storage.objects.delete_prefix(&dir).await {
        tracing::warn!(error = %crate::error::ErrorChain(&e), %dir, "objects of a deleted storage left behind");
    }
    Ok(StatusCode::NO_CONTENT)
}

pub async fn versions(
    kind: StorageKind,
    caller: Caller,
    state: AppState,
    id: String,
    q: QueryParams,
) -> ApiResult<Json<Page<StorageVersion>>> {
    q.only(&["limit", "cursor"])?;
    let scope = format!("{}_versions", scope(kind));
    let page = PageRequest::from_query(&q, &scope)?;
    let row = load(kind, &state, &caller, &id).await?;
    let rows = state
        .store
        .list_storage_versions(&row.id, page.after.as_ref(), page.limit)
        .await?;
    let items = rows
        .iter()
        .map(|v| convert::storage_version(kind, v))
        .collect();
    Ok(Json(Page::from_overfetch(
        items,
        page.limit,
        |v: &StorageVersion| cursor(&scope, v.created_at.micros(), v.id.clone()),
    )))
}

pub async fn upload(
    kind: StorageKind,
    caller: Caller,
    state: AppState,
    id: String,
    headers: HeaderMap,
    req: UploadRequest,
) -> ApiResult<(StatusCode, Json<UploadSession>)> {
    let row = load(kind, &state, &caller, &id).await?;
    check_message(&req.message)?;
    let files: Vec<Announced> = req
        .files
        .iter()
        .map(|f| Announced {
            path: f.path.clone(),
            size: f.size,
            sha256: f.sha256.clone(),
            link: f.link.clone(),
        })
        .collect();
    let base = state.storage.base(Some(&headers));
    let (upload, urls) = state
        .storage
        .begin_upload(
            &state.store,
            &row,
            files,
            req.message.clone(),
            &caller.token_id,
            &base,
        )
        .await?;
    let files = req
        .files
        .iter()
        .zip(urls)
        .map(|(f, url)| UploadTarget {
            path: f.path.clone(),
            upload_url: url,
        })
        .collect();
    Ok((
        StatusCode::CREATED,
        Json(UploadSession {
            upload_session_id: upload.id,
            files,
            expires_at: Timestamp(upload.expires_at),
        }),
    ))
}

pub async fn commit(
    kind: StorageKind,
    caller: Caller,
    state: AppState,
    id: String,
    req: CommitRequest,
) -> ApiResult<(StatusCode, Json<StorageVersion>)> {
    let row = load(kind, &state, &caller, &id).await?;
    check_message(&req.message)?;
    vm0_api_types::ids::check_id(
        vm0_api_types::ids::IdKind::Upload,
        "uploadSessionId",
        &req.upload_session_id,
    )?;
    let upload = state
        .store
        .get_upload(&req.upload_session_id)
        .await?
        .filter(|u| u.org_id == caller.org_id && u.storage_id == row.id)
        .ok_or_else(|| {
            ApiError::not_found(
                "upload session",
                &req.upload_session_id,
                Some("uploadSessionId"),
            )
        })?;
    if upload.expires_at <= Timestamp::now().micros() {
        return Err(ApiError::invalid_state(format!(
            "Upload session '{}' expired at {}; start a new upload",
            upload.id,
            Timestamp(upload.expires_at).to_rfc3339()
        )));
    }
    let committed = state
        .storage
        .commit(&state.store, &row, &upload, req.message)
        .await?;
    let status = if committed.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(convert::storage_version(kind, &committed.version)),
    ))
}

pub async fn download(
    kind: StorageKind,
    caller: Caller,
    state: AppState,
    id: String,
    headers: HeaderMap,
    q: QueryParams,
) -> ApiResult<Response> {
    q.only(&["versionId", "format"])?;
    let row = load(kind, &state, &caller, &id).await?;
    let version = match q.get("versionId").filter(|v| !v.is_empty()) {
        Some(spec) => resolve_version(&state.store, kind, &row, spec, "versionId").await?,
        None => {
            let current = row.current_version_id.clone().ok_or_else(|| {
                ApiError::not_found(kind.as_str(), &id, None).with_message(format!(
                    "{} '{}' has no version yet: commit an upload first",
                    kind.as_str(),
                    row.name
                ))
            })?;
            resolve_version(&state.store, kind, &row, &current, "versionId").await?
        }
    };
    let service = &state.storage;
    let expires_at = service.expiry();
    let base = service.base(Some(&headers));
    let archive_url = service
        .signed_url(
            Access::Get,
            &keys::archive(&row.id, &version.id),
            None,
            None,
            expires_at,
            &base,
        )
        .await?;
    match q.get("format") {
        None | Some("tar.gz") => {
            Ok((StatusCode::FOUND, [(header::LOCATION, archive_url)]).into_response())
        }
        Some("json") => {
            let stored = service.read_version(&row.id, &version.id).await?;
            let mut files = Vec::with_capacity(stored.files.len());
            for f in stored.files {
                let download_url = match f.index {
                    None => None,
                    Some(i) => Some(
                        service
                            .signed_url(
                                Access::Get,
                                &keys::staged(&row.id, &stored.upload, i),
                                None,
                                None,
                                expires_at,
                                &base,
                            )
                            .await?,
                    ),
                };
                files.push(DownloadFile {
                    path: f.entry.path,
                    size: f.entry.size,
                    sha256: f.entry.sha256,
                    link: f.entry.link,
                    download_url,
                });
            }
            Ok(Json(DownloadListing {
                version_id: version.id,
                files,
                archive_url,
                expires_at: Timestamp(expires_at * 1_000_000),
            })
            .into_response())
        }
        Some(other) => Err(ApiError::invalid(
            "format",
            format!(
                "format '{}' is not one of tar.gz (the default: a redirect to the archive) or json (a listing of the files)",
                vm0_api_types::ids::truncate_for_message(other)
            ),
        )),
    }
}

/// The routes of one kind, each handler annotated for the OpenAPI document.
macro_rules! storage_routes {
    ($module:ident, $kind:expr, $tag:literal, $noun:literal,
     $base:literal, $one:literal, $versions:literal, $upload:literal, $commit:literal, $download:literal) => {
        pub mod $module {
            use axum::Json;
            use axum::extract::{Path, State};
            use axum::http::{HeaderMap, StatusCode};
            use axum::response::Response;
            use vm0_api_types::ErrorEnvelope;
            use vm0_api_types::cursor::Page;
            use vm0_api_types::storage::{
                CommitRequest, CreateStorageRequest, DownloadListing, Storage, StorageVersion,
                UploadRequest, UploadSession,
            };
            use vm0_db::StorageKind;

            use crate::AppState;
            use crate::auth::Caller;
            use crate::error::ApiResult;
            use crate::extract::{JsonBody, QueryParams};

            const KIND: StorageKind = $kind;

            #[doc = concat!("List ", $noun, "s")]
            #[utoipa::path(get, path = $base, tag = $tag,
                params(
                    ("limit" = Option<u64>, Query, description = "Items per page (1-100, default 20)"),
                    ("cursor" = Option<String>, Query, description = "`pagination.nextCursor` of the previous page"),
                    ("name" = Option<String>, Query, description = "Only the one with this name"),
                ),
                responses((status = 200, body = Page<Storage>), (status = 400, body = ErrorEnvelope), (status = 401, body = ErrorEnvelope)),
                security(("bearer" = [])))]
            pub async fn list(caller: Caller, State(state): State<AppState>, q: QueryParams) -> ApiResult<Json<Page<Storage>>> {
                super::list(KIND, caller, state, q).await
            }

            #[doc = concat!("Create a ", $noun, " (empty until a commit)")]
            #[utoipa::path(post, path = $base, tag = $tag, request_body = CreateStorageRequest,
                responses((status = 201, body = Storage), (status = 400, body = ErrorEnvelope), (status = 401, body = ErrorEnvelope), (status = 409, body = ErrorEnvelope)),
                security(("bearer" = [])))]
            pub async fn create(caller: Caller, State(state): State<AppState>, JsonBody(req): JsonBody<CreateStorageRequest>) -> ApiResult<(StatusCode, Json<Storage>)> {
                super::create(KIND, caller, state, req).await
            }

            #[doc = concat!("Get a ", $noun, ", with its current version")]
            #[utoipa::path(get, path = $one, tag = $tag, params(("id" = String, Path)),
                responses((status = 200, body = Storage), (status = 400, body = ErrorEnvelope), (status = 401, body = ErrorEnvelope), (status = 404, body = ErrorEnvelope)),
                security(("bearer" = [])))]
            pub async fn get(caller: Caller, State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Storage>> {
                super::get(KIND, caller, state, id).await
            }

            #[doc = concat!("Delete a ", $noun, " with all its versions")]
            #[utoipa::path(delete, path = $one, tag = $tag, params(("id" = String, Path)),
                responses((status = 204), (status = 400, body = ErrorEnvelope), (status = 401, body = ErrorEnvelope), (status = 404, body = ErrorEnvelope)),
                security(("bearer" = [])))]
            pub async fn delete(caller: Caller, State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<StatusCode> {
                super::delete(KIND, caller, state, id).await
            }

            #[doc = concat!("List a ", $noun, "'s versions, newest first")]
            #[utoipa::path(get, path = $versions, tag = $tag,
                params(("id" = String, Path),
                    ("limit" = Option<u64>, Query, description = "Items per page (1-100, default 20)"),
                    ("cursor" = Option<String>, Query)),
                responses((status = 200, body = Page<StorageVersion>), (status = 400, body = ErrorEnvelope), (status = 401, body = ErrorEnvelope), (status = 404, body = ErrorEnvelope)),
                security(("bearer" = [])))]
            pub async fn versions(caller: Caller, State(state): State<AppState>, Path(id): Path<String>, q: QueryParams) -> ApiResult<Json<Page<StorageVersion>>> {
                super::versions(KIND, caller, state, id, q).await
            }

            /// Start an upload: announce the files, get a signed PUT URL for each
            #[utoipa::path(post, path = $upload, tag = $tag, params(("id" = String, Path)),
                request_body = UploadRequest,
                responses((status = 201, body = UploadSession), (status = 400, body = ErrorEnvelope), (status = 401, body = ErrorEnvelope), (status = 404, body = ErrorEnvelope), (status = 413, body = ErrorEnvelope)),
                security(("bearer" = [])))]
            pub async fn upload(caller: Caller, State(state): State<AppState>, Path(id): Path<String>, headers: HeaderMap, JsonBody(req): JsonBody<UploadRequest>) -> ApiResult<(StatusCode, Json<UploadSession>)> {
                super::upload(KIND, caller, state, id, headers, req).await
            }

            /// Commit an upload as a version (200 when that content was already a version)
            #[utoipa::path(post, path = $commit, tag = $tag, params(("id" = String, Path)),
                request_body = CommitRequest,
                responses((status = 201, body = StorageVersion), (status = 200, body = StorageVersion), (status = 400, body = ErrorEnvelope), (status = 401, body = ErrorEnvelope), (status = 404, body = ErrorEnvelope), (status = 409, body = ErrorEnvelope, description = "Files not uploaded yet; the message names them"), (status = 413, body = ErrorEnvelope)),
                security(("bearer" = [])))]
            pub async fn commit(caller: Caller, State(state): State<AppState>, Path(id): Path<String>, JsonBody(req): JsonBody<CommitRequest>) -> ApiResult<(StatusCode, Json<StorageVersion>)> {
                super::commit(KIND, caller, state, id, req).await
            }

            /// Download a version: a redirect to its signed `.tar.gz`, or with `format=json` its files with signed URLs
            #[utoipa::path(get, path = $download, tag = $tag,
                params(("id" = String, Path),
                    ("versionId" = Option<String>, Query, description = "A version id or a unique prefix of at least 8 characters; default the current version"),
                    ("format" = Option<String>, Query, description = "`tar.gz` (default: 302 to the archive) or `json` (the file listing)")),
                responses((status = 302, description = "`Location`: a signed, expiring URL of the version as one .tar.gz"), (status = 200, body = DownloadListing), (status = 400, body = ErrorEnvelope), (status = 401, body = ErrorEnvelope), (status = 404, body = ErrorEnvelope)),
                security(("bearer" = [])))]
            pub async fn download(caller: Caller, State(state): State<AppState>, Path(id): Path<String>, headers: HeaderMap, q: QueryParams) -> ApiResult<Response> {
                super::download(KIND, caller, state, id, headers, q).await
            }
        }
    };
}

storage_routes!(
    volumes,
    StorageKind::Volume,
    "volumes",
    "volume",
    "/v1/volumes",
    "/v1/volumes/{id}",
    "/v1/volumes/{id}/versions",
    "/v1/volumes/{id}/upload",
    "/v1/volumes/{id}/commit",
    "/v1/volumes/{id}/download"
);
storage_routes!(
    artifacts,
    StorageKind::Artifact,
    "artifacts",
    "artifact",
    "/v1/artifacts",
    "/v1/artifacts/{id}",
    "/v1/artifacts/{id}/versions",
    "/v1/artifacts/{id}/upload",
    "/v1/artifacts/{id}/commit",
    "/v1/artifacts/{id}/download"
);
