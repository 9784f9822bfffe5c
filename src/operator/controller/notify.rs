//! The e-mail about a finished run, sent by the controller (the Job's pod sends none): once per run,
//! right after the run first lands in `status.lastRun`, so also for runs whose pod never reported
//! (killed for memory, past its deadline, evicted: the outcome then comes from the Job). The status
//! is written before sending, so a restarted operator never sends a second message for a run. SMTP
//! credentials come from the `username` and `password` keys of `notify.email.smtpSecretRef`, read
//! only to send.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::{Client, ResourceExt};

use crate::notify::{EmailPlan, OnSet, PasswordSource, SecretValue, TlsMode, notify_run};
use crate::operator::crd::{EmailSpec, EpicExport, LastRun};
use crate::summary::{Outcome, RunSummary, TypeCount};

/// Sends the e-mail about `last` if the export asks for one; returns what to record in
/// `lastRun.notification` (`None` when nothing was to be sent).
pub async fn send_for_run(client: &Client, export: &EpicExport, last: &LastRun) -> Option<String> {
    let email = export.spec.notify.as_ref()?.email.as_ref()?;
    let outcome = match last.outcome.as_str() {
        "success" => Outcome::Success,
        "partial" => Outcome::Partial,
        // Resumed by the next run: nothing to report yet.
        "unfinished" => return None,
        _ => Outcome::Failed,
    };
    let credentials = match &email.smtp_secret_ref {
        None => None,
        Some(r) => {
            let secrets: Api<Secret> =
                Api::namespaced(client.clone(), &export.namespace().unwrap_or_default());
            let secret = match secrets.get_opt(&r.name).await {
                Ok(Some(s)) => s,
                Ok(None) => {
                    return Some(format!(
                        "failed: Secret {:?} (notify.email.smtpSecretRef) does not exist",
                        r.name
                    ));
                }
                Err(e) => return Some(format!("failed: cannot read Secret {:?}: {e}", r.name)),
            };
            let key = |k: &str| {
                secret
                    .data
                    .as_ref()
                    .and_then(|d| d.get(k))
                    .map(|v| String::from_utf8_lossy(&v.0).trim_end().to_owned())
            };
            match (key("username"), key("password")) {
                (Some(u), Some(p)) => Some((u, p)),
                _ => {
                    return Some(format!(
                        "failed: Secret {:?} (notify.email.smtpSecretRef) needs the keys username and password",
                        r.name
                    ));
                }
            }
        }
    };
    let plan = match email_plan(email, credentials) {
        Ok(plan) => plan,
        Err(e) => return Some(format!("failed: {e}")),
    };
    notify_run(Some(&plan), &run_summary(export, last, outcome))
        .await
        .record()
}

/// The e-mail settings of the spec, with the Secret's credentials.
pub fn email_plan(
    email: &EmailSpec,
    credentials: Option<(String, String)>,
) -> Result<EmailPlan, String> {
    let tls = TlsMode::parse(email.tls.as_deref().unwrap_or("starttls"))
        .map_err(|e| format!("notify.email.tls: {e}"))?;
    let mailbox = |field: &str, a: &str| {
        a.parse()
            .map_err(|e| format!("notify.email.{field}: {a:?} is not an e-mail address ({e})"))
    };
    let (username, password) = match credentials {
        Some((u, p)) => (Some(u), Some(PasswordSource::Value(SecretValue(p)))),
        None => (None, None),
    };
    Ok(EmailPlan {
        host: email.host.clone(),
        port: email.port.unwrap_or(tls.default_port()),
        tls,
        from: mailbox("from", &email.from)?,
        to: email
            .to
            .iter()
            .map(|a| mailbox("to", a))
            .collect::<Result<_, _>>()?,
        username,
        password,
        ca: None,
        insecure_skip_verify: false,
        on: OnSet::parse(&email.on).map_err(|e| format!("notify.email.on: {e}"))?,
        timeout: Duration::from_secs(30),
    })
}

/// The run as a summary for the message (figures only, as in `lastRun`).
fn run_summary(export: &EpicExport, last: &LastRun, outcome: Outcome) -> RunSummary {
    let parse = |t: &Option<String>| t.as_deref().and_then(|t| t.parse::<jiff::Timestamp>().ok());
    let duration = match (parse(&last.started_at), parse(&last.finished_at)) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64().max(0.0),
        _ => 0.0,
    };
    RunSummary {
        export: export.name_any(),
        run_id: last.job_name.clone(),
        outcome,
        started_at: last.started_at.clone().unwrap_or_default(),
        finished_at: last.finished_at.clone().unwrap_or_default(),
        duration_seconds: duration,
        fhir_base_url: export.spec.fhir.base_url.clone(),
        mode: if export.spec.source.bulk.is_some() {
            "bulk".into()
        } else {
            "search".into()
        },
        requests: 0,
        retries: 0,
        token_renewals_after_401: 0,
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
        server_outcomes: 0,
        search: None,
        bulk: None,
        errors: last.errors.clone(),
        output_dir: last.output_path.clone().unwrap_or_default(),
        notification: None,
    }
}
