//! Reconcile step 1, `dereference`: read what an EpicExport refers to (its key Secret, its roster and
//! resource ConfigMaps, the Secret with the object store's credentials, the Jobs of its runs, and the
//! report of a run that finished since the last pass). Only this step and `apply` talk to the API
//! server.
//!
//! Secret and ConfigMap are read by name only (`get`, never list or watch). Their contents are only
//! checked for the referenced key and dropped at once: of the key Secret only the public keys and key
//! ids derived from it are kept (for `status.publicKeys` and key rotation); of the credentials Secret
//! only its key names are looked at; rosters (patient ids) never leave this function. A name that
//! cannot be an object name is not sent to the API server at all.

use std::collections::BTreeSet;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};

use super::model::{
    FinishedReport, Observed, ObservedKeys, RefCheck, RefKind, Reference, Run, name_problem,
    newest_finished, object_name_problem, signing_of,
};
use crate::operator::crd::EpicExport;
use crate::operator::job::{EXPORT_LABEL, RunReportMessage, owned_by};
use crate::operator::key_secret::{self, KeySetError};
use crate::storage::{Cloud, OutputTarget, parse_output_url};

/// Reads the references, runs and (for the newest finished run not yet in `status.lastRun`) its
/// report.
pub async fn dereference(client: &Client, export: &EpicExport) -> Result<Observed, kube::Error> {
    let ns = export.namespace().unwrap_or_default();
    let mut references = Vec::new();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let key_ref = &export.spec.auth.key_secret_ref;
    let mut keys = None;
    let check = match name_problem(&key_ref.name, &key_ref.key) {
        Some(reason) => RefCheck::BadName { reason },
        None => match secrets.get_opt(&key_ref.name).await? {
            None => RefCheck::Missing,
            Some(secret) => match key_secret::read(&secret, &key_ref.key, &signing_of(export)) {
                Ok(set) => {
                    keys = Some(ObservedKeys {
                        kids: set.kids(),
                        public: set.public_keys(),
                        secret_created: secret.metadata.creation_timestamp.as_ref().map(|t| t.0),
                    });
                    RefCheck::Present
                }
                Err(KeySetError::Missing { keys, .. }) => RefCheck::KeyMissing { keys },
                Err(e) => RefCheck::Invalid {
                    reason: e.to_string(),
                },
            },
        },
    };
    references.push(Reference {
        field: "spec.auth.keySecretRef",
        kind: RefKind::Secret,
        name: key_ref.name.clone(),
        key: key_ref.key.clone(),
        check,
    });

    if let Some(reference) = credentials_reference(&secrets, export).await? {
        references.push(reference);
    }

    if let Some(search) = &export.spec.source.search {
        let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
        let refs = std::iter::once(("spec.source.search.rosterRef", &search.roster_ref)).chain(
            search
                .resources_ref
                .iter()
                .map(|r| ("spec.source.search.resourcesRef", r)),
        );
        for (field, r) in refs {
            let check = match name_problem(&r.config_map_name, &r.key) {
                Some(reason) => RefCheck::BadName { reason },
                None => match maps.get_opt(&r.config_map_name).await? {
                    None => RefCheck::Missing,
                    Some(cm) => {
                        key_check(key_names(cm.data.as_ref(), cm.binary_data.as_ref()), &r.key)
                    }
                },
            };
            references.push(Reference {
                field,
                kind: RefKind::ConfigMap,
                name: r.config_map_name.clone(),
                key: r.key.clone(),
                check,
            });
        }
    }

    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let selector = format!("{EXPORT_LABEL}={}", export.name_any());
    let runs: Vec<Run> = jobs
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
        .iter()
        .filter(|job| owned_by(job, export))
        .map(Run::from_job)
        .collect();

    let recorded = export
        .status
        .as_ref()
        .and_then(|s| s.last_run.as_ref())
        .map(|r| r.job_name.as_str());
    let report = match newest_finished(&runs) {
        Some(run) if Some(run.name.as_str()) != recorded => Some(FinishedReport {
            job: run.name.clone(),
            message: termination_message(client, &ns, run).await?,
        }),
        _ => None,
    };
    Ok(Observed {
        references,
        keys,
        runs,
        report,
    })
}

