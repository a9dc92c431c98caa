//! Logging and tracing setup shared by every vm0 binary.
//!
//! - Log lines: `tracing` with `RUST_LOG`-style filtering, human-readable by default,
//!   JSON lines when `VM0_LOG_FORMAT=json`, always on stderr.
//! - Traces: when an OTLP endpoint is configured (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
//!   `OTEL_EXPORTER_OTLP_ENDPOINT`, the standard variables), the same spans are exported
//!   over OTLP/gRPC in batches, so one run is one trace from the client's request through
//!   the gateway, the job queue and the worker ([`propagation`] carries the context).

mod otlp;
pub mod propagation;
#[cfg(feature = "receiver")]
pub mod receiver;

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub use otlp::{OtlpError, Telemetry};

/// Default filter when `RUST_LOG` is unset: our crates at info, chatty deps quieter.
const DEFAULT_FILTER: &str = "info,sqlx=warn,sea_orm=warn,sea_orm_migration=warn,hyper=warn,h2=warn,tower=warn,opentelemetry=warn";

/// Output format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    /// `VM0_LOG_FORMAT` (`json` or `text`), text when unset.
    pub fn from_env() -> LogFormat {
        match std::env::var("VM0_LOG_FORMAT").as_deref() {
            Ok("json") => LogFormat::Json,
            _ => LogFormat::Text,
        }
    }
}

/// What [`init`] sets up.
#[derive(Debug, Clone)]
pub struct TelemetryOptions {
    /// `service.name` of exported spans, unless `OTEL_SERVICE_NAME` says otherwise.
    pub service: &'static str,
    pub format: LogFormat,
    /// OTLP/gRPC collector address (`http://host:4317`); no export when `None`.
    pub otlp_endpoint: Option<String>,
}

impl TelemetryOptions {
    /// Options from the environment: `VM0_LOG_FORMAT`, and the OpenTelemetry
    /// variables (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_EXPORTER_OTLP_ENDPOINT`;
    /// `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` turn export off).
    pub fn from_env(service: &'static str) -> TelemetryOptions {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
            || var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
        let endpoint = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"));
        TelemetryOptions {
            service,
            format: LogFormat::from_env(),
            otlp_endpoint: endpoint.filter(|_| !disabled),
        }
    }

    /// Log lines only, whatever the environment says (benchmarks, tests).
    pub fn logs_only(service: &'static str, format: LogFormat) -> TelemetryOptions {
        TelemetryOptions {
            service,
            format,
            otlp_endpoint: None,
        }
    }
}

/// Installs the global subscriber (log lines on stderr, plus OTLP export when
/// configured). Must run inside a Tokio runtime when exporting. Safe to call twice:
/// the second call installs nothing and returns an inert [`Telemetry`].
pub fn init(options: TelemetryOptions) -> Result<Telemetry, OtlpError> {
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(true)
        .with_ansi(std::io::stderr().is_terminal());
    let fmt = match options.format {
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .boxed(),
        LogFormat::Text => fmt.compact().boxed(),
    }
    .with_filter(filter_from_env("RUST_LOG"));
    let telemetry = match &options.otlp_endpoint {
        Some(endpoint) => Telemetry::exporting(options.service, endpoint)?,
        None => Telemetry::inert(),
    };
    // Traces have their own filter: quieter log lines (`RUST_LOG=warn`) keep traces.
    let traces = telemetry
        .layer(options.service)
        .with_filter(filter_from_env("VM0_TRACE_FILTER"));
    let installed = tracing_subscriber::registry()
        .with(fmt)
        .with(traces)
        .try_init();
    match installed {
        Ok(()) => {
            if let Some(endpoint) = &options.otlp_endpoint {
                tracing::info!(%endpoint, service = options.service, "exporting traces over OTLP/gRPC");
            }
            Ok(telemetry)
        }
        Err(_already_set) => Ok(Telemetry::inert()),
    }
}

fn filter_from_env(var: &str) -> EnvFilter {
    EnvFilter::try_from_env(var).unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER))
}

/// Displays an error with its whole `source()` chain (`a: b: c`), for log lines.
pub struct ErrorChain<'a>(pub &'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}
