//! Request extractors that reject bad input with the API's error envelope (axum's
//! own rejections are plain text).

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{StatusCode, header, request::Parts};
use serde::de::DeserializeOwned;
use vm0_api_types::FieldError;
use vm0_api_types::ids::{IdKind, check_id};

use crate::AppState;
use crate::error::ApiError;

/// A JSON body of type `T`. Checks the content type, the size limit, JSON syntax,
/// and maps serde's complaints (unknown field, missing field, wrong type) to
/// `invalid_parameter` / `missing_parameter` naming the field. An empty body reads
/// as `{}`.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_ascii_lowercase()
            });
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::payload_too_large(state.config.max_body_bytes)
            } else {
                ApiError::invalid_json(format!("Could not read the request body: {rejection}"))
            }
        })?;
        let body: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            let is_json = content_type
                .as_deref()
                .is_some_and(|ct| ct == "application/json" || ct.ends_with("+json"));
            if !is_json {
                return Err(ApiError::unsupported_media_type());
            }
            &bytes
        };
        let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
            ApiError::invalid_json(format!(
                "Request body is not valid JSON: {e} (line {}, column {})",
                e.line(),
                e.column()
            ))
        })?;
        if !value.is_object() {
            return Err(ApiError::invalid_json("Request body must be a JSON object"));
        }
        serde_path_to_error::deserialize(value)
            .map(JsonBody)
            .map_err(|e| field_error(e).into())
    }
}

/// Turns a serde error at `path` into a field error naming the field.
fn field_error(e: serde_path_to_error::Error<serde_json::Error>) -> FieldError {
    let path = e.path().to_string();
    let message = e.inner().to_string();
    // The path names the unknown field itself but only the parent of a missing one.
    let join = |field: &str| {
        if path == "." || path.is_empty() {
            field.to_owned()
        } else if path == field || path.ends_with(&format!(".{field}")) {
            path.clone()
        } else {
            format!("{path}.{field}")
        }
    };
    if let Some(field) = backticked(&message, "unknown field `") {
        return FieldError::invalid(join(field), format!("Unknown field '{field}'"));
    }
    if let Some(field) = backticked(&message, "missing field `") {
        return FieldError::missing(join(field), format!("'{field}' is required"));
    }
    // Drop serde's " at line 1 column 2": the body was re-parsed from a value.
    let message = message
        .split(" at line ")
        .next()
        .unwrap_or(&message)
        .to_owned();
    FieldError::invalid(if path == "." { "body".to_owned() } else { path }, message)
}

fn backticked<'a>(message: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = message.strip_prefix(prefix)?;
    rest.split('`').next()
}

/// Query parameters as a map, with helpers that accept camelCase and snake_case
/// names and reject parameters an endpoint does not know (a typo in a filter would
/// otherwise silently return everything).
pub struct QueryParams(HashMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for QueryParams {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let raw = parts.uri.query().unwrap_or_default();
        let pairs: Vec<(String, String)> = serde_urlencoded_pairs(raw)?;
        let mut map = HashMap::new();
        for (k, v) in pairs {
            if map.insert(k.clone(), v).is_some() {
                return Err(ApiError::invalid(k, "parameter given more than once"));
            }
        }
        Ok(QueryParams(map))
    }
}

fn serde_urlencoded_pairs(raw: &str) -> Result<Vec<(String, String)>, ApiError> {
    let mut out = Vec::new();
    for part in raw.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        let decode = |s: &str| {
            let s = s.replace('+', " ");
            percent_decode(&s).ok_or_else(|| {
                ApiError::invalid("query", "query string is not valid percent-encoded UTF-8")
            })
        };
        out.push((decode(k)?, decode(v)?));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl QueryParams {
    /// Rejects any parameter not in `allowed` (each given in camelCase; the snake_case
    /// spelling is accepted too).
    pub fn only(&self, allowed: &[&str]) -> Result<(), ApiError> {
        for key in self.0.keys() {
            let known = allowed.iter().any(|a| *a == key || snake(a) == *key);
            if !known {
                return Err(ApiError::invalid(
                    key.clone(),
                    format!(
                        "Unknown query parameter '{}'; this endpoint accepts: {}",
                        vm0_api_types::ids::truncate_for_message(key),
                        allowed.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The value of `name` (camelCase) or its snake_case spelling.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .or_else(|| self.0.get(&snake(name)))
            .map(String::as_str)
    }
}

fn snake(camel: &str) -> String {
    let mut out = String::with_capacity(camel.len() + 4);
    for c in camel.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Checks a path id; a malformed one is a 400 naming the parameter `id`.
pub fn path_id(kind: IdKind, raw: &str) -> Result<(), ApiError> {
    check_id(kind, "id", raw).map_err(ApiError::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snake_case_names() {
        assert_eq!(snake("agentId"), "agent_id");
        assert_eq!(snake("lastEventId"), "last_event_id");
        assert_eq!(snake("limit"), "limit");
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(
            percent_decode("2024-01-01T00%3A00%3A00Z").as_deref(),
            Some("2024-01-01T00:00:00Z")
        );
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%"), None);
        assert_eq!(percent_decode("%ff"), None);
    }
}
