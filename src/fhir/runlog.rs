//! The run log (`<run>/log.ndjson`): one JSON object per completed request of the FHIR client (a
//! search page, a read, a Bulk Data kick-off, a status poll, a file or document download), for
//! support engineers and machines. A line holds the URL's *path template* (resource types and
//! operations kept, ids and query values replaced by `{id}`/`{…}`), the status, size, duration,
//! attempts, the Bulk Data `X-Progress` text, and the server's correlation headers
//! (`X-Request-Id`, `X-Correlation-Id`, `X-Epic-*`); never the token, a patient id or resource
//! content. docs/src/output.md documents the format.
//!
//! Lines are written as they happen to `log.ndjson` in the run's staging folder (a small buffered
//! file, mode 0600), so the log of a run that fails or is killed is there too; the run's folder is
//! published with it (uploaded beside `summary.json` to an object store).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

pub use crate::output::LOG_FILE;

/// Failed requests kept for the summary and the e-mail.
pub const MAX_FAILED_REQUESTS: usize = 20;

/// Longest correlation header value kept (longer ones are cut).
const MAX_HEADER_VALUE: usize = 128;
/// Most correlation headers kept of one response.
const MAX_HEADERS: usize = 8;

/// Lines kept while the run has no folder yet (the first token request), written when it has one.
const MAX_PENDING: usize = 64;

/// What a request was for (`event` in the log).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A token request (SMART backend services).
    Token,
    /// A search page (search mode).
    Page,
    /// A read or search for a referenced resource (`hydrate`).
    Hydrate,
    /// A Bulk Data `$export` kick-off.
    Kickoff,
    /// A Bulk Data status poll.
    Status,
    /// A Bulk Data output file.
    Download,
    /// A document (`attachments`).
    Attachment,
    /// The DELETE of a finished Bulk Data export (sent after the run and its log are published, so
    /// it never reaches the file).
    Delete,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Token => "token",
            EventKind::Page => "page",
            EventKind::Hydrate => "hydrate",
            EventKind::Kickoff => "kickoff",
            EventKind::Status => "status",
            EventKind::Download => "download",
            EventKind::Attachment => "attachment",
            EventKind::Delete => "delete",
        }
    }

    /// The path template of a URL that is not under the FHIR base URL (a pre-signed file URL).
    fn opaque_path(self) -> &'static str {
        match self {
            EventKind::Download => "{file}",
            EventKind::Attachment => "{attachment}",
            EventKind::Status | EventKind::Delete => "{status}",
            _ => "{url}",
        }
    }
}

/// One line of `log.ndjson`; also an entry of `failedRequests` in the summary.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogEvent {
    /// When the request ended (RFC 3339, UTC).
    pub time: String,
    pub event: String,
    pub method: String,
    /// The URL path template, e.g. `/api/FHIR/R4/Observation?patient={id}&category=laboratory`.
    pub path: String,
    /// The final HTTP status; `null` when no answer came (connection, timeout).
    pub status: Option<u16>,
    /// Body bytes read (for a download, after decoding); `null` when no body was read.
    pub bytes: Option<u64>,
    /// Milliseconds from the first attempt's sending (not the wait for a slot) to the end of the
    /// body, waits between retries included.
    pub ms: u64,
    /// Attempts made (1 = no retry).
    pub attempts: u32,
    /// The Bulk Data `X-Progress` text of a status poll.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub progress: Option<String>,
    /// The server's correlation headers of the last answer, by lower-case name.
    #[serde(default)]
    pub correlation: BTreeMap<String, String>,
    /// Why the request failed (the status and OperationOutcome codes, or the kind of network error).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
}

/// The log file of a run. Lines recorded before it is opened are kept (a few) and written when it
/// is; lines after it is finished are dropped. It also keeps the first failed requests for the summary.
#[derive(Default)]
pub struct RunLog {
    inner: Mutex<State>,
    failed: Mutex<Vec<LogEvent>>,
}

#[derive(Default)]
struct State {
    open: Option<Open>,
    pending: Vec<Vec<u8>>,
    finished: bool,
}

struct Open {
    path: PathBuf,
    out: BufWriter<File>,
}

