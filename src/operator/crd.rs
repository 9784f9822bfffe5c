//! The `EpicExport` custom resource (`fhirexport.dev/v1alpha1`): its spec mirrors the standalone config
//! with Kubernetes references instead of paths, plus CronJob-style scheduling fields and
//! pod settings; its status is kstatus-compatible. Field docs become the CRD's descriptions
//! (`kubectl explain epicexport.spec`). `epic-export crd` prints the CRD; `crds/epicexport.yaml` is its
//! committed output.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::schedule::ConcurrencyPolicy;

/// An export of patient data from Epic (or any SMART Backend Services FHIR server) to NDJSON files on a
/// PersistentVolume or in an object store (S3, Azure Blob Storage, Google Cloud Storage), run on a
/// schedule as Kubernetes Jobs.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "fhirexport.dev",
    version = "v1alpha1",
    kind = "EpicExport",
    plural = "epicexports",
    shortname = "epx",
    namespaced,
    status = "EpicExportStatus",
    printcolumn = r#"{"name":"Schedule","type":"string","jsonPath":".spec.schedule"}"#,
    printcolumn = r#"{"name":"Suspended","type":"boolean","jsonPath":".spec.suspend"}"#,
    printcolumn = r#"{"name":"Last Run","type":"date","jsonPath":".status.lastScheduleTime"}"#,
    printcolumn = r#"{"name":"Result","type":"string","jsonPath":".status.lastRun.outcome"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("self.metadata.name.size() <= 52").message("the name must be at most 52 characters, so that run (Job) names fit in 63")
)]
#[serde(rename_all = "camelCase")]
pub struct EpicExportSpec {
    /// The FHIR server.
    pub fhir: FhirSpec,
    /// SMART Backend Services authentication.
    pub auth: AuthSpec,
    /// What to export: exactly one of `search` (per-patient searches) or `bulk` (a Bulk Data export).
    pub source: SourceSpec,
    /// Where the NDJSON files go: exactly one of `volumeClaimName` (a PersistentVolumeClaim) and `url`
    /// (an object store).
    pub output: OutputSpec,
    /// How hard to push the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsSpec>,
    /// Notifications about each run's outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<NotifySpec>,
    /// Download the documents resources point at (clinical notes, scanned documents) into the run's
    /// `attachments/` folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachments: Option<AttachmentsSpec>,
    /// Referenced resource types to fetch once each after the export (e.g. Medication, Practitioner,
    /// Organization, Location), written to `<Type>.ndjson`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub hydrate: Vec<String>,
    /// When to run: 5-field cron (minute hour day-of-month month day-of-week) or a macro such as `@daily`,
    /// evaluated in `timeZone`.
    #[x_kube(validation = Rule::new("!self.contains('TZ=')").message("put the time zone in timeZone, not in the schedule"))]
    pub schedule: String,
    /// IANA time zone of the schedule (e.g. `America/Chicago`); default UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// Stop starting new runs; a running one finishes.
    #[serde(default)]
    pub suspend: bool,
    /// What to do when a run is due while another is active: `Forbid` (default: skip it until the active
    /// one ends), `Replace` (stop the active one) or `Allow`.
    #[serde(default)]
    pub concurrency_policy: ConcurrencyPolicy,
    /// A run that could not start within this many seconds of its scheduled time is skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub starting_deadline_seconds: Option<i64>,
    /// Finished successful runs (Jobs) to keep.
    #[serde(default = "default_successful_history")]
    #[schemars(range(min = 0))]
    pub successful_runs_history_limit: i32,
    /// Finished failed runs (Jobs) to keep.
    #[serde(default = "default_failed_history")]
    #[schemars(range(min = 0))]
    pub failed_runs_history_limit: i32,
    /// Settings of the export Jobs' pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobSettings>,
}

