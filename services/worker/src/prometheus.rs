//! What a worker counts for its operators, scraped as `GET /metrics` on
//! `VM0_METRICS_ADDR` (Prometheus text format): its slots in use and free (read
//! at scrape time), how long sandboxes take to start per backend, the time
//! from a claim to the run's first output, and runs ended by status and reason.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SlotLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndLabels {
    status: &'static str,
    /// `exit` (the command ended by itself), `oom`, `timeout`, `cancelled`,
    /// `shutdown` (the worker stopped it), `sandbox` (it could not start).
    reason: &'static str,
}

type StartFamily = Family<BackendLabels, Histogram, fn() -> Histogram>;

/// Sandbox starts: 10 ms (bubblewrap) to about 80 s (a TCG boot retried).
fn start_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.01, 2.0, 14,
    ))
}

/// The worker's instruments and the registry that holds them.
pub struct Instruments {
    pub registry: Arc<Registry>,
    slots: Family<SlotLabels, Gauge>,
    sandbox_start: StartFamily,
    runs_ended: Family<EndLabels, Counter>,
    first_output: Histogram,
}

impl std::fmt::Debug for Instruments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Instruments")
    }
}

impl Default for Instruments {
    fn default() -> Instruments {
        let mut registry = Registry::with_prefix("vm0_worker");
        let slots = Family::<SlotLabels, Gauge>::default();
        registry.register("slots", "Run slots, by state (used, free)", slots.clone());
        let sandbox_start = StartFamily::new_with_constructor(start_histogram);
        registry.register_with_unit(
            "sandbox_start",
            "Time from starting a sandbox to its guest agent ready, by backend",
            Unit::Seconds,
            sandbox_start.clone(),
        );
        let runs_ended = Family::<EndLabels, Counter>::default();
        registry.register(
            "runs_ended",
            "Runs this worker ended, by status and reason",
            runs_ended.clone(),
        );
        let first_output = start_histogram();
        registry.register_with_unit(
            "first_output",
            "Time from claiming a run to its first output",
            Unit::Seconds,
            first_output.clone(),
        );
        Instruments {
            first_output,
            registry: Arc::new(registry),
            slots,
            sandbox_start,
            runs_ended,
        }
    }
}

impl Instruments {
    /// The slots as they are now.
    pub fn set_slots(&self, total: usize, free: usize) {
        let gauge = |state| self.slots.get_or_create(&SlotLabels { state }).clone();
        gauge("free").set(i64::try_from(free).unwrap_or(i64::MAX));
        gauge("used").set(i64::try_from(total.saturating_sub(free)).unwrap_or(i64::MAX));
    }

    pub fn sandbox_started(&self, backend: &'static str, took: Duration) {
        self.sandbox_start
            .get_or_create(&BackendLabels { backend })
            .observe(took.as_secs_f64());
    }

    pub fn first_output(&self, took: Duration) {
        self.first_output.observe(took.as_secs_f64());
    }

    pub fn run_ended(&self, status: &'static str, reason: &'static str) {
        self.runs_ended
            .get_or_create(&EndLabels { status, reason })
            .inc();
    }
}
