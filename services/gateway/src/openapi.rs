//! The OpenAPI 3.1 document, derived from the handlers' annotations and the wire
//! types, so it cannot drift from the code. [`precise`] then adds what the
//! annotations cannot say, from the same constants and grammars the server
//! validates with: id and cursor patterns, ranges and lengths, the statuses
//! every operation can answer (400, 401, 404, 413, 415), bearer security.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};
use vm0_api_types::agents::limits;
use vm0_api_types::cursor::{Cursor, CursorId, MAX_LIMIT};
use vm0_api_types::ids::{IdKind, id_pattern};

use crate::AppState;
use crate::routes::storage::{artifacts, volumes};
use crate::routes::{agents, events, health, runs, telemetry, tokens};
use crate::storage::EMPTY_SHA256;

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

/// The document as a deployment with these storage limits serves it.
pub fn document(limits: &vm0_storage::manifest::Limits) -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    precise(&mut doc);
    deployment(&mut doc, limits);
    doc
}

/// Serve the OpenAPI document
pub async fn serve(State(state): State<AppState>) -> Json<Value> {
    Json(document(&state.storage.limits))
}

/// What the operator configures (`VM0_STORAGE_MAX_*`) and an upload is held to.
fn deployment(doc: &mut Value, limits: &vm0_storage::manifest::Limits) {
    if let Some(file) = doc.pointer_mut("/components/schemas/UploadFile") {
        file["allOf"] = json!([
            // A link's size is its target's; a file's is within the limit.
            {
                "if": {"required": ["link"], "properties": {"link": {"type": "string"}}},
                "else": {"properties": {"size": {"maximum": limits.max_file_bytes}}},
            },
            // An empty file's digest is known: none, or that of nothing.
            {
                "if": {"required": ["size"], "properties": {"size": {"const": 0}, "link": {"type": "null"}}},
                "then": {"properties": {"sha256": {"enum": [null, EMPTY_SHA256]}}},
            },
        ]);
    }
    if let Some(files) = doc.pointer_mut("/components/schemas/UploadRequest/properties/files") {
        files["maxItems"] = json!(limits.max_files);
    }
}

