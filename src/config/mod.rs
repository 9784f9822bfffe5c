//! The standalone configuration file (YAML; its keys are documented in docs/src/first-export.md) and
//! its conversion into an `ExportPlan`.
//!
//! This module only reads and validates; it does no networking. Every error names the file and the
//! field (or CSV line) and says what to write instead. Relative paths are relative to the config file.

pub mod attachments;
pub mod bulk;
pub mod ini;
pub mod roster;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::auth::Algorithm;
use crate::fhir::Limits;
use crate::http::retry::RetryPolicy;
use lettre::message::Mailbox;

use crate::notify::{CaCert, EmailPlan, OnSet, PasswordSource, TlsMode};
use crate::plan::{BulkLevel, BulkPlan, ExportPlan, ObjectOutput, Search, SearchPlan, Source};
use crate::trust::is_loopback_host;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: cannot read it: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("{path}:{line}: {message}")]
    Csv {
        path: PathBuf,
        line: u64,
        message: String,
    },
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// Export name: the folder under `output.directory`.
    pub name: String,
    pub fhir: FhirConfig,
    pub auth: AuthConfig,
    pub source: SourceConfig,
    #[serde(default)]
    pub output: OutputConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Used by `epic-export schedule`; `run` ignores it.
    #[serde(default)]
    pub schedule: Option<ScheduleConfig>,
    /// Notifications about each run's outcome.
    #[serde(default)]
    pub notify: Option<NotifyConfig>,
    /// Download the documents that resources point at (clinical notes).
    #[serde(default)]
    pub attachments: Option<attachments::AttachmentsConfig>,
    /// Referenced resource types to fetch once each after the export (e.g. Medication).
    #[serde(default)]
    pub hydrate: Vec<String>,
}

/// `schedule`: when `epic-export schedule` runs the export.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScheduleConfig {
    /// 5-field cron or a macro such as `@daily`.
    pub cron: String,
    /// IANA time zone of `cron`; default UTC.
    #[serde(default)]
    pub time_zone: Option<String>,
    /// At start, a run missed while the scheduler was down is made up only if it is at most this
    /// late (default 3600).
    #[serde(default)]
    pub starting_deadline_seconds: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NotifyConfig {
    #[serde(default)]
    pub email: Option<EmailConfig>,
}

