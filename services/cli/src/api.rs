//! The REST client every command shares: the base URL and token from
//! [`crate::auth::current`], JSON in and out, API errors as the CLI prints them
//! (message, HTTP status, code, request id), and pages followed by cursor.

use anyhow::{Context, Result};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use vm0_api_types::cursor::Page;

use crate::auth::Credentials;

/// An API error as the CLI prints it: message, code and request id.
pub fn api_error(status: StatusCode, request_id: Option<&str>, body: &str) -> anyhow::Error {
    let parsed: Option<serde_json::Value> = serde_json::from_str(body).ok();
    let error = parsed.as_ref().map(|v| &v["error"]);
    let message = error
        .and_then(|e| e["message"].as_str())
        .unwrap_or(body.trim());
    let code = error.and_then(|e| e["code"].as_str()).unwrap_or("unknown");
    let param = error
        .and_then(|e| e["param"].as_str())
        .map(|p| format!(", field {p}"))
        .unwrap_or_default();
    anyhow::anyhow!(
        "{message} (HTTP {}, code {code}{param}, request id {})",
        status.as_u16(),
        request_id.unwrap_or("none")
    )
}

/// The request id the gateway gave a response.
pub fn request_id(response: &Response) -> Option<String> {
    response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// `response` when it succeeded, its API error otherwise.
pub async fn checked(response: Response) -> Result<Response> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let id = request_id(&response);
    let body = response.text().await.unwrap_or_default();
    Err(api_error(status, id.as_deref(), &body))
}

/// One API, one token.
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    pub fn new(creds: &Credentials) -> Result<Api> {
        if creds.token.is_empty() {
            anyhow::bail!("not logged in: run `vm0 auth login` (or set VM0_API_KEY)");
        }
        let http = reqwest::Client::builder()
            .user_agent(concat!("vm0-cli/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()
            .context("building the HTTP client")?;
        Ok(Api {
            http,
            base: creds.url.trim_end_matches('/').to_owned(),
            token: creds.token.clone(),
        })
    }

    /// The environment's or the stored credentials.
    pub fn from_config() -> Result<Api> {
        Api::new(&crate::auth::current()?)
    }

    /// A client for URLs the API signed (no token goes with them).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
    }

    /// Sends `request`; an error names the API's base URL when it cannot be reached.
    pub async fn send(&self, request: RequestBuilder) -> Result<Response> {
        let response = request
            .send()
            .await
            .with_context(|| format!("reaching {}", self.base))?;
        checked(response).await
    }

    pub async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T> {
        let response = self
            .send(self.request(Method::GET, path).query(query))
            .await?;
        decode(response).await
    }

    pub async fn send_json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T> {
        let response = self.send(self.request(method, path).json(body)).await?;
        decode(response).await
    }

    pub async fn delete(&self, path: &str) -> Result<()> {
        self.send(self.request(Method::DELETE, path)).await?;
        Ok(())
    }

    /// Every item of a paginated list, at most `max` (pages of 100).
    pub async fn list_all<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
        max: usize,
    ) -> Result<Vec<T>> {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut q = query.to_vec();
            q.push((
                "limit",
                max.saturating_sub(items.len()).min(100).to_string(),
            ));
            if let Some(c) = &cursor {
                q.push(("cursor", c.clone()));
            }
            let page: Page<T> = self.get(path, &q).await?;
            items.extend(page.data);
            match page.pagination.next_cursor {
                Some(next) if page.pagination.has_more && items.len() < max => cursor = Some(next),
                _ => return Ok(items),
            }
        }
    }
}

/// The JSON body of a response, as `T`.
pub async fn decode<T: DeserializeOwned>(response: Response) -> Result<T> {
    let id = request_id(&response);
    let bytes = response.bytes().await.context("reading the API's answer")?;
    serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "the API's answer is not what this CLI understands (request id {})",
            id.as_deref().unwrap_or("none")
        )
    })
}

/// A path segment as the API expects it (names and ids are URL-safe, but a
/// user may type anything).
pub fn segment(raw: &str) -> String {
    raw.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
