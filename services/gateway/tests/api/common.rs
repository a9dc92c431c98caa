//! A real gateway on a real socket over a real database, and an HTTP client.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use vm0_db::Store;
use vm0_gateway::GatewayConfig;

pub use vm0_db::testing::TestDb as Db;

static ERRORS_LOGGED: AtomicUsize = AtomicUsize::new(0);

/// Counts ERROR events: a test fails if the gateway logged one it did not expect.
struct ErrorCounter;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for ErrorCounter {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if *event.metadata().level() == tracing::Level::ERROR {
            ERRORS_LOGGED.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn init_tracing() {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::registry()
        .with(ErrorCounter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_test_writer()
                .with_filter(filter),
        )
        .try_init();
}

pub struct TestGateway {
    pub base: String,
    pub client: reqwest::Client,
    /// Token of the default organization `acme`.
    pub token: String,
    pub store: Store,
    /// The gateway's database (fault injection writes to it directly).
    pub database_url: String,
    /// Its data directory (the local object store is `objects/` in it).
    pub data_dir: std::path::PathBuf,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl TestGateway {
    pub async fn start(db: Db) -> TestGateway {
        Self::start_with(db, |_| {}).await
    }

    pub async fn start_with(db: Db, tweak: impl FnOnce(&mut GatewayConfig)) -> TestGateway {
        init_tracing();
        let dir = tempfile::tempdir().expect("tempdir");
        let database_url = vm0_db::testing::fresh_database_url(db, dir.path()).await;
        let mut config = GatewayConfig::for_database(database_url.clone());
        config.data_dir = dir.path().to_owned();
        tweak(&mut config);
        let gateway = vm0_gateway::Gateway::open(config, vm0_gateway::secrets::SecretBox::random())
            .await
            .expect("open gateway");
        let store = gateway.store.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let shutdown = CancellationToken::new();
        tokio::spawn(gateway.serve(listener, None, shutdown.clone()));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client");
        let mut gw = TestGateway {
            base,
            client,
            token: String::new(),
            store,
            database_url,
            data_dir: dir.path().to_owned(),
            shutdown,
            _dir: dir,
        };
        gw.token = gw.mint_token("acme").await;
        gw
    }

    /// A token of organization `org` (created if new), as the admin command mints it.
    pub async fn mint_token(&self, org: &str) -> String {
        let now = vm0_api_types::Timestamp::now().micros();
        let org = self.store.ensure_organization(org, now).await.expect("org");
        vm0_gateway::routes::tokens::create_token(&self.store, &org.id, "test", None, None)
            .await
            .expect("token")
            .token
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Sends a request with the default token; returns status and JSON body (Null if empty).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        self.call_as(&self.token, method, path, body).await
    }

    pub async fn call_as(
        &self,
        token: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .client
            .request(method, self.url(path))
            .bearer_auth(token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        assert_eq!(
            resp.headers()["x-api-version"],
            "v1",
            "every response has X-API-Version"
        );
        assert!(
            resp.headers().contains_key("x-request-id"),
            "every response has X-Request-Id"
        );
        let bytes = resp.bytes().await.expect("body");
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("non-JSON body {bytes:?}: {e}"))
        };
        (status, value)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(body)).await
    }

    /// Creates an agent running `command`; returns its JSON.
    pub async fn create_agent(&self, name: &str) -> Value {
        let (status, body) = self
            .post(
                "/v1/agents",
                json!({"name": name, "config": {"command": ["echo", "hi"]}}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body
    }

    pub async fn create_run(&self, agent: &str, prompt: &str) -> Value {
        let (status, body) = self
            .post("/v1/runs", json!({"agent": agent, "prompt": prompt}))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        body
    }

    /// Follows `nextCursor` until the end; returns every item's `id` (or the whole
    /// items when they have none).
    pub async fn walk(&self, path: &str, limit: u32) -> Vec<Value> {
        let mut items = Vec::new();
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut next: Option<String> = None;
        loop {
            let url = match &next {
                None => format!("{path}{sep}limit={limit}"),
                Some(c) => format!("{path}{sep}limit={limit}&cursor={c}"),
            };
            let (status, body) = self.get(&url).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            let data = body["data"].as_array().expect("data array");
            assert!(data.len() <= limit as usize);
            items.extend(data.iter().cloned());
            match body["pagination"]["nextCursor"].as_str() {
                Some(c) => {
                    assert_eq!(body["pagination"]["hasMore"], true);
                    next = Some(c.to_owned());
                }
                None => {
                    assert_eq!(body["pagination"]["hasMore"], false);
                    return items;
                }
            }
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if !std::thread::panicking() {
            let errors = ERRORS_LOGGED.load(Ordering::SeqCst);
            assert_eq!(
                errors, 0,
                "the gateway logged {errors} unexpected ERROR line(s)"
            );
        }
    }
}

/// Asserts the error envelope: status, type, code and (when given) param.
#[track_caller]
/// `400 invalid_parameter` naming `param`.
pub fn assert_invalid(got: &(StatusCode, Value), param: &str) {
    assert_error(
        got,
        400,
        "invalid_request_error",
        "invalid_parameter",
        Some(param),
    );
}

pub fn assert_error(
    got: &(StatusCode, Value),
    status: u16,
    kind: &str,
    code: &str,
    param: Option<&str>,
) {
    let (s, body) = got;
    assert_eq!(s.as_u16(), status, "status of {body}");
    let err = &body["error"];
    assert_eq!(err["type"], kind, "type of {body}");
    assert_eq!(err["code"], code, "code of {body}");
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "message of {body}"
    );
    if let Some(param) = param {
        assert_eq!(err["param"], param, "param of {body}");
    }
}
