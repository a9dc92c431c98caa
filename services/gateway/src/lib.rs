//! The vm0 gateway: the VM0 v1 REST API and its Server-Sent Events, served from
//! the store. Stateless: any number of replicas can serve the same store.
//!
//! A request passes [`request_id::middleware`] (id, span, version header), then the
//! router; handlers in [`routes`] authenticate ([`auth::Caller`]), validate with the
//! extractors of [`extract`], call [`vm0_db::Store`], and return wire types of
//! `vm0-api-types`. Every failure becomes an [`error::ApiError`].

/// Bearer-token authentication and token minting.
pub mod auth;
/// Configuration from the environment.
pub mod config;
/// `ApiError`: failures as HTTP responses in the error envelope.
pub mod error;
/// Extractors that reject bad input in the error envelope.
pub mod extract;
/// The OpenAPI 3.1 document, generated from the handlers and types.
pub mod openapi;
/// Request ids, per-request spans, common response headers.
pub mod request_id;
/// HTTP handlers.
pub mod routes;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use vm0_db::Store;

pub use config::GatewayConfig;
use error::ApiError;
use routes::{agents, events, health, runs, telemetry, tokens};

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub config: Arc<GatewayConfig>,
    /// Recently verified API tokens.
    pub tokens: Arc<auth::TokenCache>,
    /// Cancelled at shutdown; long-lived responses (event streams) end on it.
    pub shutdown: CancellationToken,
}

async fn route_not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::route_not_found(method.as_str(), uri.path())
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(method.as_str(), uri.path())
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let err = std::io::Error::other("handler panicked");
    ApiError::internal(&err).into_response()
}

/// The whole HTTP API as a router (no socket: tests may drive it directly).
pub fn app(state: AppState) -> Router {
    let body_limit = state.config.max_body_bytes;
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/v1/openapi.json", get(openapi::serve))
        .route("/v1/agents", get(agents::list).post(agents::create))
        .route(
            "/v1/agents/{id}",
            get(agents::get).put(agents::update).delete(agents::delete),
        )
        .route("/v1/agents/{id}/versions", get(agents::versions))
        .route("/v1/runs", get(runs::list).post(runs::create))
        .route("/v1/runs/{id}", get(runs::get))
        .route("/v1/runs/{id}/cancel", post(runs::cancel))
        .route("/v1/runs/{id}/events", get(events::stream))
        .route("/v1/runs/{id}/logs", get(telemetry::logs))
        .route("/v1/runs/{id}/metrics", get(telemetry::metrics))
        .route("/v1/tokens", get(tokens::list).post(tokens::create))
        .route("/v1/tokens/{id}", delete(tokens::revoke))
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(axum::middleware::from_fn(request_id::middleware))
        .with_state(state)
}

/// Connects to the store and applies migrations.
pub async fn open_store(config: &GatewayConfig) -> anyhow::Result<Store> {
    use anyhow::Context;
    let store = Store::connect(&config.database_url, config.db_max_connections)
        .await
        .with_context(|| {
            format!(
                "connecting to {}",
                vm0_db::store::redact_url(&config.database_url)
            )
        })?;
    store.migrate().await.context("applying migrations")?;
    Ok(store)
}

/// Serves the API on `listener` until `shutdown` is cancelled, then drains.
pub async fn serve(
    store: Store,
    config: GatewayConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let state = AppState {
        store,
        tokens: Arc::new(auth::TokenCache::new(config.auth_cache_ttl)),
        config: Arc::new(config),
        shutdown: shutdown.clone(),
    };
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    Ok(())
}