fn default_successful_history() -> i32 {
    3
}
fn default_failed_history() -> i32 {
    1
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FhirSpec {
    /// FHIR R4 base URL, e.g. `https://fhir.epic.com/interconnect-fhir-oauth/api/FHIR/R4`.
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://')").message("baseUrl must be an http(s) URL"))]
    pub base_url: String,
    /// Token endpoint; discovered from `{baseUrl}/.well-known/smart-configuration` when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_url: Option<String>,
    /// Allow plain `http://` URLs to hosts that are not loopback (`baseUrl`, `tokenUrl`, `jwksUrl`,
    /// `fileHosts`, `tokenHosts`): only for a test server inside the cluster, such as the sandbox.
    /// Default false: the access token and patient data cross the network only over https.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_insecure_http: Option<bool>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    /// The client id of the Epic app (non-production or production).
    #[x_kube(validation = Rule::new("self.size() > 0").message("clientId must not be empty"))]
    pub client_id: String,
    /// The Secret (in the same namespace) and key holding the PEM private key.
    pub key_secret_ref: SecretKeyRef,
    /// `RS256`, `RS384`, `RS512`, `ES256` or `ES384`; default from the key (RS384 for RSA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<String>,
    /// Key id sent as `kid`; default the RFC 7638 thumbprint of the public key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// JWK Set URL sent as the `jku` header: the URL registered with Epic, e.g. the operator's own
    /// `https://<host>/jwks/<namespace>/<export>.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    /// Requested scope; default `system/<Type>.read` for each exported type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// Let the operator rotate the key in `keySecretRef`: on request (the `fhirexport.dev/rotate-key`
    /// annotation) and, with `every`, on a schedule. The operator needs `update` on Secrets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<RotationSpec>,
}

/// Key rotation: publish a next key, wait out the JWKS caches, switch signing, retire the old key.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct RotationSpec {
    /// Rotate when the signing key is this old, e.g. `90d` (units `m`, `h`, `d`, `w`; at least 1h).
    /// Without it, only the annotation starts a rotation. At most 100 years.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]{1,9}[mhdw]$')").message("auth.rotation.every is a whole number and a unit m, h, d or w, e.g. 90d"))]
    pub every: Option<String>,
}

/// A key in a Secret of the same namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SecretKeyRef {
    /// The Secret's name.
    #[x_kube(validation = Rule::new("self.size() > 0").message("name the Secret"))]
    pub name: String,
    /// The key holding the value (for a private key: a PEM file, e.g. `private.pem`).
    #[x_kube(validation = Rule::new("self.size() > 0").message("name the key in the Secret, e.g. private.pem"))]
    pub key: String,
}

/// A key in a ConfigMap of the same namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapKeyRef {
    /// The ConfigMap's name.
    #[x_kube(validation = Rule::new("self.size() > 0").message("name the ConfigMap"))]
    pub config_map_name: String,
    /// The key holding the file, e.g. `roster.csv`.
    #[x_kube(validation = Rule::new("self.size() > 0").message("name the key in the ConfigMap, e.g. roster.csv"))]
    pub key: String,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("has(self.search) != has(self.bulk)").message("set exactly one of source.search and source.bulk"))]
