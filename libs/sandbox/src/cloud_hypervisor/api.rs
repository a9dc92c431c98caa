//! Cloud Hypervisor's REST API (`vmm/src/api/openapi/cloud-hypervisor.yaml` in its
//! source) over the unix socket given with `--api-socket`: the request bodies we
//! send and a small HTTP/1.1 client, one connection per request.
//!
//! Cloud Hypervisor ignores fields it does not know, so a misspelled field would
//! silently fall back to its default (for `console`, a TTY that takes over the
//! worker's terminal). `libs/sandbox/tests/cloud_hypervisor_schema.rs` checks these
//! bodies against the API's schema.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;

/// `PUT /vm.create`: the subset of `VmConfig` this backend sets.
#[derive(Debug, Clone, Serialize)]
pub struct VmConfig {
    pub cpus: CpusConfig,
    pub memory: MemoryConfig,
    pub payload: PayloadConfig,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
    pub vsock: VsockConfig,
    pub console: ConsoleConfig,
    pub serial: ConsoleConfig,
}

#[derive(Debug, Clone, Serialize)]
pub struct CpusConfig {
    pub boot_vcpus: u32,
    pub max_vcpus: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemoryConfig {
    /// Bytes.
    pub size: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PayloadConfig {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub cmdline: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub readonly: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct VsockConfig {
    /// Guest CID, at least 3.
    pub cid: u64,
    /// The host-side unix socket of the hybrid vsock.
    pub socket: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConsoleConfig {
    pub mode: ConsoleMode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ConsoleMode {
    Off,
    /// The VMM's stdout (which the host reads into a bounded log).
    Tty,
}

/// `GET /vm.info`, the part we read.
#[derive(Debug, Clone, Deserialize)]
pub struct VmInfo {
    pub state: String,
}

/// `GET /vmm.ping`.
#[derive(Debug, Clone, Deserialize)]
pub struct VmmPing {
    pub version: String,
}

/// `GET /vm.counters`: device → counter → value.
pub type VmCounters = std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("connecting to the API socket {path} failed")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("building the {endpoint} request failed")]
    Request {
        endpoint: &'static str,
        #[source]
        source: hyper::http::Error,
    },
    #[error("HTTP exchange with the VMM failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("{endpoint} answered {status}: {body}")]
    Status {
        endpoint: &'static str,
        status: StatusCode,
        body: String,
    },
    #[error("encoding the {endpoint} body failed")]
    Encode {
        endpoint: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{endpoint} answered a body we cannot read")]
    Decode {
        endpoint: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{endpoint} did not answer within {timeout:?}")]
    Timeout {
        endpoint: &'static str,
        timeout: Duration,
    },
}

/// A client of one VMM's API socket.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
    timeout: Duration,
}

impl ApiClient {
    pub fn new(socket: &Path) -> ApiClient {
        ApiClient {
            socket: socket.to_owned(),
            timeout: Duration::from_secs(5),
        }
    }

    pub async fn ping(&self) -> Result<VmmPing, ApiError> {
        self.get_json("vmm.ping").await
    }

    pub async fn create(&self, config: &VmConfig) -> Result<(), ApiError> {
        let body = serde_json::to_vec(config).map_err(|source| ApiError::Encode {
            endpoint: "vm.create",
            source,
        })?;
        self.call(Method::PUT, "vm.create", Some(body)).await?;
        Ok(())
    }

    pub async fn boot(&self) -> Result<(), ApiError> {
        self.put("vm.boot").await
    }

    pub async fn info(&self) -> Result<VmInfo, ApiError> {
        self.get_json("vm.info").await
    }

    pub async fn counters(&self) -> Result<VmCounters, ApiError> {
        self.get_json("vm.counters").await
    }

    pub async fn shutdown(&self) -> Result<(), ApiError> {
        self.put("vm.shutdown").await
    }

    pub async fn delete(&self) -> Result<(), ApiError> {
        self.put("vm.delete").await
    }

    pub async fn shutdown_vmm(&self) -> Result<(), ApiError> {
        self.put("vmm.shutdown").await
    }

    async fn put(&self, endpoint: &'static str) -> Result<(), ApiError> {
        self.call(Method::PUT, endpoint, None).await.map(drop)
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        endpoint: &'static str,
    ) -> Result<T, ApiError> {
        let body = self.call(Method::GET, endpoint, None).await?;
        serde_json::from_slice(&body).map_err(|source| ApiError::Decode { endpoint, source })
    }

    async fn call(
        &self,
        method: Method,
        endpoint: &'static str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, ApiError> {
        tokio::time::timeout(self.timeout, self.exchange(method, endpoint, body))
            .await
            .map_err(|_| ApiError::Timeout {
                endpoint,
                timeout: self.timeout,
            })?
    }

    async fn exchange(
        &self,
        method: Method,
        endpoint: &'static str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, ApiError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ApiError::Connect {
                    path: self.socket.clone(),
                    source,
                })?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let connection = tokio::spawn(connection);
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://localhost/api/v1/{endpoint}"))
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::ACCEPT, "application/json");
        if body.is_some() {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|source| ApiError::Request { endpoint, source })?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        connection.abort();
        if !status.is_success() {
            return Err(ApiError::Status {
                endpoint,
                status,
                body: String::from_utf8_lossy(&bytes).trim().to_owned(),
            });
        }
        Ok(bytes)
    }
}