impl RunLog {
    /// Starts logging to `dir/log.ndjson` (appended to: a resumed run continues its log).
    pub fn start(&self, dir: &Path) -> std::io::Result<()> {
        let path = dir.join(LOG_FILE);
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)?;
        let mut out = BufWriter::with_capacity(64 * 1024, file);
        if let Ok(mut g) = self.inner.lock() {
            for line in std::mem::take(&mut g.pending) {
                out.write_all(&line)?;
            }
            g.open = Some(Open { path, out });
        }
        Ok(())
    }

    /// Writes one line (and keeps it if the request failed). A write error stops the log (with a
    /// warning); it never stops the run.
    pub fn record(&self, event: &LogEvent) {
        self.write(event, true);
    }

    /// Writes one line; a failure is kept for the summary only if `final_failure` (a download whose
    /// body was cut short and that is requested again is not one).
    fn write(&self, event: &LogEvent, final_failure: bool) {
        if final_failure
            && event.error.is_some()
            && let Ok(mut f) = self.failed.lock()
            && f.len() < MAX_FAILED_REQUESTS
        {
            f.push(event.clone());
        }
        let Ok(mut g) = self.inner.lock() else {
            return;
        };
        let Ok(mut line) = serde_json::to_vec(event) else {
            return;
        };
        line.push(b'\n');
        let state = &mut *g;
        match state.open.as_mut() {
            Some(open) => {
                if let Err(e) = open.out.write_all(&line) {
                    tracing::warn!("{}: {e}; the run log stops here", open.path.display());
                    state.open = None;
                    state.finished = true;
                }
            }
            None if !state.finished && state.pending.len() < MAX_PENDING => {
                state.pending.push(line)
            }
            None => {}
        }
    }

    /// Records a token request.
    pub fn record_token(&self, info: crate::auth::TokenRequestInfo) {
        self.record(&LogEvent {
            time: jiff::Timestamp::now().to_string(),
            event: EventKind::Token.as_str().into(),
            method: "POST".into(),
            path: info.path,
            status: info.status,
            bytes: None,
            ms: info.elapsed.as_millis() as u64,
            attempts: info.attempts,
            progress: None,
            correlation: info.correlation,
            error: info.error,
        });
    }

    /// The first `MAX_FAILED_REQUESTS` requests that failed.
    pub fn failed(&self) -> Vec<LogEvent> {
        self.failed.lock().map(|f| f.clone()).unwrap_or_default()
    }

    /// Flushes, syncs and closes the log; returns its path (`None` if none was open).
    pub fn finish(&self) -> Option<PathBuf> {
        let open = {
            let mut g = self.inner.lock().ok()?;
            g.finished = true;
            g.pending.clear();
            g.open.take()?
        };
        let path = open.path.clone();
        match open.out.into_inner() {
            Ok(f) => {
                let _ = f.sync_all();
            }
            Err(e) => tracing::warn!("{}: {}", path.display(), e.error()),
        }
        Some(path)
    }
}

/// The line of a download whose body is still being read: written by `finish` once the body has
/// been read (or has failed), with the bytes read and the time through its end; a download given up
/// without `finish` (the run stopped) is written when dropped, as not read to the end.
pub struct PendingEvent {
    log: std::sync::Arc<RunLog>,
    event: Option<LogEvent>,
    started: std::time::Instant,
}

impl PendingEvent {
    pub fn new(log: std::sync::Arc<RunLog>, event: LogEvent, started: std::time::Instant) -> Self {
        PendingEvent {
            log,
            event: Some(event),
            started,
        }
    }

    /// The server's correlation headers of the answer whose body is being read.
    pub fn correlation(&self) -> BTreeMap<String, String> {
        self.event
            .as_ref()
            .map(|e| e.correlation.clone())
            .unwrap_or_default()
    }

    /// Writes the line: `bytes` of body read, and why reading it failed, if it did.
    pub fn finish(mut self, bytes: u64, error: Option<String>) {
        self.write(Some(bytes), error, true);
    }

    /// Writes the line of a body cut short that is requested again: not a failed request of the
    /// run (its retry is another line).
    pub fn finish_retried(mut self, bytes: u64, error: String) {
        self.write(Some(bytes), Some(error), false);
    }

