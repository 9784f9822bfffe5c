//! The Kubernetes side: the `EpicExport` custom resource (`crd`) and the export Jobs built from it
//! (`job`), with the pod's entry point (`epic-export job`, `run_job`).

pub mod crd;
pub mod job;

use std::path::Path;

use job::{JOB_CONFIG_ENV, RunReportMessage};

/// What an export Job's pod runs (`epic-export job`): the config from `EPIC_EXPORT_JOB`, one export run,
/// and the run report written to `termination_log` for the controller. Returns the exit code.
pub async fn run_job(termination_log: &Path) -> u8 {
    let (code, report) = match job_run().await {
        Ok(summary) => (
            summary.outcome.exit_code() as u8,
            RunReportMessage::from_summary(&summary),
        ),
        Err(message) => {
            tracing::error!("{message}");
            let report = RunReportMessage {
                outcome: "failed".into(),
                errors: vec![message],
                ..RunReportMessage::default()
            };
            (1, report)
        }
    };
    if let Err(e) = std::fs::write(termination_log, report.to_message()) {
        tracing::warn!(
            "cannot write the termination message to {}: {e}",
            termination_log.display()
        );
    }
    code
}

async fn job_run() -> Result<crate::summary::RunSummary, String> {
    let text = std::env::var(JOB_CONFIG_ENV).map_err(|_| {
        format!("the environment variable {JOB_CONFIG_ENV} (the run's config) is not set")
    })?;
    let plan = crate::config::plan_from_text(&text, Path::new(JOB_CONFIG_ENV), Path::new("/"))
        .map_err(|e| e.to_string())?;
    let report = crate::export::run(&plan, &crate::export::RunOptions { interactive: false })
        .await
        .map_err(|e| e.to_string())?;
    Ok(report.summary)
}
