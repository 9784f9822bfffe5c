//! The EpicExport controller (`epic-export controller`): watches EpicExports and the Jobs they own,
//! and reconciles each export through a pipeline of named steps, each a function over plain data:
//!
//! `dereference` (read) → `validate` (pure) → `decide` and `rotation` (pure: the runs, and the key
//! Secret's rotation step) → build (`operator::job`, pure) → `apply` (write: Jobs, the key Secret, the
//! status) → `status` (pure; written only when it changed) → `notify` (the e-mail about a finished
//! run).
//!
//! What the steps hand each other (the observed references and runs, the [`model::SpecError`], the
//! [`model::Validated`] export, the [`model::RunPlan`], the Event [`model::Note`]s) is in `model`. A step
//! imports `model` and the steps before it, never one after it (`scripts/check_layers.py` checks that
//! there is no cycle); this module runs them in order.
//!
//! Secrets and ConfigMaps are read by name when an export is reconciled, never listed or watched, so
//! the operator needs only `get` on them (list or watch would let it read every Secret). Each export
//! is therefore looked at again every `resync` (and at once on any change to it or its Jobs), which
//! also keeps `status.publicKeys`, what the JWK Set endpoint serves, in step with the key Secret.
//!
//! A mistake in the spec marks the export `Stalled`, emits one Warning Event and waits for a change;
//! a missing Secret, ConfigMap or key does the same but is looked at again every `reference_retry`,
//! so creating it heals the export. API errors back off per export, exponentially, capped at five
//! minutes.

pub mod apply;
pub mod clock;
pub mod decide;
pub mod dereference;
pub mod model;
pub mod notify;
pub mod rotation;
pub mod status;
pub mod validate;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, ListParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};

use self::apply::{ApplyError, Started};
pub use self::clock::Clock;
use self::model::{Note, SpecError, Trigger, rfc3339};
use self::rotation::{ROTATE_KEY_ANNOTATION, RotationInput, RotationPhase, RotationTiming};
use self::status::StatusInput;
use super::crd::EpicExport;
use super::exports;
use super::images::ImagePolicy;
use super::job::{BuildError, EXPORT_LABEL, RunInputs, build_job};
use super::metrics::{
    ErrorLabels, ExportLabels, ExportState, LastRunState, Metrics, OutcomeLabels,
};
use crate::http::retry::Backoff;

/// The `reportingController` of Events and the Lease holder prefix.
pub const CONTROLLER_NAME: &str = "epic-export-operator";

/// How many exports reconcile at once.
const RECONCILE_CONCURRENCY: u16 = 16;

/// Per-export backoff after API errors: 5 s, 10 s, 20 s … capped at five minutes, with jitter.
const ERROR_BACKOFF: Backoff = Backoff {
    first: Duration::from_secs(5),
    cap: Duration::from_secs(300),
};

/// What the controller needs besides the client.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The images export Jobs may run: the operator's own (the default) and those allowed besides.
    pub images: ImagePolicy,
    /// Watch only this namespace (default: all).
    pub namespace: Option<String>,
    /// This replica's name, in Events.
    pub identity: String,
    /// The waits of key rotations (the cache lifetime is the JWKS endpoint's `max-age`).
    pub rotation: RotationTiming,
    /// How often an export stalled on a missing Secret, ConfigMap or key is looked at again.
    pub reference_retry: Duration,
    /// How often every export is looked at again at the latest.
    pub resync: Duration,
    /// What every pass takes as "now" (the system clock by default).
    pub clock: Clock,
}

impl Settings {
    /// The defaults for the operator running `images`.
    pub fn new(images: ImagePolicy) -> Settings {
        Settings {
            images,
            namespace: None,
            identity: CONTROLLER_NAME.into(),
            rotation: RotationTiming::default(),
            reference_retry: Duration::from_secs(30),
            resync: Duration::from_secs(15 * 60),
            clock: Clock::system(),
        }
    }
}

