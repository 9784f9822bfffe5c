//! Reconcile step 3, `decide` (pure): which run to start now, which runs to stop (`Replace`), which
//! finished runs to delete (history limits), and when to look again. Scheduling follows Kubernetes
//! CronJob semantics (`crate::schedule`); a new value of the `fhirexport.dev/run-now` annotation asks
//! for one run now, under the same concurrency policy.

use std::time::Duration;

use jiff::Timestamp;
use kube::{Resource, ResourceExt};

use super::model::{Note, Run, RunPlan, RunStart, RunState, Trigger, Validated};
use crate::operator::crd::EpicExport;
use crate::schedule::{self, ConcurrencyPolicy, MAX_EXPORT_NAME_LEN, ScheduleInput, job_name};

/// Annotation whose new value starts one run now: `kubectl annotate epx NAME fhirexport.dev/run-now="$(date +%s)" --overwrite`.
pub const RUN_NOW_ANNOTATION: &str = "fhirexport.dev/run-now";

pub fn decide(export: &EpicExport, valid: &Validated, runs: &[Run], now: Timestamp) -> RunPlan {
    let spec = &export.spec;
    let status = export.status.clone().unwrap_or_default();
    let name = export.name_any();
    let active: Vec<String> = runs
        .iter()
        .filter(|r| r.state == RunState::Active)
        .map(|r| r.name.clone())
        .collect();
    let decision = schedule::decide(&ScheduleInput {
        schedule: &valid.schedule,
        suspend: spec.suspend,
        concurrency: valid.concurrency,
        starting_deadline: spec
            .starting_deadline_seconds
            .map(|s| Duration::from_secs(s.max(0) as u64)),
        last_scheduled: status
            .last_schedule_time
            .as_deref()
            .and_then(|t| t.parse().ok()),
        created: export
            .meta()
            .creation_timestamp
            .as_ref()
            .map(|t| t.0)
            .unwrap_or(now),
        active: &active,
        now,
    });
    let mut plan = RunPlan {
        requeue_at: decision.requeue_at,
        notes: decision
            .notes
            .iter()
            .map(|n| Note {
                warning: n.is_warning(),
                reason: n.reason(),
                message: n.to_string(),
            })
            .collect(),
        ..RunPlan::default()
    };
    if let Some(scheduled) = decision.start {
        let job = job_name(&name, scheduled);
        plan.record_schedule = Some(scheduled);
        if !runs.iter().any(|r| r.name == job) {
            plan.stop = decision.stop;
            plan.start = Some(RunStart {
                job_name: job,
                scheduled,
                trigger: Trigger::Schedule,
            });
        }
    }

    if let Some(token) = export.annotations().get(RUN_NOW_ANNOTATION)
        && !token.is_empty()
        && status.run_now_handled.as_ref() != Some(token)
    {
        let job = on_demand_job_name(&name, token);
        if runs.iter().any(|r| r.name == job) {
            plan.run_now_handled = Some(token.clone());
        } else if plan.start.is_none() {
            let start = RunStart {
                job_name: job,
                scheduled: now,
                trigger: Trigger::OnDemand(token.clone()),
            };
            match valid.concurrency {
                ConcurrencyPolicy::Forbid if !active.is_empty() => plan.notes.push(Note {
                    warning: false,
                    reason: "JobAlreadyActive",
                    message: format!(
                        "run-now {token:?} waits: run {} is active and concurrencyPolicy is Forbid",
                        active.join(", ")
                    ),
                }),
                ConcurrencyPolicy::Replace => {
                    plan.stop = active.clone();
                    plan.start = Some(start);
                }
                _ => plan.start = Some(start),
            }
        }
        // else: a scheduled run starts in this pass; the on-demand one is considered in the next.
    }

    plan.prune = history_to_prune(
        runs,
        spec.successful_runs_history_limit,
        spec.failed_runs_history_limit,
    );
    plan
}

/// Deterministic name of the run asked for by run-now value `token`: `<export>-r<8 hex>`, so a
/// restarted operator finds it instead of starting a second one.
pub fn on_demand_job_name(export: &str, token: &str) -> String {
    // FNV-1a, 32 bits: stable across versions and platforms.
    let hash = token.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!(
        "{}-r{hash:08x}",
        crate::text::truncate(export, MAX_EXPORT_NAME_LEN).trim_end_matches('-')
    )
}

/// Finished runs beyond the limits, oldest first out: `successful` succeeded and `failed` failed runs
/// are kept, newest by start time (name breaks ties).
pub fn history_to_prune(runs: &[Run], successful: i32, failed: i32) -> Vec<String> {
    let mut prune = Vec::new();
    for (state, keep) in [
        (RunState::Succeeded, successful),
        (RunState::Failed, failed),
    ] {
        let mut done: Vec<&Run> = runs.iter().filter(|r| r.state == state).collect();
        done.sort_by(|a, b| (b.began(), &b.name).cmp(&(a.began(), &a.name)));
        prune.extend(
            done.into_iter()
                .skip(keep.max(0) as usize)
                .map(|r| r.name.clone()),
        );
    }
    prune.sort();
    prune
}
