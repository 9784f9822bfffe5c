//! Reconcile step 6, `status` (pure): the EpicExport's new status from what was observed and done,
//! kstatus-compatible so Argo CD and Flux read health without plugins.
//!
//! Besides the schedule and the last run it carries `publicKeys`, the key Secret's public JWK Set,
//! which the JWK Set server serves.
//!
//! Conditions: `Stalled` (the spec or what it refers to is wrong; only a change fixes it), `Ready`
//! (valid and scheduled; a failed *run* does not make the export unready: it shows in `lastRun`, an
//! Event and the metrics) and `Running` (a run is in progress). A condition's `lastTransitionTime`
//! changes only when its status flips, and nothing here depends on the clock except through the
//! inputs, so an unchanged world gives an identical status and no write.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{Resource, ResourceExt};

use super::model::{
    FinishedReport, Note, ReportedOutcome, Run, RunPlan, RunState, SpecError, Trigger, rfc3339,
};
use crate::operator::crd::{EpicExport, EpicExportStatus, LastRun, PublicKeys};

pub struct StatusInput<'a> {
    pub export: &'a EpicExport,
    /// The runs after `apply` (a started run is active, stopped ones are gone).
    pub runs: &'a [Run],
    pub spec_error: Option<&'a SpecError>,
    pub plan: Option<&'a RunPlan>,
    /// The next scheduled time (none when suspended or invalid).
    pub next: Option<Timestamp>,
    /// The report of a run that finished since `lastRun` was written.
    pub report: Option<&'a FinishedReport>,
    /// The key Secret's public keys as just read (`None`: the Secret holds no usable key).
    pub public_keys: Option<&'a PublicKeys>,
    pub now: Timestamp,
}

pub fn next_status(input: &StatusInput<'_>) -> EpicExportStatus {
    let export = input.export;
    let old = export.status.clone().unwrap_or_default();
    let generation = export.meta().generation;
    let mut status = old.clone();
    status.observed_generation = generation;

    status.active = input
        .runs
        .iter()
        .filter(|r| r.state == RunState::Active)
        .map(|r| r.name.clone())
        .collect();
    status.active.sort();
    if let Some(plan) = input.plan {
        if let Some(t) = plan.record_schedule {
            status.last_schedule_time = Some(rfc3339(t));
        }
        if let Some(token) = plan
            .start
            .as_ref()
            .and_then(|s| match &s.trigger {
                Trigger::OnDemand(token) => Some(token),
                Trigger::Schedule => None,
            })
            .or(plan.run_now_handled.as_ref())
        {
            status.run_now_handled = Some(token.clone());
        }
    }
    // What the JWK Set server publishes: the key Secret as last read, nothing when it is unusable.
    status.public_keys = input.public_keys.cloned();
    status.next_schedule_time = if export.spec.suspend {
        None
    } else {
        input.next.map(rfc3339)
    };
    let newest_success = input
        .runs
        .iter()
        .filter(|r| r.state == RunState::Succeeded)
        .filter_map(|r| r.finished)
        .max();
    if let Some(t) = newest_success {
        let known = old
            .last_successful_time
            .as_deref()
            .and_then(|s| s.parse::<Timestamp>().ok());
        if known.is_none_or(|k| t > k) {
            status.last_successful_time = Some(rfc3339(t));
        }
    }
    if let Some(report) = input.report
        && let Some(run) = input.runs.iter().find(|r| r.name == report.job)
    {
        let last = last_run(run, report);
        if ReportedOutcome::parse(&last.outcome) == ReportedOutcome::Success
            && let Some(tt) = report
                .message
                .as_ref()
                .and_then(|m| m.transaction_time.clone())
        {
            status.last_transaction_time = Some(tt);
        }
        status.last_run = Some(last);
    }

    let mut conditions = Vec::new();
    let set =
        |conditions: &mut Vec<Condition>, type_: &str, ok: bool, reason: &str, message: String| {
            conditions.push(condition(
                &old.conditions,
                type_,
                ok,
                reason,
                message,
                generation,
                input.now,
            ));
        };
    match input.spec_error {
        Some(e) => {
            set(&mut conditions, "Ready", false, e.reason, e.to_string());
            set(&mut conditions, "Stalled", true, e.reason, e.to_string());
        }
        None => {
            let (reason, message) = if export.spec.suspend {
                ("Suspended", "suspended: no scheduled runs start".to_owned())
            } else {
                (
                    "Scheduled",
                    format!(
                        "runs on schedule {:?} ({})",
                        export.spec.schedule,
                        export.spec.time_zone.as_deref().unwrap_or("UTC")
                    ),
                )
            };
            set(&mut conditions, "Ready", true, reason, message);
            set(
                &mut conditions,
                "Stalled",
                false,
                "Valid",
                "the spec is valid".into(),
            );
        }
    }
    if status.active.is_empty() {
        set(
            &mut conditions,
            "Running",
            false,
            "Idle",
            "no run in progress".into(),
        );
    } else {
        set(
            &mut conditions,
            "Running",
            true,
            "RunActive",
            format!("in progress: {}", status.active.join(", ")),
        );
    }
    status.conditions = conditions;
    status
}

