//! Reconcile step 5, `apply`: make the decided changes (stop runs, start a run, write status, delete
//! old runs, a key rotation step in the key Secret) with the API server. Creating a run is idempotent: its Job name is deterministic, and a
//! Job of that name that already exists and belongs to this export is adopted, never duplicated.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use super::model::{Run, RunState, SpecError, signing_of};
use crate::auth::keys::{Algorithm, SigningKey};
use crate::operator::crd::{EpicExport, EpicExportStatus};
use crate::operator::job::owned_by;
use crate::operator::key_secret::{self, KeyChange, KeyKids, Signing};

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
    /// Only the user can resolve it: a Job with the run's name exists and is not ours, or the API
    /// server refused the Job built from the spec (422).
    #[error(transparent)]
    Spec(SpecError),
}

/// Stops `stop` (Replace), then creates `job` (or adopts an existing one of ours). Returns the runs as
/// they stand afterwards (a run whose Job carries no creation time yet was created `now`).
pub async fn start_run(
    client: &Client,
    export: &EpicExport,
    runs: &[Run],
    stop: &[String],
    job: Option<Job>,
    now: jiff::Timestamp,
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
                return Err(ApplyError::Spec(SpecError {
                    reason: "JobNameTaken",
                    field: "metadata.name".into(),
                    message: format!(
                        "a Job named {name:?} exists and does not belong to this EpicExport: delete or rename it"
                    ),
                }));
            }
            (existing, Started::Adopted)
        }
        // A value the schema let through but the Job API does not accept: retrying cannot help.
        Err(kube::Error::Api(e)) if e.code == 422 => {
            let why = crate::text::shorten(&e.message, 800).into_owned();
            return Err(ApplyError::Spec(SpecError {
                reason: "JobRejected",
                field: "spec.job".into(),
                message: format!(
                    "the API server refused the run's Job: {why}; fix the EpicExport's spec"
                ),
            }));
        }
        Err(e) => return Err(e.into()),
    };
    let mut run = Run::from_job(&job);
    if run.created.is_none() {
        run.created = Some(now);
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

/// What became of a key Secret change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyWrite {
    Written,
    /// The Secret no longer holds the keys the plan was made for (someone else changed it): look again.
    Stale,
    /// The operator may not do it; the message says how to allow it.
    Refused(String),
}

/// Makes a rotation step in the key Secret: read it, check it still holds the keys `expected`, edit,
/// and replace it with its resourceVersion (a concurrent change makes this fail, never lose data).
/// A next key is generated here with the signing key's algorithm; the private key goes only into the
/// Secret.
pub async fn change_key(
    client: &Client,
    export: &EpicExport,
    expected: &KeyKids,
    change: &KeyChange,
) -> Result<KeyWrite, kube::Error> {
    let ns = export.namespace().unwrap_or_default();
    let key_ref = &export.spec.auth.key_secret_ref;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let refused = |what: &str| {
        KeyWrite::Refused(format!(
            "the operator may not {what} Secret {:?}: grant it `update` on Secrets (Helm value keyRotation.enabled=true), or rotate by hand",
            key_ref.name
        ))
    };
    let mut secret = match secrets.get(&key_ref.name).await {
        Ok(s) => s,
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(KeyWrite::Stale),
        Err(kube::Error::Api(e)) if e.code == 403 => return Ok(refused("read")),
        Err(e) => return Err(e),
    };
    let signing = signing_of(export);
    match key_secret::read(&secret, &key_ref.key, &signing) {
        Ok(set) if set.kids() == *expected => {}
        _ => return Ok(KeyWrite::Stale),
    }
    let new_key = match change {
        KeyChange::AddNext => {
            let alg = signing_algorithm(&secret, &key_ref.key, &signing);
            // RSA key generation takes a while: off the async threads.
            let key = tokio::task::spawn_blocking(move || {
                SigningKey::generate(alg).and_then(|k| k.to_pkcs8_pem())
            })
            .await;
            match key {
                Ok(Ok(pem)) => Some(pem),
                Ok(Err(e)) => return Ok(KeyWrite::Refused(format!("cannot generate a key: {e}"))),
                Err(e) => return Ok(KeyWrite::Refused(format!("cannot generate a key: {e}"))),
            }
        }
        _ => None,
    };
    let data = secret.data.get_or_insert_with(Default::default);
    if key_secret::edit(data, &key_ref.key, change, new_key).is_err() {
        return Ok(KeyWrite::Stale);
    }
    match secrets
        .replace(
            &key_ref.name,
            &PostParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..PostParams::default()
            },
            &secret,
        )
        .await
    {
        Ok(_) => Ok(KeyWrite::Written),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(KeyWrite::Stale),
        Err(kube::Error::Api(e)) if e.code == 403 => Ok(refused("update")),
        Err(e) => Err(e),
    }
}

/// The algorithm of the signing key, for a new key of the same kind.
fn signing_algorithm(secret: &Secret, key: &str, signing: &Signing) -> Algorithm {
    let pem = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.as_slice())
        .unwrap_or_default();
    SigningKey::from_pem(pem, std::path::Path::new(key), signing.algorithm, None)
        .map(|k| k.algorithm())
        .unwrap_or(Algorithm::RS384)
}
