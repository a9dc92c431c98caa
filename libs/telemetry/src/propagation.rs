//! W3C trace context (`traceparent`) across process boundaries: HTTP requests from
//! clients, the run job on NATS, and the worker's gRPC calls. Without an exporter
//! installed there is no context to carry, and these do nothing.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The header and metadata key.
pub const TRACEPARENT: &str = "traceparent";

/// `span`'s context as a `traceparent` value, when it belongs to an exported trace.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// The `traceparent` header of an HTTP request or gRPC call, if it has one.
pub fn traceparent_of(headers: &http::HeaderMap) -> Option<&str> {
    headers.get(TRACEPARENT).and_then(|v| v.to_str().ok())
}

/// Makes `span` a child of the remote span `traceparent` names. A malformed
/// value (it may come from a client) is ignored: the span starts its own trace.
pub fn set_remote_parent(span: &tracing::Span, traceparent: &str) {
    if traceparent.is_empty() {
        return;
    }
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}
