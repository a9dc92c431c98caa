//! What the gateway counts for its operators, scraped as `GET /metrics`
//! (Prometheus text format; on the API port, or only on `VM0_METRICS_ADDR`
//! when that is set). Per replica: HTTP requests by route template and status,
//! with their latency; runs created; runs finished by status and by who ended
//! them; the wait from a run's creation to its claim; event streams open; the
//! persister's batch sizes and lag; the runs pending and running now; and
//! the depth and lag of the JetStream streams (`RUN_JOBS`, `RUN_TELEMETRY`),
//! read every few seconds ([`watch_queues`]).

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
use vm0_api_types::runs::RunStatus;
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
    /// Runs pending and running now ([`watch_runs`]).
    runs_live: Family<StatusLabels, Gauge>,
    /// Event streams open on this replica (read at scrape time).
    event_streams: Gauge,
    dispatch_seconds: Histogram,
    batch_messages: Histogram,
    persist_lag_seconds: Histogram,
    stream_messages: Family<StreamLabels, Gauge>,
    consumer_pending: Family<StreamLabels, Gauge>,
    consumer_ack_pending: Family<StreamLabels, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabels {
    stream: String,
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
        let runs_live = Family::<StatusLabels, Gauge>::default();
        registry.register(
            "runs",
            "Runs now pending or running, in the whole deployment (every replica reads the same store: aggregate with max)",
            runs_live.clone(),
        );
        let event_streams = Gauge::default();
        registry.register(
            "sse_streams_open",
            "Event streams (SSE) open on this gateway",
            event_streams.clone(),
        );
        let dispatch_seconds = latency();
        registry.register_with_unit(
            "run_dispatch_latency",
            "Time from a run's creation to a worker's claim of its first attempt",
            Unit::Seconds,
            dispatch_seconds.clone(),
        );
        let stream_messages = Family::<StreamLabels, Gauge>::default();
        registry.register(
            "jetstream_messages",
            "Messages held in a JetStream stream (RUN_JOBS: the queue's depth)",
            stream_messages.clone(),
        );
        let consumer_pending = Family::<StreamLabels, Gauge>::default();
        registry.register(
            "jetstream_consumer_pending",
            "Messages of a stream its consumer (workers, persisters) has not been given yet",
            consumer_pending.clone(),
        );
        let consumer_ack_pending = Family::<StreamLabels, Gauge>::default();
        registry.register(
            "jetstream_consumer_ack_pending",
            "Messages of a stream given to its consumer and not acknowledged yet",
            consumer_ack_pending.clone(),
        );
        let batch_messages = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(1.0, 2.0, 11),
        );
        registry.register(
            "persister_batch_messages",
            "Telemetry messages the persister stored in one transaction",
            batch_messages.clone(),
        );
        let persist_lag_seconds = latency();
        registry.register_with_unit(
            "persister_lag",
            "Age of a stored batch's oldest message (JetStream's time to the store's)",
            Unit::Seconds,
            persist_lag_seconds.clone(),
        );
        Instruments {
            batch_messages,
            persist_lag_seconds,
            dispatch_seconds,
            stream_messages,
            consumer_pending,
            consumer_ack_pending,
            registry: Arc::new(registry),
            requests,
            request_seconds,
            runs_created,
            runs_finished,
            runs_live,
            event_streams,
        }
    }
}

impl Instruments {
    /// What `GET /metrics` serves: the registry, with the open event streams
    /// of `streams` read at each scrape.
    pub fn scrape(
        self: &Arc<Self>,
        streams: Arc<crate::routes::events::OrgStreams>,
    ) -> vm0_prometheus::Scrape {
        let instruments = self.clone();
        vm0_prometheus::Scrape {
            registry: self.registry.clone(),
            refresh: Some(Arc::new(move || {
                instruments
                    .event_streams
                    .set(i64::try_from(streams.total()).unwrap_or(i64::MAX));
            })),
        }
    }

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

impl Instruments {
    /// A run claimed `waited_us` microseconds after it was created.
    pub fn run_dispatched(&self, waited_us: i64) {
        self.dispatch_seconds
            .observe(waited_us.max(0) as f64 / 1_000_000.0);
    }

    /// A batch of `messages` stored, the oldest `lag_us` after JetStream got it.
    pub fn batch_stored(&self, messages: usize, lag_us: Option<i64>) {
        self.batch_messages.observe(messages as f64);
        if let Some(lag) = lag_us {
            self.persist_lag_seconds
                .observe(lag.max(0) as f64 / 1_000_000.0);
        }
    }

    fn set_queue(&self, depth: &vm0_bus::QueueDepth) {
        let labels = StreamLabels {
            stream: depth.stream.to_owned(),
        };
        let set = |family: &Family<StreamLabels, Gauge>, v: u64| {
            family
                .get_or_create(&labels)
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        set(&self.stream_messages, depth.messages);
        set(&self.consumer_pending, depth.pending);
        set(&self.consumer_ack_pending, depth.ack_pending);
    }
}

/// How often the gauges read from elsewhere ([`watch_queues`], [`watch_runs`])
/// are read.
const GAUGES_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Calls `read` every [`GAUGES_EVERY`] until `shutdown`.
async fn every_tick<F: std::future::Future<Output = ()>>(
    shutdown: tokio_util::sync::CancellationToken,
    mut read: impl FnMut() -> F,
) {
    let mut tick = tokio::time::interval(GAUGES_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        read().await;
    }
}

/// Keeps the JetStream gauges current until `shutdown`.
pub async fn watch_queues(
    bus: vm0_bus::Bus,
    instruments: Arc<Instruments>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    every_tick(shutdown, || async {
        match bus.queue_depths().await {
            Ok(depths) => depths.iter().for_each(|d| instruments.set_queue(d)),
            Err(e) => tracing::debug!(error = %e, "reading the streams' depths failed"),
        }
    })
    .await;
}

/// The statuses [`watch_runs`] counts: the live ones. Ended runs only grow
/// (`runs_finished_total` counts them) and counting them would scan the table.
const LIVE: [RunStatus; 2] = [RunStatus::Pending, RunStatus::Running];

/// Keeps the `runs` gauge current (a grouped count over the status index)
/// until `shutdown`.
pub async fn watch_runs(
    store: vm0_db::Store,
    instruments: Arc<Instruments>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    every_tick(shutdown, || async {
        match store.count_runs_by_status(&LIVE).await {
            Ok(counts) => {
                for status in LIVE {
                    let n = counts
                        .iter()
                        .find(|(s, _)| *s == status)
                        .map_or(0, |(_, n)| *n);
                    instruments
                        .runs_live
                        .get_or_create(&StatusLabels {
                            status: status.as_str(),
                        })
                        .set(i64::try_from(n).unwrap_or(i64::MAX));
                }
            }
            Err(e) => tracing::debug!(error = %e, "counting the live runs failed"),
        }
    })
    .await;
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