/// Where a response leads (OpenAPI links), so that clients and testers that
/// follow them reach what was just created by its own id, and commit the
/// upload session an upload opened.
fn links(doc: &mut Value) {
    let by_id = |targets: &[&str], id: &str| -> Value {
        targets
            .iter()
            .map(|op| {
                let name = op.split_once('_').map_or(*op, |(_, verb)| verb).to_owned();
                (
                    name,
                    json!({"operationId": op, "parameters": {"path.id": id}}),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let created = "$response.body#/id";
    let mut table = vec![
        (
            "/v1/agents".to_owned(),
            "201",
            by_id(
                &[
                    "agents_get",
                    "agents_update",
                    "agents_delete",
                    "agents_versions",
                ],
                created,
            ),
        ),
        (
            "/v1/runs".to_owned(),
            "202",
            by_id(
                &["runs_get", "runs_cancel", "runs_logs", "runs_metrics"],
                created,
            ),
        ),
        (
            "/v1/tokens".to_owned(),
            "201",
            by_id(&["tokens_revoke"], created),
        ),
    ];
    for kind in ["volumes", "artifacts"] {
        let ops: Vec<String> = ["get", "upload", "versions", "download", "delete"]
            .iter()
            .map(|verb| format!("{kind}_{verb}"))
            .collect();
        let ops: Vec<&str> = ops.iter().map(String::as_str).collect();
        table.push((format!("/v1/{kind}"), "201", by_id(&ops, created)));
        table.push((
            format!("/v1/{kind}/{{id}}/upload"),
            "201",
            json!({"commit": {
                "operationId": format!("{kind}_commit"),
                "parameters": {"path.id": "$request.path.id"},
                "requestBody": {"uploadSessionId": "$response.body#/uploadSessionId"},
            }}),
        ));
    }
    for (path, status, links) in table {
        if let Some(response) = doc
            .get_mut("paths")
            .and_then(|p| p.get_mut(&path))
            .and_then(|p| p.get_mut("post"))
            .and_then(|op| op.get_mut("responses"))
            .and_then(|r| r.get_mut(status))
        {
            response["links"] = links;
        }
    }
}

/// Names: 1–100 lowercase letters, digits and hyphens, no hyphen at either end
/// (`validate_agent_name`).
const NAME_PATTERN: &str = "^[a-z0-9]([a-z0-9-]{0,98}[a-z0-9])?$";
/// No NUL anywhere (the server refuses NUL in every string it stores).
const NO_NUL: &str = "^[^\\u0000]*$";
/// Environment names (`validate_env_map`): POSIX-style, `VM0_` (any case) reserved.
const ENV_NAME_PATTERN: &str = "^(?![Vv][Mm]0_)[A-Za-z_][A-Za-z0-9_]{0,255}$";
/// Characters `char::is_control` and `str::trim` leave: a token name needs one
/// that is neither (and none that is a control character).
const PRINTABLE: &str = "[^\\u0000-\\u001f\\u007f-\\u009f]";
const VISIBLE: &str =
    "[^\\u0000-\\u0020\\u007f-\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]";

use vm0_egress::policy::{host_name_pattern, ipv4_pattern, rule_pattern};

/// A header a secret may fill (`is_secret_header`): an HTTP token, none of
/// the reserved names in any case.
fn secret_header_pattern() -> String {
    let any_case = |name: &str| -> String {
        name.chars()
            .map(|c| {
                if c.is_ascii_alphabetic() {
                    format!("[{}{}]", c.to_ascii_lowercase(), c.to_ascii_uppercase())
                } else {
                    c.to_string()
                }
            })
            .collect()
    };
    let reserved: Vec<String> = vm0_api_types::agents::RESERVED_HEADERS
        .iter()
        .map(|n| any_case(n))
        .collect();
    format!("^(?!({})$)[!#$%&'*+.^_`|~0-9A-Za-z-]+$", reserved.join("|"))
}

/// Upload paths: `/`-separated components, none empty, `.` or `..`, no
/// control characters (`char::is_control`).
const UPLOAD_PATH_PATTERN: &str = "^(?!\\.\\.?(/|$))(?!.*/\\.\\.?(/|$))[^/\\u0000-\\u001f\\u007f-\\u009f]+(/[^/\\u0000-\\u001f\\u007f-\\u009f]+)*$";

/// The resource a path's `{id}` names.
fn path_kind(path: &str) -> Option<IdKind> {
    let resource = path.strip_prefix("/v1/")?.split('/').next()?;
    Some(match resource {
        "agents" => IdKind::Agent,
        "runs" => IdKind::Run,
        "tokens" => IdKind::Token,
        "volumes" => IdKind::Volume,
        "artifacts" => IdKind::Artifact,
        _ => return None,
    })
}

/// The list a `cursor` parameter walks (the scopes the handlers page with).
fn cursor_scope(path: &str) -> Option<(String, CursorId)> {
    let scope = match path {
        "/v1/agents" | "/v1/runs" | "/v1/tokens" | "/v1/volumes" | "/v1/artifacts" => {
            path.trim_start_matches("/v1/").to_owned()
        }
        "/v1/agents/{id}/versions" => "agent_versions".into(),
        "/v1/volumes/{id}/versions" => "volumes_versions".into(),
        "/v1/artifacts/{id}/versions" => "artifacts_versions".into(),
        "/v1/runs/{id}/logs" => return Some(("logs".into(), CursorId::RowNumber)),
        "/v1/runs/{id}/metrics" => return Some(("metrics".into(), CursorId::RowNumber)),
        _ => return None,
    };
    Some((scope, CursorId::Name))
}

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}}
    })
}

/// Adds what the annotations cannot express; see the module comment.
pub fn precise(doc: &mut Value) {
    doc["security"] = json!([{"bearer": []}]);
    split_storage(doc);
    if let Some(paths) = doc["paths"].as_object_mut() {
        for (path, ops) in paths.iter_mut() {
            let Some(ops) = ops.as_object_mut() else {
                continue;
            };
            for (method, op) in ops.iter_mut() {
                operation(path, method, op);
            }
        }
    }
    if let Some(schemas) = doc["components"]["schemas"].as_object_mut() {
        for (name, schema) in schemas.iter_mut() {
            component(name, schema);
        }
    }
    page_items_by_ref(doc);
    links(doc);
}

