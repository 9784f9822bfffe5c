//! Bulk Data mode: kick off a `$export` (or resume one a killed run started), poll until the server is
//! done, download every file in parallel, and publish the run like search mode.
//!
//! Never repeat a kick-off needlessly: Epic allows one per Group per 24 hours. The status URL is saved in
//! the run's staging folder before the first poll (`state`), and the next run with the same request
//! resumes it. A "requested this Group too recently" answer is stored as a cool-down, not retried.

pub mod download;
pub mod manifest;
pub mod state;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use reqwest::Method;
use reqwest::header::{ACCEPT, HeaderName};

use self::manifest::{Kind, Manifest};
use self::state::{Cooldown, LastSuccess, PENDING_FILE, Pending};
use super::writer;
use super::{ExportError, Retrieved, RunContext, RunReport};
use crate::fhir::client::{outcome_codes, outcome_text, parse_outcome};
use crate::fhir::runlog::EventKind;
use crate::fhir::{FetchError, RetryMode};
use crate::http::body::json_error_kind;
use crate::http::retry::Backoff;
use crate::http::{body, retry};
use crate::output::{Resume, RunWriter};
use crate::plan::{BulkLevel, BulkPlan, Since};
use crate::progress::Progress;
use crate::summary::BulkStats;

/// Epic's words when a Group was exported too recently.
const THROTTLE_TEXT: &str = "too recently";
/// Poll intervals: the server's `Retry-After` is clamped to this range; without one, backoff doubles up to the top.
const MIN_POLL: Duration = Duration::from_secs(1);
const MAX_POLL: Duration = Duration::from_secs(300);

/// The kick-off URL for the plan (`since` already resolved).
pub fn kickoff_url(base: &str, b: &BulkPlan, since: Option<&str>) -> String {
    let path = match &b.level {
        BulkLevel::Group(id) => format!("Group/{id}/$export"),
        BulkLevel::Patient => "Patient/$export".into(),
        BulkLevel::System => "$export".into(),
    };
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    if !b.types.is_empty() {
        query.append_pair("_type", &b.types.join(","));
    }
    for f in &b.type_filters {
        query.append_pair("_typeFilter", f);
    }
    if let Some(s) = since {
        query.append_pair("_since", s);
    }
    if let Some(f) = &b.output_format {
        query.append_pair("_outputFormat", f);
    }
    let query = query.finish();
    if query.is_empty() {
        format!("{base}/{path}")
    } else {
        format!("{base}/{path}?{query}")
    }
}

