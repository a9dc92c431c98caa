//! The gRPC client of the control plane, with the worker token on every call and
//! retries for transient failures.

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

pub fn connect(url: &str, token: &str) -> anyhow::Result<Client> {
    let channel = Channel::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .connect_lazy();
    let header = format!("Bearer {token}")
        .parse()
        .map_err(|_| anyhow::anyhow!("the worker token has characters not allowed in a header"))?;
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