pub struct SourceSpec {
    /// Per-patient FHIR searches for a roster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search: Option<SearchSpec>,
    /// A FHIR Bulk Data `$export`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bulk: Option<BulkSpec>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.resourcesRef) != has(self.resources)").message("set exactly one of resourcesRef and resources"))]
pub struct SearchSpec {
    /// The roster CSV (header row; the FHIR id in a `patient_id`, `fhir_id` or `id` column).
    pub roster_ref: ConfigMapKeyRef,
    /// The resource list CSV (`resource_type,search_params`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources_ref: Option<ConfigMapKeyRef>,
    /// The resources to export, inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Vec<ResourceSearch>>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ResourceSearch {
    /// FHIR resource type, e.g. `Observation`.
    #[serde(rename = "type")]
    pub resource_type: String,
    /// Extra search parameters, e.g. `{category: laboratory}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.group) != has(self.level)").message("set exactly one of group and level"))]
pub struct BulkSpec {
    /// Group id for a Group export (the only level Epic supports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// `patient` or `system`, instead of a group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == 'patient' || self == 'system'").message("level is patient or system"))]
    pub level: Option<String>,
    /// `_type`: resource types to export (default all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<String>,
    /// `_typeFilter` values, e.g. `Observation?category=laboratory`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub type_filters: Vec<String>,
    /// `auto` (the transactionTime of the last successful run) or a FHIR instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// `_outputFormat`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_format: Option<String>,
    /// Send DELETE to the status URL after a complete download (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_after_download: Option<bool>,
    /// Stop polling after this many hours, more than 0 and at most 8760 (default 72); the next run
    /// resumes the export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 8760))]
    #[x_kube(validation = Rule::new("self > 0.0").message("source.bulk.maxWaitHours must be more than 0 (hours, at most 8760)"))]
    pub max_wait_hours: Option<f64>,
    /// Other origins whose file URLs may be downloaded, never with the token, e.g.
    /// `https://storage.example.org` (scheme and host, no path).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 253)))]
    #[x_kube(validation = Rule::new("self.all(h, h.matches('^https?://[^/?#@]+/?$'))").message("source.bulk.fileHosts: each entry is an origin such as https://storage.example.org (no path, query or user)"))]
    pub file_hosts: Vec<String>,
    /// Other origins trusted with the access token (scheme and host, no path).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 253)))]
    #[x_kube(validation = Rule::new("self.all(h, h.matches('^https?://[^/?#@]+/?$'))").message("source.bulk.tokenHosts: each entry is an origin such as https://fhir.example.org (no path, query or user)"))]
    pub token_hosts: Vec<String>,
}

/// Where the runs go: a PersistentVolumeClaim (`volumeClaimName`) or an object store (`url`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.volumeClaimName) != has(self.url)").message("set exactly one of output.volumeClaimName (a PersistentVolumeClaim) and output.url (an object store: s3://, az:// or gs://)"),
    validation = Rule::new("has(self.volumeClaimName) || !has(self.subPath)").message("output.subPath is a folder in the volume of output.volumeClaimName: leave it out with output.url (put the folder in the URL's prefix)"),
    validation = Rule::new("has(self.url) || !(has(self.endpoint) || has(self.region) || has(self.partSize) || has(self.uploadConcurrency) || has(self.credentialsSecretRef) || has(self.scratchSizeLimit))").message("output.endpoint, region, partSize, uploadConcurrency, credentialsSecretRef and scratchSizeLimit go with output.url, not with a volume")
)]
pub struct OutputSpec {
    /// The PersistentVolumeClaim (same namespace) the runs write to, mounted at `/data`. Exactly one of
    /// `volumeClaimName` and `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new("self.size() > 0").message("output.volumeClaimName: name the PersistentVolumeClaim"))]
    pub volume_claim_name: Option<String>,
    /// A folder inside the volume: a relative path without `..` (e.g. `nightly`). Only with
    /// `volumeClaimName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    #[x_kube(validation = Rule::new("!self.startsWith('/') && !self.matches('(^|/)[.][.](/|$)')").message("output.subPath must be a relative path inside the volume, without '..' (e.g. nightly)"))]
    pub sub_path: Option<String>,
    /// The object store the runs are published to: `s3://bucket/prefix` (Amazon S3 or an
    /// S3-compatible store), `az://container/prefix` (Azure Blob Storage) or `gs://bucket/prefix`
    /// (Google Cloud Storage); each run lands under `<prefix>/<export name>/<run id>/`. The pod then
    /// gets an emptyDir at `/data` as its working folder. Credentials come from
    /// `credentialsSecretRef` or the pods' identity (`spec.job.serviceAccountName`), never from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    #[x_kube(validation = Rule::new("self.startsWith('s3://') || self.startsWith('az://') || self.startsWith('gs://')").message("output.url is s3://bucket/prefix, az://container/prefix or gs://bucket/prefix (for a volume, use output.volumeClaimName)"))]
    pub url: Option<String>,
    /// An S3-compatible store's endpoint, e.g. `https://minio.example.org` (https; no path). Only
    /// with `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://')").message("output.endpoint is an https URL such as https://minio.example.org"))]
    pub endpoint: Option<String>,
    /// The bucket's region, e.g. `us-east-1` (S3). Only with `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub region: Option<String>,
    /// `gzip` (files are written as `<Type>.ndjson.gz`) or `none` (default). With a volume too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new("self == 'none' || self == 'gzip'").message("output.compression is none or gzip"))]
    pub compression: Option<String>,
    /// Bytes per uploaded part, 5 MiB (5242880) to 256 MiB (268435456); default 8 MiB. Only with
    /// `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 5242880, max = 268435456))]
    pub part_size: Option<u64>,
    /// Parts uploaded at once, across the run's files, 1 to 64 (default 4). Only with `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub upload_concurrency: Option<u32>,
    /// A Secret (same namespace) whose keys become the export pods' environment variables: the
    /// object store client's credentials, e.g. `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`,
    /// `AZURE_STORAGE_ACCOUNT_NAME` and `AZURE_STORAGE_ACCOUNT_KEY`, or `GOOGLE_SERVICE_ACCOUNT_KEY`
    /// (the JSON key itself). Without it the pods' identity is used (IRSA, Azure or GKE workload
    /// identity through `spec.job.serviceAccountName`). Only with `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretName>,
    /// The size limit of the emptyDir at `/data` that a run with `url` works in (locks, bulk progress,
    /// upload parts waiting to be sent), e.g. `4Gi`; default `2Gi`. Only with `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+(Ki|Mi|Gi|Ti|k|M|G|T)?$')").message("output.scratchSizeLimit is a quantity such as 2Gi or 500Mi"))]
    pub scratch_size_limit: Option<String>,
    /// Complete runs to keep on the volume or under the URL's prefix (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub keep_runs: Option<u32>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LimitsSpec {
    /// Requests in flight at once (default 8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 256))]
    pub concurrency: Option<u32>,
    /// Requests per second: 0 = no limit, else 0.01 to 1000 (default 10). A tiny positive rate would
    /// make each request wait for hours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    #[x_kube(validation = Rule::new("self == 0.0 || self >= 0.01").message("limits.requestsPerSecond: use 0 (no limit) or a rate from 0.01 to 1000"))]
    pub requests_per_second: Option<f64>,
}

