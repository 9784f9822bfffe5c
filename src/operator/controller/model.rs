//! The plain data the reconcile steps hand each other (what `dereference` observed, what `validate`
//! found, what `decide` planned, the Events to emit) and the small pure helpers several steps share.
//! Every step imports this module and the steps before it, never a later one.

use jiff::Timestamp;
use k8s_openapi::api::batch::v1::Job;
use kube::ResourceExt;

use crate::operator::crd::{EpicExport, PublicKeys};
use crate::operator::job::{RunReportMessage, SCHEDULED_ANNOTATION};
use crate::operator::key_secret::{KeyKids, Signing};
use crate::schedule::{ConcurrencyPolicy, Schedule};

/// Whether a referenced object and key exist.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RefCheck {
    Present,
    /// The object does not exist.
    Missing,
    /// The object exists without the key; `keys` are the keys it has (names only).
    KeyMissing {
        keys: Vec<String>,
    },
    /// A key Secret slot holds no usable private key.
    Invalid {
        reason: String,
    },
    /// The name or key cannot be one of a Kubernetes object (nothing was read).
    BadName {
        reason: String,
    },
    /// A Secret whose keys become environment variables holds none of the variables the client reads
    /// (those starting with `prefix`); `keys` are the keys it has (names only).
    NoVariables {
        prefix: &'static str,
        keys: Vec<String>,
    },
}

/// A Secret or ConfigMap key the spec refers to, and what was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// The spec field, e.g. `spec.auth.keySecretRef`.
    pub field: &'static str,
    pub kind: RefKind,
    pub name: String,
    pub key: String,
    pub check: RefCheck,
}

/// What kind of object a spec field refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefKind {
    Secret,
    ConfigMap,
}

impl RefKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RefKind::Secret => "Secret",
            RefKind::ConfigMap => "ConfigMap",
        }
    }
}

impl std::fmt::Display for RefKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a run (one Job) stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Active,
    Succeeded,
    Failed,
}

/// One run: a Job owned by the EpicExport.
#[derive(Clone, Debug, PartialEq)]
pub struct Run {
    pub name: String,
    /// The Job's uid: its pods carry it in their owner reference.
    pub uid: Option<String>,
    pub state: RunState,
    /// The scheduled time annotation (RFC 3339).
    pub scheduled_at: Option<String>,
    pub created: Option<Timestamp>,
    pub started: Option<Timestamp>,
    pub finished: Option<Timestamp>,
    /// Why Kubernetes failed the Job (e.g. `DeadlineExceeded: Job was active longer than ...`).
    pub failure: Option<String>,
}

impl Run {
    pub fn from_job(job: &Job) -> Run {
        let status = job.status.clone().unwrap_or_default();
        let condition = |kind: &str| {
            status
                .conditions
                .iter()
                .flatten()
                .find(|c| c.type_ == kind && c.status == "True")
                .cloned()
        };
        let (state, finished_condition) = if let Some(c) = condition("Complete") {
            (RunState::Succeeded, Some(c))
        } else if let Some(c) = condition("Failed") {
            (RunState::Failed, Some(c))
        } else {
            (RunState::Active, None)
        };
        let failure = match (&state, &finished_condition) {
            (RunState::Failed, Some(c)) => Some(
                [c.reason.as_deref(), c.message.as_deref()]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(": "),
            )
            .filter(|s| !s.is_empty()),
            _ => None,
        };
        Run {
            name: job.name_any(),
            uid: job.metadata.uid.clone(),
            state,
            scheduled_at: job.annotations().get(SCHEDULED_ANNOTATION).cloned(),
            created: job.metadata.creation_timestamp.as_ref().map(|t| t.0),
            started: status.start_time.as_ref().map(|t| t.0),
            finished: status
                .completion_time
                .as_ref()
                .map(|t| t.0)
                .or_else(|| finished_condition.and_then(|c| c.last_transition_time.map(|t| t.0))),
            failure,
        }
    }

    pub fn is_finished(&self) -> bool {
        self.state != RunState::Active
    }

    /// When the run began, for ordering (start, else creation).
    pub fn began(&self) -> Option<Timestamp> {
        self.started.or(self.created)
    }
}

/// The report a finished run's pod left in its termination message.
#[derive(Clone, Debug, PartialEq)]
pub struct FinishedReport {
    pub job: String,
    /// `None` when the pod is gone or left no readable message (e.g. killed for memory).
    pub message: Option<RunReportMessage>,
}