/// With `spec.output.url`, the Secret of `credentialsSecretRef`: it exists, and holds at least one of
/// the variables the URL's client reads (`AWS_*` for s3://, `AZURE_*` for az://, `GOOGLE_*` for gs://;
/// key names only, the values are not looked at). A missing Secret would leave the run's pod waiting
/// forever (CreateContainerConfigError) instead of failing.
async fn credentials_reference(
    secrets: &Api<Secret>,
    export: &EpicExport,
) -> Result<Option<Reference>, kube::Error> {
    let output = &export.spec.output;
    let (Some(url), Some(secret)) = (&output.url, &output.credentials_secret_ref) else {
        return Ok(None);
    };
    let check = match object_name_problem(&secret.name) {
        Some(reason) => RefCheck::BadName { reason },
        None => match secrets.get_opt(&secret.name).await? {
            None => RefCheck::Missing,
            Some(s) => {
                let keys = key_names(s.data.as_ref(), s.string_data.as_ref());
                let prefix =
                    parse_output_url(url, None, None)
                        .ok()
                        .and_then(|target| match target {
                            OutputTarget::Object(location) => Some(env_prefix(location.cloud)),
                            OutputTarget::Local(_) => None,
                        });
                match prefix {
                    Some(prefix) if !keys.iter().any(|k| k.starts_with(prefix)) => {
                        RefCheck::NoVariables {
                            prefix,
                            keys: keys.into_iter().collect(),
                        }
                    }
                    _ => RefCheck::Present,
                }
            }
        },
    };
    Ok(Some(Reference {
        field: "spec.output.credentialsSecretRef",
        kind: RefKind::Secret,
        name: secret.name.clone(),
        key: String::new(),
        check,
    }))
}

/// The start of the environment variables the object store client of `cloud` reads.
fn env_prefix(cloud: Cloud) -> &'static str {
    match cloud {
        Cloud::S3 => "AWS_",
        Cloud::Azure => "AZURE_",
        Cloud::Gcs => "GOOGLE_",
    }
}

/// The key names of a Secret's or ConfigMap's two data maps (the values are not looked at).
fn key_names<A, B>(
    a: Option<&std::collections::BTreeMap<String, A>>,
    b: Option<&std::collections::BTreeMap<String, B>>,
) -> BTreeSet<String> {
    a.into_iter()
        .flat_map(|m| m.keys().cloned())
        .chain(b.into_iter().flat_map(|m| m.keys().cloned()))
        .collect()
}

fn key_check(keys: BTreeSet<String>, key: &str) -> RefCheck {
    if keys.contains(key) {
        RefCheck::Present
    } else {
        RefCheck::KeyMissing {
            keys: keys.into_iter().collect(),
        }
    }
}

/// The run report in the termination message of the run's newest terminated `export` container,
/// among the pods the Job owns: labelled with its name *and* owned by its uid (a pod someone else
/// labelled `job-name=<job>` is not the run's).
async fn termination_message(
    client: &Client,
    ns: &str,
    run: &Run,
) -> Result<Option<RunReportMessage>, kube::Error> {
    let Some(uid) = run.uid.as_deref() else {
        return Ok(None);
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let list = pods
        .list(&ListParams::default().labels(&format!("job-name={}", run.name)))
        .await?;
    let newest = list
        .items
        .iter()
        .filter(|pod| {
            pod.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.uid == uid)
        })
        .filter_map(|pod| {
            let terminated = pod
                .status
                .as_ref()?
                .container_statuses
                .iter()
                .flatten()
                .find(|c| c.name == "export")?
                .state
                .as_ref()?
                .terminated
                .clone()?;
            Some((terminated.finished_at.map(|t| t.0), terminated.message))
        })
        .max_by_key(|(finished, _)| *finished);
    Ok(newest
        .and_then(|(_, message)| message)
        .and_then(|m| serde_json::from_str::<RunReportMessage>(m.trim()).ok()))
}