/// Shared by every reconcile.
pub struct Context {
    client: Client,
    recorder: Recorder,
    images: ImagePolicy,
    rotation: RotationTiming,
    reference_retry: Duration,
    resync: Duration,
    clock: Clock,
    metrics: Arc<Metrics>,
    /// Consecutive failures per export (uid), for the backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// The schedule notes emitted in the last pass per export (uid), so a repeated note is one Event.
    noted: Mutex<HashMap<String, BTreeSet<String>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The run's Job could not be built from a valid spec (a bug: retried with backoff, visible in
    /// the logs and metrics, never an empty config).
    #[error("cannot build the run's Job: {0}")]
    Build(#[from] BuildError),
}

impl ReconcileError {
    fn reason(&self) -> String {
        match self {
            ReconcileError::Kube(kube::Error::Api(e)) => format!("api_{}", e.code),
            ReconcileError::Kube(_) => "api_unreachable".into(),
            ReconcileError::Build(_) => "build_failed".into(),
        }
    }
}

impl Context {
    pub fn new(client: Client, settings: &Settings, metrics: Arc<Metrics>) -> Context {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: CONTROLLER_NAME.into(),
                instance: Some(settings.identity.clone()),
            },
        );
        Context {
            client,
            recorder,
            images: settings.images.clone(),
            rotation: settings.rotation,
            reference_retry: settings.reference_retry,
            resync: settings.resync,
            clock: settings.clock.clone(),
            metrics,
            failures: Mutex::default(),
            noted: Mutex::default(),
        }
    }

    async fn publish(&self, export: &EpicExport, note: &Note, action: &str) {
        // Event notes are limited to 1 kB.
        let text = crate::text::shorten(&note.message, 1000).into_owned();
        let event = Event {
            type_: if note.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: note.reason.into(),
            note: Some(text),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &export.object_ref(&())).await {
            tracing::warn!(export = %status::describe(export), "cannot publish Event {}: {e}", note.reason);
        }
    }
}