/// Runs a bulk export end to end.
pub async fn run(ctx: &RunContext<'_>, b: &BulkPlan) -> Result<RunReport, ExportError> {
    let plan = ctx.plan;
    let export_dir = plan.output_dir.join(&plan.name);
    let mirror = state::Mirror(ctx.state_store.as_ref());
    mirror.restore(&export_dir).await;
    let since = match &b.since {
        Since::None => None,
        Since::At(t) => Some(t.clone()),
        // The state file is ours, but a damaged one must not become a garbled `_since`.
        Since::Auto => {
            state::read_last_success(&export_dir).and_then(|s| parse_instant(&s.transaction_time))
        }
    };
    let kickoff = kickoff_url(&plan.fhir_base, b, since.as_deref());
    let same_request = |marker: &std::path::Path| {
        state::read_pending(marker).is_some_and(|p| p.kickoff_url == kickoff)
    };
    let resume = Resume {
        marker: PENDING_FILE,
        accept: &same_request,
        // Documents already downloaded are not downloaded again.
        keep: &[crate::output::ATTACHMENTS_DIR],
    };
    let writer = ctx.open_writer(Some(resume))?;
    let mut stats = BulkStats {
        since: since.clone(),
        ..BulkStats::default()
    };
    let progress = Progress::new(0, "files", ctx.opts.interactive);

    let waited = Instant::now();
    let manifest = match obtain_manifest(ctx, b, &writer, &kickoff, &progress, &mut stats).await {
        Ok(m) => m,
        Err(Stop::Failed(message)) => {
            progress.finish();
            return ctx
                .conclude(failed(writer, vec![message], kickoff, stats))
                .await;
        }
        Err(Stop::KeepWaiting(message)) => {
            // The export is still being prepared: keep the staging folder so the next run resumes it.
            progress.finish();
            return Err(ExportError::Unfinished(message));
        }
    };
    stats.seconds_waiting = waited.elapsed().as_secs_f64();
    let transaction_time = manifest.transaction_time.as_deref().and_then(parse_instant);
    stats.transaction_time = transaction_time.clone();
    let pending = state::read_pending(&writer.staging_dir().join(PENDING_FILE));
    let (writer, mut got) = download_all(ctx, b, writer, &manifest, &progress, &mut stats).await?;
    progress.finish();
    if manifest.transaction_time.is_some() && transaction_time.is_none() {
        got.partial.push(
            "the manifest's transactionTime is not an instant; `since: auto` will not use it"
                .into(),
        );
    }
    if let Some(e) = got.write_error.take() {
        // The disk failed: the run fails (and is reported) and its files are removed. The status URL
        // stays with the failed run, so the next run downloads the same export again instead of
        // kicking off anew (Epic allows one kick-off per Group per day).
        return ctx
            .conclude(Retrieved {
                write_error: Some(e),
                ..failed(writer, Vec::new(), kickoff, stats)
            })
            .await;
    }
    if let Some(why) = &got.fatal {
        // Authentication failed mid-download: the export itself is fine, so keep the staging folder
        // with its status URL and let the next run download it again rather than kick off anew.
        drop(writer);
        return Err(ExportError::Unfinished(format!(
            "the download stopped: {why}; the next run with this config downloads the same export again"
        )));
    }
    // Hydration and attachments run while the status URL is still kept: a run killed or stopped
    // during them resumes without a second kick-off (and without downloading attachments again).
    let done = super::enrich::enrich(ctx, writer).await?;
    let writer = done.writer;
    if let Some(e) = done.write_error {
        return ctx
            .conclude(Retrieved {
                write_error: Some(e),
                ..failed(writer, Vec::new(), kickoff, stats)
            })
            .await;
    }
    if let Some(why) = done.fatal {
        drop(writer);
        return Err(ExportError::Unfinished(format!(
            "the download stopped: {why}; the next run with this config downloads the same export again"
        )));
    }
    got.partial.extend(done.partial);
    // The status URL has served its purpose once the files are here.
    let _ = std::fs::remove_file(writer.staging_dir().join(PENDING_FILE));
    mirror.forget_pending().await;
    let complete = got.partial.is_empty();
    let export_dir = writer.export_dir().to_owned();
    let report = ctx
        .conclude(Retrieved {
            writer,
            fatal: Vec::new(),
            write_error: None,
            partial: got.partial,
            transaction_time: transaction_time
                .clone()
                .unwrap_or_else(|| ctx.start_ts.to_string()),
            request: manifest.request.clone().unwrap_or(kickoff),
            server_outcomes: got.server_outcomes,
            search: None,
            bulk: Some(stats),
            enrichment: done.enrichment,
        })
        .await?;
    if complete {
        if let (true, Some(p)) = (b.delete_after_download, &pending) {
            match ctx
                .client
                .fetch(
                    EventKind::Delete,
                    Method::DELETE,
                    &p.status_url,
                    &[],
                    RetryMode::All,
                    body::MAX_DOCUMENT_BYTES,
                )
                .await
            {
                Ok(_) => tracing::info!("told the server the export's files can be deleted"),
                Err(e) => tracing::warn!(
                    correlation = ?e.correlation(),
                    "DELETE of the export's status URL failed ({}); the server will expire it",
                    e.brief()
                ),
            }
        }
        if let Some(t) = &transaction_time {
            let last = LastSuccess {
                transaction_time: t.clone(),
                run_id: report.summary.run_id.clone(),
            };
            if let Err(e) = state::save_last_success(&export_dir, &last) {
                tracing::warn!("cannot remember the transactionTime for `since: auto`: {e}");
            }
            mirror.save_last_success(&last).await;
        }
    }
    Ok(report)
}

/// A server's instant, normalised (`2026-01-01T00:00:00Z`), or `Err` when it is not one.
/// An instant in RFC 3339 form, normalised; `None` if `s` is not one.
fn parse_instant(s: &str) -> Option<String> {
    s.trim()
        .parse::<jiff::Timestamp>()
        .ok()
        .map(|t| t.to_string())
}

fn failed(writer: RunWriter, fatal: Vec<String>, request: String, stats: BulkStats) -> Retrieved {
    Retrieved {
        writer,
        fatal,
        write_error: None,
        partial: Vec::new(),
        transaction_time: String::new(),
        request,
        server_outcomes: 0,
        search: None,
        bulk: Some(stats),
        enrichment: Default::default(),
    }
}

