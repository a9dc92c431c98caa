//! [`ApiError`]: the one place where failures become HTTP responses in the error
//! envelope. Statuses follow the type table of the API overview (`003`).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use vm0_api_types::{ApiErrorBody, ErrorCode, ErrorEnvelope, ErrorType, FieldError};
use vm0_db::StoreError;

use crate::request_id;

/// A failed request, ready to be shown to the client.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ApiErrorBody,
    /// Seconds a rate-limited client should wait (`Retry-After`).
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(
        status: StatusCode,
        kind: ErrorType,
        code: ErrorCode,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            body: ApiErrorBody {
                kind,
                code,
                message: message.into(),
                param: None,
            },
            retry_after: None,
        }
    }

    /// Replaces the message, keeping type, code and param.
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.body.message = message.into();
        self
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.body.param = Some(param.into());
        self
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            ErrorType::AuthenticationError,
            ErrorCode::InvalidApiKey,
            message,
        )
    }

    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::from(FieldError::invalid(param, message))
    }

    /// 400 `invalid_state`: the resource exists but cannot do this now.
    pub fn invalid_state(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            ErrorType::InvalidRequestError,
            ErrorCode::InvalidState,
            message,
        )
    }

    /// 404 for a resource that does not exist *or belongs to another organization*:
    /// the two are indistinguishable on purpose.
    pub fn not_found(noun: &str, what: &str, param: Option<&str>) -> Self {
        let err = Self::new(
            StatusCode::NOT_FOUND,
            ErrorType::NotFoundError,
            ErrorCode::ResourceNotFound,
            format!(
                "No such {noun}: '{}'",
                vm0_api_types::ids::truncate_for_message(what)
            ),
        );
        match param {
            Some(p) => err.with_param(p),
            None => err,
        }
    }

    pub fn route_not_found(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            ErrorType::NotFoundError,
            ErrorCode::ResourceNotFound,
            format!(
                "Unrecognized request URL ({method} {}); see /v1/openapi.json",
                vm0_api_types::ids::truncate_for_message(path)
            ),
        )
    }

    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorType::InvalidRequestError,
            ErrorCode::MethodNotAllowed,
            format!(
                "{method} is not allowed on {}",
                vm0_api_types::ids::truncate_for_message(path)
            ),
        )
    }

    pub fn name_taken(name: &str, param: &str) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            ErrorType::ConflictError,
            ErrorCode::ResourceAlreadyExists,
            format!("A resource named '{name}' already exists"),
        )
        .with_param(param)
    }

    pub fn invalid_json(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            ErrorType::InvalidRequestError,
            ErrorCode::InvalidJson,
            message,
        )
    }

    pub fn unsupported_media_type() -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorType::InvalidRequestError,
            ErrorCode::UnsupportedMediaType,
            "Request bodies must be JSON: send `Content-Type: application/json`",
        )
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorType::InvalidRequestError,
            ErrorCode::PayloadTooLarge,
            format!("Request body exceeds the limit of {limit} bytes"),
        )
    }

    /// 500: the client learns only the request id; the cause is logged here, inside
    /// the request's span.
    pub fn internal(cause: &dyn std::error::Error) -> Self {
        tracing::error!(error = %ErrorChain(cause), "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorType::ApiError,
            ErrorCode::InternalError,
            format!(
                "Something went wrong on our side (request {}); it has been logged",
                request_id::current().unwrap_or_else(|| "unknown".into())
            ),
        )
    }

    /// 429 with `Retry-After: secs`.
    pub fn rate_limited(message: impl Into<String>, secs: u64) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorType::RateLimitError,
            ErrorCode::RateLimited,
            message,
        );
        e.retry_after = Some(secs);
        e
    }

    /// 403: the caller is known, but may not do this (a token acting outside the
    /// tokens it minted).
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            ErrorType::PermissionError,
            ErrorCode::InsufficientPermissions,
            message,
        )
    }

    /// 409: the request conflicts with the resource's state (an upload with
    /// files still missing).
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            ErrorType::ConflictError,
            ErrorCode::InvalidState,
            message,
        )
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorType::ApiError,
            ErrorCode::ServiceUnavailable,
            message,
        )
    }
}

pub use vm0_telemetry::ErrorChain;

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorType::InvalidRequestError,
            e.code,
            e.message,
        )
        .with_param(e.param)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NameTaken(name) => ApiError::name_taken(&name, "name"),
            // A lost compare-and-set race: the client may retry.
            StoreError::Conflict => ApiError::new(
                StatusCode::CONFLICT,
                ErrorType::ConflictError,
                ErrorCode::InvalidState,
                "The resource was changed concurrently; retry the request",
            ),
            other => ApiError::internal(&other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp =
            (self.status, axum::Json(ErrorEnvelope { error: self.body })).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_map_to_statuses() {
        let e: ApiError = StoreError::NameTaken("x".into()).into();
        assert_eq!(e.status, StatusCode::CONFLICT);
        assert_eq!(e.body.code, ErrorCode::ResourceAlreadyExists);
        let e: ApiError = StoreError::Conflict.into();
        assert_eq!(e.status, StatusCode::CONFLICT);
        let e: ApiError = StoreError::Corrupt("bad".into()).into();
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!e.body.message.contains("bad"), "internal detail leaked");
    }

    #[test]
    fn rate_limits_say_when_to_retry_and_forbidden_is_403() {
        let resp = ApiError::rate_limited("slow down", 42).into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            resp.headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()),
            Some("42")
        );
        let e = ApiError::forbidden("no");
        assert_eq!(e.status, StatusCode::FORBIDDEN);
        assert_eq!(e.body.kind, ErrorType::PermissionError);
    }

    #[test]
    fn field_errors_keep_their_param() {
        let e: ApiError = FieldError::missing("prompt", "prompt is required").into();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.body.code, ErrorCode::MissingParameter);
        assert_eq!(e.body.param.as_deref(), Some("prompt"));
    }
}