/// `notify.email`. The password never comes from the config itself: `passwordEnv`
/// names an environment variable, `passwordFile` a file.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EmailConfig {
    pub host: String,
    #[serde(default)]
    pub port: Option<u16>,
    /// `none`, `starttls` or `tls`.
    #[serde(default)]
    pub tls: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password_env: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    pub from: String,
    pub to: Vec<String>,
    /// Outcomes to report: `success`, `partial`, `failure` (default all). Also spelt `sendOn`, as in
    /// the Kubernetes resource.
    #[serde(default, alias = "sendOn")]
    pub on: Vec<String>,
    /// PEM certificates to trust: CAs, and certificates the server presents itself (accepted as
    /// pinned whatever their CA flag and names, e.g. ProtonMail Bridge's own).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Skip certificate verification; accepted only for loopback hosts.
    #[serde(default)]
    pub insecure_skip_verify: bool,
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FhirConfig {
    pub base_url: String,
    #[serde(default)]
    pub token_url: Option<String>,
    /// Allow plain `http://` URLs to hosts that are not loopback (a test server on a private
    /// network, such as the in-cluster sandbox); default false.
    #[serde(default)]
    pub allow_insecure_http: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthConfig {
    pub client_id: String,
    pub private_key_file: PathBuf,
    #[serde(default)]
    pub algorithm: Option<String>,
    #[serde(default)]
    pub key_id: Option<String>,
    #[serde(default)]
    pub jwks_url: Option<String>,
    #[serde(default)]
    pub scope: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourceConfig {
    #[serde(default)]
    pub search: Option<SearchConfig>,
    #[serde(default)]
    pub bulk: Option<bulk::BulkConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SearchConfig {
    #[serde(default)]
    pub roster_file: Option<PathBuf>,
    /// Patient FHIR ids given inline instead of a roster file.
    #[serde(default)]
    pub patients: Option<Vec<String>>,
    #[serde(default)]
    pub resources_file: Option<PathBuf>,
    #[serde(default)]
    pub resources: Option<Vec<ResourceConfig>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResourceConfig {
    #[serde(rename = "type")]
    pub resource_type: String,
    #[serde(default)]
    pub params: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutputConfig {
    /// Where runs are written; with `url`, the working folder (locks, bulk progress, scratch).
    #[serde(default = "default_directory")]
    pub directory: PathBuf,
    #[serde(default = "default_keep_runs")]
    pub keep_runs: usize,
    /// `s3://bucket/prefix`, `az://container/prefix`, `gs://bucket/prefix` or `file:///path`.
    #[serde(default)]
    pub url: Option<String>,
    /// An S3-compatible store's endpoint (or an emulator's).
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    /// `gzip`: files are written as `<Type>.ndjson.gz`; `none` (default).
    #[serde(default)]
    pub compression: crate::plan::Compression,
    /// Bytes per uploaded part (at least 5 MiB).
    #[serde(default = "default_part_size")]
    pub part_size: usize,
    /// Parts uploaded at once, across the run's files.
    #[serde(default = "default_upload_concurrency")]
    pub upload_concurrency: usize,
}

impl Default for OutputConfig {
    fn default() -> Self {
        OutputConfig {
            directory: default_directory(),
            keep_runs: default_keep_runs(),
            url: None,
            endpoint: None,
            region: None,
            compression: crate::plan::Compression::None,
            part_size: default_part_size(),
            upload_concurrency: default_upload_concurrency(),
        }
    }
}

fn default_part_size() -> usize {
    crate::storage::upload::DEFAULT_PART_SIZE
}
fn default_upload_concurrency() -> usize {
    4
}

fn default_directory() -> PathBuf {
    PathBuf::from("epic_data_export")
}
fn default_keep_runs() -> usize {
    30
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitsConfig {
    /// Requests in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Requests started per second across the run; 0 = no limit.
    #[serde(default = "default_rps")]
    pub requests_per_second: f64,
    /// Timeout of one HTTP request, in seconds.
    #[serde(default = "default_timeout")]
    pub request_timeout_seconds: u64,
    /// Attempts per request, the first included (429, 5xx, timeouts and connection errors are retried).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            concurrency: default_concurrency(),
            requests_per_second: default_rps(),
            request_timeout_seconds: default_timeout(),
            max_attempts: default_attempts(),
        }
    }
}

/// The lowest and highest non-zero `limits.requestsPerSecond` (one request per 100 s; no real limit).
pub const MIN_RPS: f64 = 0.01;
pub const MAX_RPS: f64 = 10_000.0;

fn default_concurrency() -> usize {
    8
}
fn default_rps() -> f64 {
    10.0
}
fn default_timeout() -> u64 {
    60
}
fn default_attempts() -> u32 {
    6
}

/// Whether `path` is the original tool's INI file (by its extension) rather than YAML.
pub fn is_ini(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("ini"))
}

/// Reads a YAML config file and validates it into a plan (reading the roster and resource CSVs).
pub fn load_plan(path: &Path) -> Result<ExportPlan, ConfigError> {
    if is_ini(path) {
        // The original tool's INI: its paths are already anchored at its app folder.
        let config = ini::config_from_ini(path)?;
        return plan_from_config(config, path, path.parent().unwrap_or(Path::new(".")));
    }
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    plan_from_text(&text, path, path.parent().unwrap_or(Path::new(".")))
}

/// The `schedule` block of the config at `path` (an INI file's `[schedule]`), `None` without one.
pub fn load_schedule(path: &Path) -> Result<Option<ScheduleConfig>, ConfigError> {
    if is_ini(path) {
        return ini::schedule_from_ini(path);
    }
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let config: Config = serde_saphyr::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    Ok(config.schedule)
}

/// Parses and validates config text (YAML, or JSON, which is YAML too). `origin` names the source in
/// errors; `dir` anchors relative paths.
pub fn plan_from_text(text: &str, origin: &Path, dir: &Path) -> Result<ExportPlan, ConfigError> {
    let config: Config = serde_saphyr::from_str(text).map_err(|e| ConfigError::Parse {
        path: origin.to_owned(),
        message: e.to_string(),
    })?;
    plan_from_config(config, origin, dir)
}

/// `output`: the local folder, or the object store that runs are published to (with the folder as
/// the working folder), checked before anything is written.
fn output_destination(
    o: &OutputConfig,
    resolve: &dyn Fn(&Path) -> PathBuf,
    invalid: &Invalid<'_>,
) -> Result<(PathBuf, Option<ObjectOutput>), ConfigError> {
    use crate::storage::{OutputTarget, upload::MIN_PART_SIZE};
    const MAX_PART_SIZE: usize = 256 * 1024 * 1024;
    if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&o.part_size) {
        return Err(invalid(
            "output.partSize",
            format!(
                "must be {MIN_PART_SIZE} (5 MiB, the smallest part S3 accepts) to {MAX_PART_SIZE} (256 MiB) bytes"
            ),
        ));
    }
    if o.upload_concurrency == 0 || o.upload_concurrency > 64 {
        return Err(invalid(
            "output.uploadConcurrency",
            "must be 1 to 64".into(),
        ));
    }
    let Some(url) = &o.url else {
        if o.endpoint.is_some() || o.region.is_some() {
            return Err(invalid(
                "output.endpoint",
                "endpoint and region need output.url (s3://bucket/prefix)".into(),
            ));
        }
        return Ok((resolve(&o.directory), None));
    };
    let target = crate::storage::parse_output_url(url, o.endpoint.as_deref(), o.region.as_deref())
        .map_err(|e| {
            let field = match e {
                crate::storage::LocationError::Endpoint(_)
                | crate::storage::LocationError::InsecureEndpoint(_) => "output.endpoint",
                _ => "output.url",
            };
            invalid(field, e.to_string())
        })?;
    Ok(match target {
        OutputTarget::Local(dir) => (resolve(&dir), None),
        OutputTarget::Object(location) => (
            resolve(&o.directory),
            Some(ObjectOutput {
                location,
                part_size: o.part_size,
                upload_concurrency: o.upload_concurrency,
            }),
        ),
    })
}

/// Validates a parsed config. `dir` anchors relative paths; `path` is named in errors.
/// What `invalid(field, message)` builds: a config error naming the field.
type Invalid<'a> = dyn Fn(&str, String) -> ConfigError + 'a;

pub fn plan_from_config(c: Config, path: &Path, dir: &Path) -> Result<ExportPlan, ConfigError> {
    let invalid = |field: &str, message: String| ConfigError::Invalid {
        path: path.to_owned(),
        field: field.into(),
        message,
    };
    let resolve = |p: &Path| {
        if p.is_absolute() {
            p.to_owned()
        } else {
            dir.join(p)
        }
    };

    if c.name.is_empty()
        || c.name.len() > 52
        || !c
            .name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_' || ch == '.')
        || c.name.starts_with('.')
    {
        return Err(invalid(
            "name",
            format!(
                "{:?} is not a usable export name: use 1-52 letters, digits, '-', '_' or '.', not starting with '.'",
                c.name
            ),
        ));
    }
    let insecure = c.fhir.allow_insecure_http;
    let base = parse_http_url(&c.fhir.base_url, insecure)
        .map_err(|m| invalid("fhir.baseUrl", m.to_string()))?;
    let token_url = match &c.fhir.token_url {
        Some(t) => Some(
            parse_http_url(t, insecure)
                .map_err(|m| invalid("fhir.tokenUrl", m.to_string()))?
                .to_string(),
        ),
        None => None,
    };
    if c.auth.client_id.trim().is_empty() {
        return Err(invalid(
            "auth.clientId",
            "is empty: use the client id of your Epic app (non-production or production)".into(),
        ));
    }
    let algorithm = match &c.auth.algorithm {
        Some(a) => Some(
            a.parse::<Algorithm>()
                .map_err(|m| invalid("auth.algorithm", m.to_string()))?,
        ),
        None => None,
    };
    if let Some(u) = &c.auth.jwks_url {
        parse_http_url(u, insecure).map_err(|m| invalid("auth.jwksUrl", m.to_string()))?;
    }
    let source = match (c.source.search, c.source.bulk) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "source",
                "give either `search:` or `bulk:`, not both".into(),
            ));
        }
        (Some(search), None) => Source::Search(search_plan(search, &invalid, &resolve)?),
        (None, Some(b)) => Source::Bulk(bulk::bulk_plan(b, insecure, &invalid)?),
        (None, None) => {
            return Err(invalid(
                "source",
                "needs a `search:` block (rosterFile and resourcesFile or resources) or a `bulk:` block (group or level)".into(),
            ));
        }
    };
    let l = &c.limits;
    if l.concurrency == 0 || l.concurrency > 256 {
        return Err(invalid(
            "limits.concurrency",
            format!("{} is out of range: use 1 to 256", l.concurrency),
        ));
    }
    let rps = l.requests_per_second;
    if !(rps == 0.0 || (MIN_RPS..=MAX_RPS).contains(&rps)) {
        return Err(invalid(
            "limits.requestsPerSecond",
            format!(
                "{rps} is out of range: use 0 (no limit) or {MIN_RPS} to {MAX_RPS} (a smaller rate would make each request wait for hours)"
            ),
        ));
    }
    if l.request_timeout_seconds == 0 {
        return Err(invalid(
            "limits.requestTimeoutSeconds",
            "must be at least 1".into(),
        ));
    }
    if l.max_attempts == 0 || l.max_attempts > 20 {
        return Err(invalid("limits.maxAttempts", "must be 1 to 20".into()));
    }
    if c.output.keep_runs == 0 {
        return Err(invalid(
            "output.keepRuns",
            "must be at least 1 (the run just written)".into(),
        ));
    }
    let (output_dir, object_output) = output_destination(&c.output, &resolve, &invalid)?;
    let email = match c.notify.and_then(|n| n.email) {
        Some(e) => Some(email_plan(e, &invalid, &resolve)?),
        None => None,
    };
    let bulk_hosts = match &source {
        Source::Bulk(b) => (b.file_origins.clone(), b.token_origins.clone()),
        Source::Search(_) => (Vec::new(), Vec::new()),
    };
    let attachments = match c.attachments {
        Some(a) => attachments::attachment_plan(a, insecure, bulk_hosts, &invalid)?,
        None => None,
    };
    let hydrate = attachments::hydrate_types(c.hydrate, &invalid)?;
    let scope = c
        .auth
        .scope
        .unwrap_or_else(|| default_scope(&source, attachments.is_some(), &hydrate));
    Ok(ExportPlan {
        name: c.name,
        fhir_base: base.as_str().trim_end_matches('/').to_owned(),
        token_url,
        client_id: c.auth.client_id.trim().to_owned(),
        private_key_file: resolve(&c.auth.private_key_file),
        algorithm,
        key_id: c.auth.key_id,
        jwks_url: c.auth.jwks_url,
        scope,
        source,
        allow_insecure_http: insecure,
        output_dir,
        keep_runs: c.output.keep_runs,
        object_output,
        compression: c.output.compression,
        limits: Limits {
            concurrency: l.concurrency,
            requests_per_second: (l.requests_per_second > 0.0).then_some(l.requests_per_second),
            retry: RetryPolicy {
                max_attempts: l.max_attempts,
                ..RetryPolicy::default()
            },
            request_timeout: Duration::from_secs(l.request_timeout_seconds),
        },
        email,
        attachments,
        hydrate,
    })
}

