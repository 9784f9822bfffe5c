//! Search mode: for every roster patient, every configured search, following `next` links verbatim
//! until there are none. Resources stream to the run writer page by page; a resource returned by two
//! searches of one patient (e.g. Observation by two categories) is written once. A failed search is
//! recorded and the run goes on; authentication failures stop the run.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use tokio::sync::mpsc;

use super::writer::{self, WriterMsg};
use super::{ExportError, Retrieved, RunContext, RunReport};
use crate::fhir::bundle::{self, push_compact_line};
use crate::fhir::{FetchError, FhirClient};
use crate::output;
use crate::plan::{Search, SearchPlan};
use crate::progress::Progress;
use crate::summary::SearchStats;

/// A search never needs more pages than this; a server that keeps sending `next` is broken.
const MAX_PAGES: usize = 100_000;

#[derive(Debug, Default)]
pub struct SearchCounters {
    pub patients_complete: AtomicU64,
    pub patients_with_errors: AtomicU64,
    pub searches_failed: AtomicU64,
    pub records: AtomicU64,
    pub outcomes: AtomicU64,
    pub duplicates: AtomicU64,
}

/// Why the run had to stop.
#[derive(Debug, thiserror::Error)]
pub enum Fatal {
    #[error("{0}")]
    Fetch(FetchError),
    #[error("the output writer stopped")]
    WriterGone,
}

/// Runs a search-mode export: every patient, every search, into a new run folder.
pub async fn run(ctx: &RunContext<'_>, search: &SearchPlan) -> Result<RunReport, ExportError> {
    let plan = ctx.plan;
    let writer = ctx.open_writer(None)?;
    let (tx, writer_task) = writer::spawn(writer);
    let progress = Progress::new(
        search.patients.len() as u64,
        "patients",
        ctx.opts.interactive,
    );
    let counters = SearchCounters::default();
    let result = export_patients(
        &ctx.client,
        search,
        plan.limits.concurrency,
        &tx,
        &progress,
        &counters,
    )
    .await;
    drop(tx);
    progress.finish();
    let (writer, written) = writer_task.await.map_err(|source| ExportError::Task {
        task: "writer",
        source,
    })?;

    let mut fatal = Vec::new();
    let mut write_error = None;
    match (&result, written) {
        (_, Err(e)) => write_error = Some(e),
        (Err(e), Ok(())) => fatal.push(e.to_string()),
        _ => {}
    }
    let failed = counters.searches_failed.load(Ordering::Relaxed);
    let mut partial = if failed > 0 {
        vec![format!(
            "{failed} searches failed; see errors/{}",
            output::FAILURES_FILE
        )]
    } else {
        Vec::new()
    };
    let (writer, enrichment) = if fatal.is_empty() && write_error.is_none() {
        let done = super::enrich::enrich(ctx, writer).await?;
        if let Some(e) = done.fatal {
            fatal.push(e.to_string());
        }
        write_error = done.write_error;
        partial.extend(done.partial);
        (done.writer, done.enrichment)
    } else {
        (writer, Default::default())
    };
    ctx.conclude(Retrieved {
        writer,
        fatal,
        write_error,
        partial,
        transaction_time: ctx.start_ts.to_string(),
        request: format!("{} ({})", plan.fhir_base, plan.describe_source()),
        server_outcomes: counters.outcomes.load(Ordering::Relaxed),
        search: Some(SearchStats {
            patients_total: search.patients.len() as u64,
            patients_complete: counters.patients_complete.load(Ordering::Relaxed),
            patients_with_errors: counters.patients_with_errors.load(Ordering::Relaxed),
            searches_failed: failed,
            duplicates_skipped: counters.duplicates.load(Ordering::Relaxed),
        }),
        bulk: None,
        enrichment,
    })
    .await
}

/// Exports every patient; the client keeps at most `limits.concurrency` requests in flight.
async fn export_patients(
    client: &FhirClient,
    search: &SearchPlan,
    concurrency: usize,
    tx: &mpsc::Sender<WriterMsg>,
    progress: &Progress,
    counters: &SearchCounters,
) -> Result<(), Fatal> {
    let mut tasks = futures::stream::iter(search.patients.iter())
        .map(|patient| export_patient(client, &search.searches, patient, tx, counters))
        .buffer_unordered(concurrency);
    while let Some(result) = tasks.next().await {
        let records = result?;
        progress.item_done(records);
    }
    Ok(())
}

