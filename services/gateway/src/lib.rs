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
/// The gRPC control plane workers talk to.
pub mod control_plane;
/// Publishing run jobs and the control plane's events.
pub mod dispatch;
/// `ApiError`: failures as HTTP responses in the error envelope.
pub mod error;
/// Extractors that reject bad input in the error envelope.
pub mod extract;
/// The OpenAPI 3.1 document, generated from the handlers and types.
pub mod openapi;
/// Stores telemetry from NATS in batches.
pub mod persister;
/// Prometheus metrics: what the gateway counts for its operators.
pub mod prometheus;
/// Backstops: lost workers, timeouts, pending runs whose job was lost.
pub mod reaper;
/// Request ids, per-request spans, common response headers.
pub mod request_id;
/// Deletes the records of runs that ended long ago.
pub mod retention;
/// HTTP handlers.
pub mod routes;
/// Run secrets sealed at rest.
pub mod secrets;
/// Volumes' and artifacts' bytes: object keys, signed URLs, commits.
pub mod storage;
/// Worker credentials: who may talk to the control plane.
pub mod worker_auth;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::serve::ListenerExt;
use secrets::SecretBox;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use vm0_bus::Bus;
use vm0_db::Store;

pub use config::GatewayConfig;
use error::ApiError;
use routes::storage::{artifacts, volumes};
use routes::{agents, events, health, objects, runs, telemetry, tokens};

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub config: Arc<GatewayConfig>,
    /// Recently verified (and refused) API tokens.
    pub tokens: Arc<auth::TokenCache>,
    /// Bad tokens per client address.
    pub auth_failures: Arc<auth::FailureLimit>,
    /// Cancelled at shutdown; long-lived responses (event streams) end on it.
    pub shutdown: CancellationToken,
    /// NATS, when dispatch is configured.
    pub bus: Option<Bus>,
    pub secrets: SecretBox,
    /// Event streams open on this gateway, per organization.
    pub event_streams: Arc<routes::events::OrgStreams>,
    pub storage: Arc<storage::StorageService>,
    /// Prometheus instruments (`GET /metrics`).
    pub instruments: Arc<prometheus::Instruments>,
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

/// Largest body of `POST /:id/upload` (the list of a version's files).
const UPLOAD_BODY_BYTES: usize = 32 << 20;

