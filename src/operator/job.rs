//! Building an export run's Kubernetes Job from an `EpicExport` (pure: no API calls), and the compact
//! run report the Job's pod leaves in its termination message.
//!
//! The pod runs `epic-export job`. Its whole configuration is the standalone config as
//! JSON in the `EPIC_EXPORT_JOB` environment variable, so `kubectl describe` shows it; it holds no
//! secret, only paths: the key Secret is mounted read-only (mode 0400), the roster and resource
//! ConfigMaps as files, the PersistentVolumeClaim for output (or, when the runs go to an object store,
//! an emptyDir as the working folder, with the store's credentials as environment variables from the
//! `credentialsSecretRef` Secret, or the pods' own cloud identity). The pod runs as non-root with a
//! read-only root file system, no privilege escalation, every capability dropped and the
//! RuntimeDefault seccomp profile.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, EnvFromSource, EnvVar,
    KeyToPath, PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec,
    SeccompProfile, SecretEnvSource, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::crd::{ConfigMapKeyRef, EpicExport, OutputSpec};
use crate::summary::RunSummary;
use crate::text::shorten;

/// The environment variable holding the run's config (JSON).
pub const JOB_CONFIG_ENV: &str = "EPIC_EXPORT_JOB";
/// Label on every Job naming its EpicExport.
pub const EXPORT_LABEL: &str = "fhirexport.dev/export";
/// Annotation with the run's scheduled time (RFC 3339).
pub const SCHEDULED_ANNOTATION: &str = "fhirexport.dev/scheduled-at";
/// The Kubernetes limit for a termination message.
pub const TERMINATION_MESSAGE_MAX: usize = 4096;
/// The size limit of the emptyDir a run with `spec.output.url` works in, unless
/// `spec.output.scratchSizeLimit` says otherwise.
pub const DEFAULT_SCRATCH_SIZE_LIMIT: &str = "2Gi";
/// The labels the operator puts on every export pod (`spec.job.podLabels` cannot set them).
pub const OWN_POD_LABELS: [&str; 3] = [
    "app.kubernetes.io/name",
    "app.kubernetes.io/managed-by",
    EXPORT_LABEL,
];

const KEY_DIR: &str = "/var/run/secrets/epic-export/key";
const CONFIG_DIR: &str = "/etc/epic-export";
/// Where the pod's output volume is mounted: the PersistentVolumeClaim, or with `spec.output.url` the
/// emptyDir the run works in (locks, bulk progress, upload parts).
const DATA_DIR: &str = "/data";
const UID: i64 = 65532;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BuildError {
    #[error("EpicExport {0} has no uid yet (it must come from the API server)")]
    NoUid(String),
    #[error("EpicExport {name}: {field}: {message}")]
    Invalid {
        name: String,
        field: &'static str,
        message: String,
    },
    /// A part of the spec did not serialise into the run's config (a bug, not a mistake in the spec).
    #[error("EpicExport {name}: cannot put {field} into the run's config: {message}")]
    Serialize {
        name: String,
        field: &'static str,
        message: String,
    },
}

/// What differs from one run to the next.
#[derive(Clone, Debug)]
pub struct RunInputs {
    pub job_name: String,
    /// The scheduled time, RFC 3339.
    pub scheduled_at: String,
    /// For a bulk export with `since: auto`: the last successful run's `transactionTime`, as recorded
    /// in the EpicExport's status (`None`: the pod uses its own record on the volume).
    pub since: Option<String>,
}