/// One reconcile pass of one export.
pub async fn reconcile(
    export: Arc<EpicExport>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    ctx.metrics.reconciles.inc();
    if export.meta().deletion_timestamp.is_some() {
        ctx.metrics
            .forget_export(&export.namespace().unwrap_or_default(), &export.name_any());
        // Its Jobs go with it (owner references).
        return Ok(Action::await_change());
    }
    let now = ctx.clock.now();
    let observed = dereference::dereference(&ctx.client, &export).await?;
    let valid = match validate::validate(&export, &observed, &ctx.images) {
        Ok(v) => v,
        Err(e) => return stalled(&ctx, &export, &observed, e, now).await,
    };
    let plan = decide::decide(&export, &valid, &observed.runs, now);
    let job = match &plan.start {
        None => None,
        Some(start) => {
            let inputs = RunInputs {
                job_name: start.job_name.clone(),
                scheduled_at: rfc3339(start.scheduled),
                since: since_for(&export),
            };
            match build_job(&export, &inputs, ctx.images.default_image()) {
                Ok(job) => Some(job),
                Err(e @ BuildError::Serialize { .. }) => return Err(e.into()),
                Err(e) => {
                    let error = SpecError {
                        reason: "InvalidSpec",
                        field: "spec".into(),
                        message: e.to_string(),
                    };
                    return stalled(&ctx, &export, &observed, error, now).await;
                }
            }
        }
    };
    let (runs, started) =
        match apply::start_run(&ctx.client, &export, &observed.runs, &plan.stop, job, now).await {
            Ok(done) => done,
            Err(ApplyError::Spec(e)) => return stalled(&ctx, &export, &observed, e, now).await,
            Err(ApplyError::Kube(e)) => return Err(e.into()),
        };
    let next = (!export.spec.suspend)
        .then(|| valid.schedule.next_after(now))
        .flatten();
    let rotated = match &observed.keys {
        Some(keys) if export.spec.auth.rotation.is_some() => {
            Some(ctx.rotate_key(&export, &valid, keys, &runs, now).await?)
        }
        _ => None,
    };
    let old = export.status.clone().unwrap_or_default();
    let mut new = status::next_status(&StatusInput {
        export: &export,
        runs: &runs,
        spec_error: None,
        plan: Some(&plan),
        next,
        report: observed.report.as_ref(),
        public_keys: observed.keys.as_ref().map(|k| &k.public),
        now,
    });
    if export.spec.auth.rotation.is_none() {
        new.key_rotation = None;
    }
    if let Some(rotated) = &rotated {
        new.key_rotation = Some(rotated.status.clone());
    }
    apply::write_status(&ctx.client, &export, &new).await?;
    let max_age = (!export.spec.suspend)
        .then(|| max_success_age(&export, &valid.schedule, now))
        .flatten();
    ctx.show(&export, &new, &runs, max_age);
    for note in rotated.iter().flat_map(|r| &r.notes) {
        ctx.publish(&export, note, "RotateKey").await;
    }

    for name in &plan.stop {
        let note = Note {
            warning: false,
            reason: "RunStopped",
            message: format!(
                "stopped run {name}: a new run replaces it (concurrencyPolicy Replace)"
            ),
        };
        ctx.publish(&export, &note, "Stop").await;
    }
    if let (Some(start), Some(Started::Created)) = (&plan.start, &started) {
        let why = match &start.trigger {
            Trigger::Schedule => format!("scheduled for {}", rfc3339(start.scheduled)),
            Trigger::OnDemand(token) => format!("on demand (run-now {token:?})"),
        };
        let note = Note {
            warning: false,
            reason: "RunStarted",
            message: format!("started run {} ({why})", start.job_name),
        };
        ctx.publish(&export, &note, "Start").await;
    }
    let fresh = ctx.fresh_notes(&export, &plan.notes);
    for note in fresh {
        ctx.publish(&export, &note, "Schedule").await;
    }
    ctx.finished(&export, &old, &new).await?;
    if old
        .conditions
        .iter()
        .any(|c| c.type_ == "Stalled" && c.status == "True")
    {
        let note = Note {
            warning: false,
            reason: "Valid",
            message: "the spec and its references are valid again".into(),
        };
        ctx.publish(&export, &note, "Validate").await;
    }
    apply::prune(&ctx.client, &export, &plan.prune).await?;

    ctx.failures
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&uid(&export));
    let wake = [plan.requeue_at, rotated.and_then(|r| r.wake_at)]
        .into_iter()
        .flatten()
        .min();
    Ok(Action::requeue(requeue_in(wake, now, ctx.resync)))
}

/// How long until `wake` (at least 100 ms), and at most `resync`.
fn requeue_in(wake: Option<Timestamp>, now: Timestamp, resync: Duration) -> Duration {
    match wake {
        Some(at) => Duration::try_from(at.duration_since(now))
            .unwrap_or_default()
            .max(Duration::from_millis(100))
            .min(resync),
        None => resync,
    }
}

/// `now + d`, or `None` when that is not a representable time.
fn after(now: Timestamp, d: Duration) -> Option<Timestamp> {
    now.checked_add(d).ok()
}

/// The outcome of a key rotation step.
struct Rotated {
    status: crate::operator::crd::KeyRotationStatus,
    notes: Vec<Note>,
    wake_at: Option<Timestamp>,
}