enum Stop {
    /// The run fails with this message.
    Failed(String),
    /// Polling gave up but the export goes on at the server; the next run resumes it.
    KeepWaiting(String),
}

/// Kicks off (or resumes) the export and polls until the manifest is ready.
async fn obtain_manifest(
    ctx: &RunContext<'_>,
    b: &BulkPlan,
    writer: &RunWriter,
    kickoff: &str,
    progress: &Progress,
    stats: &mut BulkStats,
) -> Result<Manifest, Stop> {
    let marker = writer.staging_dir().join(PENDING_FILE);
    let mut resumed = state::read_pending(&marker);
    loop {
        let pending = match resumed.take() {
            Some(p) => {
                stats.resumed = true;
                tracing::info!(
                    "resuming the bulk export kicked off at {} (not kicking off again)",
                    p.kicked_off_at
                );
                p
            }
            None => {
                let p = kick_off(ctx, b, writer, kickoff).await?;
                state::save_pending(writer.staging_dir(), &p).map_err(|e| {
                    Stop::Failed(format!(
                        "cannot save the export's status URL in {}: {e}",
                        marker.display()
                    ))
                })?;
                state::Mirror(ctx.state_store.as_ref())
                    .save_pending(writer.run_id(), &p)
                    .await;
                p
            }
        };
        match poll(ctx, b, &pending, progress).await {
            Ok(m) => return Ok(m),
            Err(Poll::Gone(why)) if stats.resumed => {
                tracing::warn!(
                    "the export this run resumed is gone ({why}); kicking off a new one"
                );
                let _ = std::fs::remove_file(&marker);
                stats.resumed = false;
            }
            Err(Poll::Gone(why)) => {
                let _ = std::fs::remove_file(&marker);
                return Err(Stop::Failed(format!("the server ended the export: {why}")));
            }
            Err(Poll::Stop(s)) => {
                if matches!(s, Stop::Failed(_)) {
                    let _ = std::fs::remove_file(&marker);
                }
                return Err(s);
            }
        }
    }
}

/// Sends the kick-off request. A throttle answer is stored as a cool-down.
async fn kick_off(
    ctx: &RunContext<'_>,
    b: &BulkPlan,
    writer: &RunWriter,
    kickoff: &str,
) -> Result<Pending, Stop> {
    let export_dir = writer.export_dir();
    if let Some(c) = state::read_cooldown(export_dir) {
        let until: Option<jiff::Timestamp> = c.until.parse().ok();
        if until.is_some_and(|u| u > jiff::Timestamp::now()) {
            return Err(Stop::Failed(format!(
                "not kicking off: the server refused the last kick-off ({:?}); the next one is allowed after {} (remove {} to try earlier)",
                c.message,
                c.until,
                state::cooldown_path(export_dir).display()
            )));
        }
    }
    let headers: [(HeaderName, &str); 2] = [
        (ACCEPT, "application/fhir+json"),
        (HeaderName::from_static("prefer"), "respond-async"),
    ];
    let mut attempt = 0;
    let (status, text) = loop {
        attempt += 1;
        let kicked_off_at = jiff::Timestamp::now().to_string();
        let reply = ctx
            .client
            .fetch(
                EventKind::Kickoff,
                Method::GET,
                kickoff,
                &headers,
                RetryMode::TransportOnly,
                body::MAX_DOCUMENT_BYTES,
            )
            .await;
        let (status, text) = match reply {
            Ok(r) if r.status.as_u16() == 202 => {
                let location = r
                    .headers
                    .get(reqwest::header::CONTENT_LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|l| url::Url::parse(kickoff).ok()?.join(l).ok());
                let Some(status_url) = location else {
                    return Err(Stop::Failed(
                        "the kick-off was accepted (202) without a Content-Location header; the export cannot be followed".into(),
                    ));
                };
                if !ctx.client.is_trusted(&status_url) {
                    return Err(Stop::Failed(format!(
                        "the kick-off was accepted (202) but its status URL (Content-Location) is on another origin ({}); the access token is not sent there, so the export cannot be followed. If that host belongs to your FHIR server, add it to source.bulk.tokenHosts",
                        status_url.origin().ascii_serialization()
                    )));
                }
                tracing::info!(status_url = %status_url, "bulk export kicked off");
                let _ = std::fs::remove_file(state::cooldown_path(export_dir));
                state::Mirror(ctx.state_store.as_ref())
                    .forget_cooldown()
                    .await;
                return Ok(Pending {
                    status_url: status_url.to_string(),
                    kickoff_url: kickoff.to_owned(),
                    kicked_off_at,
                });
            }
            Ok(r) => (
                r.status.as_u16(),
                parse_outcome(&r.body).as_deref().and_then(outcome_text),
            ),
            Err(FetchError::Status {
                status,
                diagnostics,
                ..
            }) => (status, diagnostics),
            Err(e) if e.is_fatal() => return Err(Stop::Failed(e.to_string())),
            Err(e) => return Err(Stop::Failed(format!("the kick-off failed: {e}"))),
        };
        let throttled = text
            .as_deref()
            .is_some_and(|t| t.to_ascii_lowercase().contains(THROTTLE_TEXT));
        // A busy server (429/5xx without Epic's throttle words) is asked again a few times.
        if throttled
            || !retry::is_retryable_status(status)
            || attempt >= ctx.client.retry_policy().max_attempts
        {
            break (status, text);
        }
        ctx.client
            .pause(
                attempt,
                None,
                &format!("the kick-off answered HTTP {status}"),
            )
            .await;
    };
    let words = text.unwrap_or_else(|| "(no OperationOutcome)".into());
    if words.to_ascii_lowercase().contains(THROTTLE_TEXT) {
        let until = jiff::Timestamp::now()
            .checked_add(
                jiff::SignedDuration::try_from(b.throttle_cooldown)
                    .unwrap_or(jiff::SignedDuration::from_hours(24)),
            )
            .unwrap_or(jiff::Timestamp::MAX);
        let c = Cooldown {
            until: until.to_string(),
            message: words.clone(),
            kickoff_url: kickoff.to_owned(),
        };
        if let Err(e) = state::save_cooldown(export_dir, &c) {
            tracing::warn!("cannot save the cool-down: {e}");
        }
        state::Mirror(ctx.state_store.as_ref())
            .save_cooldown(&c)
            .await;
        return Err(Stop::Failed(format!(
            "the server refused the kick-off (HTTP {status}): {words:?}. Epic allows one export per Group per 24 hours; the next kick-off is allowed after {}",
            c.until
        )));
    }
    Err(Stop::Failed(format!(
        "the server refused the kick-off (HTTP {status}): {words}"
    )))
}

