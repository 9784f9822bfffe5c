//! One export run from an `ExportPlan`: connect (key, token URL, first token), open the run folder,
//! retrieve, publish, and build the `RunSummary`. The retrieval itself lives in `search`; files in
//! `output`. Authentication and configuration problems are found before any folder is created.

pub mod search;
pub mod writer;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::auth::{self, AuthError, KeyError, SigningKey, TokenSource, TokenSourceConfig};
use crate::fhir::{self, FhirClient};
use crate::output::{self, OutputError, RunWriter};
use crate::plan::ExportPlan;
use crate::progress::Progress;
use crate::summary::{Outcome, RunSummary, TypeCount};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{0}")]
    Key(#[from] KeyError),
    #[error("{0}")]
    Auth(#[from] AuthError),
    #[error("{0}")]
    Output(#[from] OutputError),
    #[error("{0}")]
    Config(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// An authenticated session with the FHIR server.
pub struct Connection {
    pub http: reqwest::Client,
    pub tokens: Arc<TokenSource>,
    pub token_url: String,
    pub kid: String,
}

/// Loads the key, finds the token URL (configured or discovered) and builds the token source.
pub async fn connect(plan: &ExportPlan) -> Result<Connection, ExportError> {
    let key = SigningKey::load(&plan.private_key_file, plan.algorithm, plan.key_id.clone())?;
    let kid = key.kid().to_owned();
    let http = fhir::http_client(plan.request_timeout);
    let token_url = match &plan.token_url {
        Some(t) => t.clone(),
        None => auth::discovery::token_url(&http, &plan.fhir_base).await?,
    };
    let tokens = Arc::new(TokenSource::new(
        http.clone(),
        TokenSourceConfig {
            client_id: plan.client_id.clone(),
            token_url: token_url.clone(),
            scope: plan.scope.clone(),
            key,
            jku: plan.jwks_url.clone(),
        },
    ));
    Ok(Connection {
        http,
        tokens,
        token_url,
        kid,
    })
}

#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Show a progress bar when stderr is a terminal.
    pub interactive: bool,
}

/// What a finished (or failed after starting) run left.
#[derive(Debug)]
pub struct RunReport {
    pub summary: RunSummary,
    pub dir: PathBuf,
}

/// Runs one export. `Err` means nothing was written (bad key, authentication, output folder); a run that
/// failed after it started comes back as `Ok` with outcome `Failed` and its `.failed` folder.
pub async fn run(plan: &ExportPlan, opts: &RunOptions) -> Result<RunReport, ExportError> {
    let started = Instant::now();
    let start_ts = jiff::Timestamp::now();
    let conn = connect(plan).await?;
    // Authenticate before creating anything, so a credentials problem leaves no folder behind.
    conn.tokens.token().await?;
    let client = FhirClient::new(
        conn.http.clone(),
        &plan.fhir_base,
        conn.tokens.clone(),
        plan.limits.clone(),
    )
    .map_err(ExportError::Config)?;
    let run_id = start_ts.strftime("%Y%m%dT%H%M%SZ").to_string();
    let writer = RunWriter::create(&plan.output_dir, &plan.name, &run_id)?;
    let run_id = writer.run_id().to_owned();
    tracing::info!(export = %plan.name, run_id = %run_id, patients = plan.patients.len(), searches = plan.searches.len(), "export started");

    let (tx, rx) = mpsc::channel(writer::CHANNEL_CAPACITY);
    let writer_task = tokio::task::spawn_blocking(move || writer::run(writer, rx));
    let progress = Progress::new(plan.patients.len() as u64, opts.interactive);
    let counters = search::SearchCounters::default();
    let result = search::export_patients(&client, plan, &tx, &progress, &counters).await;
    drop(tx);
    progress.finish();
    let (mut writer, written) = writer_task
        .await
        .map_err(|e| ExportError::Internal(format!("the writer task failed: {e}")))?;
    let closed = written.and_then(|()| writer.close_files());

    let mut errors = Vec::new();
    match (&result, &closed) {
        (_, Err(e)) => errors.push(format!("writing output failed: {e}")),
        (Err(e), Ok(_)) => errors.push(e.to_string()),
        _ => {}
    }
    let failed_searches = counters.searches_failed.load(Ordering::Relaxed);
    let outcome = if !errors.is_empty() {
        Outcome::Failed
    } else if failed_searches > 0 {
        errors.push(format!(
            "{failed_searches} searches failed; see errors/{}",
            output::FAILURES_FILE
        ));
        Outcome::Partial
    } else {
        Outcome::Success
    };
    let files = closed.unwrap_or_default();
    let resources: Vec<TypeCount> = files
        .iter()
        .filter(|(_, f)| !f.relative.starts_with(output::ERRORS_DIR))
        .map(|(t, f)| TypeCount {
            resource_type: t.clone(),
            records: f.count,
            bytes: f.bytes,
            file: f.relative.clone(),
        })
        .collect();
    let transaction_time = start_ts.to_string();
    let summary = RunSummary {
        export: plan.name.clone(),
        run_id: run_id.clone(),
        outcome,
        started_at: transaction_time.clone(),
        finished_at: jiff::Timestamp::now().to_string(),
        duration_seconds: started.elapsed().as_secs_f64(),
        fhir_base_url: plan.fhir_base.clone(),
        patients_total: plan.patients.len() as u64,
        patients_complete: counters.patients_complete.load(Ordering::Relaxed),
        patients_with_errors: counters.patients_with_errors.load(Ordering::Relaxed),
        searches_failed: failed_searches,
        requests: client.counters.requests.load(Ordering::Relaxed),
        retries: client.counters.retries.load(Ordering::Relaxed),
        token_renewals_after_401: client.counters.renewals.load(Ordering::Relaxed),
        records_total: resources.iter().map(|r| r.records).sum(),
        bytes_total: resources.iter().map(|r| r.bytes).sum(),
        resources,
        server_outcomes: counters.outcomes.load(Ordering::Relaxed),
        duplicates_skipped: counters.duplicates.load(Ordering::Relaxed),
        errors,
        output_dir: if outcome == Outcome::Failed {
            writer.failed_dir()
        } else {
            writer.final_dir()
        }
        .display()
        .to_string(),
    };
    let dir = if outcome == Outcome::Failed {
        let dir = writer.abandon(&summary)?;
        tracing::error!(export = %plan.name, run_id = %run_id, "export failed; partial files kept in {}", dir.display());
        dir
    } else {
        let request = format!(
            "{} (search mode: {})",
            plan.fhir_base,
            plan.searches
                .iter()
                .map(|s| s.label())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let dir = writer.publish(&transaction_time, &request, &files, &summary)?;
        let export_dir = plan.output_dir.join(&plan.name);
        for old in output::remove_old_runs(&export_dir, plan.keep_runs) {
            tracing::info!("removed old run {old} (keepRuns = {})", plan.keep_runs);
        }
        dir
    };
    tracing::info!(
        export = %plan.name,
        run_id = %run_id,
        outcome = ?summary.outcome,
        records = summary.records_total,
        failed_searches,
        seconds = format!("{:.1}", summary.duration_seconds),
        "export finished"
    );
    Ok(RunReport { summary, dir })
}
