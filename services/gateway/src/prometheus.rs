//! What the gateway counts for its operators, scraped as `GET /metrics`
//! (Prometheus text format; on the API port, or only on `VM0_METRICS_ADDR`
//! when that is set). Per replica: HTTP requests by route template and status,
//! with their latency; runs created; runs finished by status and by who ended
//! them; event streams open.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Unit;
use vm0_prometheus::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    /// The route's template (`/v1/runs/:id`), never the path itself.
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: String,
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FinishLabels {
    status: String,
    /// Who ended it: `worker` (it reported), `cancelled` (the API, the worker
    /// not confirming), `worker_lost`, `timeout` (the reaper).
    reason: String,
}

type LatencyFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

fn latency() -> Histogram {
    Histogram::new(vm0_prometheus::latency_buckets())
}

/// The gateway's instruments and the registry that holds them.
pub struct Instruments {
    pub registry: Arc<Registry>,
    requests: Family<RequestLabels, Counter>,
    request_seconds: LatencyFamily,
    runs_created: Counter,
    runs_finished: Family<FinishLabels, Counter>,
    /// Event streams open on this replica.
    pub event_streams: Gauge,
}

impl std::fmt::Debug for Instruments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Instruments")
    }
}

impl Default for Instruments {
    fn default() -> Instruments {
        let mut registry = Registry::with_prefix("vm0");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by method, route template and status",
            requests.clone(),
        );
        let request_seconds = LatencyFamily::new_with_constructor(latency);
        registry.register_with_unit(
            "http_request_duration",
            "Time to answer an HTTP request (to its headers, for event streams)",
            Unit::Seconds,
            request_seconds.clone(),
        );
        let runs_created = Counter::default();
        registry.register("runs_created", "Runs created", runs_created.clone());
        let runs_finished = Family::<FinishLabels, Counter>::default();
        registry.register(
            "runs_finished",
            "Runs that reached a final status, by status and by who ended them",
            runs_finished.clone(),
        );
        let event_streams = Gauge::default();
        registry.register(
            "sse_streams_open",
            "Event streams (SSE) open on this gateway",
            event_streams.clone(),
        );
        Instruments {
            registry: Arc::new(registry),
            requests,
            request_seconds,
            runs_created,
            runs_finished,
            event_streams,
        }
    }
}

impl Instruments {
    pub fn run_created(&self) {
        self.runs_created.inc();
    }

    pub fn run_finished(&self, status: vm0_api_types::runs::RunStatus, reason: &str) {
        self.runs_finished
            .get_or_create(&FinishLabels {
                status: status.as_str().to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }
}

/// Where the router writes the matched route's template for [`count`].
#[derive(Clone, Default)]
struct MatchedRoute(Arc<Mutex<Option<String>>>);

/// Counts and times every request (outermost layer; unmatched paths count as
/// route `unmatched`).
pub async fn count(
    State(instruments): State<Arc<Instruments>>,
    mut req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = req.method().as_str().to_owned();
    let matched = MatchedRoute::default();
    req.extensions_mut().insert(matched.clone());
    let response = next.run(req).await;
    let route = matched
        .0
        .lock()
        .ok()
        .and_then(|m| m.clone())
        .unwrap_or_else(|| "unmatched".to_owned());
    let status = response.status().as_u16();
    instruments
        .request_seconds
        .get_or_create(&RouteLabels {
            method: method.clone(),
            route: route.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    instruments
        .requests
        .get_or_create(&RequestLabels {
            method,
            route,
            status,
        })
        .inc();
    response
}

/// Records the matched route (a route layer: it runs once a route matched).
pub async fn record_route(req: Request, next: Next) -> Response {
    if let (Some(path), Some(matched)) = (
        req.extensions().get::<MatchedPath>(),
        req.extensions().get::<MatchedRoute>(),
    ) && let Ok(mut slot) = matched.0.lock()
    {
        *slot = Some(template(path.as_str()));
    }
    next.run(req).await
}

/// axum's `/v1/runs/{id}` as `/v1/runs/:id`: braces inside label values are
/// valid, but trip up some parsers of the text format.
fn template(path: &str) -> String {
    path.replace("{*", ":").replace('{', ":").replace('}', "")
}

#[cfg(test)]
mod tests {
    #[test]
    fn route_templates_lose_their_braces() {
        assert_eq!(super::template("/v1/runs/{id}/logs"), "/v1/runs/:id/logs");
        assert_eq!(super::template("/v1/objects/{*key}"), "/v1/objects/:key");
        assert_eq!(super::template("/v1/runs"), "/v1/runs");
    }
}