/// Validates a list of origins (`fileHosts`, `tokenHosts`): each `https://host[:port]` without a path;
/// plain http only where `check_transport` allows it.
fn origins(
    field: &str,
    hosts: Vec<String>,
    allow_insecure_http: bool,
    invalid: &Invalid<'_>,
) -> Result<Vec<String>, ConfigError> {
    hosts
        .into_iter()
        .enumerate()
        .map(|(i, h)| {
            let field = format!("{field}[{i}]");
            let u = url::Url::parse(&h)
                .ok()
                .filter(|u| {
                    matches!(u.scheme(), "https" | "http")
                        && u.host().is_some()
                        && u.username().is_empty()
                        && u.password().is_none()
                        && matches!(u.path(), "" | "/")
                        && u.query().is_none()
                })
                .ok_or_else(|| {
                    invalid(
                        &field,
                        format!(
                            "{h:?} must be an origin such as https://storage.example.org (no path)"
                        ),
                    )
                })?;
            crate::trust::check_transport(&u, allow_insecure_http)
                .map_err(|m| invalid(&field, m.to_string()))?;
            Ok(u.origin().ascii_serialization())
        })
        .collect()
}

/// Validates `notify.email`. The password itself is not read here: a missing environment variable or
/// file is reported when the notification is sent.
fn email_plan(
    e: EmailConfig,
    invalid: &Invalid<'_>,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<EmailPlan, ConfigError> {
    let host = e.host.trim().to_owned();
    let tls = match &e.tls {
        Some(t) => TlsMode::parse(t).map_err(|m| invalid("notify.email.tls", m.to_string()))?,
        None => TlsMode::Starttls,
    };
    let logs_in = e.username.as_deref().is_some_and(|u| !u.is_empty());
    let port = crate::notify::check_server(&host, tls, e.port, logs_in)
        .map_err(|p| invalid(&format!("notify.email.{}", p.key()), p.to_string()))?;
    let mailbox = |field: &str, s: &str| {
        s.trim().parse::<Mailbox>().map_err(|err| {
            invalid(
                field,
                format!("{s:?} is not an e-mail address ({err}): write e.g. me@example.org or \"Exports <me@example.org>\""),
            )
        })
    };
    let from = mailbox("notify.email.from", &e.from)?;
    if e.to.is_empty() {
        return Err(invalid("notify.email.to", "lists no recipients".into()));
    }
    let to =
        e.to.iter()
            .map(|t| mailbox("notify.email.to", t))
            .collect::<Result<Vec<_>, _>>()?;
    let password = match (e.password_env, e.password_file) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "notify.email",
                "give either passwordEnv or passwordFile, not both".into(),
            ));
        }
        (Some(v), None) => {
            if v.is_empty() || v.contains('=') || v.contains('\0') {
                return Err(invalid(
                    "notify.email.passwordEnv",
                    format!("{v:?} is not an environment variable name"),
                ));
            }
            Some(PasswordSource::Env(v))
        }
        (None, Some(f)) => Some(PasswordSource::File(resolve(&f))),
        (None, None) => None,
    };
    let username = e.username.filter(|u| !u.is_empty());
    match (&username, &password) {
        (Some(_), None) => {
            return Err(invalid(
                "notify.email.passwordEnv",
                "username is set but no password source: set passwordEnv (an environment variable) or passwordFile".into(),
            ));
        }
        (None, Some(_)) => {
            return Err(invalid(
                "notify.email.username",
                "a password source is set but no username to log in with".into(),
            ));
        }
        _ => {}
    }
    let ca_file = e.ca_file.as_deref().map(resolve);
    if let Some(ca) = &ca_file
        && !ca.is_file()
    {
        return Err(invalid(
            "notify.email.caFile",
            format!(
                "{} is not a readable file (a PEM CA certificate)",
                ca.display()
            ),
        ));
    }
    if e.insecure_skip_verify {
        if !is_loopback_host(&host) {
            return Err(invalid(
                "notify.email.insecureSkipVerify",
                format!(
                    "is only allowed for a loopback host (127.0.0.1, ::1, localhost), not {host:?}: trust the server's certificate with caFile instead"
                ),
            ));
        }
        tracing::warn!(
            "notify.email.insecureSkipVerify: the certificate of {host} will not be verified (loopback only)"
        );
    }
    let on = OnSet::parse(&e.on).map_err(|m| invalid("notify.email.on", m.to_string()))?;
    let timeout = match e.timeout_seconds {
        Some(0) => {
            return Err(invalid(
                "notify.email.timeoutSeconds",
                "must be at least 1".into(),
            ));
        }
        Some(t) => Duration::from_secs(t),
        None => Duration::from_secs(30),
    };
    Ok(EmailPlan {
        host,
        port,
        tls,
        from,
        to,
        username,
        password,
        ca: ca_file.map(CaCert::File),
        insecure_skip_verify: e.insecure_skip_verify,
        on,
        timeout,
    })
}