/// `spec.attachments`: the same settings as the config file's `attachments`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentsSpec {
    /// Download attachments (default false).
    #[serde(default)]
    pub enabled: bool,
    /// Resource types to look in (default DocumentReference and DiagnosticReport).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Vec<String>>,
    /// Content types to download, e.g. text/html, text/rtf, application/pdf; empty = all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub content_types: Vec<String>,
    /// Attachments smaller than this many bytes go into `attachment.data` instead of a file (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 4194304))]
    pub inline_smaller_than: Option<u64>,
    /// Larger attachments are recorded as errors, not downloaded (default 104857600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_bytes: Option<u64>,
    /// Other origins attachments may be downloaded from, never with the access token.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub file_hosts: Vec<String>,
    /// Other origins trusted with the access token for attachment downloads.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub token_hosts: Vec<String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct NotifySpec {
    /// E-mail the run summary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<EmailSpec>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.on)").message("notify.email.on was renamed: write sendOn (a bare `on` key is the boolean true in YAML 1.1, as kubectl and many GitOps tools read it)"),
    validation = Rule::new("!has(self.__true__)").message("notify.email has a key `true`: a YAML 1.1 parser (kubectl, many GitOps tools) read `on:` as the boolean true; write sendOn instead"),
    validation = Rule::new("!has(self.smtpSecretRef) || !has(self.tls) || self.tls != 'none' || self.host == 'localhost' || self.host == '::1' || self.host == '[::1]' || self.host.startsWith('127.')").message("notify.email.tls: none sends the smtpSecretRef credentials unencrypted: use starttls or tls, or a loopback host")
)]
pub struct EmailSpec {
    /// SMTP server host name.
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new("self.size() > 0").message("notify.email.host: name the SMTP server"))]
    pub host: String,
    /// SMTP port (default by `tls`: 587 starttls, 465 tls, 25 none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub port: Option<u16>,
    /// `none`, `starttls` (default) or `tls`. `none` is refused with `smtpSecretRef` unless the host is
    /// loopback: the credentials would cross the network in clear text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new("self == 'none' || self == 'starttls' || self == 'tls'").message("notify.email.tls is none, starttls or tls"))]
    pub tls: Option<String>,
    /// Sender address.
    pub from: String,
    /// Recipient addresses.
    pub to: Vec<String>,
    /// Which outcomes to report: `success`, `partial`, `failure` (default all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 3), inner(length(max = 16)))]
    #[x_kube(validation = Rule::new("self.all(o, o == 'success' || o == 'partial' || o == 'failure')").message("notify.email.sendOn lists success, partial or failure"))]
    pub send_on: Vec<String>,
    /// The old name of `sendOn`, refused: YAML 1.1 parsers read a bare `on` as `true`. Write `sendOn`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "refused_field")]
    pub on: Option<serde_json::Value>,
    /// What a YAML 1.1 parser makes of a bare `on:` key, refused: write `sendOn`.
    #[serde(default, rename = "true", skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "refused_field")]
    pub yaml11_on: Option<serde_json::Value>,
    /// A Secret with `username` and `password` keys for SMTP AUTH (read by the operator, which sends
    /// the e-mail about each finished run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smtp_secret_ref: Option<SecretName>,
    /// A ConfigMap key holding a PEM certificate to trust for this server besides the system's roots,
    /// e.g. a mail bridge's self-signed certificate (`kubectl create configmap smtp-ca
    /// --from-file=ca.pem=bridge-cert.pem`). Read by the operator when it sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert_ref: Option<ConfigMapKeyRef>,
}