/// Everything `validate`, `decide` and `status` need from the cluster.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    pub references: Vec<Reference>,
    /// The key Secret's public keys and key ids by slot, when the Secret is usable.
    pub keys: Option<ObservedKeys>,
    pub runs: Vec<Run>,
    pub report: Option<FinishedReport>,
}

/// What the status (`publicKeys`) and key rotation need from the key Secret.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ObservedKeys {
    pub kids: KeyKids,
    /// The public JWK Set (signing key first).
    pub public: PublicKeys,
    pub secret_created: Option<Timestamp>,
}

/// How the export signs (an unparsable algorithm is left to `validate` to report).
pub fn signing_of(export: &EpicExport) -> Signing {
    Signing {
        algorithm: export
            .spec
            .auth
            .algorithm
            .as_deref()
            .and_then(|a| a.parse().ok()),
        key_id: export.spec.auth.key_id.clone(),
    }
}

/// Why `name` cannot name a Secret or ConfigMap (a DNS subdomain) or `key` one of its keys, if so.
pub fn name_problem(name: &str, key: &str) -> Option<String> {
    if let Some(problem) = object_name_problem(name) {
        return Some(problem);
    }
    let key_ok = !key.is_empty()
        && key.len() <= 253
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !key_ok {
        return Some(format!(
            "{key:?} is not a key name: use letters, digits, '-', '_' and '.'"
        ));
    }
    None
}

/// Why `name` cannot name a Secret or ConfigMap (a DNS subdomain), if so.
pub fn object_name_problem(name: &str) -> Option<String> {
    let dns_subdomain = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    (!dns_subdomain).then(|| {
        format!("{name:?} is not an object name: use lower-case letters, digits, '-' and '.'")
    })
}

/// The newest finished run (by finish time, then start).
pub fn newest_finished(runs: &[Run]) -> Option<&Run> {
    runs.iter()
        .filter(|r| r.is_finished())
        .max_by_key(|r| (r.finished, r.began(), r.name.clone()))
}

/// RFC 3339, whole seconds, UTC (`2026-12-01T02:00:00Z`).
pub fn rfc3339(t: Timestamp) -> String {
    Timestamp::from_second(t.as_second())
        .unwrap_or(t)
        .to_string()
}

/// A mistake in the EpicExport or in what it refers to; only a change fixes it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    /// The condition and Event reason, e.g. `SecretNotFound`.
    pub reason: &'static str,
    /// The field to fix, e.g. `spec.auth.keySecretRef`.
    pub field: String,
    pub message: String,
}

impl SpecError {
    /// Whether the problem is in a referenced Secret or ConfigMap, which can be fixed without touching
    /// the EpicExport (the controller does not watch them, so it looks again periodically).
    pub fn is_in_reference(&self) -> bool {
        matches!(
            self.reason,
            "SecretNotFound" | "ConfigMapNotFound" | "KeyNotFound" | "InvalidKey"
        )
    }
}

/// What later steps need from a valid export.
#[derive(Clone, Debug)]
pub struct Validated {
    pub schedule: Schedule,
    pub concurrency: ConcurrencyPolicy,
    /// `spec.auth.rotation.every`, parsed.
    pub rotate_every: Option<jiff::SignedDuration>,
}

/// Why a run starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trigger {
    Schedule,
    /// The run-now annotation, with its value.
    OnDemand(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunStart {
    pub job_name: String,
    /// The scheduled time (for on-demand runs: now).
    pub scheduled: Timestamp,
    pub trigger: Trigger,
}

/// Something worth an Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    pub reason: &'static str,
    pub message: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunPlan {
    pub start: Option<RunStart>,
    /// Active runs to stop before starting (Replace).
    pub stop: Vec<String>,
    /// Finished runs beyond the history limits, to delete.
    pub prune: Vec<String>,
    /// The scheduled time to record as `lastScheduleTime` (a run started or found already created).
    pub record_schedule: Option<Timestamp>,
    /// The run-now value to record as handled (its run started or found already created).
    pub run_now_handled: Option<String>,
    pub notes: Vec<Note>,
    /// The next scheduled time (+100 ms), when to reconcile again; `None` when suspended.
    pub requeue_at: Option<Timestamp>,
}

pub use crate::operator::job::ReportedOutcome;
