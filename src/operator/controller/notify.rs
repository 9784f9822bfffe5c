//! The e-mail about a finished run, sent by the controller (the Job's pod sends none): once per run,
//! right after the run first lands in `status.lastRun`, so also for runs whose pod never reported
//! (killed for memory, past its deadline, evicted: the outcome then comes from the Job). The status
//! is written before sending, so a restarted operator never sends a second message for a run. SMTP
//! credentials come from the `username` and `password` keys of `notify.email.smtpSecretRef`, and a
//! certificate to trust from `notify.email.caCertRef` (a ConfigMap key), both read by name only to
//! send. The settings themselves were checked by `validate` ([`super::validate::check_email`], which
//! refuses among others credentials that would cross the network without TLS); the message is built
//! with the same [`email_plan`].

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::Api;
use kube::{Client, ResourceExt};

use super::model::ReportedOutcome;
use super::validate::email_plan;
use crate::notify::{CaCert, notify_run};
use crate::operator::crd::{ConfigMapKeyRef, EpicExport, LastRun};
use crate::summary::{Outcome, RunMode, RunSummary, TypeCount};

/// Why the SMTP credentials or the certificate to trust could not be read (recorded as
/// `failed: <this>` in `lastRun.notification`).
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{kind} {name:?} ({field}) does not exist")]
    Missing {
        kind: &'static str,
        name: String,
        field: &'static str,
    },
    #[error("cannot read {kind} {name:?}: {source}")]
    Api {
        kind: &'static str,
        name: String,
        source: kube::Error,
    },
    #[error("Secret {0:?} (spec.notify.email.smtpSecretRef) needs the keys username and password")]
    NoCredentials(String),
    #[error("ConfigMap {name:?} (spec.notify.email.caCertRef) has no key {key:?}")]
    NoCertificate { name: String, key: String },
}

/// Reads `name` (`kind`, the object `field` refers to) by name.
async fn read_named<K>(
    client: &Client,
    ns: &str,
    name: &str,
    kind: &'static str,
    field: &'static str,
) -> Result<K, ReadError>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    match api.get_opt(name).await {
        Ok(Some(object)) => Ok(object),
        Ok(None) => Err(ReadError::Missing {
            kind,
            name: name.to_owned(),
            field,
        }),
        Err(source) => Err(ReadError::Api {
            kind,
            name: name.to_owned(),
            source,
        }),
    }
}

/// Sends the e-mail about `last` if the export asks for one; returns what to record in
/// `lastRun.notification` (`None` when nothing was to be sent).
pub async fn send_for_run(client: &Client, export: &EpicExport, last: &LastRun) -> Option<String> {
    let email = export.spec.notify.as_ref()?.email.as_ref()?;
    let outcome = match ReportedOutcome::parse(&last.outcome) {
        ReportedOutcome::Success => Outcome::Success,
        ReportedOutcome::Partial => Outcome::Partial,
        // Resumed by the next run: nothing to report yet.
        ReportedOutcome::Unfinished => return None,
        ReportedOutcome::Failed => Outcome::Failed,
    };
    let ns = export.namespace().unwrap_or_default();
    let credentials = match &email.smtp_secret_ref {
        None => None,
        Some(r) => match smtp_credentials(client, &ns, &r.name).await {
            Ok(c) => Some(c),
            Err(why) => return Some(format!("failed: {why}")),
        },
    };
    let ca = match &email.ca_cert_ref {
        None => None,
        Some(r) => match ca_certificate(client, &ns, r).await {
            Ok(pem) => Some(CaCert::Pem(pem)),
            Err(why) => return Some(format!("failed: {why}")),
        },
    };
    let plan = match email_plan(email, credentials, ca) {
        Ok(plan) => plan,
        Err(e) => return Some(format!("failed: {e}")),
    };
    notify_run(Some(&plan), &run_summary(export, last, outcome))
        .await
        .record()
}

/// `username` and `password` of the SMTP Secret.
async fn smtp_credentials(
    client: &Client,
    ns: &str,
    name: &str,
) -> Result<(String, String), ReadError> {
    let secret: Secret = read_named(
        client,
        ns,
        name,
        "Secret",
        "spec.notify.email.smtpSecretRef",
    )
    .await?;
    let key = |k: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(k))
            .map(|v| String::from_utf8_lossy(&v.0).trim_end().to_owned())
    };
    match (key("username"), key("password")) {
        (Some(u), Some(p)) => Ok((u, p)),
        _ => Err(ReadError::NoCredentials(name.to_owned())),
    }
}

/// The PEM text under `r`'s key (`data` or `binaryData`).
async fn ca_certificate(
    client: &Client,
    ns: &str,
    r: &ConfigMapKeyRef,
) -> Result<Vec<u8>, ReadError> {
    let name = &r.config_map_name;
    let map: ConfigMap =
        read_named(client, ns, name, "ConfigMap", "spec.notify.email.caCertRef").await?;
    let text = map
        .data
        .as_ref()
        .and_then(|d| d.get(&r.key))
        .map(|t| t.as_bytes().to_vec());
    let binary = || {
        map.binary_data
            .as_ref()
            .and_then(|d| d.get(&r.key))
            .map(|b| b.0.clone())
    };
    text.or_else(binary)
        .ok_or_else(|| ReadError::NoCertificate {
            name: name.clone(),
            key: r.key.clone(),
        })
}

/// The run as a summary for the message (figures only, as in `lastRun`).
fn run_summary(export: &EpicExport, last: &LastRun, outcome: Outcome) -> RunSummary {
    let parse = |t: &Option<String>| t.as_deref().and_then(|t| t.parse::<jiff::Timestamp>().ok());
    let duration = match (parse(&last.started_at), parse(&last.finished_at)) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64().max(0.0),
        _ => 0.0,
    };
    let mode = if export.spec.source.bulk.is_some() {
        RunMode::Bulk
    } else {
        RunMode::Search
    };
    RunSummary {
        started_at: last.started_at.clone().unwrap_or_default(),
        finished_at: last.finished_at.clone().unwrap_or_default(),
        duration_seconds: duration,
        resources: last
            .records_by_type
            .iter()
            .map(|(t, n)| TypeCount {
                resource_type: t.clone(),
                records: *n,
                bytes: 0,
                file: format!("{t}.ndjson"),
            })
            .collect(),
        records_total: last.records,
        bytes_total: last.bytes,
        attachments: (last.attachments > 0).then(|| crate::summary::AttachmentStats {
            files: last.attachments,
            bytes: last.attachment_bytes,
            ..Default::default()
        }),
        errors: last.errors.clone(),
        output_dir: last.output_path.clone().unwrap_or_default(),
        ..RunSummary::new(
            export.name_any(),
            &last.job_name,
            mode,
            &export.spec.fhir.base_url,
            outcome,
        )
    }
}