/// Runs every search for one patient, one after the other. Returns the records written.
async fn export_patient(
    client: &FhirClient,
    searches: &[Search],
    patient: &str,
    tx: &mpsc::Sender<WriterMsg>,
    counters: &SearchCounters,
) -> Result<u64, Fatal> {
    // The searches of one patient run concurrently (the client bounds requests in flight), so the last
    // patients of a roster do not leave most of the concurrency idle. They share one de-duplication set.
    let seen: Mutex<HashSet<(String, String)>> = Mutex::new(HashSet::new());
    let results = futures::future::join_all(
        searches
            .iter()
            .map(|search| run_search(client, search, patient, tx, &seen, counters)),
    )
    .await;
    let mut records = 0;
    let mut failed = false;
    for (search, result) in searches.iter().zip(results) {
        match result {
            Ok(n) => records += n,
            Err(SearchError::Fatal(f)) => return Err(f),
            Err(SearchError::Failed {
                written,
                error,
                outcome,
            }) => {
                records += written;
                failed = true;
                counters.searches_failed.fetch_add(1, Ordering::Relaxed);
                let (status, correlation) = match &error {
                    FetchError::Status {
                        status,
                        correlation,
                        ..
                    } => (Some(*status), correlation.clone()),
                    _ => (None, Default::default()),
                };
                let record = serde_json::json!({
                    "patient": patient,
                    "search": search.label(),
                    "status": status,
                    "correlation": correlation,
                    "message": error.to_string(),
                    "recordsWrittenBeforeFailure": written,
                    "outcome": outcome,
                });
                tx.send(WriterMsg::Failure(record))
                    .await
                    .map_err(|_| Fatal::WriterGone)?;
            }
        }
    }
    if failed {
        counters
            .patients_with_errors
            .fetch_add(1, Ordering::Relaxed);
    } else {
        counters.patients_complete.fetch_add(1, Ordering::Relaxed);
    }
    Ok(records)
}

enum SearchError {
    Fatal(Fatal),
    Failed {
        written: u64,
        error: FetchError,
        outcome: Option<Box<serde_json::value::RawValue>>,
    },
}

fn encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The first request of a search (a read for `Patient`).
pub fn first_url(client: &FhirClient, search: &Search, patient: &str) -> String {
    if search.resource_type == "Patient" {
        return client.url(&format!("Patient/{}", encode(patient)));
    }
    let mut q = format!("{}?patient={}", search.resource_type, encode(patient));
    for (k, v) in &search.params {
        q.push('&');
        q.push_str(&encode(k));
        q.push('=');
        q.push_str(&encode(v));
    }
    client.url(&q)
}

/// Why a page's resources are not written.
#[derive(Debug, thiserror::Error)]
enum PageRefused {
    #[error("a bundle entry is not a FHIR resource (no resourceType)")]
    NotResource,
    #[error(
        "the server returned a resource of type {found} that the search for {asked} did not ask for; the page was not written"
    )]
    UnaskedType { found: String, asked: String },
}