/// The Job for one run of `export`, with `image` unless the spec names another.
pub fn build_job(export: &EpicExport, run: &RunInputs, image: &str) -> Result<Job, BuildError> {
    let name = export.name_any();
    let owner = export
        .controller_owner_ref(&())
        .ok_or_else(|| BuildError::NoUid(name.clone()))?;
    let spec = &export.spec;
    let settings = spec.job.clone().unwrap_or_default();
    let mut config = run_config(export)?;
    if let (Some(since), Some(bulk)) = (&run.since, config.pointer_mut("/source/bulk")) {
        bulk["since"] = json!(since);
    }

    let mut volumes = vec![Volume {
        name: "key".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(spec.auth.key_secret_ref.name.clone()),
            items: Some(vec![KeyToPath {
                key: spec.auth.key_secret_ref.key.clone(),
                path: "private.pem".into(),
                mode: Some(0o400),
                ..KeyToPath::default()
            }]),
            default_mode: Some(0o400),
            optional: Some(false),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }];
    let mut mounts = vec![VolumeMount {
        name: "key".into(),
        mount_path: KEY_DIR.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    }];
    for (i, cm) in config_maps(export).into_iter().enumerate() {
        let volume = format!("config-{i}");
        volumes.push(Volume {
            name: volume.clone(),
            config_map: Some(ConfigMapVolumeSource {
                name: cm.clone(),
                optional: Some(false),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: volume,
            mount_path: format!("{CONFIG_DIR}/{cm}"),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    let (data, sub_path) = match output_kind(&name, &spec.output)? {
        OutputKind::Volume { claim } => (
            Volume {
                name: "data".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim.to_owned(),
                    read_only: Some(false),
                }),
                ..Volume::default()
            },
            spec.output.sub_path.clone(),
        ),
        // The run's working folder; what it publishes goes to the object store.
        OutputKind::Object { .. } => (
            Volume {
                name: "data".into(),
                empty_dir: Some(EmptyDirVolumeSource {
                    size_limit: Some(Quantity(
                        spec.output
                            .scratch_size_limit
                            .clone()
                            .unwrap_or_else(|| DEFAULT_SCRATCH_SIZE_LIMIT.to_owned()),
                    )),
                    ..EmptyDirVolumeSource::default()
                }),
                ..Volume::default()
            },
            None,
        ),
    };
    volumes.push(data);
    mounts.push(VolumeMount {
        name: "data".into(),
        mount_path: DATA_DIR.into(),
        sub_path,
        ..VolumeMount::default()
    });
    volumes.push(Volume {
        name: "tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    });
    mounts.push(VolumeMount {
        name: "tmp".into(),
        mount_path: "/tmp".into(),
        ..VolumeMount::default()
    });

    let labels = BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "epic-export".to_string(),
        ),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "epic-export-operator".to_string(),
        ),
        (EXPORT_LABEL.to_string(), name.clone()),
    ]);
    // The pods carry the extra labels too, but never instead of the operator's own.
    let mut pod_labels = settings.pod_labels.clone();
    pod_labels.extend(labels.clone());
    // The object store's credentials, as the environment variables its client reads. `env` wins over
    // `envFrom`, so the Secret cannot replace the run's config.
    let env_from = spec
        .output
        .credentials_secret_ref
        .as_ref()
        .filter(|_| spec.output.url.is_some())
        .map(|secret| {
            vec![EnvFromSource {
                secret_ref: Some(SecretEnvSource {
                    name: secret.name.clone(),
                    optional: Some(false),
                }),
                ..EnvFromSource::default()
            }]
        });
    let container = Container {
        name: "export".into(),
        image: Some(settings.image.clone().unwrap_or_else(|| image.to_owned())),
        args: Some(vec!["job".into(), "--log-format".into(), "json".into()]),
        env: Some(vec![EnvVar {
            name: JOB_CONFIG_ENV.into(),
            value: Some(config.to_string()),
            ..EnvVar::default()
        }]),
        env_from,
        resources: settings.resources.clone(),
        volume_mounts: Some(mounts),
        termination_message_policy: Some("File".into()),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    let pod = PodSpec {
        restart_policy: Some("Never".into()),
        containers: vec![container],
        volumes: Some(volumes),
        service_account_name: settings.service_account_name.clone(),
        automount_service_account_token: Some(false),
        node_selector: settings.node_selector.clone(),
        tolerations: settings.tolerations.clone(),
        affinity: settings.affinity.clone(),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(UID),
            run_as_group: Some(UID),
            fs_group: Some(UID),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..PodSecurityContext::default()
        }),
        ..PodSpec::default()
    };
    Ok(Job {
        metadata: ObjectMeta {
            name: Some(run.job_name.clone()),
            namespace: export.namespace(),
            labels: Some(labels.clone()),
            annotations: Some(BTreeMap::from([(
                SCHEDULED_ANNOTATION.to_string(),
                run.scheduled_at.clone(),
            )])),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(settings.backoff_limit.unwrap_or(0)),
            active_deadline_seconds: settings.active_deadline_seconds,
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..JobSpec::default()
        }),
        status: None,
    })
}

/// Where `spec.output` sends the runs.
enum OutputKind<'a> {
    /// A PersistentVolumeClaim mounted at [`DATA_DIR`].
    Volume { claim: &'a str },
    /// An object store; the pod works in an emptyDir at [`DATA_DIR`].
    Object { url: &'a str },
}

/// Exactly one of `volumeClaimName` and `url` (the CRD's rule, again for objects admitted without it).
fn output_kind<'a>(name: &str, output: &'a OutputSpec) -> Result<OutputKind<'a>, BuildError> {
    let message = match (&output.volume_claim_name, &output.url) {
        (Some(claim), None) => return Ok(OutputKind::Volume { claim }),
        (None, Some(url)) => return Ok(OutputKind::Object { url }),
        (Some(_), Some(_)) => {
            "set only one of volumeClaimName (a PersistentVolumeClaim) and url (an object store), not both"
        }
        (None, None) => {
            "set volumeClaimName (a PersistentVolumeClaim) or url (an object store: s3://, az:// or gs://)"
        }
    };
    Err(BuildError::Invalid {
        name: name.to_owned(),
        field: "spec.output",
        message: message.into(),
    })
}