/// The whole HTTP API as a router (no socket: tests may drive it directly).
pub fn app(state: AppState) -> Router {
    let body_limit = state.config.max_body_bytes;
    // Only on the API port when no port of their own is configured.
    let metrics = match state.config.metrics_addr {
        None => vm0_prometheus::router(state.instruments.scrape(state.event_streams.clone())),
        Some(_) => Router::new(),
    };
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
        .route("/v1/volumes", get(volumes::list).post(volumes::create))
        .route(
            "/v1/volumes/{id}",
            get(volumes::get).delete(volumes::delete),
        )
        .route("/v1/volumes/{id}/versions", get(volumes::versions))
        .route("/v1/volumes/{id}/download", get(volumes::download))
        .route(
            "/v1/artifacts",
            get(artifacts::list).post(artifacts::create),
        )
        .route(
            "/v1/artifacts/{id}",
            get(artifacts::get).delete(artifacts::delete),
        )
        .route("/v1/artifacts/{id}/versions", get(artifacts::versions))
        .route("/v1/artifacts/{id}/download", get(artifacts::download))
        .merge(
            // An upload lists every file: up to 100,000 of them.
            Router::new()
                .route("/v1/volumes/{id}/upload", post(volumes::upload))
                .route("/v1/volumes/{id}/commit", post(volumes::commit))
                .route("/v1/artifacts/{id}/upload", post(artifacts::upload))
                .route("/v1/artifacts/{id}/commit", post(artifacts::commit))
                .layer(DefaultBodyLimit::max(body_limit.max(UPLOAD_BODY_BYTES))),
        )
        .merge(
            // A file's bytes stream to the store, bounded by the signed size.
            Router::new()
                .route("/v1/objects/{*key}", put(objects::put).get(objects::get))
                .layer(DefaultBodyLimit::disable()),
        )
        .merge(metrics.with_state(()))
        .route_layer(axum::middleware::from_fn(prometheus::record_route))
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(axum::middleware::from_fn_with_state(
            state.instruments.clone(),
            prometheus::count,
        ))
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

/// Everything a gateway process serves from.
pub struct Gateway {
    pub config: GatewayConfig,
    pub store: Store,
    pub objects: vm0_storage::Objects,
    pub bus: Option<Bus>,
    pub secrets: SecretBox,
}

impl Gateway {
    /// Opens the store (migrating it), checks that the secrets key is the
    /// deployment's, and connects to NATS when dispatch is configured (creating
    /// the streams).
    pub async fn open(config: GatewayConfig, secrets: SecretBox) -> anyhow::Result<Gateway> {
        use anyhow::Context;
        let store = open_store(&config).await?;
        secrets.check_against(&store).await?;
        let options: Vec<(&str, &str)> = config
            .storage
            .object_store_options
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let objects = vm0_storage::Objects::open_with(
            config.storage.object_store_url.as_deref(),
            &config.data_dir.join("objects"),
            &options,
        )
        .context("opening the object store (VM0_OBJECT_STORE_URL)")?;
        let bus = match &config.dispatch {
            Some(d) => {
                let bus = Bus::connect(&d.nats, vm0_bus::Role::Gateway, "vm0-gateway").await?;
                bus.ensure_streams(d.telemetry_max_bytes)
                    .await
                    .context("creating JetStream streams")?;
                Some(bus)
            }
            None => None,
        };
        Ok(Gateway {
            config,
            store,
            objects,
            bus,
            secrets,
        })
    }

    /// Serves the API on `http` (and the control plane on `grpc` when dispatch is
    /// configured) until `shutdown` is cancelled; then drains and returns.
    pub async fn serve(
        self,
        http: TcpListener,
        grpc: Option<TcpListener>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let dispatch = self.config.dispatch.clone().map(Arc::new);
        let storage_service = Arc::new(storage::StorageService {
            objects: self.objects.clone(),
            signer: self.secrets.url_signer(),
            limits: self.config.storage.limits,
            url_ttl: self.config.storage.url_ttl,
            public_url: self.config.storage.public_url.clone(),
            listen_addr: http.local_addr()?,
        });
        let instruments = Arc::new(prometheus::Instruments::default());
        let state = AppState {
            store: self.store.clone(),
            tokens: Arc::new(auth::TokenCache::new(self.config.auth_cache_ttl)),
            auth_failures: Arc::new(auth::FailureLimit::new(
                self.config.auth_failures_per_minute,
            )),
            config: Arc::new(self.config),
            shutdown: shutdown.clone(),
            bus: self.bus.clone(),
            secrets: self.secrets.clone(),
            event_streams: Arc::new(routes::events::OrgStreams::default()),
            storage: storage_service,
            instruments: instruments.clone(),
        };
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(addr) = state.config.metrics_addr {
            use anyhow::Context;
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding VM0_METRICS_ADDR {addr}"))?;
            tracing::info!(addr = %listener.local_addr()?, "serving metrics");
            let scrape = instruments.scrape(state.event_streams.clone());
            let stop = shutdown.clone();
            tasks.spawn(async move {
                if let Err(e) = vm0_prometheus::serve(listener, scrape, stop).await {
                    tracing::error!(error = %e, "the metrics listener failed");
                }
            });
        }
        tasks.spawn(storage::sweep_uploads(
            self.store.clone(),
            state.storage.clone(),
            state.config.retention_interval,
            shutdown.clone(),
        ));
        if let Some(keep) = state.config.records_retention {
            tasks.spawn(retention::run(
                self.store.clone(),
                keep,
                state.config.retention_interval,
                shutdown.clone(),
            ));
        }
        tasks.spawn(prometheus::watch_runs(
            self.store.clone(),
            instruments.clone(),
            shutdown.clone(),
        ));
        if let Some(bus) = &self.bus {
            tasks.spawn(prometheus::watch_queues(
                bus.clone(),
                instruments.clone(),
                shutdown.clone(),
            ));
            tasks.spawn(auth::forget_revoked(
                state.tokens.clone(),
                bus.clone(),
                shutdown.clone(),
            ));
        }
        if let (Some(bus), Some(dispatch)) = (self.bus, dispatch) {
            tasks.spawn(persister::run(
                self.store.clone(),
                bus.clone(),
                instruments.clone(),
                shutdown.clone(),
            ));
            tasks.spawn(reaper::run(
                self.store.clone(),
                bus.clone(),
                dispatch.clone(),
                instruments.clone(),
                shutdown.clone(),
            ));
            if let Some(grpc) = grpc {
                let addr = grpc.local_addr()?;
                let mut builder = tonic::transport::Server::builder();
                match &dispatch.grpc_tls {
                    Some(tls) => {
                        let identity =
                            tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem);
                        builder = builder
                            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                            .map_err(|e| anyhow::anyhow!("the control plane's TLS: {e}"))?;
                    }
                    // Run secrets cross this link: in clear only on loopback.
                    None if !addr.ip().is_loopback() => anyhow::bail!(
                        "the control plane listens on {addr}, which is not loopback, without TLS \
                         (set VM0_GRPC_TLS_CERT and VM0_GRPC_TLS_KEY)"
                    ),
                    None => {}
                }
                let svc = control_plane::server(
                    self.store.clone(),
                    bus,
                    self.secrets,
                    dispatch,
                    state.storage.clone(),
                    instruments.clone(),
                );
                let stop = shutdown.clone();
                tasks.spawn(async move {
                    let incoming =
                        tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true));
                    let served = builder
                        .trace_fn(control_plane::rpc_span)
                        .add_service(svc)
                        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                        .await;
                    if let Err(e) = served {
                        tracing::error!(error = %e, "control plane server failed");
                    }
                });
            }
        }
        // Event streams write small frames: without TCP_NODELAY, Nagle holds each one
        // back until the client's delayed ACK (about 40 ms).
        let http = http.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        // Connect info: the client's address limits bad tokens per address.
        let served = axum::serve(
            http,
            app(state).into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await;
        shutdown.cancel();
        while tasks.join_next().await.is_some() {}
        served?;
        Ok(())
    }
}