impl Context {
    /// Decides the key rotation step and makes its Secret change.
    async fn rotate_key(
        &self,
        export: &EpicExport,
        valid: &model::Validated,
        keys: &model::ObservedKeys,
        runs: &[model::Run],
        now: Timestamp,
    ) -> Result<Rotated, kube::Error> {
        let previous = export.status.as_ref().and_then(|s| s.key_rotation.as_ref());
        let plan = rotation::plan(&RotationInput {
            now,
            every: valid.rotate_every,
            request: export
                .annotations()
                .get(ROTATE_KEY_ANNOTATION)
                .map(String::as_str),
            previous,
            kids: &keys.kids,
            secret_created: keys.secret_created,
            runs,
            timing: self.rotation,
        });
        let Some(change) = &plan.change else {
            return Ok(Rotated {
                status: plan.status,
                notes: plan.notes,
                wake_at: plan.wake_at,
            });
        };
        Ok(
            match apply::change_key(&self.client, export, &keys.kids, change).await? {
                apply::KeyWrite::Written => {
                    tracing::info!(export = %status::describe(export), "key rotation: {change:?} written");
                    Rotated {
                        status: plan.status,
                        notes: plan.notes,
                        // The next pass reads the changed Secret (and publishes its keys).
                        wake_at: [plan.wake_at, after(now, Duration::from_secs(1))]
                            .into_iter()
                            .flatten()
                            .min(),
                    }
                }
                // The Secret changed meanwhile: look again soon.
                apply::KeyWrite::Stale => Rotated {
                    status: previous.cloned().unwrap_or(plan.status),
                    notes: Vec::new(),
                    wake_at: after(now, Duration::from_secs(1)),
                },
                apply::KeyWrite::Refused(why) => {
                    let status = rotation::blocked(&plan, previous, &why);
                    let repeated = previous.is_some_and(|p| {
                        p.phase == RotationPhase::Blocked.as_str() && p.message == status.message
                    });
                    let notes = (!repeated)
                        .then(|| Note {
                            warning: true,
                            reason: "KeyRotationBlocked",
                            message: why.clone(),
                        })
                        .into_iter()
                        .collect();
                    Rotated {
                        status,
                        notes,
                        wake_at: after(now, Duration::from_secs(300)),
                    }
                }
            },
        )
    }
}

/// `since` for a bulk run with `since: auto`: the last successful transactionTime the controller
/// recorded (the pod falls back to its own record on the volume when there is none).
fn since_for(export: &EpicExport) -> Option<String> {
    let bulk = export.spec.source.bulk.as_ref()?;
    if bulk.since.as_deref() != Some("auto") {
        return None;
    }
    export.status.as_ref()?.last_transaction_time.clone()
}

/// Marks the export Stalled (one Warning Event per distinct problem) and waits for a change (a
/// problem in a referenced Secret or ConfigMap: looks again every `reference_retry`).
async fn stalled(
    ctx: &Context,
    export: &EpicExport,
    observed: &model::Observed,
    error: SpecError,
    now: Timestamp,
) -> Result<Action, ReconcileError> {
    tracing::warn!(export = %status::describe(export), "not runnable: {error}");
    let old = export.status.clone().unwrap_or_default();
    let new = status::next_status(&StatusInput {
        export,
        runs: &observed.runs,
        spec_error: Some(&error),
        plan: None,
        next: None,
        report: observed.report.as_ref(),
        // Still published while the Secret holds them: a run may be signing with them.
        public_keys: observed.keys.as_ref().map(|k| &k.public),
        now,
    });
    apply::write_status(&ctx.client, export, &new).await?;
    ctx.show(export, &new, &observed.runs, None);
    if let Some(note) = status::spec_error_note(&old, &error) {
        ctx.publish(export, &note, "Validate").await;
    }
    ctx.finished(export, &old, &new).await?;
    ctx.failures
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&uid(export));
    Ok(if error.is_in_reference() {
        Action::requeue(ctx.reference_retry)
    } else {
        Action::await_change()
    })
}

