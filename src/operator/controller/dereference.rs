//! Reconcile step 1, `dereference`: read what an EpicExport refers to (its key Secret, its roster and
//! resource ConfigMaps, the Jobs of its runs, and the report of a run that finished since the last
//! pass). Only this step and `apply` talk to the API server.
//!
//! Secret and ConfigMap are read by name only (`get`, never list or watch). Their contents are only
//! checked for the referenced key and dropped at once: of the key Secret only the public keys and key
//! ids derived from it are kept (for `status.publicKeys` and key rotation); rosters (patient ids) never
//! leave this function. A name that cannot be an object name is not sent to the API server at all.

use std::collections::BTreeSet;

use jiff::Timestamp;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};

use crate::operator::crd::{EpicExport, PublicKeys};
use crate::operator::job::{EXPORT_LABEL, RunReportMessage, SCHEDULED_ANNOTATION, owned_by};
use crate::operator::key_secret::{self, KeyKids, KeySetError, Signing};

/// Whether a referenced object and key exist.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RefCheck {
    Present,
    /// The object does not exist.
    Missing,
    /// The object exists without the key; `keys` are the keys it has (names only).
    KeyMissing {
        keys: Vec<String>,
    },
    /// A key Secret slot holds no usable private key.
    Invalid {
        reason: String,
    },
    /// The name or key cannot be one of a Kubernetes object (nothing was read).
    BadName {
        reason: String,
    },
}

/// A Secret or ConfigMap key the spec refers to, and what was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// The spec field, e.g. `spec.auth.keySecretRef`.
    pub field: &'static str,
    /// `Secret` or `ConfigMap`.
    pub kind: &'static str,
    pub name: String,
    pub key: String,
    pub check: RefCheck,
}

/// Where a run (one Job) stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Active,
    Succeeded,
    Failed,
}

/// One run: a Job owned by the EpicExport.
#[derive(Clone, Debug, PartialEq)]
pub struct Run {
    pub name: String,
    /// The Job's uid: its pods carry it in their owner reference.
    pub uid: Option<String>,
    pub state: RunState,
    /// The scheduled time annotation (RFC 3339).
    pub scheduled_at: Option<String>,
    pub created: Option<Timestamp>,
    pub started: Option<Timestamp>,
    pub finished: Option<Timestamp>,
    /// Why Kubernetes failed the Job (e.g. `DeadlineExceeded: Job was active longer than ...`).
    pub failure: Option<String>,
}

impl Run {
    pub fn from_job(job: &Job) -> Run {
        let status = job.status.clone().unwrap_or_default();
        let condition = |kind: &str| {
            status
                .conditions
                .iter()
                .flatten()
                .find(|c| c.type_ == kind && c.status == "True")
                .cloned()
        };
        let (state, finished_condition) = if let Some(c) = condition("Complete") {
            (RunState::Succeeded, Some(c))
        } else if let Some(c) = condition("Failed") {
            (RunState::Failed, Some(c))
        } else {
            (RunState::Active, None)
        };
        let failure = match (&state, &finished_condition) {
            (RunState::Failed, Some(c)) => Some(
                [c.reason.as_deref(), c.message.as_deref()]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(": "),
            )
            .filter(|s| !s.is_empty()),
            _ => None,
        };
        Run {
            name: job.name_any(),
            uid: job.metadata.uid.clone(),
            state,
            scheduled_at: job.annotations().get(SCHEDULED_ANNOTATION).cloned(),
            created: job.metadata.creation_timestamp.as_ref().map(|t| t.0),
            started: status.start_time.as_ref().map(|t| t.0),
            finished: status
                .completion_time
                .as_ref()
                .map(|t| t.0)
                .or_else(|| finished_condition.and_then(|c| c.last_transition_time.map(|t| t.0))),
            failure,
        }
    }

    pub fn is_finished(&self) -> bool {
        self.state != RunState::Active
    }

    /// When the run began, for ordering (start, else creation).
    pub fn began(&self) -> Option<Timestamp> {
        self.started.or(self.created)
    }
}

/// The report a finished run's pod left in its termination message.
#[derive(Clone, Debug, PartialEq)]
pub struct FinishedReport {
    pub job: String,
    /// `None` when the pod is gone or left no readable message (e.g. killed for memory).
    pub message: Option<RunReportMessage>,
}

/// Everything `validate`, `decide` and `status` need from the cluster.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    pub references: Vec<Reference>,
    /// The key Secret's public keys and key ids by slot, when the Secret is usable.
    pub keys: Option<ObservedKeys>,
    pub runs: Vec<Run>,
    pub report: Option<FinishedReport>,
}

/// What the status (`publicKeys`) and key rotation need from the key Secret.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ObservedKeys {
    pub kids: KeyKids,
    /// The public JWK Set (signing key first).
    pub public: PublicKeys,
    pub secret_created: Option<Timestamp>,
}

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
        kind: "Secret",
        name: key_ref.name.clone(),
        key: key_ref.key.clone(),
        check,
    });

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
                kind: "ConfigMap",
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
    let report = match super::status::newest_finished(&runs) {
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

/// How the export signs (an unparsable algorithm is left to `validate` to report).
pub fn signing_of(export: &EpicExport) -> Signing {
    Signing {
        algorithm: export
            .spec
            .auth
            .algorithm
            .as_deref()
            .and_then(|a| a.parse().ok()),
        key_id: export.spec.auth.key_id.clone(),
    }
}

/// Why `name` cannot name a Secret or ConfigMap (a DNS subdomain) or `key` one of its keys, if so.
pub fn name_problem(name: &str, key: &str) -> Option<String> {
    let dns_subdomain = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !dns_subdomain {
        return Some(format!(
            "{name:?} is not an object name: use lower-case letters, digits, '-' and '.'"
        ));
    }
    let key_ok = !key.is_empty()
        && key.len() <= 253
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !key_ok {
        return Some(format!(
            "{key:?} is not a key name: use letters, digits, '-', '_' and '.'"
        ));
    }
    None
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