/// Groups a page's resources into one batch of compact NDJSON lines per resource type, leaving out
/// resources this patient's other searches already returned. A resource whose type is not a FHIR type
/// name, or one the search did not ask for, fails the page: nothing of it is written.
fn batch_by_type(
    search: &Search,
    resources: &[&serde_json::value::RawValue],
    seen: &Mutex<HashSet<(String, String)>>,
    counters: &SearchCounters,
    size_hint: usize,
) -> Result<Vec<(String, Vec<u8>, u64)>, PageRefused> {
    let mut heads = Vec::with_capacity(resources.len());
    for resource in resources {
        let head = bundle::head(resource).map_err(|_| PageRefused::NotResource)?;
        if !crate::trust::is_resource_type(&head.resource_type)
            || !search.returns_type(&head.resource_type)
        {
            return Err(PageRefused::UnaskedType {
                found: crate::trust::describe_type(&head.resource_type),
                asked: search.resource_type.clone(),
            });
        }
        heads.push(head);
    }
    let mut batches: Vec<(String, Vec<u8>, u64)> = Vec::new();
    let mut seen = seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    for (resource, head) in resources.iter().zip(heads) {
        if let Some(id) = head.id.as_deref()
            && !seen.insert((head.resource_type.to_string(), id.to_owned()))
        {
            counters.duplicates.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let i = match batches
            .iter()
            .position(|(t, _, _)| *t == head.resource_type)
        {
            Some(i) => i,
            None => {
                batches.push((
                    head.resource_type.to_string(),
                    Vec::with_capacity(size_hint),
                    0,
                ));
                batches.len() - 1
            }
        };
        push_compact_line(resource.get().as_bytes(), &mut batches[i].1);
        batches[i].2 += 1;
    }
    Ok(batches)
}

/// `next` links are absolute in FHIR, but some servers send relative ones: resolve those against the
/// page they came from. An absolute link is kept exactly as sent.
fn resolve_link(current: &str, next: &str) -> Option<String> {
    if url::Url::parse(next).is_ok() {
        return Some(next.to_owned());
    }
    url::Url::parse(current)
        .ok()?
        .join(next)
        .ok()
        .map(String::from)
}

async fn run_search(
    client: &FhirClient,
    search: &Search,
    patient: &str,
    tx: &mpsc::Sender<WriterMsg>,
    seen: &Mutex<HashSet<(String, String)>>,
    counters: &SearchCounters,
) -> Result<u64, SearchError> {
    let mut url = first_url(client, search, patient);
    let mut written = 0;
    let fail = |written, error: FetchError| {
        if error.is_fatal() {
            return SearchError::Fatal(Fatal::Fetch(error));
        }
        let outcome = match &error {
            FetchError::Status { outcome, .. } => outcome.clone(),
            _ => None,
        };
        SearchError::Failed {
            written,
            error,
            outcome,
        }
    };
    let bad_body = |message: String| FetchError::Transport(message);
    for _ in 0..MAX_PAGES {
        let body = client.get(&url).await.map_err(|e| fail(written, e))?;
        if search.resource_type == "Patient" {
            let raw: &serde_json::value::RawValue =
                serde_json::from_slice(&body).map_err(|_| {
                    fail(
                        written,
                        bad_body("the Patient read returned invalid JSON".into()),
                    )
                })?;
            match bundle::head(raw) {
                Ok(h) if h.resource_type == "Patient" => {}
                _ => {
                    return Err(fail(
                        written,
                        bad_body("the Patient read did not return a Patient".into()),
                    ));
                }
            }
            let mut line = Vec::with_capacity(body.len() + 1);
            push_compact_line(raw.get().as_bytes(), &mut line);
            tx.send(WriterMsg::Resources {
                resource_type: "Patient".into(),
                lines: line,
                count: 1,
            })
            .await
            .map_err(|_| SearchError::Fatal(Fatal::WriterGone))?;
            counters.records.fetch_add(1, Ordering::Relaxed);
            return Ok(1);
        }
        let page = bundle::parse_page(&body).map_err(|m| fail(written, bad_body(m.to_string())))?;
        let batches = batch_by_type(search, &page.resources, seen, counters, body.len())
            .map_err(|m| fail(written, bad_body(m.to_string())))?;
        if !page.outcomes.is_empty() {
            let mut lines = Vec::new();
            for o in &page.outcomes {
                push_compact_line(o.get().as_bytes(), &mut lines);
            }
            counters
                .outcomes
                .fetch_add(page.outcomes.len() as u64, Ordering::Relaxed);
            tx.send(WriterMsg::Outcomes {
                lines,
                count: page.outcomes.len() as u64,
            })
            .await
            .map_err(|_| SearchError::Fatal(Fatal::WriterGone))?;
        }
        for (resource_type, lines, count) in batches {
            written += count;
            counters.records.fetch_add(count, Ordering::Relaxed);
            tx.send(WriterMsg::Resources {
                resource_type,
                lines,
                count,
            })
            .await
            .map_err(|_| SearchError::Fatal(Fatal::WriterGone))?;
        }
        match page.next.map(|next| resolve_link(&url, &next)) {
            None => return Ok(written),
            Some(None) => {
                return Err(fail(
                    written,
                    bad_body("the server's next link is not a URL".into()),
                ));
            }
            Some(Some(next)) if next == url => {
                return Err(fail(
                    written,
                    bad_body("the server's next link points at the same page".into()),
                ));
            }
            Some(Some(next)) => url = next,
        }
    }
    Err(fail(
        written,
        bad_body(format!(
            "the search went on for more than {MAX_PAGES} pages"
        )),
    ))
}

#[cfg(test)]
mod tests {
    use super::resolve_link;

    #[test]
    fn next_links_absolute_or_relative() {
        let cur = "https://h/api/FHIR/R4/Observation?patient=1";
        let abs = "https://h/api/FHIR/R4/Observation?page=2&x=%20";
        assert_eq!(resolve_link(cur, abs).as_deref(), Some(abs));
        assert_eq!(
            resolve_link(cur, "Observation?page=2").as_deref(),
            Some("https://h/api/FHIR/R4/Observation?page=2")
        );
        assert_eq!(
            resolve_link(cur, "/other?page=2").as_deref(),
            Some("https://h/other?page=2")
        );
        assert_eq!(
            resolve_link(cur, "https://evil.example/x").as_deref(),
            Some("https://evil.example/x")
        );
    }
}
