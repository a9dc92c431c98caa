//! The OpenAPI 3.1 document, derived from the handlers' annotations and the wire
//! types, so it cannot drift from the code.

use axum::Json;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::routes::storage::{artifacts, volumes};
use crate::routes::{agents, events, health, runs, telemetry, tokens};

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "vm0 fleet API",
        version = "v1",
        description = "VM0 public API v1: agents, runs, events, logs, metrics, tokens, volumes, artifacts. Errors use {\"error\": {type, code, message, param}}."
    ),
    paths(
        health::healthz, health::readyz,
        agents::list, agents::create, agents::get, agents::update, agents::delete, agents::versions,
        runs::list, runs::create, runs::get, runs::cancel,
        events::stream, telemetry::logs, telemetry::metrics,
        tokens::create, tokens::list, tokens::revoke,
        volumes::list, volumes::create, volumes::get, volumes::delete, volumes::versions,
        volumes::upload, volumes::commit, volumes::download,
        artifacts::list, artifacts::create, artifacts::get, artifacts::delete, artifacts::versions,
        artifacts::upload, artifacts::commit, artifacts::download,
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "agents", description = "Named, versioned run recipes"),
        (name = "runs", description = "Agent executions and their events, logs, metrics"),
        (name = "tokens", description = "API tokens of the caller's organization"),
        (name = "volumes", description = "Versioned input files of runs"),
        (name = "artifacts", description = "Versioned output files of runs"),
        (name = "health", description = "Liveness and readiness, no auth"),
    )
)]
pub struct ApiDoc;

/// The document as JSON.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// Serve the OpenAPI document
pub async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(document())
}