/// The schema of a field that exists only to be refused by a validation rule: any value.
fn refused_field(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "Refused: write sendOn.",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SecretName {
    /// The Secret's name (same namespace).
    pub name: String,
}

/// Settings of the export Jobs' pods.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct JobSettings {
    /// Container image; default the operator's own image. Any other image must be allowed by the
    /// operator (its `--allowed-job-images`, the chart's `allowedJobImages`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node labels the pods must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Taints the pods tolerate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// ServiceAccount of the pods. They get no Kubernetes API token (the export needs none); with
    /// `spec.output.url` and no `credentialsSecretRef`, the ServiceAccount's cloud identity reaches the
    /// object store: IRSA (the `eks.amazonaws.com/role-arn` annotation), GKE workload identity, or
    /// Azure workload identity (with the pod label `azure.workload.identity/use: "true"` in
    /// `podLabels`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Extra labels on the pods, e.g. `azure.workload.identity/use: "true"` for Azure workload
    /// identity. The operator's own labels (`app.kubernetes.io/name`, `app.kubernetes.io/managed-by`,
    /// `fhirexport.dev/export`) cannot be set here.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[x_kube(validation = Rule::new("['app.kubernetes.io/name', 'app.kubernetes.io/managed-by', 'fhirexport.dev/export'].all(k, !(k in self))").message("job.podLabels cannot set the operator's own labels (app.kubernetes.io/name, app.kubernetes.io/managed-by, fhirexport.dev/export)"))]
    pub pod_labels: BTreeMap<String, String>,
    /// Seconds a run may take before Kubernetes stops it (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<i64>,
    /// Pod retries of a failed run, at least 0 (default 0: a failed export is reported, not repeated
    /// blindly).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub backoff_limit: Option<i32>,
}