/// utoipa inlines a page's item type; a reference to the item's own component
/// gives generated clients one model per resource (`Run`, not a `PageRunDataItem`).
fn page_items_by_ref(doc: &mut Value) {
    let Some(schemas) = doc
        .get_mut("components")
        .and_then(|c| c.get_mut("schemas"))
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    let names: std::collections::BTreeSet<String> = schemas.keys().cloned().collect();
    for (name, schema) in schemas.iter_mut() {
        if let Some(item) = name.strip_prefix("Page_")
            && names.contains(item)
            && let Some(data) = schema.get_mut("properties").and_then(|p| p.get_mut("data"))
        {
            data["items"] = json!({"$ref": format!("#/components/schemas/{item}")});
        }
    }
}

/// Volumes and artifacts share one wire shape (`Storage`); as one component a
/// client generator, or a tester following responses to requests, cannot tell
/// a volume's id from an artifact's. Each kind gets its own named copies.
fn split_storage(doc: &mut Value) {
    const SHARED: [&str; 4] = [
        "Storage",
        "StorageVersion",
        "Page_Storage",
        "Page_StorageVersion",
    ];
    let rename = |text: &str, kind: &str| {
        SHARED.iter().rev().fold(text.to_owned(), |t, name| {
            t.replace(
                &format!("#/components/schemas/{name}\""),
                &format!("#/components/schemas/{}\"", name.replace("Storage", kind)),
            )
        })
    };
    for kind in ["Volume", "Artifact"] {
        let prefix = format!("/v1/{}s", kind.to_lowercase());
        if let Some(paths) = doc["paths"].as_object_mut() {
            for (path, ops) in paths.iter_mut() {
                if path.starts_with(&prefix)
                    && let Ok(renamed) = serde_json::from_str(&rename(&ops.to_string(), kind))
                {
                    *ops = renamed;
                }
            }
        }
        if let Some(schemas) = doc["components"]["schemas"].as_object_mut() {
            for name in SHARED {
                if let Some(schema) = schemas.get(name)
                    && let Ok(copy) = serde_json::from_str(&rename(&schema.to_string(), kind))
                {
                    schemas.insert(name.replace("Storage", kind), copy);
                }
            }
        }
    }
    if let Some(schemas) = doc["components"]["schemas"].as_object_mut() {
        for name in SHARED {
            schemas.remove(name);
        }
    }
}