impl Context {
    /// When a run first landed in `lastRun` (status `new` already written): its Event, its metrics,
    /// and its e-mail, whose result is then recorded in `lastRun.notification`.
    async fn finished(
        &self,
        export: &EpicExport,
        old: &crate::operator::crd::EpicExportStatus,
        new: &crate::operator::crd::EpicExportStatus,
    ) -> Result<(), kube::Error> {
        let Some(note) = status::finished_run_note(old, new) else {
            return Ok(());
        };
        self.publish(export, &note, "Finish").await;
        self.count_run(export, new);
        let Some(last) = &new.last_run else {
            return Ok(());
        };
        if let Some(record) = notify::send_for_run(&self.client, export, last).await {
            let mut written = export.clone();
            written.status = Some(new.clone());
            let mut with = new.clone();
            if let Some(l) = with.last_run.as_mut() {
                l.notification = Some(record);
            }
            apply::write_status(&self.client, &written, &with).await?;
        }
        Ok(())
    }

    /// The notes not already emitted in this export's previous pass.
    fn fresh_notes(&self, export: &EpicExport, notes: &[Note]) -> Vec<Note> {
        let keys: BTreeSet<String> = notes
            .iter()
            .map(|n| format!("{}|{}", n.reason, n.message))
            .collect();
        let mut noted = self.noted.lock().unwrap_or_else(|p| p.into_inner());
        let previous = noted.insert(uid(export), keys).unwrap_or_default();
        notes
            .iter()
            .filter(|n| !previous.contains(&format!("{}|{}", n.reason, n.message)))
            .cloned()
            .collect()
    }

    fn count_run(&self, export: &EpicExport, status: &crate::operator::crd::EpicExportStatus) {
        let Some(last) = &status.last_run else { return };
        self.metrics
            .runs
            .get_or_create(&OutcomeLabels {
                outcome: last.outcome.clone(),
            })
            .inc();
        self.metrics.records.inc_by(last.records);
        self.metrics.bytes.inc_by(last.bytes);
        let parse = |t: &Option<String>| t.as_deref().and_then(|t| t.parse::<Timestamp>().ok());
        if let (Some(start), Some(end)) = (parse(&last.started_at), parse(&last.finished_at)) {
            self.metrics
                .run_duration
                .observe(end.duration_since(start).as_secs_f64().max(0.0));
        }
        if model::ReportedOutcome::parse(&last.outcome) == model::ReportedOutcome::Success
            && let Some(end) = parse(&last.finished_at)
        {
            self.metrics
                .last_success
                .get_or_create(&ExportLabels {
                    namespace: export.namespace().unwrap_or_default(),
                    export: export.name_any(),
                })
                .set(end.as_second() as f64);
        }
    }
}

/// The annotation that overrides how long an export may go without a successful run before
/// `epic_export_max_success_age_seconds` (and so the EpicExportNotSuccessful alert) says it is late:
/// a whole number and a unit (`m`, `h`, `d`, `w`), at least 1h.
pub const MAX_SUCCESS_AGE_ANNOTATION: &str = "fhirexport.dev/max-success-age";

/// How long the export may go without a successful run: the annotation
/// [`MAX_SUCCESS_AGE_ANNOTATION`], or else the longest gap between the schedule's next 16 runs plus
/// half of it (at least 1 h) for the run itself. `None` when the schedule has no next run.
pub fn max_success_age(
    export: &EpicExport,
    schedule: &crate::schedule::Schedule,
    now: Timestamp,
) -> Option<f64> {
    if let Some(text) = export.annotations().get(MAX_SUCCESS_AGE_ANNOTATION) {
        match validate::parse_every(text) {
            Ok(d) => return Some(d.as_secs_f64()),
            Err(e) => tracing::warn!(
                export = %status::describe(export),
                "annotation {MAX_SUCCESS_AGE_ANNOTATION}: {e}; using the schedule"
            ),
        }
    }
    schedule_allowance(schedule, now)
}