/// The ConfigMaps the pod needs (roster, resource list), without repeats.
fn config_maps(export: &EpicExport) -> Vec<String> {
    let mut names = Vec::new();
    if let Some(search) = &export.spec.source.search {
        for r in std::iter::once(&search.roster_ref).chain(search.resources_ref.as_ref()) {
            if !names.contains(&r.config_map_name) {
                names.push(r.config_map_name.clone());
            }
        }
    }
    names
}

fn mounted(r: &ConfigMapKeyRef) -> String {
    format!("{CONFIG_DIR}/{}/{}", r.config_map_name, r.key)
}

/// `value` (the spec's `field`) as JSON for the run's config.
fn config_value<T: Serialize>(
    name: &str,
    field: &'static str,
    value: &T,
) -> Result<Value, BuildError> {
    serde_json::to_value(value).map_err(|e| BuildError::Serialize {
        name: name.to_owned(),
        field,
        message: e.to_string(),
    })
}

/// The standalone config the pod runs, with paths into its mounts.
pub fn run_config(export: &EpicExport) -> Result<Value, BuildError> {
    let name = export.name_any();
    let spec = &export.spec;
    let source = match (&spec.source.search, &spec.source.bulk) {
        (Some(s), None) => {
            let mut search = json!({ "rosterFile": mounted(&s.roster_ref) });
            match (&s.resources_ref, &s.resources) {
                (Some(r), None) => search["resourcesFile"] = json!(mounted(r)),
                (None, Some(list)) => {
                    search["resources"] = config_value(&name, "spec.source.search.resources", list)?
                }
                _ => {
                    return Err(BuildError::Invalid {
                        name,
                        field: "spec.source.search",
                        message: "set exactly one of resourcesRef and resources".into(),
                    });
                }
            }
            json!({ "search": search })
        }
        (None, Some(b)) => json!({ "bulk": config_value(&name, "spec.source.bulk", b)? }),
        _ => {
            return Err(BuildError::Invalid {
                name,
                field: "spec.source",
                message: "set exactly one of search and bulk".into(),
            });
        }
    };
    let mut auth = json!({ "clientId": spec.auth.client_id, "privateKeyFile": format!("{KEY_DIR}/private.pem") });
    for (k, v) in [
        ("algorithm", &spec.auth.algorithm),
        ("keyId", &spec.auth.key_id),
        ("jwksUrl", &spec.auth.jwks_url),
        ("scope", &spec.auth.scope),
    ] {
        if let Some(v) = v {
            auth[k] = json!(v);
        }
    }
    let mut output = json!({ "directory": DATA_DIR });
    let o = &spec.output;
    if let OutputKind::Object { url } = output_kind(&name, o)? {
        output["url"] = json!(url);
        for (k, v) in [("endpoint", &o.endpoint), ("region", &o.region)] {
            if let Some(v) = v {
                output[k] = json!(v);
            }
        }
        if let Some(n) = o.part_size {
            output["partSize"] = json!(n);
        }
        if let Some(n) = o.upload_concurrency {
            output["uploadConcurrency"] = json!(n);
        }
    }
    if let Some(c) = &o.compression {
        output["compression"] = json!(c);
    }
    if let Some(keep) = o.keep_runs {
        output["keepRuns"] = json!(keep);
    }
    let mut config = json!({
        "name": name,
        "fhir": config_value(&name, "spec.fhir", &spec.fhir)?,
        "auth": auth,
        "source": source,
        "output": output,
    });
    if let Some(l) = &spec.limits {
        config["limits"] = config_value(&name, "spec.limits", l)?;
    }
    if let Some(a) = &spec.attachments {
        config["attachments"] = config_value(&name, "spec.attachments", a)?;
    }
    if !spec.hydrate.is_empty() {
        config["hydrate"] = json!(spec.hydrate);
    }
    Ok(config)
}

/// A run's outcome as `lastRun.outcome` and the run report carry it (a string there; the CRD keeps
/// the field a string, so any other value reads as [`ReportedOutcome::Failed`] here).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportedOutcome {
    Success,
    Partial,
    /// Stopped before the end; the next run resumes it.
    Unfinished,
    Failed,
}

impl ReportedOutcome {
    pub fn parse(text: &str) -> ReportedOutcome {
        match text {
            "success" => ReportedOutcome::Success,
            "partial" => ReportedOutcome::Partial,
            "unfinished" => ReportedOutcome::Unfinished,
            _ => ReportedOutcome::Failed,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ReportedOutcome::Success => "success",
            ReportedOutcome::Partial => "partial",
            ReportedOutcome::Unfinished => "unfinished",
            ReportedOutcome::Failed => "failed",
        }
    }
}

