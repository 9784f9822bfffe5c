//! `attachments` and `hydrate`: which documents to download beside the resources that point at them,
//! and which referenced resource types to fetch once each, validated into the plan's
//! [`AttachmentPlan`] and type list.

use serde::Deserialize;

use super::{ConfigError, Invalid};
use crate::plan::{ATTACHMENT_RESOURCES, AttachmentPlan};

/// The default `attachments.maxBytes`: 100 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 100 * 1024 * 1024;
/// The largest `attachments.maxBytes`: 4 GiB.
pub const MAX_MAX_BYTES: u64 = 4 * 1024 * 1024 * 1024;
/// The largest `attachments.inlineSmallerThan`: 4 MiB (an inlined attachment becomes part of one
/// NDJSON line, a third larger in base64).
pub const MAX_INLINE_BYTES: u64 = 4 * 1024 * 1024;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AttachmentsConfig {
    #[serde(default)]
    pub enabled: bool,
    /// Resource types whose attachments are downloaded (default DocumentReference, DiagnosticReport).
    #[serde(default)]
    pub resources: Option<Vec<String>>,
    /// Content types to download; empty or absent = all.
    #[serde(default)]
    pub content_types: Vec<String>,
    /// Attachments smaller than this many bytes go into `attachment.data` instead of a file.
    #[serde(default)]
    pub inline_smaller_than: u64,
    /// Larger attachments are recorded as errors, not downloaded.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// Other origins attachments may be downloaded from, never with the token.
    #[serde(default)]
    pub file_hosts: Vec<String>,
    /// Other origins trusted with the token for attachment downloads.
    #[serde(default)]
    pub token_hosts: Vec<String>,
}

fn default_max_bytes() -> u64 {
    DEFAULT_MAX_BYTES
}

/// Validates `attachments`; `None` when it is disabled. `bulk_hosts` are `source.bulk`'s
/// `(fileHosts, tokenHosts)`: attachments on those hosts are trusted the same way.
pub fn attachment_plan(
    a: AttachmentsConfig,
    allow_insecure_http: bool,
    bulk_hosts: (Vec<String>, Vec<String>),
    invalid: &Invalid<'_>,
) -> Result<Option<AttachmentPlan>, ConfigError> {
    if !a.enabled {
        return Ok(None);
    }
    let resources = match a.resources {
        None => vec![
            "DocumentReference".to_owned(),
            "DiagnosticReport".to_owned(),
        ],
        Some(list) if list.is_empty() => {
            return Err(invalid(
                "attachments.resources",
                "lists no resource types: remove it for the default (DocumentReference, DiagnosticReport) or set attachments.enabled: false".into(),
            ));
        }
        Some(list) => list,
    };
    for (i, t) in resources.iter().enumerate() {
        if !ATTACHMENT_RESOURCES.iter().any(|(known, _)| known == t) {
            return Err(invalid(
                &format!("attachments.resources[{i}]"),
                format!(
                    "{t:?} is not a type whose attachments epic-export knows where to find: use {}",
                    ATTACHMENT_RESOURCES
                        .iter()
                        .map(|(t, _)| *t)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    }
    let mut content_types = Vec::new();
    for (i, c) in a.content_types.iter().enumerate() {
        let c = c.trim().to_ascii_lowercase();
        let valid = c.split_once('/').is_some_and(|(t, s)| {
            let token = |x: &str| {
                !x.is_empty()
                    && x.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
            };
            token(t) && token(s)
        });
        if !valid {
            return Err(invalid(
                &format!("attachments.contentTypes[{i}]"),
                format!(
                    "{c:?} is not a content type: write it like text/html or application/pdf, without parameters"
                ),
            ));
        }
        content_types.push(c);
    }
    if a.max_bytes == 0 || a.max_bytes > MAX_MAX_BYTES {
        return Err(invalid(
            "attachments.maxBytes",
            format!(
                "{} is out of range: use 1 to {MAX_MAX_BYTES} bytes (default {DEFAULT_MAX_BYTES})",
                a.max_bytes
            ),
        ));
    }
    if a.inline_smaller_than > MAX_INLINE_BYTES {
        return Err(invalid(
            "attachments.inlineSmallerThan",
            format!(
                "{} is too large: inline at most {MAX_INLINE_BYTES} bytes (larger attachments are better as files)",
                a.inline_smaller_than
            ),
        ));
    }
    let (mut file_origins, mut token_origins) = bulk_hosts;
    for o in super::origins(
        "attachments.fileHosts",
        a.file_hosts,
        allow_insecure_http,
        invalid,
    )? {
        if !file_origins.contains(&o) {
            file_origins.push(o);
        }
    }
    for o in super::origins(
        "attachments.tokenHosts",
        a.token_hosts,
        allow_insecure_http,
        invalid,
    )? {
        if !token_origins.contains(&o) {
            token_origins.push(o);
        }
    }
    Ok(Some(AttachmentPlan {
        resources,
        content_types,
        inline_smaller_than: a.inline_smaller_than,
        max_bytes: a.max_bytes,
        file_origins,
        token_origins,
        allow_insecure_http,
    }))
}

/// Validates `hydrate`: resource type names, each once.
pub fn hydrate_types(
    types: Vec<String>,
    invalid: &Invalid<'_>,
) -> Result<Vec<String>, ConfigError> {
    let mut out: Vec<String> = Vec::new();
    for (i, t) in types.into_iter().enumerate() {
        let t = t.trim().to_owned();
        if !crate::trust::is_resource_type(&t) {
            return Err(invalid(
                &format!("hydrate[{i}]"),
                format!(
                    "{} is not a FHIR resource type: list types such as Medication, Practitioner, Organization, Location",
                    crate::trust::describe_type(&t)
                ),
            ));
        }
        if t == "Binary" {
            return Err(invalid(
                &format!("hydrate[{i}]"),
                "Binary is not hydrated: documents are downloaded with attachments.enabled: true"
                    .into(),
            ));
        }
        if !out.contains(&t) {
            out.push(t);
        }
    }
    Ok(out)
}
