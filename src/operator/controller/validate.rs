//! Reconcile step 2, `validate` (pure): is the EpicExport runnable? Checks what the CRD schema cannot
//! (and again what it can, for objects admitted without its rules, e.g. under an older CRD): the cron
//! expression and time zone, the Job settings (an allowed image, retry and deadline values the Job API
//! accepts, the pods' extra labels), the output (a volume folder, or an object store URL parsed as the
//! pod will), the rate limit, the e-mail settings, the run config the Job would get
//! (through the same validation as a standalone config file, so its rules, such as https, apply), key
//! rotation, and the referenced Secret/ConfigMap keys. A failure is a [`SpecError`] naming the field
//! and the fix; the controller then marks the export `Stalled` and waits for a change (or, for a
//! missing Secret, ConfigMap or key, looks again periodically) instead of retrying.

use std::path::Path;
use std::time::Duration;

use jiff::SignedDuration;
use serde_json::{Value, json};

use super::model::{Observed, RefCheck, RefKind, SpecError, Validated, name_problem};
use crate::config::ConfigError;
use crate::notify::{CaCert, EmailPlan, OnSet, PasswordSource, SecretValue, TlsMode};
use crate::operator::crd::{EmailSpec, EpicExport, OutputSpec};
use crate::operator::images::ImagePolicy;
use crate::operator::job::{BuildError, OWN_POD_LABELS, run_config};
use crate::schedule::Schedule;
use crate::storage::{LocationError, OutputTarget, parse_output_url};

