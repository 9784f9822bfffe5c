//! Reconcile step 5, `apply`: make the decided changes (stop runs, start a run, write status, delete
//! old runs) with the API server. Creating a run is idempotent: its Job name is deterministic, and a
//! Job of that name that already exists and belongs to this export is adopted, never duplicated.

use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use super::dereference::{Run, RunState};
use super::validate::SpecError;
use crate::operator::crd::{EpicExport, EpicExportStatus};
use crate::operator::job::owned_by;

/// The field manager of every write.
pub const FIELD_MANAGER: &str = "epic-export-operator";

/// What happened to the run the plan wanted started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Started {
    Created,
    /// The Job already existed and is ours (a previous pass or another replica created it).
    Adopted,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Kube(#[from] kube::Error),
    /// A Job with the run's name exists and is not ours: the user must resolve it.
    #[error(transparent)]
    Conflict(SpecError),
}

/// Stops `stop` (Replace), then creates `job` (or adopts an existing one of ours). Returns the runs as
/// they stand afterwards.
pub async fn start_run(
    client: &Client,
    export: &EpicExport,
    runs: &[Run],
    stop: &[String],
    job: Option<Job>,
) -> Result<(Vec<Run>, Option<Started>), ApplyError> {
    let ns = export.namespace().unwrap_or_default();
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let mut runs: Vec<Run> = runs.to_vec();
    for name in stop {
        delete_job(&jobs, name).await?;
        runs.retain(|r| &r.name != name);
    }
    let Some(job) = job else {
        return Ok((runs, None));
    };
    let name = job.name_any();
    let (job, started) = match jobs.create(&PostParams::default(), &job).await {
        Ok(created) => (created, Started::Created),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let existing = jobs.get(&name).await?;
            if !owned_by(&existing, export) {
                return Err(ApplyError::Conflict(SpecError {
                    reason: "JobNameTaken",
                    field: "metadata.name".into(),
                    message: format!(
                        "a Job named {name:?} exists and does not belong to this EpicExport: delete or rename it"
                    ),
                }));
            }
            (existing, Started::Adopted)
        }
        Err(e) => return Err(e.into()),
    };
    let mut run = Run::from_job(&job);
    if run.created.is_none() {
        run.created = Some(jiff::Timestamp::now());
    }
    runs.retain(|r| r.name != run.name);
    if run.state == RunState::Active || started == Started::Adopted {
        runs.push(run);
    }
    Ok((runs, Some(started)))
}

/// Writes the status with server-side apply, only when it changed.
pub async fn write_status(
    client: &Client,
    export: &EpicExport,
    status: &EpicExportStatus,
) -> Result<bool, kube::Error> {
    if export.status.as_ref() == Some(status) {
        return Ok(false);
    }
    let api: Api<EpicExport> =
        Api::namespaced(client.clone(), &export.namespace().unwrap_or_default());
    let patch = json!({
        "apiVersion": "fhirexport.dev/v1alpha1",
        "kind": "EpicExport",
        "status": status,
    });
    api.patch_status(
        &export.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(true)
}

/// Deletes finished runs beyond the history limits (their pods go with them).
pub async fn prune(
    client: &Client,
    export: &EpicExport,
    names: &[String],
) -> Result<(), kube::Error> {
    let jobs: Api<Job> = Api::namespaced(client.clone(), &export.namespace().unwrap_or_default());
    for name in names {
        delete_job(&jobs, name).await?;
    }
    Ok(())
}

async fn delete_job(jobs: &Api<Job>, name: &str) -> Result<(), kube::Error> {
    match jobs.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}
