//! The controller's Prometheus metrics (served at `/metrics` by `operator::http`): reconciles and
//! their errors, finished runs by outcome, records and bytes exported, the last successful run per
//! export, and run durations. Runs are counted when the controller first records them in status, so
//! a restarted operator does not count a run twice.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExportLabels {
    pub namespace: String,
    pub export: String,
}

pub struct Metrics {
    registry: Registry,
    pub reconciles: Counter,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub runs: Family<OutcomeLabels, Counter>,
    pub records: Counter,
    pub bytes: Counter,
    pub last_success: Family<ExportLabels, Gauge<f64, AtomicU64>>,
    pub run_duration: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("epic_export");
        let m = Metrics {
            reconciles: Counter::default(),
            reconcile_errors: Family::default(),
            runs: Family::default(),
            records: Counter::default(),
            bytes: Counter::default(),
            last_success: Family::default(),
            // 1 s .. ~36 h
            run_duration: Histogram::new(exponential_buckets(1.0, 2.0, 18)),
            registry: Registry::default(),
        };
        registry.register("reconciles", "Reconcile passes", m.reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconcile passes that failed, by reason",
            m.reconcile_errors.clone(),
        );
        registry.register("runs", "Finished export runs, by outcome", m.runs.clone());
        registry.register(
            "records_exported",
            "FHIR resources exported by finished runs",
            m.records.clone(),
        );
        registry.register(
            "bytes_exported",
            "NDJSON bytes written by finished runs",
            m.bytes.clone(),
        );
        registry.register(
            "last_success_timestamp_seconds",
            "Unix time of the last successful run, per export",
            m.last_success.clone(),
        );
        registry.register(
            "run_duration_seconds",
            "Wall time of finished export runs",
            m.run_duration.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The Prometheus/OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}
