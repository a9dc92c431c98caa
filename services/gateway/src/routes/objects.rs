//! `/v1/objects/<key>`: the signed URLs of the local object store (S3 serves
//! its own presigned ones). No bearer token: the signature is the permission,
//! bound to method, key, size and expiry ([`vm0_storage::signed`]). A PUT goes
//! only to a file of an open upload, and must bring exactly the bytes (and the
//! digest, when announced) the upload said.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::TryStreamExt;
use vm0_api_types::Timestamp;
use vm0_storage::{Access, Grant, ObjectsError, SignatureError};

use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::QueryParams;
use crate::storage::{keys, objects_error};

fn refused(e: SignatureError) -> ApiError {
    ApiError::forbidden(e.to_string())
}

/// What a URL's signature covers beyond the key and expiry.
struct Signed {
    size: Option<u64>,
    sha256: Option<String>,
}

/// Checks the URL's signature for `access` to `key`.
fn verify(state: &AppState, access: Access, key: &str, q: &QueryParams) -> ApiResult<Signed> {
    q.only(&["expires", "size", "sha256", "signature"])?;
    let bad = || refused(SignatureError::Invalid);
    let expires_at: i64 = q
        .get("expires")
        .and_then(|e| e.parse().ok())
        .ok_or_else(bad)?;
    let size = match q.get("size") {
        None => None,
        Some(s) => Some(s.parse::<u64>().map_err(|_| bad())?),
    };
    let sha256 = q.get("sha256").map(str::to_owned);
    let signature = q.get("signature").ok_or_else(bad)?;
    let grant = Grant {
        access,
        key: key.to_owned(),
        size,
        sha256: sha256.clone(),
        expires_at,
    };
    state
        .storage
        .signer
        .verify(&grant, signature, Timestamp::now().micros() / 1_000_000)
        .map_err(refused)?;
    Ok(Signed { size, sha256 })
}

/// Read an object through a signed URL
pub async fn get(
    State(state): State<AppState>,
    Path(key): Path<String>,
    q: QueryParams,
) -> ApiResult<Response> {
    verify(&state, Access::Get, &key, &q)?;
    let objects = &state.storage.objects;
    let not_found = || {
        ApiError::not_found("object", &key, None)
            .with_message("This object no longer exists (its version or storage was deleted)")
    };
    let size = objects
        .size(&key)
        .await
        .map_err(objects_error)?
        .ok_or_else(not_found)?;
    let stream = objects.get_stream(&key).await.map_err(|e| match e {
        ObjectsError::NotFound(_) => not_found(),
        e => objects_error(e),
    })?;
    let content_type = if key.ends_with(".tar.gz") {
        "application/gzip"
    } else if key.ends_with(".json") {
        "application/json"
    } else {
        "application/octet-stream"
    };
    Ok((
        [
            (header::CONTENT_TYPE, content_type.to_owned()),
            (header::CONTENT_LENGTH, size.to_string()),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Write one file of an upload through its signed URL
pub async fn put(
    State(state): State<AppState>,
    Path(key): Path<String>,
    q: QueryParams,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<StatusCode> {
    let signed = verify(&state, Access::Put, &key, &q)?;
    let size = signed
        .size
        .ok_or_else(|| refused(SignatureError::Invalid))?;
    let (upload_id, index) =
        keys::parse_staged(&key).ok_or_else(|| refused(SignatureError::Invalid))?;
    // Signed, so the file is one the upload announced; the upload must still
    // be open (not committed, expired or deleted).
    let open = state
        .store
        .upload_expiry(upload_id)
        .await?
        .is_some_and(|expires| expires > Timestamp::now().micros());
    if !open {
        return Err(ApiError::not_found("upload session", upload_id, None)
            .with_message("This upload session was committed, expired or deleted"));
    }
    let what = format!("file {index} of upload {upload_id}");
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len != size
    {
        return Err(ApiError::invalid(
            "Content-Length",
            format!("{what} is {size} bytes; this request sends {len}"),
        ));
    }
    let objects = &state.storage.objects;
    let stored = objects
        .put_stream(
            &key,
            body.into_data_stream().map_err(std::io::Error::other),
            size,
        )
        .await
        .map_err(|e| match e {
            ObjectsError::TooLarge { .. } => ApiError::payload_too_large(0)
                .with_message(format!("{what} is {size} bytes; this request sent more")),
            ObjectsError::Source { .. } => {
                ApiError::invalid_json("The request body broke off before its end")
            }
            e => objects_error(e),
        })?;
    let wrong = if stored.size != size {
        Some(format!(
            "{what} is {size} bytes; this request sent {}",
            stored.size
        ))
    } else {
        signed
            .sha256
            .as_ref()
            .filter(|want| **want != stored.sha256)
            .map(|want| {
                format!(
                    "{what} was announced with SHA-256 {want}; these bytes are {}",
                    stored.sha256
                )
            })
    };
    if let Some(why) = wrong {
        objects.delete(&key).await.map_err(objects_error)?;
        return Err(ApiError::invalid("body", why));
    }
    Ok(StatusCode::OK)
}
