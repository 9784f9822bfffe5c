//! Reconcile step 2, `validate` (pure): is the EpicExport runnable? Checks what the CRD schema cannot
//! (and again what it can, for objects admitted without its rules, e.g. under an older CRD): the cron
//! expression and time zone, the Job settings (an allowed image, retry and deadline values the Job API
//! accepts), the output folder, the rate limit, the e-mail settings, the run config the Job would get
//! (through the same validation as a standalone config file, so its rules, such as https, apply), key
//! rotation, and the referenced Secret/ConfigMap keys. A failure is a [`SpecError`] naming the field
//! and the fix; the controller then marks the export `Stalled` and waits for a change (or, for a
//! missing Secret, ConfigMap or key, looks again periodically) instead of retrying.

use std::path::Path;

use serde_json::{Value, json};

use super::dereference::{Observed, RefCheck};
use crate::config::ConfigError;
use crate::operator::crd::EpicExport;
use crate::operator::images::ImagePolicy;
use crate::operator::job::{BuildError, run_config};
use crate::schedule::{ConcurrencyPolicy, Schedule};

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

fn invalid(field: &str, message: String) -> SpecError {
    SpecError {
        reason: "InvalidSpec",
        field: field.into(),
        message,
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

pub fn validate(
    export: &EpicExport,
    observed: &Observed,
    images: &ImagePolicy,
) -> Result<Validated, SpecError> {
    let spec = &export.spec;
    let schedule =
        Schedule::parse(&spec.schedule, spec.time_zone.as_deref()).map_err(|e| SpecError {
            reason: "InvalidSchedule",
            field: match e {
                crate::schedule::ScheduleError::UnknownTimeZone { .. } => "spec.timeZone",
                _ => "spec.schedule",
            }
            .into(),
            message: e.to_string(),
        })?;
    if let Some(d) = spec.starting_deadline_seconds
        && d < 0
    {
        return Err(invalid(
            "spec.startingDeadlineSeconds",
            format!("{d} is negative: use a number of seconds ≥ 0, or leave it out"),
        ));
    }
    check_job(export, images)?;
    check_output(export)?;
    check_limits(export)?;
    if let Some(email) = spec.notify.as_ref().and_then(|n| n.email.as_ref()) {
        super::notify::check_email(email).map_err(|e| invalid(&e.field, e.message))?;
    }
    check_run_config(export)?;
    let rotate_every = check_rotation(export)?;
    check_references(observed)?;
    Ok(Validated {
        schedule,
        concurrency: spec.concurrency_policy,
        rotate_every,
    })
}

/// The referenced Secret and ConfigMap keys exist (and the key Secret holds usable keys).
fn check_references(observed: &Observed) -> Result<(), SpecError> {
    for r in &observed.references {
        let (reason, message) = match &r.check {
            RefCheck::Present => continue,
            RefCheck::Missing => (
                if r.kind == "Secret" {
                    "SecretNotFound"
                } else {
                    "ConfigMapNotFound"
                },
                format!(
                    "{} {:?} does not exist in this namespace: create it, or fix the name",
                    r.kind, r.name
                ),
            ),
            RefCheck::Invalid { reason } => (
                "InvalidKey",
                format!(
                    "{} {:?}: {reason}; put a PEM private key there (`epic-export keygen --k8s-secret`)",
                    r.kind, r.name
                ),
            ),
            RefCheck::KeyMissing { keys } => (
                "KeyNotFound",
                format!(
                    "{} {:?} has no key {:?} (it has: {}): add the key, or fix `key`",
                    r.kind,
                    r.name,
                    r.key,
                    if keys.is_empty() {
                        "none".to_owned()
                    } else {
                        keys.join(", ")
                    }
                ),
            ),
            RefCheck::BadName { reason } => ("InvalidSpec", format!("{}: {reason}", r.kind)),
        };
        return Err(SpecError {
            reason,
            field: r.field.into(),
            message,
        });
    }
    Ok(())
}

/// `spec.job`: an image the operator may run, and retry and deadline values the Job API accepts.
fn check_job(export: &EpicExport, images: &ImagePolicy) -> Result<(), SpecError> {
    let Some(job) = &export.spec.job else {
        return Ok(());
    };
    if let Some(image) = &job.image
        && !images.allows(image)
    {
        return Err(SpecError {
            reason: "ImageNotAllowed",
            field: "spec.job.image".into(),
            message: format!(
                "{image:?} is not an image this operator runs export Jobs with (allowed: {}): remove spec.job.image to use the operator's own image, or have the operator's administrator allow it (--allowed-job-images, Helm value allowedJobImages)",
                images.describe()
            ),
        });
    }
    if let Some(n) = job.backoff_limit
        && n < 0
    {
        return Err(invalid(
            "spec.job.backoffLimit",
            format!("{n} is negative: give the number of pod retries, 0 or more"),
        ));
    }
    if let Some(s) = job.active_deadline_seconds
        && s < 1
    {
        return Err(invalid(
            "spec.job.activeDeadlineSeconds",
            format!("{s}: give at least 1 second, or leave it out (no deadline)"),
        ));
    }
    Ok(())
}

/// `spec.output.subPath`: a folder inside the volume.
fn check_output(export: &EpicExport) -> Result<(), SpecError> {
    let Some(sub) = &export.spec.output.sub_path else {
        return Ok(());
    };
    if sub.starts_with('/') {
        return Err(invalid(
            "spec.output.subPath",
            format!("{sub:?} is absolute: give a folder inside the volume, e.g. nightly"),
        ));
    }
    if sub.split('/').any(|part| part == "..") {
        return Err(invalid(
            "spec.output.subPath",
            format!(
                "{sub:?} leaves its folder with '..': give a folder inside the volume, e.g. nightly"
            ),
        ));
    }
    Ok(())
}

/// `spec.limits.requestsPerSecond`: 0 (no limit) or 0.01 to 1000. A tiny positive rate would make
/// each request wait for hours (or forever).
fn check_limits(export: &EpicExport) -> Result<(), SpecError> {
    let Some(rate) = export
        .spec
        .limits
        .as_ref()
        .and_then(|l| l.requests_per_second)
    else {
        return Ok(());
    };
    if rate == 0.0 || (MIN_RATE..=MAX_RATE).contains(&rate) {
        return Ok(());
    }
    Err(invalid(
        "spec.limits.requestsPerSecond",
        format!(
            "{rate} is out of range: use 0 (no limit) or {MIN_RATE} to {MAX_RATE} requests per second"
        ),
    ))
}

const MIN_RATE: f64 = 0.01;
const MAX_RATE: f64 = 1000.0;

/// `spec.auth.rotation`: a valid `every`, and no fixed `keyId` (each key needs its own `kid`).
fn check_rotation(export: &EpicExport) -> Result<Option<jiff::SignedDuration>, SpecError> {
    let auth = &export.spec.auth;
    let Some(rotation) = &auth.rotation else {
        return Ok(None);
    };
    if auth.key_id.is_some() {
        return Err(invalid(
            "spec.auth.keyId",
            "a fixed keyId cannot be rotated (the next key needs its own kid): remove keyId, and each key is known by its RFC 7638 thumbprint".into(),
        ));
    }
    rotation
        .every
        .as_deref()
        .map(super::rotation::parse_every)
        .transpose()
        .map_err(|message| invalid("spec.auth.rotation.every", message))
}

/// Runs the Job's config through the standalone config validation, with the mounted files (which
/// only exist in the pod) replaced by placeholders.
fn check_run_config(export: &EpicExport) -> Result<(), SpecError> {
    let mut config = run_config(export).map_err(|e| match e {
        BuildError::Invalid { field, message, .. } => invalid(field, message),
        BuildError::NoUid(name) => SpecError {
            reason: "InvalidSpec",
            field: "metadata.uid".into(),
            message: format!("EpicExport {name} has no uid"),
        },
    })?;
    if let Some(search) = config
        .pointer_mut("/source/search")
        .and_then(Value::as_object_mut)
    {
        search.remove("rosterFile");
        search.insert("patients".into(), json!(["placeholder"]));
        if search.remove("resourcesFile").is_some() {
            search.insert("resources".into(), json!([{ "type": "Patient" }]));
        }
    }
    let text = config.to_string();
    match crate::config::plan_from_text(&text, Path::new("spec"), Path::new("/")) {
        Ok(_) => Ok(()),
        Err(ConfigError::Invalid { field, message, .. }) => {
            Err(invalid(&spec_field(&field), message))
        }
        Err(other) => Err(invalid("spec", other.to_string())),
    }
}

/// The spec path of a standalone config field (the spec mirrors the config's names).
fn spec_field(config_field: &str) -> String {
    match config_field {
        "name" => "metadata.name".into(),
        f => format!("spec.{f}"),
    }
}