/// `system/<Type>.read` for every exported type (SMART v1 form, accepted by Epic of every version),
/// `Binary` when attachments are downloaded and the hydrated types; `system/*.read` for a bulk
/// export of every type.
pub fn default_scope(source: &Source, attachments: bool, hydrate: &[String]) -> String {
    let mut types: Vec<&str> = match source {
        Source::Search(s) => s
            .searches
            .iter()
            .map(|s| s.resource_type.as_str())
            .collect(),
        Source::Bulk(b) if b.types.is_empty() => return "system/*.read".into(),
        Source::Bulk(b) => b.types.iter().map(String::as_str).collect(),
    };
    if let Source::Bulk(BulkPlan {
        level: BulkLevel::Group(_),
        ..
    }) = source
    {
        types.push("Group");
    }
    if attachments {
        types.push("Binary");
    }
    types.extend(hydrate.iter().map(String::as_str));
    types.sort_unstable();
    types.dedup();
    types
        .iter()
        .map(|t| format!("system/{t}.read"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// What is wrong with a configured server URL.
#[derive(Debug, thiserror::Error)]
enum UrlProblem {
    #[error("{0:?} is not a URL ({1}); write e.g. https://fhir.example.org/api/FHIR/R4")]
    NotUrl(String, url::ParseError),
    #[error("{0:?} must be an https:// URL")]
    NotHttp(String),
    #[error("{0:?} carries credentials in the URL; remove them (the key authenticates)")]
    Credentials(String),
    #[error(transparent)]
    Transport(#[from] crate::trust::TransportRefused),
    #[error("{0:?} must not have a query or fragment")]
    Query(String),
}

fn parse_http_url(s: &str, allow_insecure_http: bool) -> Result<url::Url, UrlProblem> {
    let u = url::Url::parse(s.trim()).map_err(|e| UrlProblem::NotUrl(s.to_owned(), e))?;
    if u.scheme() != "https" && u.scheme() != "http" {
        return Err(UrlProblem::NotHttp(s.to_owned()));
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err(UrlProblem::Credentials(s.to_owned()));
    }
    crate::trust::check_transport(&u, allow_insecure_http)?;
    if u.query().is_some() || u.fragment().is_some() {
        return Err(UrlProblem::Query(s.to_owned()));
    }
    Ok(u)
}

/// Validates `source.search`: the roster and the searches (inline or from the CSV files).
fn search_plan(
    search: SearchConfig,
    invalid: &Invalid<'_>,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<SearchPlan, ConfigError> {
    let patients = match (&search.roster_file, search.patients) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "source.search",
                "give either rosterFile or patients, not both".into(),
            ));
        }
        (Some(f), None) => roster::read_roster(&resolve(f))?,
        (None, Some(p)) => roster::check_patient_ids(p)
            .map_err(|m| invalid("source.search.patients", m.to_string()))?,
        (None, None) => {
            return Err(invalid(
                "source.search",
                "needs rosterFile (a CSV with a patient_id column) or patients (a list of FHIR ids)".into(),
            ));
        }
    };
    let searches = match (&search.resources_file, search.resources) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "source.search",
                "give either resourcesFile or resources, not both".into(),
            ));
        }
        (Some(f), None) => roster::read_resources(&resolve(f))?,
        (None, Some(list)) => {
            let mut out = Vec::new();
            for (i, r) in list.into_iter().enumerate() {
                let params: Vec<(String, String)> = r.params.into_iter().collect();
                let s = Search::new(r.resource_type, params).map_err(|m| {
                    invalid(&format!("source.search.resources[{i}]"), m.to_string())
                })?;
                out.push(s);
            }
            out
        }
        (None, None) => {
            return Err(invalid(
                "source.search",
                "needs resourcesFile (CSV: resource_type,search_params) or resources (a list of {type, params})".into(),
            ));
        }
    };
    if searches.is_empty() {
        return Err(invalid(
            "source.search",
            "lists no resources to export".into(),
        ));
    }
    Ok(SearchPlan { patients, searches })
}