/// The run report a Job's pod leaves in its termination message (at most 4 KiB).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RunReportMessage {
    pub outcome: String,
    pub run_id: String,
    pub started_at: String,
    pub finished_at: String,
    pub records: u64,
    pub bytes: u64,
    pub records_by_type: BTreeMap<String, u64>,
    /// Documents in the run's `attachments/` folder, and their bytes.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub attachments: u64,
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub attachment_bytes: u64,
    pub errors: Vec<String>,
    pub output_dir: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction_time: Option<String>,
    /// Errors left out to fit the size limit.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub errors_omitted: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

impl RunReportMessage {
    /// The report of a run that ended without a summary (it could not start, or is unfinished).
    pub fn without_summary(outcome: ReportedOutcome, error: String) -> Self {
        RunReportMessage {
            outcome: outcome.as_str().to_owned(),
            errors: vec![error],
            ..RunReportMessage::default()
        }
    }

    pub fn from_summary(s: &RunSummary) -> Self {
        RunReportMessage {
            outcome: s.outcome.as_str().to_owned(),
            run_id: s.run_id.clone(),
            started_at: s.started_at.clone(),
            finished_at: s.finished_at.clone(),
            records: s.records_total,
            bytes: s.bytes_total,
            records_by_type: s
                .resources
                .iter()
                .map(|r| (r.resource_type.clone(), r.records))
                .collect(),
            attachments: s.attachments.as_ref().map_or(0, |a| a.files),
            attachment_bytes: s.attachments.as_ref().map_or(0, |a| a.bytes),
            errors: s.errors.clone(),
            output_dir: s.output_dir.clone(),
            transaction_time: s.bulk.as_ref().and_then(|b| b.transaction_time.clone()),
            errors_omitted: 0,
        }
    }

    /// JSON of at most `TERMINATION_MESSAGE_MAX` bytes, always parseable back: errors are shortened
    /// to 300 bytes each and as many as fit are kept (the rest counted in `errorsOmitted`); if that
    /// is not enough the per-type counts go, then the remaining text fields are shortened.
    pub fn to_message(&self) -> Result<String, serde_json::Error> {
        let mut m = self.clone();
        let mut errors = std::mem::take(&mut m.errors);
        for e in &mut errors {
            *e = shorten(e, 300).into_owned();
        }
        if let Some(text) = m.fit_errors(&errors) {
            return Ok(text);
        }
        m.records_by_type.clear();
        if let Some(text) = m.fit_errors(&errors) {
            return Ok(text);
        }
        for (field, max) in [
            (&mut m.outcome, 32),
            (&mut m.run_id, 64),
            (&mut m.started_at, 64),
            (&mut m.finished_at, 64),
            (&mut m.output_dir, 512),
        ] {
            *field = shorten(field, max).into_owned();
        }
        if let Some(t) = m.transaction_time.as_mut() {
            *t = shorten(t, 64).into_owned();
        }
        if let Some(text) = m.fit_errors(&errors) {
            return Ok(text);
        }
        // Only reachable with text that escapes to six times its size: the outcome and counts.
        let minimal = RunReportMessage {
            outcome: m.outcome.chars().take(16).collect(),
            records: m.records,
            bytes: m.bytes,
            errors_omitted: m.errors_omitted.saturating_add(errors.len()),
            ..RunReportMessage::default()
        };
        serde_json::to_string(&minimal)
    }

    /// `self` with as many of `errors` (in order) as fit, the others counted, if the result fits.
    fn fit_errors(&mut self, errors: &[String]) -> Option<String> {
        let already_omitted = self.errors_omitted;
        // The size without errors, counting all of them as omitted (the most digits it can take).
        self.errors = Vec::new();
        self.errors_omitted = already_omitted.saturating_add(errors.len());
        let mut size = serde_json::to_string(self).ok()?.len();
        let mut kept = 0;
        for e in errors {
            // The error as a JSON string, and the comma before it (none for the first).
            let grow =
                serde_json::to_string(e).map_or(usize::MAX, |t| t.len()) + usize::from(kept > 0);
            if size.saturating_add(grow) > TERMINATION_MESSAGE_MAX {
                break;
            }
            size += grow;
            kept += 1;
        }
        self.errors = errors[..kept].to_vec();
        self.errors_omitted = already_omitted.saturating_add(errors.len() - kept);
        let text = serde_json::to_string(self).ok()?;
        let fits = text.len() <= TERMINATION_MESSAGE_MAX;
        self.errors = Vec::new();
        self.errors_omitted = already_omitted;
        fits.then_some(text)
    }
}

/// True when `job` belongs to `export` (its controller owner reference).
pub fn owned_by(job: &Job, export: &EpicExport) -> bool {
    let uid = export.meta().uid.as_deref();
    job.metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && Some(o.uid.as_str()) == uid)
}
