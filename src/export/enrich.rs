//! What a run adds after retrieval, in both modes: hydrated references (`hydrate`) and downloaded
//! attachments (`attachments`). The writer, handed back by retrieval, sets aside the files whose
//! attachments are rewritten and runs again on its thread while both steps send it resources.

use std::path::PathBuf;

use super::attachments::{self, Attached};
use super::hydrate::{Hydrator, Scan};
use super::writer::{self, WriterMsg};
use super::{ExportError, RunContext, StepError};
use crate::fhir::FetchError;
use crate::output::{OutputError, RunWriter};
use crate::summary::HydrationStats;
use tokio::sync::mpsc;

/// What enrichment left.
pub struct Enriched {
    pub writer: RunWriter,
    /// Authentication failed: the run cannot finish (search: it fails; bulk: the next run resumes).
    pub fatal: Option<FetchError>,
    /// Writing failed (disk full...).
    pub write_error: Option<OutputError>,
    /// Why the run is partial.
    pub partial: Vec<String>,
    pub enrichment: Enrichment,
}

/// The figures and the manifest section a run reports.
#[derive(Debug, Default)]
pub struct Enrichment {
    pub attachments: Option<Attached>,
    pub hydration: Option<HydrationStats>,
}

/// Why a step stopped.
enum Stop {
    Fatal(FetchError),
    Write(OutputError),
}

impl From<StepError> for Stop {
    fn from(s: StepError) -> Self {
        match s {
            StepError::Fetch(e) => Stop::Fatal(e),
            StepError::WriterGone => Stop::Write(writer_gone()),
            StepError::Io { path, source } => Stop::Write(OutputError::Io { path, source }),
        }
    }
}

/// The writer thread ended early; its own error is what gets reported.
fn writer_gone() -> OutputError {
    OutputError::Io {
        path: PathBuf::from("."),
        source: std::io::Error::other("the output writer stopped"),
    }
}

/// Hydrates and downloads attachments as the plan asks; a no-op without either.
pub async fn enrich(ctx: &RunContext<'_>, mut writer: RunWriter) -> Result<Enriched, ExportError> {
    let plan = ctx.plan;
    let untouched = |writer, write_error| Enriched {
        writer,
        fatal: None,
        write_error,
        partial: Vec::new(),
        enrichment: Enrichment::default(),
    };
    if plan.attachments.is_none() && plan.hydrate.is_empty() {
        return Ok(untouched(writer, None));
    }
    let prepared = writer.flush().and_then(|()| {
        let mut originals = Vec::new();
        for t in plan.attachments.iter().flat_map(|a| &a.resources) {
            if let Some(path) = writer.detach(t)? {
                originals.push((t.clone(), path));
            }
        }
        Ok(originals)
    });
    let originals = match prepared {
        Ok(o) => o,
        Err(e) => return Ok(untouched(writer, Some(e))),
    };
    // Hydration needs what retrieval wrote, not what enrichment adds.
    drop(writer.take_observer());
    let staging = writer.staging_dir().to_owned();
    let (tx, writer_task) = writer::spawn(writer);
    let mut enrichment = Enrichment::default();
    let result = steps(ctx, &tx, &originals, &staging, &mut enrichment).await;
    drop(tx);
    let (writer, written) = writer_task.await.map_err(|source| ExportError::Task {
        task: "writer",
        source,
    })?;
    let mut done = Enriched {
        enrichment,
        ..untouched(writer, None)
    };
    match (result, written) {
        (_, Err(e)) => done.write_error = Some(e),
        (Err(Stop::Write(e)), Ok(())) => done.write_error = Some(e),
        (Err(Stop::Fatal(e)), Ok(())) => done.fatal = Some(e),
        (Ok(()), Ok(())) => {
            for (_, original) in &originals {
                if let Err(e) = std::fs::remove_file(original) {
                    tracing::warn!("cannot remove {}: {e}", original.display());
                }
            }
        }
    }
    if let Some(h) = &done.enrichment.hydration
        && h.failed > 0
    {
        done.partial.push(format!(
            "{} referenced resources could not be fetched; see errors/{}",
            h.failed,
            crate::output::FAILURES_FILE
        ));
    }
    if let Some(a) = &done.enrichment.attachments
        && a.stats.failed > 0
    {
        done.partial.push(format!(
            "{} attachments could not be downloaded or did not match their declared size or hash; see errors/{}",
            a.stats.failed,
            crate::output::FAILURES_FILE
        ));
    }
    Ok(done)
}

async fn steps(
    ctx: &RunContext<'_>,
    tx: &mpsc::Sender<WriterMsg>,
    originals: &[(String, PathBuf)],
    staging: &std::path::Path,
    out: &mut Enrichment,
) -> Result<(), Stop> {
    let plan = ctx.plan;
    let concurrency = plan.limits.concurrency;
    if let Some(references) = &ctx.references {
        let scan = references
            .lock()
            .map(|mut s| std::mem::replace(&mut *s, Scan::new(&plan.hydrate, &plan.fhir_base)))
            .unwrap_or_else(|_| Scan::new(&plan.hydrate, &plan.fhir_base));
        let hydrator = Hydrator::new(&ctx.client, &plan.fhir_base, &plan.hydrate, concurrency, tx);
        out.hydration = Some(hydrator.run(scan).await?);
    }
    if let Some(a) = &plan.attachments {
        let mut phase =
            attachments::Phase::open(a, &ctx.client, &plan.fhir_base, concurrency, staging, tx)?;
        for (t, original) in originals {
            phase.process_file(t, original).await?;
        }
        out.attachments = Some(phase.finish()?);
    }
    Ok(())
}
