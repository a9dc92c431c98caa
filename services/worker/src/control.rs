//! The gRPC client of the control plane, with the worker's credential on every
//! call and retries for transient failures. TLS (`https://`) wherever the control
//! plane is not on loopback: the claim answer carries the run's secrets.

use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use vm0_proto::worker::control_plane_client::ControlPlaneClient;

pub type Client = ControlPlaneClient<InterceptedService<Channel, AuthHeader>>;

#[derive(Clone)]
pub struct AuthHeader(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for AuthHeader {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        // The control plane's span for this call joins the caller's trace.
        if let Some(parent) = vm0_telemetry::propagation::traceparent(&tracing::Span::current())
            && let Ok(value) = parent.parse()
        {
            req.metadata_mut()
                .insert(vm0_telemetry::propagation::TRACEPARENT, value);
        }
        Ok(req)
    }
}

/// Whether a URL's host is a loopback address (or `localhost`).
fn loopback(uri: &http::Uri) -> bool {
    match uri.host() {
        Some("localhost") => true,
        Some(h) => h
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
}

pub fn connect(url: &str, token: &str, ca: Option<&std::path::Path>) -> anyhow::Result<Client> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| anyhow::anyhow!("VM0_CONTROL_PLANE_URL {url:?}: {e}"))?;
    let mut endpoint = Channel::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30));
    match uri.scheme_str() {
        Some("https") => {
            let mut tls = tonic::transport::ClientTlsConfig::new();
            tls = match ca {
                Some(ca) => {
                    let pem = std::fs::read_to_string(ca).map_err(|e| {
                        anyhow::anyhow!("reading VM0_CONTROL_PLANE_CA {}: {e}", ca.display())
                    })?;
                    tls.ca_certificate(tonic::transport::Certificate::from_pem(pem))
                }
                None => tls.with_native_roots(),
            };
            endpoint = endpoint.tls_config(tls)?;
        }
        Some("http") if loopback(&uri) => {}
        Some("http") => anyhow::bail!(
            "VM0_CONTROL_PLANE_URL {url} is plain http to another machine: run secrets would \
             cross the network in clear; use https:// (and VM0_CONTROL_PLANE_CA)"
        ),
        _ => anyhow::bail!("VM0_CONTROL_PLANE_URL {url} must be https:// (or http:// on loopback)"),
    }
    let channel = endpoint.connect_lazy();
    let header = format!("Bearer {token}")
        .parse()
        .map_err(|_| anyhow::anyhow!("VM0_WORKER_TOKEN has characters not allowed in a header"))?;
    Ok(ControlPlaneClient::with_interceptor(
        channel,
        AuthHeader(header),
    ))
}

/// Retries `call` on transient errors (unavailable, deadline) with backoff.
pub async fn retry<T, F, Fut>(what: &str, mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut pause = Duration::from_millis(100);
    for attempt in 1.. {
        match call().await {
            Ok(resp) => return Ok(resp.into_inner()),
            Err(status)
                if attempt < 8
                    && matches!(
                        status.code(),
                        tonic::Code::Unavailable
                            | tonic::Code::DeadlineExceeded
                            | tonic::Code::Unknown
                    ) =>
            {
                tracing::warn!(what, attempt, error = %status, "control plane call failed; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(status) => return Err(status),
        }
    }
    unreachable!("the loop returns")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn plain_http_is_for_loopback_only() {
        for ok in [
            "http://127.0.0.1:9090",
            "http://localhost:9090",
            "http://[::1]:9090",
            "https://gw:9090",
        ] {
            assert!(connect(ok, "t", None).is_ok(), "{ok}");
        }
        let err = connect("http://10.0.0.5:9090", "t", None).expect_err("refused");
        assert!(err.to_string().contains("https://"), "{err}");
        assert!(connect("ftp://x", "t", None).is_err());
    }
}