/// The longest gap between the schedule's next 16 runs after `now`, plus half of it (at least 1 h).
fn schedule_allowance(schedule: &crate::schedule::Schedule, now: Timestamp) -> Option<f64> {
    let mut at = schedule.next_after(now)?;
    let mut gap = 0.0_f64;
    for _ in 0..16 {
        let Some(next) = schedule.next_after(at) else {
            break;
        };
        gap = gap.max(next.duration_since(at).as_secs_f64());
        at = next;
    }
    if gap <= 0.0 {
        return None;
    }
    Some(gap + (gap / 2.0).max(3600.0))
}

/// The per-export gauges from the status just written.
fn export_state(
    status: &crate::operator::crd::EpicExportStatus,
    runs: &[model::Run],
    max_success_age: Option<f64>,
) -> ExportState {
    let parse = |t: &Option<String>| t.as_deref().and_then(|t| t.parse::<Timestamp>().ok());
    ExportState {
        last_run: status.last_run.as_ref().map(|last| LastRunState {
            outcome: model::ReportedOutcome::parse(&last.outcome)
                .as_str()
                .to_owned(),
            duration: match (parse(&last.started_at), parse(&last.finished_at)) {
                (Some(start), Some(end)) => Some(end.duration_since(start).as_secs_f64().max(0.0)),
                _ => None,
            },
            records: last.records,
            bytes: last.bytes,
            records_by_type: last
                .records_by_type
                .iter()
                .map(|(t, n)| (t.clone(), *n))
                .collect(),
        }),
        last_success: parse(&status.last_successful_time).map(|t| t.as_second() as f64),
        active_runs: i64::try_from(status.active.len()).unwrap_or(i64::MAX),
        active_since: runs
            .iter()
            .filter(|r| r.state == model::RunState::Active)
            .filter_map(|r| r.started.or(r.created))
            .min()
            .map(|t| t.as_second() as f64),
        stalled: status
            .conditions
            .iter()
            .any(|c| c.type_ == "Stalled" && c.status == "True"),
        rotation_phase: status.key_rotation.as_ref().map(|k| k.phase.clone()),
        max_success_age,
        created: None,
    }
}

impl Context {
    fn show(
        &self,
        export: &EpicExport,
        status: &crate::operator::crd::EpicExportStatus,
        runs: &[model::Run],
        max_success_age: Option<f64>,
    ) {
        self.metrics.set_export(
            &export.namespace().unwrap_or_default(),
            &export.name_any(),
            &ExportState {
                created: export
                    .meta()
                    .creation_timestamp
                    .as_ref()
                    .map(|t| t.0.as_second() as f64),
                ..export_state(status, runs, max_success_age)
            },
        );
    }
}

/// Exponential per-export backoff for API errors: 5 s, 10 s, 20 s … capped at 5 min, with jitter.
pub fn error_policy(export: Arc<EpicExport>, error: &ReconcileError, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_errors
        .get_or_create(&ErrorLabels {
            reason: error.reason(),
        })
        .inc();
    let attempt = {
        let mut failures = ctx.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = failures.entry(uid(&export)).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = ERROR_BACKOFF.next(attempt);
    tracing::warn!(
        export = %status::describe(&export),
        attempt,
        retry_in_s = delay.as_secs_f64(),
        "reconcile failed: {error}"
    );
    Action::requeue(delay)
}

fn uid(export: &EpicExport) -> String {
    export.uid().unwrap_or_else(|| status::describe(export))
}

/// Every minute, removes the per-export gauges of exports no longer in the cache.
async fn prune_metrics(store: kube::runtime::reflector::Store<EpicExport>, metrics: Arc<Metrics>) {
    loop {
        tokio::time::sleep(Duration::from_secs(60)).await;
        let keep: BTreeSet<(String, String)> = store
            .state()
            .iter()
            .map(|e| (e.namespace().unwrap_or_default(), e.name_any()))
            .collect();
        metrics.retain_exports(&keep);
    }
}

/// Why the controller cannot run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(
        "cannot list EpicExports ({0}): is the CRD installed? `epic-export crd | kubectl apply -f -` (or install the Helm chart), and check the operator's RBAC"
    )]
    CannotList(#[source] kube::Error),
}