    fn write(&mut self, bytes: Option<u64>, error: Option<String>, final_failure: bool) {
        if let Some(mut event) = self.event.take() {
            event.time = jiff::Timestamp::now().to_string();
            event.ms = self.started.elapsed().as_millis() as u64;
            event.bytes = bytes;
            event.error = error;
            self.log.write(&event, final_failure);
        }
    }
}

impl Drop for PendingEvent {
    fn drop(&mut self) {
        self.write(None, Some("the body was not read to the end".into()), true);
    }
}

/// Query parameters whose values are kept in a path template: they name what is asked for, never whom.
const KEPT_VALUES: &[&str] = &[
    "_type",
    "_count",
    "category",
    "_outputFormat",
    "_elements",
    "_summary",
    "_sort",
    "_include",
    "_revinclude",
    "status",
];

/// Query parameters whose values are ids (`{id}`); any other value becomes `{…}`.
const ID_PARAMS: &[&str] = &["patient", "subject", "_id", "encounter", "id", "_jobId"];

fn safe_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b':' | b'.' | b'$'))
}

fn safe_value(s: &str) -> bool {
    s.len() <= 100
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b',' | b'.' | b':' | b'|' | b'/')
        })
}

/// The path template of `url` for the log: under `base` (the FHIR base URL), the base's path, then
/// the first segment if it is a resource type or an operation, later segments only if they are
/// operations (`$export`) or `_history`/`_search`, every other segment `{id}`; query names kept
/// (if plain), values only of `KEPT_VALUES`. A URL outside the base becomes a placeholder
/// (`{file}`, `{status}`, `{attachment}`), as do Bulk Data status and file URLs.
pub fn path_template(url: &url::Url, base: &url::Url, kind: EventKind) -> String {
    let base_path = base.path();
    let under_base = url.origin() == base.origin() && url.path().starts_with(base_path);
    if !under_base || matches!(kind, EventKind::Download | EventKind::Status) {
        let prefix = if under_base { base_path } else { "/" };
        return format!("{prefix}{}", kind.opaque_path());
    }
    let mut out = base_path.to_owned();
    let rest = &url.path()[base_path.len()..];
    let segments: Vec<String> = rest
        .split('/')
        .enumerate()
        .map(|(i, s)| {
            let keep = s.starts_with('$')
                || s == "_history"
                || s == "_search"
                || (i == 0 && crate::trust::is_resource_type(s));
            if keep && safe_name(s) || s.is_empty() {
                s.to_owned()
            } else {
                "{id}".to_owned()
            }
        })
        .collect();
    out.push_str(&segments.join("/"));
    if url.query().is_some() {
        let params: Vec<String> = url
            .query_pairs()
            .map(|(k, v)| {
                if !safe_name(&k) {
                    return "{…}={…}".to_owned();
                }
                let value = if KEPT_VALUES.contains(&k.as_ref()) && safe_value(&v) {
                    v.into_owned()
                } else if ID_PARAMS.contains(&k.as_ref()) {
                    "{id}".to_owned()
                } else {
                    "{…}".to_owned()
                };
                format!("{k}={value}")
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

/// The correlation headers of a response: `X-Request-Id`, `X-Correlation-Id` and every `X-Epic-*`,
/// values cut to printable ASCII and 128 characters, at most 8.
pub fn correlation(headers: &reqwest::header::HeaderMap) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (name, value) in headers {
        let n = name.as_str();
        if !(n == "x-request-id" || n == "x-correlation-id" || n.starts_with("x-epic-")) {
            continue;
        }
        if out.len() >= MAX_HEADERS {
            break;
        }
        if n.len() > 64 {
            continue;
        }
        if let Some(v) = printable(value) {
            out.insert(n.to_owned(), v);
        }
    }
    out
}

/// The Bulk Data `X-Progress` text, cut like a correlation header.
pub fn progress(headers: &reqwest::header::HeaderMap) -> Option<String> {
    printable(headers.get("x-progress")?)
}

/// A header value's printable ASCII, at most `MAX_HEADER_VALUE` characters; `None` if nothing is left.
fn printable(value: &reqwest::header::HeaderValue) -> Option<String> {
    let v: String = value
        .as_bytes()
        .iter()
        .filter(|b| (0x20..0x7f).contains(*b))
        .take(MAX_HEADER_VALUE)
        .map(|b| *b as char)
        .collect();
    (!v.is_empty()).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(url: &str, kind: EventKind) -> String {
        let base = url::Url::parse("https://ehr.example.org/api/FHIR/R4/").unwrap();
        path_template(&url::Url::parse(url).unwrap(), &base, kind)
    }

    #[test]
    fn templates_hide_ids() {
        assert_eq!(
            t(
                "https://ehr.example.org/api/FHIR/R4/Observation?patient=eAbc123&category=laboratory&_count=100",
                EventKind::Page
            ),
            "/api/FHIR/R4/Observation?patient={id}&category=laboratory&_count=100"
        );
        assert_eq!(
            t(
                "https://ehr.example.org/api/FHIR/R4/Patient/Tsecret/_history/2",
                EventKind::Hydrate
            ),
            "/api/FHIR/R4/Patient/{id}/_history/{id}"
        );
        assert_eq!(
            t(
                "https://ehr.example.org/api/FHIR/R4/Group/g1/$export?_type=Patient,Observation&_since=2026-01-01",
                EventKind::Kickoff
            ),
            "/api/FHIR/R4/Group/{id}/$export?_type=Patient,Observation&_since={…}"
        );
        assert_eq!(
            t(
                "https://ehr.example.org/api/FHIR/R4/Encounter?subject=Patient%2Fx&date=ge2020&weird%20name=1",
                EventKind::Page
            ),
            "/api/FHIR/R4/Encounter?subject={id}&date={…}&{…}={…}"
        );
        assert_eq!(
            t(
                "https://ehr.example.org/api/FHIR/R4/bulk/status/123",
                EventKind::Status
            ),
            "/api/FHIR/R4/{status}"
        );
        assert_eq!(
            t(
                "https://files.example.net/x/y.ndjson?sig=abc",
                EventKind::Download
            ),
            "/{file}"
        );
        assert_eq!(
            t(
                "https://ehr.example.org/api/FHIR/R4/Binary/doc1",
                EventKind::Attachment
            ),
            "/api/FHIR/R4/Binary/{id}"
        );
        assert_eq!(
            t(
                "https://ehr.example.org/api/FHIR/R4/patientid?x=1",
                EventKind::Page
            ),
            "/api/FHIR/R4/{id}?x={…}"
        );
    }

    #[test]
    fn lines_before_the_folder_wait_and_lines_after_the_end_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let log = RunLog::default();
        let event = |n: u64, error: bool| LogEvent {
            event: "page".into(),
            ms: n,
            attempts: 1,
            error: error.then(|| "HTTP 503".into()),
            ..LogEvent::default()
        };
        log.record(&event(1, false));
        log.start(dir.path()).unwrap();
        for n in 2..30 {
            log.record(&event(n, true));
        }
        assert_eq!(log.finish(), Some(dir.path().join(LOG_FILE)));
        log.record(&event(99, false));
        let text = std::fs::read_to_string(dir.path().join(LOG_FILE)).unwrap();
        let ms: Vec<u64> = text
            .lines()
            .map(|l| serde_json::from_str::<LogEvent>(l).unwrap().ms)
            .collect();
        assert_eq!(ms, (1..30).collect::<Vec<_>>());
        let failed = log.failed();
        assert_eq!(failed.len(), MAX_FAILED_REQUESTS);
        assert_eq!(failed[0].ms, 2);
    }

    #[test]
    fn correlation_headers_are_picked_and_cleaned() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("x-request-id", "abc-123".parse().unwrap());
        h.insert("x-epic-parentrequestid", "p\tq".parse().unwrap());
        h.insert("x-other", "no".parse().unwrap());
        h.insert("authorization", "Bearer x".parse().unwrap());
        h.insert("x-correlation-id", "c".repeat(300).parse().unwrap());
        let c = correlation(&h);
        assert_eq!(c.len(), 3);
        assert_eq!(c["x-request-id"], "abc-123");
        assert_eq!(c["x-epic-parentrequestid"], "pq");
        assert_eq!(c["x-correlation-id"].len(), 128);
    }
}
