//! Reconcile step 2, `validate` (pure): is the EpicExport runnable? Checks what the CRD schema cannot:
//! the cron expression and time zone, the referenced Secret/ConfigMap keys, and the run config the
//! Job would get (through the same validation as a standalone config file). A failure is a
//! [`SpecError`] naming the field and the fix; the controller then marks the export `Stalled` and
//! waits for a change instead of retrying.

use std::path::Path;

use serde_json::{Value, json};

use super::dereference::{Observed, RefCheck};
use crate::config::ConfigError;
use crate::operator::crd::EpicExport;
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

/// What later steps need from a valid export.
#[derive(Clone, Debug)]
pub struct Validated {
    pub schedule: Schedule,
    pub concurrency: ConcurrencyPolicy,
    /// `spec.auth.rotation.every`, parsed.
    pub rotate_every: Option<jiff::SignedDuration>,
}

pub fn validate(export: &EpicExport, observed: &Observed) -> Result<Validated, SpecError> {
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
        return Err(SpecError {
            reason: "InvalidSpec",
            field: "spec.startingDeadlineSeconds".into(),
            message: format!("{d} is negative: use a number of seconds ≥ 0, or leave it out"),
        });
    }
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
        };
        return Err(SpecError {
            reason,
            field: r.field.into(),
            message,
        });
    }
    check_run_config(export)?;
    let rotate_every = check_rotation(export)?;
    Ok(Validated {
        schedule,
        concurrency: spec.concurrency_policy,
        rotate_every,
    })
}

/// `spec.auth.rotation`: a valid `every`, and no fixed `keyId` (each key needs its own `kid`).
fn check_rotation(export: &EpicExport) -> Result<Option<jiff::SignedDuration>, SpecError> {
    let auth = &export.spec.auth;
    let Some(rotation) = &auth.rotation else {
        return Ok(None);
    };
    if auth.key_id.is_some() {
        return Err(SpecError {
            reason: "InvalidSpec",
            field: "spec.auth.keyId".into(),
            message: "a fixed keyId cannot be rotated (the next key needs its own kid): remove keyId, and each key is known by its RFC 7638 thumbprint".into(),
        });
    }
    rotation
        .every
        .as_deref()
        .map(super::rotation::parse_every)
        .transpose()
        .map_err(|message| SpecError {
            reason: "InvalidSpec",
            field: "spec.auth.rotation.every".into(),
            message,
        })
}

/// Runs the Job's config through the standalone config validation, with the mounted files (which
/// only exist in the pod) replaced by placeholders.
fn check_run_config(export: &EpicExport) -> Result<(), SpecError> {
    let mut config = run_config(export).map_err(|e| match e {
        BuildError::Invalid { field, message, .. } => SpecError {
            reason: "InvalidSpec",
            field: field.into(),
            message,
        },
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
        Err(ConfigError::Invalid { field, message, .. }) => Err(SpecError {
            reason: "InvalidSpec",
            field: spec_field(&field),
            message,
        }),
        Err(other) => Err(SpecError {
            reason: "InvalidSpec",
            field: "spec".into(),
            message: other.to_string(),
        }),
    }
}

/// The spec path of a standalone config field (the spec mirrors the config's names).
fn spec_field(config_field: &str) -> String {
    match config_field {
        "name" => "metadata.name".into(),
        f => format!("spec.{f}"),
    }
}
