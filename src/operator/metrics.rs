//! The controller's Prometheus metrics (served at `/metrics` by `operator::http`): reconciles and
//! their errors, finished runs by outcome, records and bytes exported, the last successful run per
//! export, and run durations. Runs are counted when the controller first records them in status, so
//! a restarted operator does not count a run twice.
//!
//! Per export (labels `namespace` and `export`, plus a label from a fixed set: `outcome`, `phase`,
//! or a validated FHIR `resource_type`), gauges describe the current state, set from status on every
//! reconcile pass (so they survive an operator restart) and removed when the export is deleted: the
//! last run's duration, records, bytes and outcome, runs in progress, Stalled, the key rotation phase,
//! and the longest the export may go without a success (`max_success_age_seconds`, for alerts).

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExportOutcomeLabels {
    pub namespace: String,
    pub export: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExportPhaseLabels {
    pub namespace: String,
    pub export: String,
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExportTypeLabels {
    pub namespace: String,
    pub export: String,
    pub resource_type: String,
}

/// The values of `outcome` in `last_run_outcome` (as `lastRun.outcome` reads).
pub const OUTCOMES: [&str; 4] = ["success", "partial", "unfinished", "failed"];
/// The values of `phase` in `key_rotation_phase`.
pub const ROTATION_PHASES: [&str; 5] = ["Idle", "Generating", "Publishing", "Retiring", "Blocked"];
/// At most this many resource types per export in `last_run_records_by_type`.
pub const MAX_TYPES: usize = 200;

type F64Gauge = Gauge<f64, AtomicU64>;

/// One export's state as the per-export gauges show it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExportState {
    /// `lastRun`: outcome, duration (seconds, when known), records, bytes, records by type.
    pub last_run: Option<LastRunState>,
    /// Unix time of `lastSuccessfulTime`.
    pub last_success: Option<f64>,
    pub active_runs: i64,
    /// Unix time the oldest run in progress started (or was created, before its pod started).
    pub active_since: Option<f64>,
    pub stalled: bool,
    /// `status.keyRotation.phase`, when the export rotates its key.
    pub rotation_phase: Option<String>,
    /// `None`: no limit (suspended, or no schedule).
    pub max_success_age: Option<f64>,
    /// Unix time the EpicExport was created (for an export that never succeeded).
    pub created: Option<f64>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct LastRunState {
    pub outcome: String,
    pub duration: Option<f64>,
    pub records: u64,
    pub bytes: u64,
    pub records_by_type: Vec<(String, u64)>,
}

/// A FHIR resource type name (bounds the `resource_type` label).
pub fn is_resource_type(name: &str) -> bool {
    name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_uppercase())
        && name.chars().all(|c| c.is_ascii_alphanumeric())
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
    pub last_run_duration: Family<ExportLabels, F64Gauge>,
    pub last_run_records: Family<ExportLabels, Gauge>,
    pub last_run_bytes: Family<ExportLabels, Gauge>,
    pub last_run_records_by_type: Family<ExportTypeLabels, Gauge>,
    pub last_run_outcome: Family<ExportOutcomeLabels, Gauge>,
    pub runs_active: Family<ExportLabels, Gauge>,
    pub active_run_started: Family<ExportLabels, F64Gauge>,
    pub stalled: Family<ExportLabels, Gauge>,
    pub key_rotation_phase: Family<ExportPhaseLabels, Gauge>,
    pub max_success_age: Family<ExportLabels, F64Gauge>,
    pub created: Family<ExportLabels, F64Gauge>,
    /// 1 while this instance runs the controller (holds the lease, or runs without election).
    pub leader: Gauge,
    /// The resource types last shown per export, to remove those gone.
    types: Mutex<HashMap<ExportLabels, BTreeSet<String>>>,
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
            last_run_duration: Family::default(),
            last_run_records: Family::default(),
            last_run_bytes: Family::default(),
            last_run_records_by_type: Family::default(),
            last_run_outcome: Family::default(),
            runs_active: Family::default(),
            active_run_started: Family::default(),
            stalled: Family::default(),
            key_rotation_phase: Family::default(),
            max_success_age: Family::default(),
            created: Family::default(),
            leader: Gauge::default(),
            types: Mutex::default(),
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
        registry.register(
            "last_run_duration_seconds",
            "Wall time of the last finished run, per export",
            m.last_run_duration.clone(),
        );
        registry.register(
            "last_run_records",
            "FHIR resources exported by the last finished run, per export",
            m.last_run_records.clone(),
        );
        registry.register(
            "last_run_bytes",
            "NDJSON bytes written by the last finished run, per export",
            m.last_run_bytes.clone(),
        );
        registry.register(
            "last_run_records_by_type",
            "FHIR resources exported by the last finished run, per export and resource type",
            m.last_run_records_by_type.clone(),
        );
        registry.register(
            "last_run_outcome",
            "1 for the outcome of the last finished run (success, partial, unfinished, failed), 0 for the others",
            m.last_run_outcome.clone(),
        );
        registry.register(
            "runs_active",
            "Runs (Jobs) in progress, per export",
            m.runs_active.clone(),
        );
        registry.register(
            "active_run_started_timestamp_seconds",
            "Unix time the oldest run in progress started, per export (absent when none runs)",
            m.active_run_started.clone(),
        );
        registry.register(
            "stalled",
            "1 while the export is Stalled (its spec or a reference is invalid)",
            m.stalled.clone(),
        );
        registry.register(
            "key_rotation_phase",
            "1 for the export's key rotation phase (Idle, Generating, Publishing, Retiring, Blocked), 0 for the others",
            m.key_rotation_phase.clone(),
        );
        registry.register(
            "max_success_age_seconds",
            "The longest the export may go without a successful run (from its schedule, or the annotation fhirexport.dev/max-success-age)",
            m.max_success_age.clone(),
        );
        registry.register(
            "created_timestamp_seconds",
            "Unix time the EpicExport was created, per export",
            m.created.clone(),
        );
        registry.register(
            "leader",
            "1 while this operator instance runs the controller (holds the leader lease)",
            m.leader.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Sets one export's gauges to `state`.
    pub fn set_export(&self, namespace: &str, export: &str, state: &ExportState) {
        let key = ExportLabels {
            namespace: namespace.into(),
            export: export.into(),
        };
        let outcome = |o: &str| ExportOutcomeLabels {
            namespace: namespace.into(),
            export: export.into(),
            outcome: o.into(),
        };
        let of_type = |t: &str| ExportTypeLabels {
            namespace: namespace.into(),
            export: export.into(),
            resource_type: t.into(),
        };
        let mut types = self.types.lock().unwrap_or_else(|p| p.into_inner());
        let shown = types.entry(key.clone()).or_default();
        match &state.last_run {
            Some(last) => {
                match last.duration {
                    Some(d) => {
                        self.last_run_duration.get_or_create(&key).set(d);
                    }
                    None => {
                        self.last_run_duration.remove(&key);
                    }
                }
                self.last_run_records
                    .get_or_create(&key)
                    .set(clamp(last.records));
                self.last_run_bytes
                    .get_or_create(&key)
                    .set(clamp(last.bytes));
                for o in OUTCOMES {
                    self.last_run_outcome
                        .get_or_create(&outcome(o))
                        .set(i64::from(
                            crate::operator::job::ReportedOutcome::parse(&last.outcome).as_str()
                                == o,
                        ));
                }
                let now: BTreeSet<String> = last
                    .records_by_type
                    .iter()
                    .filter(|(t, _)| is_resource_type(t))
                    .take(MAX_TYPES)
                    .map(|(t, n)| {
                        self.last_run_records_by_type
                            .get_or_create(&of_type(t))
                            .set(clamp(*n));
                        t.clone()
                    })
                    .collect();
                for gone in shown.difference(&now) {
                    self.last_run_records_by_type.remove(&of_type(gone));
                }
                *shown = now;
            }
            None => {
                self.last_run_duration.remove(&key);
                self.last_run_records.remove(&key);
                self.last_run_bytes.remove(&key);
                for o in OUTCOMES {
                    self.last_run_outcome.remove(&outcome(o));
                }
                for gone in shown.iter() {
                    self.last_run_records_by_type.remove(&of_type(gone));
                }
                shown.clear();
            }
        }
        match state.last_success {
            Some(t) => {
                self.last_success.get_or_create(&key).set(t);
            }
            None => {
                self.last_success.remove(&key);
            }
        }
        self.runs_active.get_or_create(&key).set(state.active_runs);
        match state.active_since {
            Some(t) => {
                self.active_run_started.get_or_create(&key).set(t);
            }
            None => {
                self.active_run_started.remove(&key);
            }
        }
        self.stalled
            .get_or_create(&key)
            .set(i64::from(state.stalled));
        for p in ROTATION_PHASES {
            let labels = ExportPhaseLabels {
                namespace: namespace.into(),
                export: export.into(),
                phase: p.into(),
            };
            match &state.rotation_phase {
                Some(phase) => {
                    self.key_rotation_phase
                        .get_or_create(&labels)
                        .set(i64::from(phase == p));
                }
                None => {
                    self.key_rotation_phase.remove(&labels);
                }
            }
        }
        match state.created {
            Some(t) => {
                self.created.get_or_create(&key).set(t);
            }
            None => {
                self.created.remove(&key);
            }
        }
        match state.max_success_age {
            Some(age) => {
                self.max_success_age.get_or_create(&key).set(age);
            }
            None => {
                self.max_success_age.remove(&key);
            }
        }
    }

    /// Removes the gauges of every export not in `keep` (namespace, name).
    pub fn retain_exports(&self, keep: &BTreeSet<(String, String)>) {
        let gone: Vec<ExportLabels> = self
            .types
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .filter(|k| !keep.contains(&(k.namespace.clone(), k.export.clone())))
            .cloned()
            .collect();
        for k in gone {
            self.forget_export(&k.namespace, &k.export);
        }
    }

    /// Removes a deleted export's gauges.
    pub fn forget_export(&self, namespace: &str, export: &str) {
        self.set_export(namespace, export, &ExportState::default());
        let key = ExportLabels {
            namespace: namespace.into(),
            export: export.into(),
        };
        self.runs_active.remove(&key);
        self.stalled.remove(&key);
        self.types
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
    }

    /// The Prometheus/OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> ExportState {
        ExportState {
            last_run: Some(LastRunState {
                outcome: "failed".into(),
                duration: Some(90.5),
                records: 42,
                bytes: 1000,
                records_by_type: vec![
                    ("Patient".into(), 40),
                    ("Observation".into(), 2),
                    ("bad label\"".into(), 1),
                ],
            }),
            last_success: Some(1_800_000_000.0),
            active_runs: 1,
            active_since: Some(1_800_000_100.0),
            stalled: false,
            rotation_phase: Some("Blocked".into()),
            max_success_age: Some(129_600.0),
            created: Some(1_700_000_000.0),
        }
    }

    #[test]
    fn per_export_gauges_show_the_state_and_go_with_the_export() {
        let m = Metrics::new();
        m.set_export("phi", "nightly", &state());
        let text = m.encode();
        for line in [
            "epic_export_last_run_duration_seconds{namespace=\"phi\",export=\"nightly\"} 90.5",
            "epic_export_last_run_records{namespace=\"phi\",export=\"nightly\"} 42",
            "epic_export_last_run_bytes{namespace=\"phi\",export=\"nightly\"} 1000",
            "epic_export_last_run_records_by_type{namespace=\"phi\",export=\"nightly\",resource_type=\"Patient\"} 40",
            "epic_export_last_run_outcome{namespace=\"phi\",export=\"nightly\",outcome=\"failed\"} 1",
            "epic_export_last_run_outcome{namespace=\"phi\",export=\"nightly\",outcome=\"success\"} 0",
            "epic_export_runs_active{namespace=\"phi\",export=\"nightly\"} 1",
            "epic_export_stalled{namespace=\"phi\",export=\"nightly\"} 0",
            "epic_export_active_run_started_timestamp_seconds{namespace=\"phi\",export=\"nightly\"} 1800000100.0",
            "epic_export_key_rotation_phase{namespace=\"phi\",export=\"nightly\",phase=\"Blocked\"} 1",
            "epic_export_key_rotation_phase{namespace=\"phi\",export=\"nightly\",phase=\"Idle\"} 0",
            "epic_export_max_success_age_seconds{namespace=\"phi\",export=\"nightly\"} 129600.0",
            "epic_export_created_timestamp_seconds{namespace=\"phi\",export=\"nightly\"} 1700000000.0",
            "epic_export_last_success_timestamp_seconds{namespace=\"phi\",export=\"nightly\"} 1800000000.0",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        assert!(!text.contains("bad label"), "{text}");

        // A type gone from the last run goes from the metrics.
        let mut next = state();
        if let Some(l) = next.last_run.as_mut() {
            l.records_by_type.truncate(1);
        }
        m.set_export("phi", "nightly", &next);
        assert!(!m.encode().contains("Observation"));

        m.set_export("phi", "weekly", &state());
        m.retain_exports(&BTreeSet::from([("phi".to_owned(), "nightly".to_owned())]));
        assert!(!m.encode().contains("weekly"), "{}", m.encode());
        assert!(m.encode().contains("nightly"));

        m.forget_export("phi", "nightly");
        assert!(!m.encode().contains("nightly"), "{}", m.encode());
    }
}
