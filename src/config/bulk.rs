//! `source.bulk`: the Bulk Data export settings, validated into a `BulkPlan`.

use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Invalid};
use crate::plan::{BulkLevel, BulkPlan, Since};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BulkConfig {
    /// Group id for a Group export (Epic supports only Group export).
    #[serde(default)]
    pub group: Option<String>,
    /// `patient` or `system` instead of a group.
    #[serde(default)]
    pub level: Option<String>,
    #[serde(default)]
    pub types: Vec<String>,
    #[serde(default)]
    pub type_filters: Vec<String>,
    /// `auto` or a FHIR instant such as `2026-01-01T00:00:00Z`.
    #[serde(default)]
    pub since: Option<String>,
    #[serde(default)]
    pub output_format: Option<String>,
    #[serde(default = "yes")]
    pub delete_after_download: bool,
    /// How long to keep polling, in hours (default 72).
    #[serde(default = "default_max_wait_hours")]
    pub max_wait_hours: f64,
    /// Wait after "requested this Group too recently" (Epic gives no time), in hours (default 24); no
    /// kick-off is sent for this Group until then.
    #[serde(default = "default_cooldown_hours")]
    pub throttle_cooldown_hours: f64,
    /// Other hosts whose file URLs may be downloaded (never with the token), e.g. `https://storage.example.org`.
    #[serde(default)]
    pub file_hosts: Vec<String>,
    /// Other hosts trusted with the access token when the manifest says `requiresAccessToken: true`.
    #[serde(default)]
    pub token_hosts: Vec<String>,
}

fn yes() -> bool {
    true
}
fn default_max_wait_hours() -> f64 {
    72.0
}
fn default_cooldown_hours() -> f64 {
    24.0
}

/// The output formats the Bulk Data IG defines.
const OUTPUT_FORMATS: [&str; 3] = ["application/fhir+ndjson", "application/ndjson", "ndjson"];

pub fn bulk_plan(
    b: BulkConfig,
    allow_insecure_http: bool,
    invalid: &Invalid<'_>,
) -> Result<BulkPlan, ConfigError> {
    let level = match (b.group, b.level.as_deref()) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "source.bulk",
                "give either group or level, not both".into(),
            ));
        }
        (Some(g), None) => {
            let g = g.trim().to_owned();
            if g.is_empty()
                || !g
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            {
                return Err(invalid(
                    "source.bulk.group",
                    format!("{g:?} is not a FHIR id; use the Group's id as Epic gives it"),
                ));
            }
            BulkLevel::Group(g)
        }
        (None, Some("patient")) => BulkLevel::Patient,
        (None, Some("system")) => BulkLevel::System,
        (None, Some(other)) => {
            return Err(invalid(
                "source.bulk.level",
                format!("{other:?} is not a level: use patient or system (or set group)"),
            ));
        }
        (None, None) => {
            return Err(invalid(
                "source.bulk",
                "needs group: <Group id> (Epic) or level: patient|system".into(),
            ));
        }
    };
    for (i, t) in b.types.iter().enumerate() {
        if t.is_empty()
            || !t.starts_with(|c: char| c.is_ascii_uppercase())
            || !t.chars().all(|c| c.is_ascii_alphanumeric())
        {
            return Err(invalid(
                &format!("source.bulk.types[{i}]"),
                format!("{t:?} is not a FHIR resource type"),
            ));
        }
    }
    for (i, f) in b.type_filters.iter().enumerate() {
        let ok = f.split_once('?').is_some_and(|(t, q)| {
            t.starts_with(|c: char| c.is_ascii_uppercase())
                && t.chars().all(|c| c.is_ascii_alphanumeric())
                && q.contains('=')
        });
        if !ok {
            return Err(invalid(
                &format!("source.bulk.typeFilters[{i}]"),
                format!("{f:?} must look like Observation?category=laboratory"),
            ));
        }
    }
    let since = match b.since.as_deref().map(str::trim) {
        None | Some("") => Since::None,
        Some("auto") => Since::Auto,
        Some(instant) => {
            let ts: jiff::Timestamp = instant.parse().map_err(|_| {
                invalid("source.bulk.since", format!("{instant:?} is neither `auto` nor an instant with a time zone, e.g. 2026-01-01T00:00:00Z"))
            })?;
            Since::At(ts.to_string())
        }
    };
    if let Some(f) = &b.output_format
        && !OUTPUT_FORMATS.contains(&f.as_str())
    {
        return Err(invalid(
            "source.bulk.outputFormat",
            format!("{f:?} is not one of {}", OUTPUT_FORMATS.join(", ")),
        ));
    }
    let hours = |field: &str, h: f64| {
        if h.is_finite() && h > 0.0 && h <= 24.0 * 365.0 {
            Ok(Duration::from_secs_f64(h * 3600.0))
        } else {
            Err(invalid(
                field,
                format!("{h} is out of range: give hours between 0 and 8760"),
            ))
        }
    };
    Ok(BulkPlan {
        level,
        types: b.types,
        type_filters: b.type_filters,
        since,
        output_format: b.output_format,
        delete_after_download: b.delete_after_download,
        max_wait: hours("source.bulk.maxWaitHours", b.max_wait_hours)?,
        throttle_cooldown: hours(
            "source.bulk.throttleCooldownHours",
            b.throttle_cooldown_hours,
        )?,
        file_origins: super::origins(
            "source.bulk.fileHosts",
            b.file_hosts,
            allow_insecure_http,
            invalid,
        )?,
        token_origins: super::origins(
            "source.bulk.tokenHosts",
            b.token_hosts,
            allow_insecure_http,
            invalid,
        )?,
    })
}
