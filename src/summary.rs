//! `RunSummary`: what a run did, as written to `summary.json`, printed as a table, and (later) e-mailed
//! and reported in status. It holds counts, sizes, file names and error messages; never patient ids or
//! resource content.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// How a run ended. Each has its own process exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Every search of every patient completed.
    Success,
    /// The run finished, but some searches failed (listed in `errors/failed-requests.ndjson`).
    Partial,
    /// The run stopped (authentication, configuration, output); nothing was published.
    Failed,
}

impl Outcome {
    /// The name in summary.json and the run report.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Partial => "partial",
            Outcome::Failed => "failed",
        }
    }

    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Success => 0,
            Outcome::Failed => 1,
            Outcome::Partial => 3,
        }
    }
}

/// How a run retrieved its data (`mode` in summary.json).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunMode {
    /// Per-patient FHIR searches.
    Search,
    /// A Bulk Data `$export`.
    Bulk,
}

impl RunMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RunMode::Search => "search",
            RunMode::Bulk => "bulk",
        }
    }
}

impl std::fmt::Display for RunMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TypeCount {
    #[serde(rename = "type")]
    pub resource_type: String,
    pub records: u64,
    pub bytes: u64,
    pub file: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunSummary {
    pub export: String,
    pub run_id: String,
    pub outcome: Outcome,
    pub started_at: String,
    pub finished_at: String,
    pub duration_seconds: f64,
    pub fhir_base_url: String,
    pub mode: RunMode,
    pub requests: u64,
    pub retries: u64,
    pub token_renewals_after_401: u64,
    pub resources: Vec<TypeCount>,
    pub records_total: u64,
    pub bytes_total: u64,
    /// OperationOutcome lines the server reported (in `errors/OperationOutcome.ndjson`).
    pub server_outcomes: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub search: Option<SearchStats>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub bulk: Option<BulkStats>,
    /// Documents downloaded (with `attachments.enabled`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub attachments: Option<AttachmentStats>,
    /// Referenced resources fetched (with `hydrate`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub hydration: Option<HydrationStats>,
    /// Messages about what went wrong, without patient identifiers.
    pub errors: Vec<String>,
    /// The first requests that failed (at most 20), as `log.ndjson` has them: path template,
    /// status, and the server's correlation ids (`X-Request-Id`, `X-Epic-*`...) to cite to the
    /// server's support.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub failed_requests: Vec<crate::fhir::runlog::LogEvent>,
    /// Where the files are (the published run folder, or the `.failed` folder).
    pub output_dir: String,
    /// What became of the notifications about this run (added after the run, summary.json rewritten).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub notification: Option<NotificationStatus>,
}

/// `notification` in summary.json, e.g. `{"email": "sent to 2 recipients"}` or
/// `{"email": "failed: cannot connect to ..."}`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NotificationStatus {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub email: Option<String>,
}

/// Search-mode figures.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SearchStats {
    pub patients_total: u64,
    pub patients_complete: u64,
    pub patients_with_errors: u64,
    pub searches_failed: u64,
    pub duplicates_skipped: u64,
}

/// Bulk-mode figures.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkStats {
    /// The server's `transactionTime` (the next `_since` for `since: auto`).
    pub transaction_time: Option<String>,
    /// The `_since` sent, if any.
    pub since: Option<String>,
    /// Whether this run resumed an export an earlier run had kicked off.
    pub resumed: bool,
    pub seconds_waiting: f64,
    pub files_total: u64,
    pub files_failed: u64,
    pub deleted_records: u64,
}

/// Attachment figures: distinct documents (one per URL and content type).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentStats {
    /// Files in `attachments/` (identical content is one file).
    pub files: u64,
    pub bytes: u64,
    /// Attachments put into `attachment.data` instead of a file.
    pub inlined: u64,
    /// Attachments left alone because of `contentTypes`.
    pub skipped: u64,
    /// Attachments that could not be downloaded or did not match their declared size or hash.
    pub failed: u64,
    /// Documents a resumed run found downloaded already.
    pub reused: u64,
}

/// Hydration figures.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HydrationStats {
    /// Rounds that fetched something (the first fetches what the export references, each next one
    /// what the last round's resources reference).
    pub rounds: u32,
    /// Resources fetched, per type.
    pub fetched: BTreeMap<String, u64>,
    /// References that could not be fetched.
    pub failed: u64,
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