enum Poll {
    /// 404/410: the export expired or was cancelled.
    Gone(String),
    Stop(Stop),
}

/// Polls the status URL until the manifest is ready.
async fn poll(
    ctx: &RunContext<'_>,
    b: &BulkPlan,
    p: &Pending,
    progress: &Progress,
) -> Result<Manifest, Poll> {
    let started = Instant::now();
    let mut attempt = 0u32;
    let mut last_progress = String::new();
    let headers: [(HeaderName, &str); 1] = [(ACCEPT, "application/json")];
    loop {
        attempt += 1;
        let wait = match ctx
            .client
            .fetch(
                EventKind::Status,
                Method::GET,
                &p.status_url,
                &headers,
                RetryMode::TransportOnly,
                body::MAX_MANIFEST_BYTES,
            )
            .await
        {
            Ok(r) if r.status.as_u16() == 200 => {
                return serde_json::from_slice::<Manifest>(&r.body).map_err(|e| {
                    Poll::Stop(Stop::Failed(format!(
                        "the completion manifest is not valid JSON of the Bulk Data IG ({} at line {}, column {})",
                        json_error_kind(&e),
                        e.line(),
                        e.column()
                    )))
                });
            }
            Ok(r) => {
                let progress_text = r
                    .headers
                    .get("x-progress")
                    .and_then(|v| v.to_str().ok())
                    .map(progress_text)
                    .filter(|t| !t.is_empty())
                    .unwrap_or_else(|| "in progress".into());
                if progress_text != last_progress {
                    tracing::info!(progress = %progress_text, "waiting for the server to prepare the export");
                    progress.set_status(&format!("server: {progress_text}"));
                    last_progress = progress_text;
                }
                server_wait(&r.headers).unwrap_or_else(|| backoff(attempt))
            }
            Err(FetchError::Status {
                status: 404 | 410,
                diagnostics,
                ..
            }) => {
                return Err(Poll::Gone(diagnostics.unwrap_or_else(|| {
                    "the status URL answers 404/410 (expired or cancelled)".into()
                })));
            }
            Err(FetchError::Status {
                status,
                diagnostics,
                outcome,
                ..
            }) => {
                let transient = outcome.as_deref().is_none_or(|o| {
                    outcome_codes(o)
                        .iter()
                        .all(|c| c == "transient" || c == "throttled")
                }) && (status == 429 || status >= 500);
                if !transient {
                    return Err(Poll::Stop(Stop::Failed(format!(
                        "the server reports the export failed (HTTP {status}): {}",
                        diagnostics.unwrap_or_else(|| "(no OperationOutcome)".into())
                    ))));
                }
                tracing::warn!(status, "the status URL answered an error; polling on");
                backoff(attempt)
            }
            Err(FetchError::Transport(why)) => {
                tracing::warn!("polling failed ({why}); polling on");
                backoff(attempt)
            }
            // Authentication, a status URL that is not a URL or not on a trusted origin, an oversized
            // manifest: polling again cannot help.
            Err(e) => {
                return Err(Poll::Stop(Stop::Failed(format!(
                    "polling the export's status failed: {e}"
                ))));
            }
        };
        if started.elapsed() + wait > b.max_wait {
            return Err(Poll::Stop(Stop::KeepWaiting(format!(
                "the export was not ready after {:.1} hours (source.bulk.maxWaitHours); it goes on at the server, and the next run with this config resumes it",
                b.max_wait.as_secs_f64() / 3600.0
            ))));
        }
        tokio::time::sleep(wait).await;
    }
}