/// `lastRun` from a finished run and its report (or what Kubernetes said when there is none).
fn last_run(run: &Run, report: &FinishedReport) -> LastRun {
    let mut last = LastRun {
        job_name: run.name.clone(),
        started_at: run.started.map(rfc3339),
        finished_at: run.finished.map(rfc3339),
        ..LastRun::default()
    };
    match &report.message {
        Some(m) => {
            last.outcome = m.outcome.clone();
            last.records = m.records;
            last.bytes = m.bytes;
            last.records_by_type = m.records_by_type.clone();
            last.attachments = m.attachments;
            last.attachment_bytes = m.attachment_bytes;
            last.errors = m.errors.clone();
            if m.errors_omitted > 0 {
                last.errors.push(format!(
                    "… and {} more errors (see the run's summary.json)",
                    m.errors_omitted
                ));
            }
            last.output_path = Some(m.output_dir.clone()).filter(|p| !p.is_empty());
        }
        None => {
            last.outcome = if run.state == RunState::Succeeded {
                ReportedOutcome::Success
            } else {
                ReportedOutcome::Failed
            }
            .as_str()
            .into();
            if run.state == RunState::Failed {
                last.errors.push(match &run.failure {
                    Some(f) => format!("{f} (the run left no report: see the Job's pod logs)"),
                    None => "the run left no report: its pod is gone or was killed (e.g. out of memory); see the Job's events".into(),
                });
            }
        }
    }
    last
}

fn condition(
    old: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let since = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(Timestamp::from_second(now.as_second()).unwrap_or(now)));
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: since,
    }
}

/// The Event for a run that finished since the old status (`RunSucceeded`, `RunPartial`, `RunFailed`).
pub fn finished_run_note(old: &EpicExportStatus, new: &EpicExportStatus) -> Option<Note> {
    let last = new.last_run.as_ref()?;
    if old.last_run.as_ref().map(|l| &l.job_name) == Some(&last.job_name) {
        return None;
    }
    let (warning, reason) = match ReportedOutcome::parse(&last.outcome) {
        ReportedOutcome::Success => (false, "RunSucceeded"),
        ReportedOutcome::Partial => (true, "RunPartial"),
        ReportedOutcome::Unfinished => (false, "RunUnfinished"),
        ReportedOutcome::Failed => (true, "RunFailed"),
    };
    let mut message = format!(
        "run {} {}: {} records, {} bytes",
        last.job_name, last.outcome, last.records, last.bytes
    );
    if let Some(first) = last.errors.first() {
        message.push_str(&format!("; {} error(s), first: {first}", last.errors.len()));
    }
    Some(Note {
        warning,
        reason,
        message,
    })
}

/// The `Stalled` Event when the export became invalid (or its problem changed).
pub fn spec_error_note(old: &EpicExportStatus, error: &SpecError) -> Option<Note> {
    let message = error.to_string();
    let already = old
        .conditions
        .iter()
        .any(|c| c.type_ == "Stalled" && c.status == "True" && c.message == message);
    (!already).then_some(Note {
        warning: true,
        reason: error.reason,
        message,
    })
}

/// Name of the export for messages.
pub fn describe(export: &EpicExport) -> String {
    format!(
        "{}/{}",
        export.namespace().unwrap_or_default(),
        export.name_any()
    )
}