/// Runs the controller until `shutdown` completes. `ready` is set once the EpicExport cache is
/// filled. Fails at once, with the fix, when the CRD is not installed.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    ready: Arc<std::sync::atomic::AtomicBool>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), RunError> {
    let namespace = settings.namespace.as_deref();
    let exports: Api<EpicExport> = exports::api(client.clone(), namespace);
    exports
        .list(&ListParams::default().limit(1))
        .await
        .map_err(RunError::CannotList)?;
    let jobs: Api<Job> = exports::api(client.clone(), namespace);
    let ctx = Arc::new(Context::new(client.clone(), &settings, metrics));

    // At most this many exports reconcile at once: bounds API requests in flight (and connections, and
    // memory) when many exports are due together; more does not finish sooner.
    let (store, watch) = exports::reflector(client.clone(), namespace);
    let controller = Controller::for_stream(watch, store).with_config(
        kube::runtime::controller::Config::default().concurrency(RECONCILE_CONCURRENCY),
    );
    tokio::spawn(exports::mark_ready(controller.store(), ready, ""));
    // A deleted export is not reconciled (no finalizer): its gauges go when it is gone from the cache.
    let _prune = crate::task::AbortOnDrop(tokio::spawn(prune_metrics(
        controller.store(),
        ctx.metrics.clone(),
    )));
    controller
        .owns(jobs, watcher::Config::default().labels(EXPORT_LABEL))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            use kube::runtime::controller::Error;
            match result {
                // A watch failed (RBAC, API unreachable): kube retries it with backoff.
                Err(Error::QueueError(e)) => tracing::warn!("watch failed, retrying: {e}"),
                // Reconcile errors were logged by `error_policy`; a deleted object needs nothing.
                Err(e) => tracing::debug!("controller: {e}"),
                Ok(_) => {}
            }
        })
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requeue_is_bounded_and_never_panics() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let resync = Duration::from_secs(900);
        assert_eq!(requeue_in(None, now, resync), resync);
        let soon = now.checked_add(Duration::from_secs(5)).unwrap();
        assert_eq!(requeue_in(Some(soon), now, resync), Duration::from_secs(5));
        assert_eq!(requeue_in(Some(Timestamp::MAX), now, resync), resync);
        assert_eq!(
            requeue_in(Some(Timestamp::MIN), now, resync),
            Duration::from_millis(100)
        );
        assert_eq!(after(Timestamp::MAX, Duration::from_secs(1)), None);
    }

    #[test]
    fn the_allowed_age_follows_the_longest_gap_of_the_schedule() {
        let now: Timestamp = "2026-03-04T12:00:00Z".parse().unwrap();
        let allowance = |cron: &str| {
            schedule_allowance(&crate::schedule::Schedule::parse(cron, None).unwrap(), now)
        };
        assert_eq!(allowance("0 * * * *"), Some(7200.0));
        assert_eq!(allowance("0 2 * * *"), Some(36.0 * 3600.0));
        assert_eq!(allowance("0 2 * * 0"), Some(1.5 * 7.0 * 86400.0));
        // Weekdays: the weekend is the longest gap (Friday to Monday).
        assert_eq!(allowance("0 2 * * 1-5"), Some(1.5 * 3.0 * 86400.0));
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(ERROR_BACKOFF.delay(1, 1.0), Duration::from_secs(5));
        assert_eq!(ERROR_BACKOFF.delay(2, 1.0), Duration::from_secs(10));
        assert_eq!(ERROR_BACKOFF.delay(3, 1.0), Duration::from_secs(20));
        assert_eq!(ERROR_BACKOFF.delay(7, 1.0), Duration::from_secs(300));
        assert!(ERROR_BACKOFF.delay(40, 0.999) <= Duration::from_secs(300));
        assert_eq!(ERROR_BACKOFF.delay(1, 0.0), Duration::from_millis(2500));
    }
}
