//! Request ids and the per-request span. Every response, errors and unknown routes
//! included, carries `X-Request-Id` and `X-API-Version: v1`.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;
use vm0_api_types::ids::{IdKind, new_id};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const API_VERSION: HeaderName = HeaderName::from_static("x-api-version");

tokio::task_local! {
    static CURRENT: String;
}

/// The id of the request being handled by this task, if any.
pub fn current() -> Option<String> {
    CURRENT.try_with(Clone::clone).ok()
}

/// A client-supplied id is echoed when it is short and plain; otherwise we mint one.
fn accept_client_id(raw: &HeaderValue) -> Option<String> {
    let s = raw.to_str().ok()?;
    let ok = (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    ok.then(|| s.to_owned())
}

pub async fn middleware(req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(accept_client_id)
        .unwrap_or_else(|| new_id(IdKind::Request));
    // Spans are named by route template, not path, so that traces group by endpoint.
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("", |m| m.as_str());
    let span = tracing::info_span!(
        "request",
        otel.name = %format!("{} {route}", req.method()).trim_end(),
        otel.kind = "server",
        request_id = %id,
        method = %req.method(),
        path = %req.uri().path(),
        http.route = route,
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    // A client's trace continues here (a CI job tracing its own steps, say).
    if let Some(parent) = vm0_telemetry::propagation::traceparent_of(req.headers()) {
        vm0_telemetry::propagation::set_remote_parent(&span, parent);
    }
    let started = Instant::now();
    let mut resp = CURRENT
        .scope(id.clone(), next.run(req).instrument(span.clone()))
        .await;
    let status = resp.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "error");
    }
    span.in_scope(|| {
        let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), elapsed_ms, "request done");
        } else {
            tracing::debug!(status = status.as_u16(), elapsed_ms, "request done");
        }
    });
    let headers = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&id) {
        headers.insert(REQUEST_ID, v);
    }
    headers.insert(API_VERSION, HeaderValue::from_static("v1"));
    resp
}