fn operation(path: &str, method: &str, op: &mut Value) {
    let authenticated = op["security"].as_array().is_some_and(|s| !s.is_empty());
    if !authenticated {
        op["security"] = json!([]);
        return;
    }
    if method == "post" && path == "/v1/tokens" {
        // Every field is optional: no body is an empty one.
        op["requestBody"]["required"] = json!(false);
    }
    // Unique per operation (utoipa names them by function: `list`, `create`).
    if let (Some(tag), Some(id)) = (op["tags"][0].as_str(), op["operationId"].as_str()) {
        op["operationId"] = json!(format!("{tag}_{id}"));
    }
    let has_body = op.get("requestBody").is_some();
    let responses = op.get_mut("responses").and_then(Value::as_object_mut);
    if let Some(responses) = responses {
        let mut add = |status: &str, description: &str| {
            responses
                .entry(status)
                .or_insert_with(|| error_response(description));
        };
        add(
            "400",
            "invalid_parameter or missing_parameter: a bad field, id, filter or cursor, or an unknown query parameter",
        );
        add(
            "401",
            "invalid_api_key: no token, or one that is unknown, expired or revoked",
        );
        add(
            "429",
            "rate_limited: too many requests with invalid tokens from this address",
        );
        if path.contains("{id}") {
            add(
                "404",
                "not_found: no such resource in the caller's organization",
            );
        }
        if has_body {
            add("413", "the body is larger than VM0_MAX_BODY_BYTES");
            add("415", "the body is not application/json");
        }
    }
    let kind = path_kind(path);
    let Some(params) = op.get_mut("parameters").and_then(Value::as_array_mut) else {
        return;
    };
    for param in params {
        let name = param["name"].as_str().unwrap_or_default().to_owned();
        let schema = match (param["in"].as_str(), name.as_str()) {
            (Some("path"), "id") => {
                kind.map(|k| json!({"type": "string", "pattern": id_pattern(k)}))
            }
            (Some("query"), "limit") => {
                Some(json!({"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}))
            }
            (Some("query"), "cursor") => cursor_scope(path).map(
                |(scope, id)| json!({"type": "string", "pattern": Cursor::pattern(&scope, id)}),
            ),
            (Some("query"), "name") => Some(json!({"type": "string", "pattern": NAME_PATTERN})),
            (Some("query"), "agentId") => {
                Some(json!({"type": "string", "pattern": id_pattern(IdKind::Agent)}))
            }
            (Some("query"), "since" | "until") => {
                Some(json!({"type": "string", "format": "date-time"}))
            }
            (Some("query"), "order") => Some(json!({"type": "string", "enum": ["asc", "desc"]})),
            (Some("query"), "type") => {
                Some(json!({"type": "string", "enum": ["all", "agent", "system", "network"]}))
            }
            (Some("query"), "level") => {
                Some(json!({"type": "string", "enum": ["debug", "info", "warn", "error"]}))
            }
            (Some("query"), "format") => {
                Some(json!({"type": "string", "enum": ["tar.gz", "json"]}))
            }
            (Some("query"), "versionId") => {
                Some(json!({"type": "string", "pattern": "^([0-9a-f]{8,64})?$"}))
            }
            (Some("query"), "lastEventId") => {
                Some(json!({"type": "string", "pattern": "^(evt_)?[0-9]{1,18}$"}))
            }
            _ => None,
        };
        if let Some(schema) = schema {
            param["schema"] = schema;
        }
    }
}

/// A string property (nullable or not) gets `extra`.
fn refine(schema: &mut Value, property: &str, extra: Value) {
    let Some(target) = schema
        .get_mut("properties")
        .and_then(|p| p.get_mut(property))
    else {
        return;
    };
    if let (Some(target), Some(extra)) = (target.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            target.insert(k.clone(), v.clone());
        }
    }
}

fn env_map() -> Value {
    json!({
        "type": "object",
        "maxProperties": limits::MAX_ENV_VARS,
        "propertyNames": {"pattern": ENV_NAME_PATTERN},
        "additionalProperties": {"type": "string", "maxLength": limits::MAX_ENV_VALUE_LEN, "pattern": NO_NUL},
    })
}

fn component(name: &str, schema: &mut Value) {
    use limits::*;
    match name {
        "CreateAgentRequest" | "CreateStorageRequest" => {
            refine(schema, "name", json!({"pattern": NAME_PATTERN}));
        }
        "AgentConfig" => {
            refine(
                schema,
                "command",
                json!({
                    "minItems": 1,
                    "maxItems": MAX_ARGS,
                    "prefixItems": [{"type": "string", "minLength": 1, "maxLength": MAX_ARG_LEN, "pattern": NO_NUL}],
                    "items": {"type": "string", "maxLength": MAX_ARG_LEN, "pattern": NO_NUL},
                }),
            );
            refine(schema, "env", env_map());
            refine(
                schema,
                "timeoutSeconds",
                json!({"minimum": 1, "maximum": MAX_TIMEOUT_SECONDS}),
            );
            refine(
                schema,
                "image",
                json!({"pattern": format!("^[a-z0-9][a-z0-9._:/-]{{0,{}}}$", MAX_IMAGE_LEN - 1)}),
            );
            refine(
                schema,
                "workingDir",
                json!({"pattern": format!("^(?!.*/\\.\\.(/|$))/[^\\u0000]{{0,{}}}$", MAX_PATH_LEN - 1)}),
            );
        }
        "Resources" => {
            refine(schema, "vcpus", json!({"minimum": 1, "maximum": MAX_VCPUS}));
            refine(
                schema,
                "memoryMb",
                json!({"minimum": MIN_MEMORY_MB, "maximum": MAX_MEMORY_MB}),
            );
            refine(
                schema,
                "diskMb",
                json!({"minimum": MIN_DISK_MB, "maximum": MAX_DISK_MB}),
            );
        }
        "CreateRunRequest" => {
            schema["required"] = json!(["prompt"]);
            // Exactly one target that is not null (null is absent).
            let given = |field: &str| json!({"required": [field], "properties": {field: {"type": "string"}}});
            // Inside `allOf`: client generators make a top-level `oneOf` a
            // union of partial models; under `allOf` they keep one model.
            schema["allOf"] = json!([
                {"oneOf": [given("agent"), given("agentId"), given("sessionId"), given("checkpointId")]},
                {"if": given("artifactVersion"), "then": given("artifactName")},
            ]);
            refine(
                schema,
                "prompt",
                json!({
                    "type": "string",
                    "maxLength": vm0_api_types::runs::MAX_PROMPT_BYTES,
                    "pattern": format!("^[^\\u0000]*{VISIBLE}[^\\u0000]*$"),
                }),
            );
            refine(
                schema,
                "agent",
                json!({"type": "string", "pattern": NAME_PATTERN}),
            );
            refine(
                schema,
                "agentId",
                json!({"type": "string", "pattern": id_pattern(IdKind::Agent)}),
            );
            refine(
                schema,
                "sessionId",
                json!({"type": "string", "pattern": id_pattern(IdKind::Session)}),
            );
            refine(
                schema,
                "checkpointId",
                json!({"type": "string", "pattern": id_pattern(IdKind::Checkpoint)}),
            );
            refine(schema, "artifactName", json!({"pattern": NAME_PATTERN}));
            refine(
                schema,
                "agentVersion",
                json!({"pattern": "^(latest|ver_[a-z0-9]{1,64}|[0-9]{1,18})$"}),
            );
            refine(schema, "variables", env_map());
            refine(
                schema,
                "volumes",
                json!({
                    "maxProperties": 64,
                    "propertyNames": {"pattern": NAME_PATTERN},
                    "additionalProperties": {"type": "string", "pattern": "^(latest|[0-9a-f]{8,64})$"},
                }),
            );
        }
        "Secrets" => {
            if let (Some(target), Some(extra)) = (schema.as_object_mut(), env_map().as_object()) {
                for (k, v) in extra {
                    target.insert(k.clone(), v.clone());
                }
            }
        }
        "CreateTokenRequest" => {
            refine(
                schema,
                "name",
                json!({"maxLength": 100, "pattern": format!("^{PRINTABLE}*{VISIBLE}{PRINTABLE}*$")}),
            );
            refine(
                schema,
                "expiresInDays",
                json!({"minimum": 1, "maximum": vm0_api_types::tokens::MAX_EXPIRES_IN_DAYS}),
            );
        }
        "CommitRequest" => {
            refine(
                schema,
                "uploadSessionId",
                json!({"pattern": id_pattern(IdKind::Upload)}),
            );
            refine(
                schema,
                "message",
                json!({"maxLength": 1000, "pattern": NO_NUL}),
            );
        }
        "NetworkConfig" => {
            let rules = json!({
                "maxItems": vm0_egress::policy::MAX_RULES,
                "items": {"type": "string", "maxLength": vm0_egress::policy::MAX_RULE_LEN, "pattern": rule_pattern()},
            });
            refine(schema, "allow", rules.clone());
            refine(schema, "deny", rules);
            refine(
                schema,
                "secretHeaders",
                json!({
                    "maxProperties": vm0_api_types::agents::MAX_SECRET_HEADERS,
                    "propertyNames": {"maxLength": 254, "pattern": host_name_pattern()},
                    "additionalProperties": {
                        "type": "object",
                        "minProperties": 1,
                        "maxProperties": vm0_api_types::agents::MAX_SECRET_HEADERS,
                        "propertyNames": {"maxLength": 100, "pattern": secret_header_pattern()},
                        "additionalProperties": {"type": "string", "pattern": ENV_NAME_PATTERN},
                    },
                }),
            );
            refine(
                schema,
                "extraHosts",
                json!({
                    "maxProperties": vm0_egress::policy::MAX_RULES,
                    "propertyNames": {"maxLength": 254, "pattern": host_name_pattern()},
                    "additionalProperties": {"type": "string", "pattern": format!("^{}$", ipv4_pattern())},
                }),
            );
        }
        "UploadFile" => {
            refine(schema, "path", json!({"pattern": UPLOAD_PATH_PATTERN}));
            refine(
                schema,
                "link",
                json!({"pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]+$"}),
            );
        }
        "UploadRequest" => {
            refine(
                schema,
                "message",
                json!({"maxLength": 1000, "pattern": NO_NUL}),
            );
        }
        _ => {}
    }
}
