//! One export run from an `ExportPlan`: connect (key, token URL, first token), open the run folder,
//! retrieve, enrich, publish, and build the `RunSummary`. Retrieval lives in `search` and `bulk`;
//! what is added after it (hydrated references, attachments) in `enrich`; files in `output`. Authentication and configuration problems are found before any folder is created.

pub mod attachments;
pub mod bulk;
pub mod disk_table;
pub mod enrich;
pub mod hydrate;
pub mod search;
pub mod writer;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::auth::{self, AuthError, KeyError, SigningKey, TokenSource, TokenSourceConfig};
use crate::fhir::FhirClient;
use crate::output::{self, OutputError, RunWriter};
use crate::plan::ExportPlan;
use crate::plan::Source;
use crate::summary::{BulkStats, Outcome, RunSummary, SearchStats, TypeCount};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{0}")]
    Key(#[from] KeyError),
    #[error("{0}")]
    Auth(#[from] AuthError),
    #[error("{0}")]
    Output(#[from] OutputError),
    #[error("invalid FHIR base URL: {0}")]
    BaseUrl(url::ParseError),
    /// A task of the run (the writer, a download) panicked or was cancelled.
    #[error("internal error: the {task} task failed: {source}")]
    Task {
        task: &'static str,
        source: tokio::task::JoinError,
    },
    /// The run stopped early but left its state so that the next run carries on (a bulk export).
    #[error("{0}")]
    Unfinished(String),
    /// The object store of `output.url` cannot be used (no client, credentials refused).
    #[error("output.url {url}: {message}")]
    Storage { url: String, message: String },
}

/// Why hydration or the attachment downloads stopped before the end.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// Authentication failed: nothing more can be fetched.
    #[error("{0}")]
    Fetch(crate::fhir::FetchError),
    #[error("the output writer stopped")]
    WriterGone,
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
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
    let http = crate::http::client(
        crate::http::Timeout::Total(plan.limits.request_timeout),
        crate::http::Redirects::SameOrigin,
    );
    let token_url = match &plan.token_url {
        Some(t) => t.clone(),
        None => {
            let found = auth::discovery::token_url(&http, &plan.fhir_base).await?;
            // The client assertion goes there: the discovered URL obeys the same rule as a configured one.
            url::Url::parse(&found)
                .map_err(|e| e.to_string())
                .and_then(|u| {
                    crate::trust::check_transport(&u, plan.allow_insecure_http)
                        .map_err(|e| e.to_string())
                })
                .map_err(|detail| AuthError::Discovery {
                    url: format!("{}/.well-known/smart-configuration", plan.fhir_base),
                    detail: format!("the discovered token endpoint is refused: {detail}"),
                })?;
            found
        }
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
    /// The run's folder; for a run published to an object store, the export's working folder.
    pub dir: PathBuf,
    /// The run in the object store of `output.url`.
    pub object: Option<output::ObjectRunLink>,
}

/// Connects to the object store of `output.url` and reads `latest.json`, so that missing or
/// refused credentials are reported before anything is fetched or written.
pub async fn open_destination(
    plan: &ExportPlan,
) -> Result<Option<output::ObjectDestination>, ExportError> {
    let Some(o) = &plan.object_output else {
        return Ok(None);
    };
    let url = o.location.url();
    let store = o.location.connect().map_err(|e| ExportError::Storage {
        url: url.clone(),
        message: e.message.clone(),
    })?;
    let runs = crate::storage::runs::ExportRuns::new(store.clone(), &o.location.prefix, &plan.name);
    runs.latest().await.map_err(|e| ExportError::Storage {
        url: url.clone(),
        message: format!(
            "{e} (check the {} credentials the export runs with, and that they may read and write this prefix)",
            o.location.cloud.credentials_hint()
        ),
    })?;
    Ok(Some(output::ObjectDestination {
        store,
        prefix: o.location.prefix.clone(),
        url,
        part_size: o.part_size,
        concurrency: o.upload_concurrency,
    }))
}

/// Runs one export. `Err` means nothing was written (bad key, authentication, output folder); a run that
/// failed after it started comes back as `Ok` with outcome `Failed` and its `.failed` folder.
pub async fn run(plan: &ExportPlan, opts: &RunOptions) -> Result<RunReport, ExportError> {
    let started = Instant::now();
    let start_ts = jiff::Timestamp::now();
    let conn = connect(plan).await?;
    // Token requests go to the run log too (the first one is written once the run has a folder).
    let log = Arc::new(crate::fhir::runlog::RunLog::default());
    let token_log = log.clone();
    conn.tokens
        .observe(Box::new(move |info| token_log.record_token(info)));
    // Authenticate before creating anything, so a credentials problem leaves no folder behind.
    conn.tokens.token().await?;
    let mut client = FhirClient::new(&plan.fhir_base, conn.tokens.clone(), plan.limits.clone())
        .map_err(ExportError::BaseUrl)?;
    client.log = log;
    if let Source::Bulk(b) = &plan.source {
        client = client.trusting(&b.token_origins);
    }
    let destination = open_destination(plan).await?;
    let state_store = destination
        .as_ref()
        .map(|d| crate::storage::runs::ExportRuns::new(d.store.clone(), &d.prefix, &plan.name));
    let destination = std::sync::Mutex::new(destination);
    let references = (!plan.hydrate.is_empty()).then(|| {
        Arc::new(std::sync::Mutex::new(hydrate::Scan::new(
            &plan.hydrate,
            &plan.fhir_base,
        )))
    });
    let ctx = RunContext {
        destination,
        state_store,
        references,
        plan,
        client: std::sync::Arc::new(client),
        opts: opts.clone(),
        started,
        start_ts,
        run_id: start_ts.strftime("%Y%m%dT%H%M%SZ").to_string(),
    };
    tracing::info!(export = %plan.name, "export started ({})", plan.describe_source());
    match &plan.source {
        Source::Search(search) => search::run(&ctx, search).await,
        Source::Bulk(bulk) => bulk::run(&ctx, bulk).await,
    }
}

/// What every mode of a run shares.
pub struct RunContext<'a> {
    pub plan: &'a ExportPlan,
    /// Shared with the bulk download tasks.
    pub client: std::sync::Arc<FhirClient>,
    pub opts: RunOptions,
    pub started: Instant,
    pub start_ts: jiff::Timestamp,
    /// The run id to use unless an unfinished run is resumed.
    pub run_id: String,
    /// The object store the run goes to (taken by `open_writer`).
    destination: std::sync::Mutex<Option<output::ObjectDestination>>,
    /// Where the export's state (bulk status URL, last success) is kept beside the working folder
    /// when runs go to an object store.
    pub state_store: Option<crate::storage::runs::ExportRuns>,
    /// What hydration needs to know of the exported resources, filled as they are written.
    pub references: Option<Arc<std::sync::Mutex<hydrate::Scan>>>,
}

/// What a mode hands over once retrieval is over.
pub struct Retrieved {
    pub writer: RunWriter,
    /// Why the run failed (authentication, server refusal); empty if it did not.
    pub fatal: Vec<String>,
    /// Writing the run's files failed (disk full, file too large, I/O error): the run fails and its
    /// resource files are removed.
    pub write_error: Option<OutputError>,
    /// Why it is partial (searches or files that failed); empty if it is not.
    pub partial: Vec<String>,
    pub transaction_time: String,
    pub request: String,
    pub server_outcomes: u64,
    pub search: Option<SearchStats>,
    pub bulk: Option<BulkStats>,
    /// Hydration and attachments, when the plan asks for them.
    pub enrichment: enrich::Enrichment,
}

impl RunContext<'_> {
    /// Opens the run's writer (resuming an unfinished run as `resume` says) and sets it up as the
    /// plan asks: compression, the object store, and the files kept aside for rewriting.
    pub fn open_writer(
        &self,
        resume: Option<output::Resume<'_>>,
    ) -> Result<RunWriter, ExportError> {
        let plan = self.plan;
        let mut writer = RunWriter::open(&plan.output_dir, &plan.name, &self.run_id, resume)?;
        // The run log is a help, never a reason to stop: a folder that takes no log is reported.
        if let Err(e) = self.client.log.start(writer.staging_dir()) {
            tracing::warn!("the run log cannot be written: {e}");
        }
        let observer = self.references.clone().map(|scan| {
            Box::new(move |t: &str, lines: &[u8]| {
                if let Ok(mut scan) = scan.lock() {
                    scan.add(t, lines);
                }
            }) as output::Observer
        });
        let destination = self.destination.lock().ok().and_then(|mut d| d.take());
        writer.configure(output::WriterOptions {
            gzip: plan.compression == crate::plan::Compression::Gzip,
            staged: plan
                .attachments
                .as_ref()
                .map(|a| a.resources.clone())
                .unwrap_or_default(),
            destination,
            observer,
        })?;
        Ok(writer)
    }

    /// Closes the files, builds the summary, and publishes the run (success or partial) or sets it aside
    /// as failed.
    pub async fn conclude(&self, r: Retrieved) -> Result<RunReport, ExportError> {
        let Retrieved {
            mut writer,
            mut fatal,
            mut write_error,
            partial,
            transaction_time,
            request,
            server_outcomes,
            search,
            bulk,
            enrichment,
        } = r;
        let client = self.client.clone();
        let (writer, files, write_error) = blocking(move || {
            client.log.finish();
            let files = match write_error {
                Some(_) => Vec::new(),
                None => writer.close_files().unwrap_or_else(|e| {
                    write_error = Some(e);
                    Vec::new()
                }),
            };
            (writer, files, write_error)
        })
        .await?;
        if let Some(e) = &write_error {
            fatal.insert(
                0,
                format!(
                    "writing output failed: {e}; the run's resource files were removed (free the space and run again)"
                ),
            );
        }
        let outcome = if !fatal.is_empty() {
            Outcome::Failed
        } else if !partial.is_empty() {
            Outcome::Partial
        } else {
            Outcome::Success
        };
        let resources: Vec<TypeCount> = files
            .iter()
            .filter(|(_, f)| output::is_data_file(f))
            .map(|(t, f)| TypeCount {
                resource_type: t.clone(),
                records: f.count,
                bytes: f.bytes,
                file: f.relative.clone(),
            })
            .collect();
        let counters = &self.client.counters;
        let plan = self.plan;
        let summary = RunSummary {
            started_at: self.start_ts.to_string(),
            finished_at: jiff::Timestamp::now().to_string(),
            duration_seconds: self.started.elapsed().as_secs_f64(),
            requests: counters.requests.load(Ordering::Relaxed),
            retries: counters.retries.load(Ordering::Relaxed),
            token_renewals_after_401: counters.renewals.load(Ordering::Relaxed),
            records_total: resources.iter().map(|r| r.records).sum(),
            bytes_total: resources.iter().map(|r| r.bytes).sum(),
            resources,
            server_outcomes,
            search,
            bulk,
            attachments: enrichment.attachments.as_ref().map(|a| a.stats.clone()),
            hydration: enrichment.hydration.clone(),
            errors: fatal.iter().chain(&partial).cloned().collect(),
            failed_requests: self.client.failed_requests(),
            output_dir: match (outcome, writer.object_link()) {
                (Outcome::Failed, None) => writer.failed_dir().display().to_string(),
                _ => writer.final_place(),
            },
            ..RunSummary::new(
                &plan.name,
                writer.run_id(),
                plan.mode(),
                &plan.fhir_base,
                outcome,
            )
        };
        let run_id = summary.run_id.clone();
        let object = writer.object_link();
        let dir = if outcome == Outcome::Failed {
            let discard = write_error.is_some();
            let copy = summary.clone();
            let dir = blocking(move || writer.abandon(&copy, discard)).await??;
            tracing::error!(
                export = %plan.name,
                run_id = %run_id,
                "export failed: {}; {} {}",
                summary.errors.join("; "),
                if discard { "its summary is in" } else { "its files are kept in" },
                dir.display()
            );
            dir
        } else {
            let export_dir = writer.export_dir().to_owned();
            let attachments = enrichment.attachments.map(|a| a.manifest);
            let copy = summary.clone();
            let dir = blocking(move || {
                writer.publish(
                    &transaction_time,
                    &request,
                    &files,
                    attachments.as_ref(),
                    &copy,
                )
            })
            .await??;
            let removed = match &object {
                Some(o) => o.remove_old_runs(plan.keep_runs, &run_id).await,
                None => Ok(output::remove_old_runs(&export_dir, plan.keep_runs)),
            };
            match removed {
                Ok(removed) => {
                    for old in removed {
                        tracing::info!("removed old run {old} (keepRuns = {})", plan.keep_runs);
                    }
                }
                Err(e) => tracing::warn!("retention (keepRuns = {}): {e}", plan.keep_runs),
            }
            dir
        };
        tracing::info!(
            export = %plan.name,
            run_id = %run_id,
            outcome = ?summary.outcome,
            records = summary.records_total,
            seconds = format!("{:.1}", summary.duration_seconds),
            "export finished"
        );
        Ok(RunReport {
            summary,
            dir,
            object,
        })
    }
}

/// Runs `f` (the writer's blocking work: closing files, uploads) on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ExportError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|source| ExportError::Task {
            task: "writer",
            source,
        })
}