impl RunSummary {
    /// A summary with nothing counted yet, no errors and no files: the one way to start one (the
    /// exporter fills it in as the run ends; a run that failed before it started and the operator's
    /// report of a Job's run set what they know).
    pub fn new(
        export: impl Into<String>,
        run_id: impl Into<String>,
        mode: RunMode,
        fhir_base_url: impl Into<String>,
        outcome: Outcome,
    ) -> RunSummary {
        RunSummary {
            export: export.into(),
            run_id: run_id.into(),
            outcome,
            started_at: String::new(),
            finished_at: String::new(),
            duration_seconds: 0.0,
            fhir_base_url: fhir_base_url.into(),
            mode,
            requests: 0,
            retries: 0,
            token_renewals_after_401: 0,
            resources: Vec::new(),
            records_total: 0,
            bytes_total: 0,
            server_outcomes: 0,
            search: None,
            bulk: None,
            attachments: None,
            hydration: None,
            errors: Vec::new(),
            failed_requests: Vec::new(),
            output_dir: String::new(),
            notification: None,
        }
    }

    /// A plain-text table for the terminal.
    pub fn render_table(&self) -> String {
        let mut s = String::new();
        let tw = self
            .resources
            .iter()
            .map(|r| r.resource_type.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let fw = self
            .resources
            .iter()
            .map(|r| r.file.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let _ = writeln!(
            s,
            "{:<tw$}  {:>10}  {:>10}  {:<fw$}",
            "type", "records", "bytes", "file"
        );
        let _ = writeln!(s, "{}", "-".repeat(tw + fw + 26));
        for r in &self.resources {
            let _ = writeln!(
                s,
                "{:<tw$}  {:>10}  {:>10}  {:<fw$}",
                r.resource_type,
                r.records,
                human_bytes(r.bytes),
                r.file
            );
        }
        let _ = writeln!(s, "{}", "-".repeat(tw + fw + 26));
        let _ = writeln!(
            s,
            "{:<tw$}  {:>10}  {:>10}",
            "total",
            self.records_total,
            human_bytes(self.bytes_total)
        );
        let outcome = match self.outcome {
            Outcome::Success => "success",
            Outcome::Partial => "PARTIAL",
            Outcome::Failed => "FAILED",
        };
        let scope = match (&self.search, &self.bulk) {
            (Some(p), _) => format!(
                "{} patients ({} with errors)",
                p.patients_total, p.patients_with_errors
            ),
            (None, Some(b)) => format!(
                "bulk export, {} files ({} failed), {:.0} s waiting for the server{}",
                b.files_total,
                b.files_failed,
                b.seconds_waiting,
                if b.resumed { ", resumed" } else { "" }
            ),
            (None, None) => self.mode.to_string(),
        };
        let _ = writeln!(
            s,
            "\n{outcome}: {scope}, {} requests, {} retries, {:.1} s, {:.0} records/s",
            self.requests,
            self.retries,
            self.duration_seconds,
            self.records_total as f64 / self.duration_seconds.max(0.001)
        );
        if let Some(a) = &self.attachments {
            let _ = writeln!(
                s,
                "attachments: {} files, {} in attachments/ ({} inlined, {} skipped by content type, {} failed{})",
                a.files,
                human_bytes(a.bytes),
                a.inlined,
                a.skipped,
                a.failed,
                match a.reused {
                    0 => String::new(),
                    n => format!(", {n} kept from the interrupted run"),
                }
            );
        }
        if let Some(h) = &self.hydration {
            let fetched: Vec<String> = h.fetched.iter().map(|(t, n)| format!("{t} {n}")).collect();
            let _ = writeln!(
                s,
                "hydrated: {} ({} rounds, {} failed)",
                if fetched.is_empty() {
                    "nothing to fetch".to_string()
                } else {
                    fetched.join(", ")
                },
                h.rounds,
                h.failed
            );
        }
        if self.server_outcomes > 0 {
            let _ = writeln!(
                s,
                "{} OperationOutcome entries from the server: errors/OperationOutcome.ndjson",
                self.server_outcomes
            );
        }
        for e in &self.errors {
            let _ = writeln!(s, "error: {e}");
        }
        for f in self.failed_requests.iter().take(5) {
            let ids: Vec<String> = f
                .correlation
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            let _ = writeln!(
                s,
                "failed request: {} {} → {} ({})",
                f.method,
                f.path,
                f.error
                    .clone()
                    .or(f.status.map(|st| format!("HTTP {st}")))
                    .unwrap_or_else(|| "failed".into()),
                if ids.is_empty() {
                    "no correlation id".to_owned()
                } else {
                    ids.join(", ")
                }
            );
        }
        if self.failed_requests.len() > 5 {
            let _ = writeln!(
                s,
                "… {} more failed requests in summary.json, all in log.ndjson",
                self.failed_requests.len() - 5
            );
        }
        let _ = writeln!(s, "run folder: {}", self.output_dir);
        if let Some(email) = self.notification.as_ref().and_then(|n| n.email.as_ref()) {
            let _ = writeln!(s, "e-mail notification: {email}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_exit_codes() {
        assert_eq!(human_bytes(10), "10 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(Outcome::Success.exit_code(), 0);
        assert_ne!(Outcome::Partial.exit_code(), Outcome::Failed.exit_code());
    }
}