/// `X-Progress` for the log and the progress bar: at most 100 characters, control characters dropped
/// (the header is the server's free text).
fn progress_text(v: &str) -> String {
    v.chars().filter(|c| !c.is_control()).take(100).collect()
}

/// The server's `Retry-After`, clamped to [1 s, 5 min]; absurd epoch values end up at the top.
fn server_wait(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    retry::parse_retry_after(v, SystemTime::now(), MAX_POLL).map(|d| d.clamp(MIN_POLL, MAX_POLL))
}

/// Backoff for polls without `Retry-After`: 1, 2, 4... up to 5 minutes (with jitter, at least 1 s).
const POLL_BACKOFF: Backoff = Backoff {
    first: MIN_POLL,
    cap: MAX_POLL,
};

fn backoff(attempt: u32) -> Duration {
    POLL_BACKOFF.next(attempt).max(MIN_POLL)
}

/// What the downloads came to.
struct Got {
    /// Why the downloads stopped (authentication); the export can be downloaded again.
    fatal: Option<String>,
    /// The writer failed (disk full, I/O error): the run fails.
    write_error: Option<crate::output::OutputError>,
    partial: Vec<String>,
    server_outcomes: u64,
}

/// Downloads every file of the manifest in parallel; the writer task joins the files of each type.
async fn download_all(
    ctx: &RunContext<'_>,
    b: &BulkPlan,
    writer: RunWriter,
    m: &Manifest,
    progress: &Progress,
    stats: &mut BulkStats,
) -> Result<(RunWriter, Got), ExportError> {
    let (downloads, refused) =
        manifest::plan_downloads(m, &ctx.client.origin(), &b.token_origins, &b.file_origins);
    stats.files_total = (downloads.len() + refused.len()) as u64;
    stats.files_failed = refused.len() as u64;
    progress.set_total(downloads.len() as u64);
    progress.set_status("downloading");
    let mut got = Got {
        fatal: None,
        write_error: None,
        partial: refused
            .iter()
            .map(|r| {
                format!(
                    "{} file of {} not downloaded: {}",
                    kind_name(r.kind),
                    crate::trust::describe_type(&r.file.resource_type),
                    r.reason
                )
            })
            .collect(),
        server_outcomes: 0,
    };
    let (tx, writer_task) = writer::spawn(writer);
    let bytes = AtomicU64::new(0);
    // Each download is its own task, so that decoding and checking lines use every core; the
    // tasks still running when this returns early (a fatal error) are aborted with their handles.
    let mut results = futures::stream::iter(downloads.iter().cloned())
        .map(|d| {
            let (client, tx) = (ctx.client.clone(), tx.clone());
            crate::task::AbortOnDrop(tokio::spawn(async move {
                let r = download::download(&client, &d, &tx).await;
                (d, r)
            }))
        })
        .buffer_unordered(ctx.plan.limits.concurrency)
        .map(|joined| {
            let (d, r) = joined.map_err(|source| ExportError::Task {
                task: "download",
                source,
            })?;
            if let Ok((records, received)) = &r {
                bytes.fetch_add(*received, Ordering::Relaxed);
                progress.item_done(*records);
            }
            Ok::<_, ExportError>((d, r))
        });
    while let Some(next) = results.next().await {
        let (d, result) = next?;
        match result {
            Ok((records, _)) => {
                match d.kind {
                    Kind::Error => got.server_outcomes += records,
                    Kind::Deleted => stats.deleted_records += records,
                    Kind::Output => {}
                }
                if let Some(expected) = d.file.count
                    && expected != records
                {
                    got.partial.push(format!(
                        "a {} file of {} has {records} records but the manifest says {expected}",
                        kind_name(d.kind),
                        d.file.resource_type,
                    ));
                }
            }
            Err(e) if e.fatal => {
                got.fatal = Some(e.message);
                break;
            }
            Err(e) => {
                stats.files_failed += 1;
                got.partial.push(format!(
                    "a {} file of {} failed: {} (see errors/{})",
                    kind_name(d.kind),
                    d.file.resource_type,
                    e.message,
                    crate::output::FAILURES_FILE
                ));
                let record = serde_json::json!({
                    "file": d.file.url,
                    "list": kind_name(d.kind),
                    "type": d.file.resource_type,
                    "correlation": e.correlation,
                    "message": e.detail,
                });
                if tx.send(writer::WriterMsg::Failure(record)).await.is_err() {
                    got.fatal = Some("the output writer stopped".into());
                    break;
                }
            }
        }
    }
    drop(results);
    drop(tx);
    let (writer, written) = writer_task.await.map_err(|source| ExportError::Task {
        task: "writer",
        source,
    })?;
    if let Err(e) = written {
        got.write_error = Some(e);
    }
    tracing::info!(
        files = downloads.len(),
        bytes = bytes.load(Ordering::Relaxed),
        "bulk files downloaded"
    );
    Ok((writer, got))
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Output => "output",
        Kind::Error => "error",
        Kind::Deleted => "deleted",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};

    fn plan(level: BulkLevel) -> BulkPlan {
        BulkPlan {
            level,
            types: vec!["Patient".into(), "Observation".into()],
            type_filters: vec!["Observation?category=laboratory".into()],
            since: Since::None,
            output_format: None,
            delete_after_download: true,
            max_wait: Duration::from_secs(60),
            throttle_cooldown: Duration::from_secs(3600),
            file_origins: vec![],
            token_origins: vec![],
        }
    }

    #[test]
    fn kickoff_urls() {
        let base = "https://h/api/FHIR/R4";
        assert_eq!(
            kickoff_url(
                base,
                &plan(BulkLevel::Group("g.1".into())),
                Some("2026-01-01T00:00:00Z")
            ),
            "https://h/api/FHIR/R4/Group/g.1/$export?_type=Patient%2CObservation&_typeFilter=Observation%3Fcategory%3Dlaboratory&_since=2026-01-01T00%3A00%3A00Z"
        );
        let mut p = plan(BulkLevel::System);
        p.types.clear();
        p.type_filters.clear();
        assert_eq!(kickoff_url(base, &p, None), "https://h/api/FHIR/R4/$export");
        assert!(
            kickoff_url(base, &plan(BulkLevel::Patient), None)
                .starts_with("https://h/api/FHIR/R4/Patient/$export?")
        );
    }

    fn headers(retry_after: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_str(retry_after).unwrap());
        h
    }

    #[test]
    fn poll_waits_are_clamped() {
        assert_eq!(server_wait(&headers("5")), Some(Duration::from_secs(5)));
        assert_eq!(
            server_wait(&headers("0")),
            Some(MIN_POLL),
            "never hammer the server"
        );
        assert_eq!(
            server_wait(&headers("18000")),
            Some(MAX_POLL),
            "hours are cut to 5 minutes"
        );
        assert_eq!(
            server_wait(&headers("99999999999")),
            Some(MAX_POLL),
            "an absurd epoch value"
        );
        let soon = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(20));
        let w = server_wait(&headers(&soon)).unwrap();
        assert!(
            w > Duration::from_secs(17) && w <= Duration::from_secs(20),
            "{w:?}"
        );
        assert_eq!(server_wait(&headers("later")), None);
        assert_eq!(server_wait(&HeaderMap::new()), None);
        assert_eq!(POLL_BACKOFF.delay(1, 1.0), Duration::from_secs(1));
        assert_eq!(POLL_BACKOFF.delay(4, 1.0), Duration::from_secs(8));
        assert_eq!(POLL_BACKOFF.delay(30, 1.0), MAX_POLL);
        assert!(backoff(1) >= MIN_POLL && backoff(30) <= MAX_POLL);
    }
}