fn invalid(field: &str, message: String) -> SpecError {
    SpecError {
        reason: "InvalidSpec",
        field: field.into(),
        message,
    }
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
        check_email(email).map_err(|e| invalid(&e.field, e.message))?;
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
                if r.kind == RefKind::Secret {
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
            RefCheck::NoVariables { prefix, keys } => (
                "KeyNotFound",
                format!(
                    "{} {:?} holds no {prefix}* variable, the only ones the object store client reads (it has: {}): put the credentials there as {prefix}... keys, e.g. {}",
                    r.kind,
                    r.name,
                    if keys.is_empty() {
                        "none".to_owned()
                    } else {
                        keys.join(", ")
                    },
                    match *prefix {
                        "AWS_" => "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
                        "AZURE_" => "AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY",
                        _ => "GOOGLE_SERVICE_ACCOUNT_KEY (the JSON key)",
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
    for (key, value) in &job.pod_labels {
        if OWN_POD_LABELS.contains(&key.as_str()) {
            return Err(invalid(
                "spec.job.podLabels",
                format!("{key:?} is one of the operator's own labels: remove it"),
            ));
        }
        if let Some(problem) = label_problem(key, value) {
            return Err(invalid("spec.job.podLabels", problem));
        }
    }
    Ok(())
}

/// Why `key: value` cannot be a Kubernetes label, if so: the key an optional DNS subdomain prefix and
/// `/` and a name of at most 63 characters, the value empty or such a name.
fn label_problem(key: &str, value: &str) -> Option<String> {
    fn name_ok(s: &str) -> bool {
        s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.ends_with(|c: char| c.is_ascii_alphanumeric())
    }
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part.len() <= 63
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            })
    });
    if !prefix_ok || !name_ok(name) {
        return Some(format!(
            "{key:?} is not a label key: an optional DNS prefix and '/', then up to 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        ));
    }
    if !value.is_empty() && !name_ok(value) {
        return Some(format!(
            "the value {value:?} of {key:?} is not a label value: up to 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        ));
    }
    None
}

/// `spec.output`: exactly one of a volume (`volumeClaimName`, with `subPath` a folder inside it) and an
/// object store (`url`, checked as the pod will parse it, with its options); nothing of one with the
/// other.
fn check_output(export: &EpicExport) -> Result<(), SpecError> {
    let o = &export.spec.output;
    match (&o.volume_claim_name, &o.url) {
        (Some(_), Some(_)) => Err(invalid(
            "spec.output",
            "set only one of volumeClaimName (a PersistentVolumeClaim) and url (an object store), not both".into(),
        )),
        (None, None) => Err(invalid(
            "spec.output",
            "set volumeClaimName (a PersistentVolumeClaim) or url (an object store: s3://bucket/prefix, az://container/prefix or gs://bucket/prefix)".into(),
        )),
        (Some(claim), None) => check_volume_output(o, claim),
        (None, Some(url)) => check_object_output(o, url),
    }?;
    if let Some(c) = &o.compression
        && c != "none"
        && c != "gzip"
    {
        return Err(invalid(
            "spec.output.compression",
            format!("{c:?}: use gzip (files written as <Type>.ndjson.gz) or none"),
        ));
    }
    Ok(())
}

fn check_volume_output(o: &OutputSpec, claim: &str) -> Result<(), SpecError> {
    if claim.is_empty() {
        return Err(invalid(
            "spec.output.volumeClaimName",
            "name the PersistentVolumeClaim the runs write to".into(),
        ));
    }
    for (field, set) in [
        ("spec.output.endpoint", o.endpoint.is_some()),
        ("spec.output.region", o.region.is_some()),
        ("spec.output.partSize", o.part_size.is_some()),
        (
            "spec.output.uploadConcurrency",
            o.upload_concurrency.is_some(),
        ),
        (
            "spec.output.credentialsSecretRef",
            o.credentials_secret_ref.is_some(),
        ),
        (
            "spec.output.scratchSizeLimit",
            o.scratch_size_limit.is_some(),
        ),
    ] {
        if set {
            return Err(invalid(
                field,
                "goes with spec.output.url (an object store), not with a volume: remove it".into(),
            ));
        }
    }
    let Some(sub) = &o.sub_path else {
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

fn check_object_output(o: &OutputSpec, url: &str) -> Result<(), SpecError> {
    if o.sub_path.is_some() {
        return Err(invalid(
            "spec.output.subPath",
            "is a folder inside the volume of volumeClaimName: with url, put the folder in the URL's prefix (s3://bucket/prefix/folder)".into(),
        ));
    }
    let local = || {
        invalid(
            "spec.output.url",
            format!(
                "{url:?} is a folder, and a folder in the export pod is gone when the run ends: use volumeClaimName (a PersistentVolumeClaim) to write to a volume, or an s3://, az:// or gs:// URL"
            ),
        )
    };
    match parse_output_url(url, o.endpoint.as_deref(), o.region.as_deref()) {
        Ok(OutputTarget::Object(_)) => {}
        Ok(OutputTarget::Local(_)) | Err(LocationError::LocalOptions) => return Err(local()),
        // The pod's own messages offer file:// too, which the operator does not.
        Err(LocationError::Scheme(u) | LocationError::NotUrl(u)) => {
            return Err(invalid(
                "spec.output.url",
                format!(
                    "{u:?} is not an object store URL: write s3://bucket/prefix, az://container/prefix or gs://bucket/prefix (for a volume, use volumeClaimName)"
                ),
            ));
        }
        Err(e @ (LocationError::Endpoint(_) | LocationError::InsecureEndpoint(_))) => {
            return Err(invalid("spec.output.endpoint", e.to_string()));
        }
        Err(e) => return Err(invalid("spec.output.url", e.to_string())),
    }
    if let Some(limit) = &o.scratch_size_limit
        && !is_quantity(limit)
    {
        return Err(invalid(
            "spec.output.scratchSizeLimit",
            format!("{limit:?} is not a size: write a whole number and a unit, e.g. 2Gi or 500Mi"),
        ));
    }
    // partSize and uploadConcurrency are checked with the run's config (check_run_config).
    Ok(())
}

/// A whole number with an optional binary or decimal suffix (`2Gi`, `500M`, `1073741824`).
fn is_quantity(text: &str) -> bool {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    digits > 0
        && digits <= 18
        && matches!(
            &text[digits..],
            "" | "Ki" | "Mi" | "Gi" | "Ti" | "k" | "M" | "G" | "T"
        )
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
        .map(parse_every)
        .transpose()
        .map_err(|e| invalid("spec.auth.rotation.every", e.to_string()))
}

/// Runs the Job's config through the standalone config validation, with the mounted files (which
/// only exist in the pod) replaced by placeholders.
fn check_run_config(export: &EpicExport) -> Result<(), SpecError> {
    let mut config = run_config(export).map_err(|e| match e {
        BuildError::Invalid { field, message, .. } => invalid(field, message),
        e @ BuildError::Serialize { field, .. } => invalid(field, e.to_string()),
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

/// Why `spec.auth.rotation.every` is not a rotation period.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EveryError {
    #[error("{0:?} is not a duration: write e.g. 90d, 12w or 36h")]
    NotADuration(String),
    #[error("{0:?} is too long: rotate at least every 100 years")]
    TooLong(String),
    #[error("{text:?}: unknown unit {unit:?}; use m, h, d or w (e.g. 90d)")]
    UnknownUnit { text: String, unit: String },
    #[error("{0:?} is shorter than 1h: rotate at most hourly")]
    TooShort(String),
}

/// Parses `spec.auth.rotation.every`: a whole number and a unit (`m`, `h`, `d`, `w`), at least 1 hour.
pub fn parse_every(text: &str) -> Result<SignedDuration, EveryError> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: i64 = number.parse().map_err(|_| {
        if number.is_empty() {
            EveryError::NotADuration(text.to_owned())
        } else {
            EveryError::TooLong(text.to_owned())
        }
    })?;
    let minutes = match unit {
        "m" => 1,
        "h" => 60,
        "d" => 24 * 60,
        "w" => 7 * 24 * 60,
        _ => {
            return Err(EveryError::UnknownUnit {
                text: text.to_owned(),
                unit: unit.to_owned(),
            });
        }
    };
    let total = n
        .checked_mul(minutes)
        .filter(|m| *m <= 100 * 366 * 24 * 60)
        .ok_or_else(|| EveryError::TooLong(text.to_owned()))?;
    if total < 60 {
        return Err(EveryError::TooShort(text.to_owned()));
    }
    Ok(SignedDuration::from_mins(total))
}

/// A mistake in `spec.notify.email`, naming the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct EmailError {
    pub field: String,
    pub message: String,
}

fn error(field: impl Into<String>, message: String) -> EmailError {
    EmailError {
        field: field.into(),
        message,
    }
}

/// What the spec alone shows to be wrong with `notify.email` (checked by `validate`, so such an
/// export is `Stalled` instead of failing to send after each run).
pub fn check_email(email: &EmailSpec) -> Result<(), EmailError> {
    if email.on.is_some() {
        return Err(error(
            "spec.notify.email.on",
            "renamed: write sendOn (a bare `on` key is the boolean true for YAML 1.1 parsers such as kubectl)".into(),
        ));
    }
    if email.yaml11_on.is_some() {
        return Err(error(
            "spec.notify.email",
            "has a key `true`: a YAML 1.1 parser (kubectl, many GitOps tools) read `on:` as the boolean true; write sendOn instead".into(),
        ));
    }
    if let Some(r) = &email.smtp_secret_ref
        && let Some(why) = name_problem(&r.name, "password")
    {
        return Err(error(
            "spec.notify.email.smtpSecretRef",
            format!("Secret {why}"),
        ));
    }
    if let Some(r) = &email.ca_cert_ref
        && let Some(why) = name_problem(&r.config_map_name, &r.key)
    {
        return Err(error(
            "spec.notify.email.caCertRef",
            format!("ConfigMap {why}"),
        ));
    }
    // Placeholder credentials: only whether there are any matters here.
    let credentials = email
        .smtp_secret_ref
        .as_ref()
        .map(|_| (String::new(), String::new()));
    email_plan(email, credentials, None).map(|_| ())
}

/// The e-mail settings of the spec, with the Secret's credentials and the certificate to trust.
/// Credentials are never sent over `tls: none` to a host that is not loopback.
pub fn email_plan(
    email: &EmailSpec,
    credentials: Option<(String, String)>,
    ca: Option<CaCert>,
) -> Result<EmailPlan, EmailError> {
    let host = email.host.trim();
    let tls = TlsMode::parse(email.tls.as_deref().unwrap_or("starttls"))
        .map_err(|e| error("spec.notify.email.tls", e.to_string()))?;
    let port = crate::notify::check_server(host, tls, email.port, credentials.is_some())
        .map_err(|p| error(format!("spec.notify.email.{}", p.key()), p.to_string()))?;
    let mailbox = |field: &'static str, a: &str| {
        a.parse()
            .map_err(|e| error(field, format!("{a:?} is not an e-mail address ({e})")))
    };
    if email.to.is_empty() {
        return Err(error(
            "spec.notify.email.to",
            "is empty: give at least one recipient".into(),
        ));
    }
    let (username, password) = match credentials {
        Some((u, p)) => (Some(u), Some(PasswordSource::Value(SecretValue(p)))),
        None => (None, None),
    };
    Ok(EmailPlan {
        host: host.to_owned(),
        port,
        tls,
        from: mailbox("spec.notify.email.from", &email.from)?,
        to: email
            .to
            .iter()
            .map(|a| mailbox("spec.notify.email.to", a))
            .collect::<Result<_, _>>()?,
        username,
        password,
        ca,
        insecure_skip_verify: false,
        on: OnSet::parse(&email.send_on)
            .map_err(|e| error("spec.notify.email.sendOn", e.to_string()))?,
        timeout: Duration::from_secs(30),
    })
}
