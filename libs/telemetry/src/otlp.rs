//! OTLP/gRPC export of spans: a batch exporter on its own thread, flushed when the
//! binary shuts down.

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Subscriber;
use tracing_subscriber::Layer;
use tracing_subscriber::registry::LookupSpan;

/// How long shutdown waits for the last batch to reach the collector.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("cannot export traces to OTLP endpoint {endpoint:?}")]
    Exporter {
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// The installed telemetry. Keep it for the life of the binary and call
/// [`Telemetry::shutdown`] at the end, so the last spans are exported.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    pub(crate) fn inert() -> Telemetry {
        Telemetry { provider: None }
    }

    pub(crate) fn exporting(service: &'static str, endpoint: &str) -> Result<Telemetry, OtlpError> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|source| OtlpError::Exporter {
                endpoint: endpoint.to_owned(),
                source,
            })?;
        // The builder reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; our
        // name is the default, not an override.
        let resource = Resource::builder().build();
        let named = resource
            .get(&opentelemetry::Key::new("service.name"))
            .is_some_and(|v| !v.as_str().starts_with("unknown_service"));
        let resource = if named {
            resource
        } else {
            Resource::builder().with_service_name(service).build()
        };
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        Ok(Telemetry {
            provider: Some(provider),
        })
    }

    /// The layer that turns `tracing` spans into OpenTelemetry spans, when exporting.
    pub(crate) fn layer<S>(&self, service: &'static str) -> Option<impl Layer<S> + use<S>>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        self.provider.as_ref().map(|p| {
            tracing_opentelemetry::layer()
                .with_tracer(p.tracer(service))
                .with_threads(false)
        })
    }

    /// Whether spans are being exported.
    pub fn is_exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans ended so far. The exporter needs the Tokio runtime to make
    /// progress, so the blocking wait runs on the blocking pool.
    pub async fn flush(&self) {
        if let Some(p) = self.provider.clone() {
            let _ = tokio::task::spawn_blocking(move || {
                if let Err(e) = p.force_flush() {
                    eprintln!("vm0: exporting traces failed: {e}");
                }
            })
            .await;
        }
    }

    /// Exports what is left and stops the exporter (at most a few seconds).
    pub async fn shutdown(mut self) {
        if let Some(p) = self.provider.take() {
            let _ = tokio::task::spawn_blocking(move || {
                if let Err(e) = p.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
                    eprintln!("vm0: exporting the last traces failed: {e}");
                }
            })
            .await;
        }
    }
}

impl Drop for Telemetry {
    /// On an early return without [`Telemetry::shutdown`]: stop the exporter on a
    /// thread of its own, never blocking a runtime thread the exporter needs.
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            std::thread::spawn(move || {
                let _ = p.shutdown_with_timeout(SHUTDOWN_TIMEOUT);
            });
        }
    }
}
