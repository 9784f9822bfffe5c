//! One export run, the way every command that runs exports does it: `epic-export run`, each run of
//! `epic-export schedule` (`crate::scheduler`) and `epic-export job` in an export Job's pod all call
//! [`run_once`]. It runs the export, sends the e-mail the plan asks for and records what became of it
//! in `summary.json`, and returns a typed [`RunOutcome`]: finished (success, partial or failed after
//! it started) or unfinished (a bulk export the next run resumes). A run that could not start (key,
//! authentication, output folder) is an `Err`, reported by e-mail too when the plan has one.

use std::path::Path;
use std::time::Instant;

use crate::config::ConfigError;
use crate::export::{ExportError, RunOptions, RunReport};
use crate::operator::job::{JOB_CONFIG_ENV, ReportedOutcome, RunReportMessage};
use crate::plan::ExportPlan;
use crate::summary::{NotificationStatus, Outcome, RunSummary, human_bytes};

/// Exit code of a run that stopped early on purpose and will be resumed by the next run.
pub const EXIT_UNFINISHED: u8 = 4;
/// Exit code of a run that failed, or could not start.
pub const EXIT_FAILED: u8 = 1;

/// How a run that started ended.
#[derive(Debug)]
pub enum RunOutcome {
    /// The run ended with a summary and a folder (success, partial, or failed after it started).
    Finished(Box<RunReport>),
    /// The run stopped early on purpose and left its state for the next run (a bulk export the
    /// server is still preparing, or one interrupted): why.
    Unfinished(String),
}

impl RunOutcome {
    /// The process exit code: 0 success, 3 partial, 1 failed, 4 unfinished.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunOutcome::Finished(report) => report.summary.outcome.exit_code(),
            RunOutcome::Unfinished(_) => EXIT_UNFINISHED,
        }
    }

    /// How `run` and `schedule` report a run: the summary table on stdout and the original tool's
    /// closing log lines, or why the run is unfinished on stderr.
    pub fn report(&self) {
        match self {
            RunOutcome::Finished(report) => {
                println!("{}", report.summary.render_table());
                log_closing_lines(&report.summary);
            }
            RunOutcome::Unfinished(why) => eprintln!("unfinished: {why}"),
        }
    }
}

/// Why a run did not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error("the environment variable {JOB_CONFIG_ENV} (the run's config) is not set")]
    NoJobConfig,
}

/// Loads the config file (YAML or the original INI) and runs it with [`run_once`].
pub async fn run_config_file(config: &Path, interactive: bool) -> Result<RunOutcome, RunError> {
    let plan = crate::config::load_plan(config)?;
    run_once(&plan, &RunOptions { interactive }).await
}

/// One export run of `plan`, e-mailed as the plan says.
pub async fn run_once(plan: &ExportPlan, options: &RunOptions) -> Result<RunOutcome, RunError> {
    let started_at = jiff::Timestamp::now();
    let started = Instant::now();
    match crate::export::run(plan, options).await {
        Ok(mut report) => {
            // Best-effort: the outcome and exit code stay what the export decided.
            let result = crate::notify::notify_run(plan.email.as_ref(), &report.summary).await;
            if let Some(record) = result.record() {
                report.summary.notification = Some(NotificationStatus {
                    email: Some(record),
                });
                let recorded = match &report.object {
                    Some(o) => o.rewrite_summary(&report.summary).await,
                    None => {
                        let path = report.dir.join("summary.json");
                        crate::output::write_json_atomic(&path, &report.summary)
                            .map_err(|e| format!("{}: {e}", path.display()))
                    }
                };
                if let Err(e) = recorded {
                    tracing::warn!("cannot record the notification in the run's summary: {e}");
                }
            }
            Ok(RunOutcome::Finished(Box::new(report)))
        }
        Err(ExportError::Unfinished(why)) => Ok(RunOutcome::Unfinished(why)),
        Err(e) => {
            // Nothing was written (key, authentication, output folder); still report the failure
            // if asked to. There is no summary.json to record the result in.
            if plan.email.is_some() {
                let summary = failed_start(plan, started_at, started, &e.to_string());
                let _ = crate::notify::notify_run(plan.email.as_ref(), &summary).await;
            }
            Err(e.into())
        }
    }
}

/// The original tool's closing log lines: each file with its records and size, then the total.
fn log_closing_lines(summary: &RunSummary) {
    for r in &summary.resources {
        tracing::info!(
            file = %r.file,
            records = r.records,
            bytes = r.bytes,
            "{}: {} records, {}",
            r.file,
            r.records,
            human_bytes(r.bytes)
        );
    }
    tracing::info!(
        outcome = ?summary.outcome,
        records = summary.records_total,
        bytes = summary.bytes_total,
        "export {} finished: {} records, {} in {}",
        summary.export,
        summary.records_total,
        human_bytes(summary.bytes_total),
        summary.output_dir
    );
}

/// The summary of a run that failed before it wrote anything, for the notification only.
fn failed_start(
    plan: &ExportPlan,
    started_at: jiff::Timestamp,
    started: Instant,
    error: &str,
) -> RunSummary {
    RunSummary {
        started_at: started_at.to_string(),
        finished_at: jiff::Timestamp::now().to_string(),
        duration_seconds: started.elapsed().as_secs_f64(),
        errors: vec![error.to_owned()],
        output_dir: format!(
            "{} (nothing was written)",
            plan.output_dir.join(&plan.name).display()
        ),
        ..RunSummary::new(
            &plan.name,
            started_at.strftime("%Y%m%dT%H%M%SZ").to_string(),
            plan.mode(),
            &plan.fhir_base,
            Outcome::Failed,
        )
    }
}

/// What an export Job's pod runs (`epic-export job`): the config from `EPIC_EXPORT_JOB`, one run,
/// and the run report written to `termination_log` for the controller. Returns the exit code (as
/// `epic-export run`).
pub async fn run_job(termination_log: &Path) -> u8 {
    let (code, report) = match job_run().await {
        Ok(RunOutcome::Finished(report)) => (
            report.summary.outcome.exit_code(),
            RunReportMessage::from_summary(&report.summary),
        ),
        Ok(RunOutcome::Unfinished(why)) => {
            let message = format!("unfinished: {why}");
            tracing::error!("{message}");
            (
                EXIT_UNFINISHED,
                RunReportMessage::without_summary(ReportedOutcome::Unfinished, message),
            )
        }
        Err(e) => {
            let message = e.to_string();
            tracing::error!("{message}");
            (
                EXIT_FAILED,
                RunReportMessage::without_summary(ReportedOutcome::Failed, message),
            )
        }
    };
    let written = report
        .to_message()
        .map_err(std::io::Error::other)
        .and_then(|text| std::fs::write(termination_log, text));
    if let Err(e) = written {
        tracing::warn!(
            "cannot write the termination message to {}: {e}",
            termination_log.display()
        );
    }
    code
}

async fn job_run() -> Result<RunOutcome, RunError> {
    let text = std::env::var(JOB_CONFIG_ENV).map_err(|_| RunError::NoJobConfig)?;
    let plan = crate::config::plan_from_text(&text, Path::new(JOB_CONFIG_ENV), Path::new("/"))?;
    run_once(&plan, &RunOptions { interactive: false }).await
}
