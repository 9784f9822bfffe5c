//! `ExportPlan`: the one validated description of a run. Every front end (YAML config, later the INI files
//! and the Kubernetes resource) converts into it; nothing downstream knows where it came from.

use std::path::PathBuf;
use std::time::Duration;

use crate::auth::Algorithm;
use crate::fhir::Limits;
use crate::summary::RunMode;

#[derive(Clone, Debug)]
pub struct ExportPlan {
    pub name: String,
    /// FHIR base URL without a trailing slash.
    pub fhir_base: String,
    /// Token URL; discovered from the base when `None`.
    pub token_url: Option<String>,
    pub client_id: String,
    pub private_key_file: PathBuf,
    pub algorithm: Option<Algorithm>,
    pub key_id: Option<String>,
    pub jwks_url: Option<String>,
    pub scope: String,
    /// `fhir.allowInsecureHttp`: plain http to hosts that are not loopback is allowed (test servers).
    pub allow_insecure_http: bool,
    pub source: Source,
    /// Where runs are written; with `object_output`, the working folder (the lock, bulk progress,
    /// scratch for files being rewritten and parts being uploaded).
    pub output_dir: PathBuf,
    pub keep_runs: usize,
    /// `output.url` naming an object store: runs are published there.
    pub object_output: Option<ObjectOutput>,
    /// `output.compression`.
    pub compression: Compression,
    pub limits: Limits,
    /// `notify.email`: where to report each run's outcome.
    pub email: Option<crate::notify::EmailPlan>,
    /// `attachments`: download the documents resources point at; `None` when disabled.
    pub attachments: Option<AttachmentPlan>,
    /// `hydrate`: referenced resource types fetched once each after the export.
    pub hydrate: Vec<String>,
}

/// An object store that runs are streamed to.
#[derive(Clone, Debug)]
pub struct ObjectOutput {
    pub location: crate::storage::ObjectLocation,
    /// Bytes per uploaded part.
    pub part_size: usize,
    /// Parts in flight at once, across the run's files.
    pub upload_concurrency: usize,
}

/// How resource files are stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// `<Type>.ndjson`.
    #[default]
    None,
    /// `<Type>.ndjson.gz`.
    Gzip,
}

impl ExportPlan {
    /// The search-mode part of the plan, if this is a search export.
    /// Search or Bulk Data, as the summary names it.
    pub fn mode(&self) -> RunMode {
        match self.source {
            Source::Search(_) => RunMode::Search,
            Source::Bulk(_) => RunMode::Bulk,
        }
    }

    pub fn search(&self) -> Option<&SearchPlan> {
        match &self.source {
            Source::Search(s) => Some(s),
            Source::Bulk(_) => None,
        }
    }

    /// One line describing what is exported (no patient ids).
    pub fn describe_source(&self) -> String {
        match &self.source {
            Source::Search(s) => format!(
                "search mode: {} patients, {} searches: {}",
                s.patients.len(),
                s.searches.len(),
                s.searches
                    .iter()
                    .map(Search::label)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Source::Bulk(b) => format!(
                "bulk mode: {} export of {}",
                match &b.level {
                    BulkLevel::Group(g) => format!("Group/{g}"),
                    BulkLevel::Patient => "Patient-level".into(),
                    BulkLevel::System => "system-level".into(),
                },
                if b.types.is_empty() {
                    "every type".to_string()
                } else {
                    b.types.join(", ")
                }
            ),
        }
    }
}

/// Where the data comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// Per-patient FHIR searches for a roster.
    Search(SearchPlan),
    /// A FHIR Bulk Data `$export`.
    Bulk(BulkPlan),
}

#[derive(Clone, Debug)]
pub struct SearchPlan {
    pub patients: Vec<String>,
    pub searches: Vec<Search>,
}

/// The kick-off level of a bulk export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BulkLevel {
    Group(String),
    Patient,
    System,
}

/// Which `_since` to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Since {
    None,
    /// The `transactionTime` of this export's last successful run (none on the first run).
    Auto,
    /// A FHIR instant given in the config.
    At(String),
}

#[derive(Clone, Debug)]
pub struct BulkPlan {
    pub level: BulkLevel,
    /// `_type` (empty = every type the server exports).
    pub types: Vec<String>,
    /// `_typeFilter` values, e.g. `Observation?category=laboratory`.
    pub type_filters: Vec<String>,
    pub since: Since,
    /// `_outputFormat`, when set.
    pub output_format: Option<String>,
    /// Send `DELETE` to the status URL after a complete download.
    pub delete_after_download: bool,
    /// Give up polling after this long (the export keeps running on the server; the next run resumes it).
    pub max_wait: Duration,
    /// Wait before a new kick-off after the server said the group was requested too recently, when it
    /// does not say for how long.
    pub throttle_cooldown: Duration,
    /// Other origins (`https://host[:port]`) whose file URLs may be downloaded, never with the token.
    pub file_origins: Vec<String>,
    /// Other origins trusted with the access token when the manifest requires it.
    pub token_origins: Vec<String>,
}

