use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Category of an error; fixes the HTTP status (see `003` in the API documents).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorType {
    /// 401
    AuthenticationError,
    /// 400, and the other 4xx caused by the request itself (405, 413, 415)
    InvalidRequestError,
    /// 403: the caller is known but may not do this
    PermissionError,
    /// 404
    NotFoundError,
    /// 409
    ConflictError,
    /// 429
    RateLimitError,
    /// 500 and 503
    ApiError,
}

/// Specific error code. The first seven are the documented ones; the rest name
/// HTTP-level problems the documents do not cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidApiKey,
    InvalidParameter,
    MissingParameter,
    InvalidState,
    ResourceNotFound,
    ResourceAlreadyExists,
    InternalError,
    /// The body is not valid JSON.
    InvalidJson,
    /// The body is not `application/json`.
    UnsupportedMediaType,
    /// The body exceeds the gateway's limit.
    PayloadTooLarge,
    /// The route exists but not for this method.
    MethodNotAllowed,
    /// The store or another dependency is unreachable.
    ServiceUnavailable,
    RateLimited,
    /// The caller's token may not act on this resource.
    InsufficientPermissions,
}

/// The body of the `error` member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ApiErrorBody {
    #[serde(rename = "type")]
    pub kind: ErrorType,
    pub code: ErrorCode,
    pub message: String,
    /// The request parameter the error is about, when there is one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub param: Option<String>,
}

/// `{"error": {...}}`, the body of every non-2xx response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorEnvelope {
    pub error: ApiErrorBody,
}

/// A request field that failed validation: which one and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub code: ErrorCode,
    pub param: String,
    pub message: String,
}

impl FieldError {
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::InvalidParameter,
            param: param.into(),
            message: message.into(),
        }
    }

    pub fn missing(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::MissingParameter,
            param: param.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.param, self.message)
    }
}

impl std::error::Error for FieldError {}