/// Observed state, kstatus-compatible (conditions `Ready`, `Running`, `Stalled`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct EpicExportStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The scheduled time of the latest run started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<String>,
    /// When the next scheduled run is due (absent when suspended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_schedule_time: Option<String>,
    /// When the last successful run finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_time: Option<String>,
    /// Names of the runs (Jobs) in progress.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub active: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<LastRun>,
    /// The `transactionTime` of the last successful bulk run (the next `since: auto`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transaction_time: Option<String>,
    /// The last value of the `fhirexport.dev/run-now` annotation that started a run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_now_handled: Option<String>,
    /// Where the key rotation stands (present when `spec.auth.rotation` is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_rotation: Option<KeyRotationStatus>,
    /// The public JWK Set of the key Secret as the operator last read it (the signing key, and during
    /// a rotation the next or retiring key): what the JWK Set endpoint serves. Absent when the Secret
    /// holds no usable key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_keys: Option<PublicKeys>,
}

/// A public JWK Set (RFC 7517): public members only, by construction.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct PublicKeys {
    /// The keys, the signing key first.
    pub keys: Vec<PublicJwk>,
}

/// One public key: the members of an RSA or EC public JWK, and nothing that could hold a private key.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct PublicJwk {
    /// `RSA` or `EC`.
    pub kty: String,
    /// The key id assertions name in their `kid` header.
    pub kid: String,
    /// The signing algorithm, e.g. `RS384`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    /// `sig`.
    #[serde(default, rename = "use", skip_serializing_if = "Option::is_none")]
    pub use_: Option<String>,
    /// RSA modulus (base64url).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<String>,
    /// RSA exponent (base64url).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e: Option<String>,
    /// EC curve, e.g. `P-384`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crv: Option<String>,
    /// EC point x (base64url).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x: Option<String>,
    /// EC point y (base64url).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
}

/// The key rotation's progress; every time is RFC 3339.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct KeyRotationStatus {
    /// `Idle`, `Generating`, `Publishing` (next key published, waiting out the caches), `Retiring`
    /// (signing with the new key, the old one still published) or `Blocked` (see `message`).
    pub phase: String,
    /// The `kid` export runs sign with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_kid: Option<String>,
    /// The `kid` of the published next key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_kid: Option<String>,
    /// The `kid` of the old key, still published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retiring_kid: Option<String>,
    /// When the next key was first published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published_at: Option<String>,
    /// When signing switches to the next key (published time + cache lifetime + margin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch_after: Option<String>,
    /// When signing switched to the current key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switched_at: Option<String>,
    /// When the retiring key leaves the JWKS (5 minutes after its last use), once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retire_after: Option<String>,
    /// When the last rotation switched keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotation_time: Option<String>,
    /// When `every` starts the next rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_rotation_time: Option<String>,
    /// The last value of the `fhirexport.dev/rotate-key` annotation acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_handled: Option<String>,
    /// What the rotation waits for, or why it cannot go on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// What the latest finished run reported.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct LastRun {
    /// The run's Job.
    pub job_name: String,
    /// `success`, `partial` or `failed`.
    pub outcome: String,
    /// When the run's pod started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// When the run finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Resources exported.
    #[serde(default)]
    pub records: u64,
    /// NDJSON bytes written.
    #[serde(default)]
    pub bytes: u64,
    /// Records per resource type.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub records_by_type: BTreeMap<String, u64>,
    /// Documents downloaded into the run's `attachments/` folder.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attachments: u64,
    /// Bytes of those documents.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attachment_bytes: u64,
    /// What went wrong (shortened; the run's summary.json has everything).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    /// Where the run is: its folder in the pod (`/data` is the volume's `subPath`), or with
    /// `spec.output.url` the run's object URL, e.g. `s3://bucket/prefix/<export>/<run id>/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_path: Option<String>,
    /// What became of the e-mail about this run (`sent to N recipients` or `failed: ...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notification: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The CRD did not serialise as YAML (a bug).
#[derive(Debug, thiserror::Error)]
#[error("cannot write the CRD as YAML: {0}")]
pub struct CrdError(String);

/// The CRD as YAML, as `epic-export crd` prints it.
pub fn crd_yaml() -> Result<String, CrdError> {
    use kube::CustomResourceExt;
    serde_saphyr::to_string(&EpicExport::crd()).map_err(|e| CrdError(e.to_string()))
}