/// The resource types whose attachments can be downloaded, and where each keeps them: a path of
/// fields, `[]` meaning every element of an array.
pub const ATTACHMENT_RESOURCES: &[(&str, &str)] = &[
    ("DocumentReference", "content[].attachment"),
    ("DiagnosticReport", "presentedForm[]"),
    ("Media", "content"),
    ("Communication", "payload[].contentAttachment"),
    ("CommunicationRequest", "payload[].contentAttachment"),
];

/// What `attachments` asks for.
#[derive(Clone, Debug)]
pub struct AttachmentPlan {
    /// Resource types to look in (each one of `ATTACHMENT_RESOURCES`).
    pub resources: Vec<String>,
    /// Lower-case content types without parameters; empty = all.
    pub content_types: Vec<String>,
    /// Attachments smaller than this go into `attachment.data`; 0 = never.
    pub inline_smaller_than: u64,
    /// Larger attachments are recorded as errors.
    pub max_bytes: u64,
    /// Other origins attachments may come from, never with the token.
    pub file_origins: Vec<String>,
    /// Other origins trusted with the token.
    pub token_origins: Vec<String>,
    /// Plain http to hosts that are not loopback is allowed (`fhir.allowInsecureHttp`).
    pub allow_insecure_http: bool,
}

impl AttachmentPlan {
    /// Whether an attachment of `content_type` (as the resource gives it, parameters allowed) is
    /// wanted. Without a list every type is; with one, an attachment without a type is not.
    pub fn wants(&self, content_type: Option<&str>) -> bool {
        if self.content_types.is_empty() {
            return true;
        }
        content_type.is_some_and(|c| {
            let bare = c.split(';').next().unwrap_or_default().trim();
            self.content_types
                .iter()
                .any(|w| w.eq_ignore_ascii_case(bare))
        })
    }
}

/// One configured search: a resource type and its extra parameters (the patient is added per patient).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Search {
    pub resource_type: String,
    pub params: Vec<(String, String)>,
}

/// What is wrong with a configured search.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SearchProblem {
    #[error("{0:?} is not a FHIR resource type (e.g. Observation, Condition)")]
    NotResourceType(String),
    #[error("{0}: a search parameter has an empty name")]
    EmptyParameter(String),
    #[error("{resource_type}: do not set `{parameter}`; the patient comes from the roster")]
    PatientParameter {
        resource_type: String,
        parameter: String,
    },
    #[error("Patient is read by id (Patient/{{id}}) and takes no search parameters")]
    PatientWithParameters,
    #[error(
        "Observation needs a category or code parameter (Epic rejects Observation searches without one), e.g. category=laboratory"
    )]
    ObservationWithoutCategory,
}

impl Search {
    /// Validates a resource type and its parameters.
    pub fn new(
        resource_type: String,
        params: Vec<(String, String)>,
    ) -> Result<Search, SearchProblem> {
        let t = resource_type.trim().to_owned();
        if !crate::trust::is_resource_type(&t) {
            return Err(SearchProblem::NotResourceType(t));
        }
        for (k, _) in &params {
            if k.is_empty() {
                return Err(SearchProblem::EmptyParameter(t));
            }
            if matches!(k.as_str(), "patient" | "subject" | "_id") {
                return Err(SearchProblem::PatientParameter {
                    resource_type: t,
                    parameter: k.clone(),
                });
            }
        }
        if t == "Patient" && !params.is_empty() {
            return Err(SearchProblem::PatientWithParameters);
        }
        if t == "Observation" && !params.iter().any(|(k, _)| k == "category" || k == "code") {
            return Err(SearchProblem::ObservationWithoutCategory);
        }
        Ok(Search {
            resource_type: t,
            params,
        })
    }

    /// Whether a resource of type `t` may come back from this search: its own type, and what its
    /// `_include`/`_revinclude` parameters ask for (`_include=MedicationRequest:medication:Medication`
    /// names its target; an `_include` without a target, or `*`, allows any type).
    pub fn returns_type(&self, t: &str) -> bool {
        if t == self.resource_type {
            return true;
        }
        self.params.iter().any(|(k, v)| {
            let k = k.split(':').next().unwrap_or_default();
            v.split(',').any(|v| {
                let parts: Vec<&str> = v.split(':').map(str::trim).collect();
                match (k, parts.as_slice()) {
                    ("_include", [_, _, target]) => *target == t,
                    ("_include", _) => true,
                    ("_revinclude", [source, ..]) => *source == t || *source == "*",
                    _ => false,
                }
            })
        })
    }

    /// A short label for logs and the summary, e.g. `Observation?category=laboratory`. Contains no PHI.
    pub fn label(&self) -> String {
        if self.params.is_empty() {
            return self.resource_type.clone();
        }
        let q: Vec<String> = self
            .params
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!("{}?{}", self.resource_type, q.join("&"))
    }
}
