//! Prometheus exposition for the gateway and the worker: each builds its
//! instruments into a [`Registry`] (`prometheus-client`, no global state) and
//! serves it as `GET /metrics` in the text format, on its API router or on a
//! listener of its own ([`serve`], `VM0_METRICS_ADDR`). Names follow the
//! conventions: a `vm0_` prefix, base units (`_seconds`, `_bytes`), `_total`
//! for counters, and no label of high cardinality (no run, agent or
//! organization ids).

use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
pub use prometheus_client;
pub use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The content type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Latency buckets in seconds, 1 ms to about 65 s.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 17)
}

/// `registry` in the text format.
pub fn render(registry: &Registry) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "encoding the metrics failed");
            axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// What a scrape shows: the registry, and what brings its gauges up to date
/// first (values read at scrape time, such as free slots).
#[derive(Clone)]
pub struct Scrape {
    pub registry: Arc<Registry>,
    pub refresh: Option<Arc<dyn Fn() + Send + Sync>>,
}

/// A router with `GET /metrics` only.
pub fn router(scrape: Scrape) -> Router {
    Router::new().route(
        "/metrics",
        get(move || async move {
            if let Some(refresh) = &scrape.refresh {
                refresh();
            }
            render(&scrape.registry)
        }),
    )
}

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    scrape: Scrape,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(scrape))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}
