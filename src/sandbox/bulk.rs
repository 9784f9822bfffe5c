//! The sandbox's FHIR Bulk Data export, as Epic serves it to a backend client.
//!
//! - Kick-off: `GET {base}/Group/{id}/$export`, `{base}/Patient/$export` and `{base}/$export`
//!   (all three export every sandbox patient) with `Accept: application/fhir+json` and
//!   `Prefer: respond-async`, `_type`, `_typeFilter`, `_since` and `_outputFormat`; `202` with an
//!   absolute `Content-Location`, or Epic's throttle answer (429 without `Retry-After`) when the
//!   same client asks for the same group again too soon.
//! - Status: `GET {base}/bulk/status/{job}` answers 202 with `X-Progress` until `bulk_delay` has
//!   passed, then 200 with the manifest; `DELETE` forgets the job.
//! - Files: `GET {base}/bulk/file/{job}/{n}` (bearer token) and, on the separate storage origin,
//!   `GET /files/{job}/{n}?sig=...` (a pre-signed URL, no token). Bodies are NDJSON streamed
//!   patient by patient, gzip when asked, `Range: bytes=N-` honoured on uncompressed answers.
//!
//! Nothing is stored per resource: a job keeps its selection and a plan (where each file starts,
//! how many resources and bytes it holds), and file bodies are regenerated from `data.rs` while
//! they are sent. Tokens and the general faults come from `fhir.rs`.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::{Value, json};

use super::fhir::{FHIR_JSON, Filters, error, fhir, gate, operation_outcome};
use super::{Dataset, Fault, Inner, SANDBOX_GROUP_ID, SEARCH_TYPES, Shared};

/// Status URLs are `{base}/{STATUS_PATH}/{job}`.
pub(super) const STATUS_PATH: &str = "bulk/status";
/// File URLs on the FHIR origin are `{base}/{FILE_PATH}/{job}/{n}`.
pub(super) const FILE_PATH: &str = "bulk/file";
const NDJSON: &str = "application/fhir+ndjson";
/// Output formats a kick-off may ask for (all mean NDJSON).
const OUTPUT_FORMATS: &[&str] = &["application/fhir+ndjson", "application/ndjson", "ndjson"];
/// Epic's answer to a kick-off for a group the client exported too recently.
const THROTTLED: &str = "Error processing Bulk Data Kickoff request: Request not allowed: The Client requested this Group too recently.";
/// The throttle key of system- and patient-level kick-offs.
const ALL_PATIENTS: &str = "*";
/// Streamed bodies are generated in pieces of about this many bytes.
const CHUNK: usize = 64 * 1024;
/// `_typeFilter` search parameters the sandbox understands (as in `fhir.rs` searches).
const FILTER_PARAMS: &[&str] = &["category", "code"];

/// One export job.
pub(super) struct Job {
    client: String,
    /// The kick-off URL as received.
    request: String,
    started: Instant,
    transaction_time: jiff::Timestamp,
    /// The storage origin's signature for this job's files.
    sig: String,
    selection: Arc<Selection>,
    /// The plan, and when it was ready (computed off the request path after kick-off).
    plan: Option<(Arc<Plan>, Instant)>,
}

impl Job {
    /// When the export counts as complete: `bulk_delay` after kick-off, and the plan ready.
    fn complete_at(&self, delay: Duration) -> Option<Instant> {
        let (_, ready) = self.plan.as_ref()?;
        Some(self.started.checked_add(delay)?.max(*ready))
    }

    /// When a complete export stops being served (`None`: not complete, or never).
    fn expires_at(&self, delay: Duration, expiry: Duration) -> Option<Instant> {
        self.complete_at(delay)?.checked_add(expiry)
    }

    fn expired(&self, now: Instant, delay: Duration, expiry: Duration) -> bool {
        self.expires_at(delay, expiry).is_some_and(|t| now >= t)
    }
}

/// What a kick-off asked for.
#[derive(Debug, Default)]
struct Selection {
    /// Resource types in export order.
    types: Vec<String>,
    /// `_typeFilter` queries per type; a resource must match one of its type's queries.
    filters: HashMap<String, Vec<Filters>>,
    /// `_since`: only resources whose `meta.lastUpdated` is later.
    since: Option<jiff::Timestamp>,
}

impl Selection {
    fn keeps(&self, resource_type: &str, resource: &Value) -> bool {
        if let Some(filters) = self.filters.get(resource_type)
            && !filters.iter().any(|f| f.matches(resource))
        {
            return false;
        }
        match self.since {
            None => true,
            Some(since) => resource
                .pointer("/meta/lastUpdated")
                .and_then(Value::as_str)
                .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                .is_some_and(|t| t > since),
        }
    }

    /// The selected resources of one type for the patient at `patient` (dataset order).
    fn resources(&self, dataset: &Dataset, resource_type: &str, patient: usize) -> Vec<Value> {
        let Some(pid) = dataset.patient_id(patient) else {
            return Vec::new();
        };
        dataset
            .resources(resource_type, pid)
            .into_iter()
            .filter(|r| self.keeps(resource_type, r))
            .collect()
    }
}

/// The output files of a job.
#[derive(Debug)]
struct Plan {
    files: Vec<FileSpec>,
    /// Whether there is an error file (served as file number `files.len()`).
    error_file: bool,
}

impl Plan {
    /// Plans the files and compresses each one once (`Compression::fast`), like a server that stores
    /// its output: gzip downloads of the whole file are then served from memory, and a download costs
    /// the sandbox next to nothing beside the client measured against it.
    fn build(dataset: &Dataset, selection: &Selection, file_size: usize) -> Plan {
        let file_size = file_size.max(1);
        let mut files = Vec::new();
        let mut line = Vec::new();
        for rt in &selection.types {
            let mut current: Option<(FileSpec, GzEncoder<Vec<u8>>)> = None;
            for patient in 0..dataset.patient_count() {
                for (k, resource) in selection.resources(dataset, rt, patient).iter().enumerate() {
                    let (file, gz) = current.get_or_insert_with(|| {
                        let spec = FileSpec {
                            resource_type: rt.clone(),
                            first_patient: patient,
                            skip: k,
                            count: 0,
                            bytes: 0,
                            gzip: None,
                        };
                        (spec, GzEncoder::new(Vec::new(), Compression::fast()))
                    });
                    line.clear();
                    let _ = serde_json::to_writer(&mut line, resource);
                    line.push(b'\n');
                    let _ = gz.write_all(&line);
                    file.count += 1;
                    file.bytes += line.len() as u64;
                    if file.count == file_size {
                        files.extend(current.take().map(finish));
                    }
                }
            }
            files.extend(current.take().map(finish));
        }
        Plan {
            files,
            error_file: selection.types.iter().any(|t| t == "DocumentReference"),
        }
    }
}

fn finish((mut spec, gz): (FileSpec, GzEncoder<Vec<u8>>)) -> FileSpec {
    spec.gzip = gz.finish().ok().map(Bytes::from);
    spec
}

/// One output file: `count` resources of one type, starting with the `skip`-th selected
/// resource of the patient at `first_patient`.
#[derive(Debug, Clone)]
struct FileSpec {
    resource_type: String,
    first_patient: usize,
    skip: usize,
    count: usize,
    /// The uncompressed body length.
    bytes: u64,
    /// The whole file, gzip-compressed.
    gzip: Option<Bytes>,
}

/// The single line of the error file.
fn error_line() -> Bytes {
    let outcome = operation_outcome(
        "warning",
        "processing",
        "Some DocumentReference content could not be exported: attachments (Binary) are not part of the sandbox's bulk export.",
    );
    Bytes::from(format!("{outcome}\n"))
}

// ---------- kick-off ----------

/// `GET {base}/Group/{id}/$export`.
pub(super) async fn kickoff_group(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    kickoff(&s, Some(id), &uri, &headers).await
}

/// `GET {base}/Patient/$export`: every patient.
pub(super) async fn kickoff_patient(
    State(s): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    kickoff(&s, None, &uri, &headers).await
}

/// `GET {base}/$export`: system level, which here is every patient too.
pub(super) async fn kickoff_system(
    State(s): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    kickoff(&s, None, &uri, &headers).await
}

async fn kickoff(
    s: &Arc<Shared>,
    group: Option<String>,
    uri: &Uri,
    headers: &HeaderMap,
) -> Response {
    let client = match gate(s, headers).await {
        Ok(client) => client,
        Err(resp) => return resp,
    };
    s.lock().stats.bulk_kickoffs += 1;
    if let Some(id) = &group
        && id != SANDBOX_GROUP_ID
    {
        return error(
            StatusCode::NOT_FOUND,
            "not-found",
            &format!("Group/{id} was not found."),
        );
    }
    let accept_ok = headers
        .get_all(header::ACCEPT)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.trim() == FHIR_JSON));
    if !accept_ok {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid",
            "The Accept header must be application/fhir+json for a Bulk Data kick-off.",
        );
    }
    let async_ok = headers.get_all("prefer").iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|p| p.trim().eq_ignore_ascii_case("respond-async"))
        })
    });
    if !async_ok {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid",
            "The Prefer header must include respond-async for a Bulk Data kick-off.",
        );
    }
    let params: Vec<(String, String)> =
        url::form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let selection = match parse_selection(&params) {
        Ok(selection) => Arc::new(selection),
        Err(resp) => return resp,
    };

    let group_key = group.unwrap_or_else(|| ALL_PATIENTS.to_string());
    let now = Instant::now();
    let job_id = uuid::Uuid::new_v4().simple().to_string();
    {
        let mut inner = s.lock();
        let throttle = s.opts.bulk_throttle;
        let key = (client.clone(), group_key.clone());
        if !throttle.is_zero()
            && let Some(last) = inner.bulk_last_kickoff.get(&key)
            && now.duration_since(*last) < throttle
        {
            drop(inner);
            tracing::warn!(client_id = %client, group = %group_key, "bulk kick-off throttled: {THROTTLED}");
            return error(StatusCode::TOO_MANY_REQUESTS, "throttled", THROTTLED);
        }
        inner.bulk_last_kickoff.insert(key, now);
        let (delay, expiry) = (s.opts.bulk_delay, s.opts.bulk_expiry);
        inner
            .bulk_jobs
            .retain(|_, job| !job.expired(now, delay, expiry));
        let transaction_time = jiff::Timestamp::now();
        inner.bulk_jobs.insert(
            job_id.clone(),
            Job {
                client: client.clone(),
                request: format!("{}{}", s.origin, uri),
                started: now,
                transaction_time: transaction_time
                    .round(jiff::Unit::Millisecond)
                    .unwrap_or(transaction_time),
                sig: uuid::Uuid::new_v4().simple().to_string(),
                selection: selection.clone(),
                plan: None,
            },
        );
    }
    let (shared, id) = (s.clone(), job_id.clone());
    tokio::task::spawn_blocking(move || {
        let plan = Plan::build(&shared.dataset, &selection, shared.opts.bulk_file_size);
        if let Some(job) = shared.lock().bulk_jobs.get_mut(&id) {
            job.plan = Some((Arc::new(plan), Instant::now()));
        }
    });
    let status_url = format!("{}/{STATUS_PATH}/{job_id}", s.base_url());
    tracing::info!(client_id = %client, group = %group_key, job = %job_id, "bulk export accepted");
    let mut resp = fhir(
        StatusCode::ACCEPTED,
        &operation_outcome(
            "information",
            "informational",
            "The export request was accepted; poll the Content-Location URL for its status.",
        ),
    );
    if let Ok(value) = HeaderValue::from_str(&status_url) {
        resp.headers_mut().insert(header::CONTENT_LOCATION, value);
    }
    resp
}

/// Validates the kick-off parameters.
#[allow(clippy::result_large_err)]
fn parse_selection(params: &[(String, String)]) -> Result<Selection, Response> {
    let bad = |diagnostics: String| error(StatusCode::BAD_REQUEST, "invalid", &diagnostics);
    let values = |name: &'static str| {
        params
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v)
    };
    let known = |t: &str| t == "Patient" || SEARCH_TYPES.contains(&t);

    for format in values("_outputFormat") {
        if !OUTPUT_FORMATS.contains(&format.trim()) {
            return Err(bad(format!(
                "Unsupported _outputFormat {format}; use application/fhir+ndjson."
            )));
        }
    }

    let mut types: Vec<String> = Vec::new();
    for t in values("_type").flat_map(|v| v.split(',')) {
        let t = t.trim();
        if t.is_empty() {
            continue;
        }
        if !known(t) {
            return Err(bad(format!("Unsupported resource type in _type: {t}.")));
        }
        if !types.iter().any(|x| x == t) {
            types.push(t.to_string());
        }
    }
    if types.is_empty() {
        types = std::iter::once("Patient")
            .chain(SEARCH_TYPES.iter().copied())
            .map(str::to_string)
            .collect();
    }

    let mut filters: HashMap<String, Vec<Filters>> = HashMap::new();
    for query in values("_typeFilter").flat_map(|v| split_type_filters(v)) {
        let Some((rt, search)) = query.split_once('?') else {
            return Err(bad(format!(
                "Invalid _typeFilter {query}: expected Type?param=value."
            )));
        };
        if !known(rt) {
            return Err(bad(format!(
                "Unsupported resource type in _typeFilter: {rt}."
            )));
        }
        let search: Vec<(String, String)> = url::form_urlencoded::parse(search.as_bytes())
            .into_owned()
            .collect();
        if let Some((name, _)) = search
            .iter()
            .find(|(k, _)| !FILTER_PARAMS.contains(&k.as_str()))
        {
            return Err(bad(format!(
                "Unsupported search parameter in _typeFilter {query}: {name} (supported: category, code)."
            )));
        }
        if types.iter().any(|t| t == rt) {
            filters
                .entry(rt.to_string())
                .or_default()
                .push(Filters::from_params(&search));
        }
    }

    let since = match values("_since").next_back() {
        None => None,
        // A `+` offset arrives as a space when the client did not percent-encode it.
        Some(v) => match v.trim().replace(' ', "+").parse::<jiff::Timestamp>() {
            Ok(t) => Some(t),
            Err(_) => {
                return Err(bad(format!(
                    "Invalid _since {v}: expected a FHIR instant such as 2024-01-31T00:00:00Z."
                )));
            }
        },
    };
    Ok(Selection {
        types,
        filters,
        since,
    })
}

/// Splits a `_typeFilter` value into queries. Commas separate queries (STU2) but also OR codes
/// inside one query, so a piece that does not start with `Type?` continues the previous query.
fn split_type_filters(value: &str) -> Vec<String> {
    let mut queries: Vec<String> = Vec::new();
    for piece in value.split(',') {
        let starts_query = piece
            .split_once('?')
            .is_some_and(|(t, _)| !t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric()));
        match queries.last_mut() {
            Some(last) if !starts_query => {
                last.push(',');
                last.push_str(piece);
            }
            _ => queries.push(piece.trim().to_string()),
        }
    }
    queries.retain(|q| !q.is_empty());
    queries
}

// ---------- status, manifest and delete ----------

/// A job as seen by a request at one moment.
enum Lookup {
    /// Unknown, deleted or expired.
    Gone,
    Running {
        percent: u64,
    },
    Ready(ReadyJob),
}

struct ReadyJob {
    plan: Arc<Plan>,
    selection: Arc<Selection>,
    sig: String,
    request: String,
    transaction_time: jiff::Timestamp,
    /// How long the job is still served (`None`: forever).
    remaining: Option<Duration>,
}

fn lookup(s: &Shared, id: &str) -> Lookup {
    let inner = s.lock();
    let Some(job) = inner.bulk_jobs.get(id) else {
        return Lookup::Gone;
    };
    let (delay, expiry) = (s.opts.bulk_delay, s.opts.bulk_expiry);
    let now = Instant::now();
    if job.expired(now, delay, expiry) {
        return Lookup::Gone;
    }
    match (&job.plan, job.complete_at(delay)) {
        (Some((plan, _)), Some(at)) if now >= at => Lookup::Ready(ReadyJob {
            plan: plan.clone(),
            selection: job.selection.clone(),
            sig: job.sig.clone(),
            request: job.request.clone(),
            transaction_time: job.transaction_time,
            remaining: job
                .expires_at(delay, expiry)
                .map(|t| t.saturating_duration_since(now)),
        }),
        _ => {
            let elapsed = now.duration_since(job.started).as_millis();
            let percent = match delay.as_millis() {
                0 => 99,
                d => (elapsed * 100 / d).min(99) as u64,
            };
            Lookup::Running { percent }
        }
    }
}

/// Takes the first queued fault `wanted` accepts, counting it.
fn take_fault(inner: &mut Inner, wanted: impl Fn(&Fault) -> bool) -> Option<Fault> {
    let i = inner.faults.iter().position(wanted)?;
    let fault = inner.faults.remove(i)?;
    inner.stats.injected_faults += 1;
    tracing::info!(?fault, "injected fault");
    Some(fault)
}

fn gone(job: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not-found",
        &format!("Bulk Data export {job} is unknown, deleted or expired."),
    )
}

/// `GET {base}/bulk/status/{job}`.
pub(super) async fn status(
    State(s): State<Arc<Shared>>,
    Path(job): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(resp) = gate(&s, &headers).await {
        return resp;
    }
    let fault = {
        let mut inner = s.lock();
        inner.stats.bulk_polls += 1;
        take_fault(&mut inner, |f| matches!(f, Fault::PollOutcome { .. }))
    };
    if let Some(Fault::PollOutcome { status, code }) = fault {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return error(
            status,
            &code,
            &format!("Simulated Bulk Data status failure ({code})."),
        );
    }
    let ready = match lookup(&s, &job) {
        Lookup::Gone => return gone(&job),
        Lookup::Running { percent } => {
            let mut resp = StatusCode::ACCEPTED.into_response();
            let h = resp.headers_mut();
            if let Ok(v) = HeaderValue::from_str(&format!("{percent}% complete")) {
                h.insert("x-progress", v);
            }
            if let Some(v) = s
                .opts
                .bulk_retry_after
                .as_deref()
                .and_then(|v| HeaderValue::from_str(v).ok())
            {
                h.insert(header::RETRY_AFTER, v);
            }
            return resp;
        }
        Lookup::Ready(ready) => ready,
    };
    let wrong_count = take_fault(&mut s.lock(), |f| *f == Fault::WrongCount).is_some();
    let on_storage = s.opts.bulk_files_on_storage;
    let mut output: Vec<Value> = ready
        .plan
        .files
        .iter()
        .enumerate()
        .map(|(n, f)| {
            json!({
                "type": f.resource_type,
                "url": file_url(&s, &job, n, &ready.sig, on_storage),
                "count": f.count,
            })
        })
        .collect();
    if wrong_count && let Some(first) = output.first_mut() {
        first["count"] = json!(ready.plan.files[0].count + 1);
    }
    let errors: Vec<Value> = if ready.plan.error_file {
        vec![json!({
            "type": "OperationOutcome",
            "url": file_url(&s, &job, ready.plan.files.len(), &ready.sig, on_storage),
        })]
    } else {
        Vec::new()
    };
    let manifest = json!({
        "transactionTime": ready.transaction_time.to_string(),
        "request": ready.request,
        "requiresAccessToken": !on_storage,
        "output": output,
        "error": errors,
        "deleted": [],
    });
    let mut resp = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        manifest.to_string(),
    )
        .into_response();
    if let Some(remaining) = ready.remaining
        && let Some(at) = SystemTime::now().checked_add(remaining)
        && let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(at))
    {
        resp.headers_mut().insert(header::EXPIRES, v);
    }
    resp
}

/// The URL of file `n` of a job, on the FHIR origin or pre-signed on the storage origin.
fn file_url(s: &Shared, job: &str, n: usize, sig: &str, on_storage: bool) -> String {
    if on_storage {
        format!("{}/files/{job}/{n}?sig={sig}", s.storage_origin)
    } else {
        format!("{}/{FILE_PATH}/{job}/{n}", s.base_url())
    }
}

/// `DELETE {base}/bulk/status/{job}`: forgets the job (running or complete) and its files.
pub(super) async fn delete(
    State(s): State<Arc<Shared>>,
    Path(job): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(resp) = gate(&s, &headers).await {
        return resp;
    }
    let removed = {
        let mut inner = s.lock();
        inner.stats.bulk_deletes += 1;
        let now = Instant::now();
        let (delay, expiry) = (s.opts.bulk_delay, s.opts.bulk_expiry);
        match inner.bulk_jobs.remove(&job) {
            Some(j) if !j.expired(now, delay, expiry) => Some(j.client),
            _ => None,
        }
    };
    match removed {
        Some(client) => {
            tracing::info!(client_id = %client, job = %job, "bulk export deleted");
            fhir(
                StatusCode::ACCEPTED,
                &operation_outcome(
                    "information",
                    "informational",
                    "The export and its files were deleted.",
                ),
            )
        }
        None => gone(&job),
    }
}

// ---------- files ----------

/// `GET {base}/bulk/file/{job}/{n}` (bearer token required).
pub(super) async fn file(
    State(s): State<Arc<Shared>>,
    Path((job, n)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(resp) = gate(&s, &headers).await {
        return resp;
    }
    let Lookup::Ready(ready) = lookup(&s, &job) else {
        return gone(&job);
    };
    let Some(n) = file_number(&ready, &n) else {
        return gone(&job);
    };
    let redirect = {
        let mut inner = s.lock();
        inner.stats.bulk_downloads += 1;
        take_fault(&mut inner, |f| *f == Fault::RedirectDownload).is_some()
    };
    if redirect {
        let location = file_url(&s, &job, n, &ready.sig, true);
        let mut resp = StatusCode::TEMPORARY_REDIRECT.into_response();
        if let Ok(v) = HeaderValue::from_str(&location) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        return resp;
    }
    serve_file(&s, &ready, n, &headers)
}

/// Every request to the storage origin: `GET /files/{job}/{n}?sig=...`, no token.
pub(super) async fn storage_file(
    State(s): State<Arc<Shared>>,
    uri: Uri,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    {
        let mut inner = s.lock();
        inner.stats.storage_requests += 1;
        if headers.contains_key(header::AUTHORIZATION) {
            inner.stats.storage_requests_with_authorization += 1;
        }
    }
    let segments: Vec<&str> = uri.path().trim_start_matches('/').split('/').collect();
    let [prefix, job, n] = segments.as_slice() else {
        return storage_not_found();
    };
    if *prefix != "files" {
        return storage_not_found();
    }
    let Lookup::Ready(ready) = lookup(&s, job) else {
        return storage_not_found();
    };
    let sig = url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(k, _)| k == "sig")
        .map(|(_, v)| v.into_owned());
    if sig.as_deref() != Some(ready.sig.as_str()) {
        tracing::warn!(job = %job, "storage request with a missing or wrong signature");
        return error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "The signature of this URL is missing or does not match.",
        );
    }
    let Some(n) = file_number(&ready, n) else {
        return storage_not_found();
    };
    s.lock().stats.bulk_downloads += 1;
    serve_file(&s, &ready, n, &headers)
}

fn storage_not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not-found",
        "No such file on the storage origin.",
    )
}

/// Parses a file number valid for this job (outputs, then the error file).
fn file_number(ready: &ReadyJob, n: &str) -> Option<usize> {
    let n: usize = n.parse().ok()?;
    let files = ready.plan.files.len();
    (n < files || (n == files && ready.plan.error_file)).then_some(n)
}

/// Streams file `n`: gzip when accepted (unless a Range or a `DropDownload` fault asks for the
/// identity encoding), `206` for `Range: bytes=N-`.
fn serve_file(s: &Shared, ready: &ReadyJob, n: usize, headers: &HeaderMap) -> Response {
    let (source, total) = match ready.plan.files.get(n) {
        Some(f) => (
            Source::Resources {
                dataset: s.dataset.clone(),
                selection: ready.selection.clone(),
                resource_type: f.resource_type.clone(),
                patient: f.first_patient,
                skip: f.skip,
                remaining: f.count,
            },
            f.bytes,
        ),
        None => {
            let line = error_line();
            let len = line.len() as u64;
            (Source::Fixed(Some(line)), len)
        }
    };
    let cut_after = match take_fault(&mut s.lock(), |f| matches!(f, Fault::DropDownload { .. })) {
        Some(Fault::DropDownload { after_bytes }) => Some(after_bytes),
        _ => None,
    };
    let range = if cut_after.is_some() {
        None
    } else {
        range_start(headers)
    };
    if let Some(start) = range
        && start >= total
    {
        let mut resp = error(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "invalid",
            "The requested range starts beyond the end of the file.",
        );
        if let Ok(v) = HeaderValue::from_str(&format!("bytes */{total}")) {
            resp.headers_mut().insert(header::CONTENT_RANGE, v);
        }
        return resp;
    }
    let gzip = cut_after.is_none() && range.is_none() && accepts_gzip(headers);
    if let Some(compressed) = ready
        .plan
        .files
        .get(n)
        .and_then(|f| f.gzip.clone())
        .filter(|_| gzip)
    {
        let mut resp = Response::new(Body::from(compressed));
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
        h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        return resp;
    }
    let producer = Producer {
        source,
        skip: range.unwrap_or(0),
        cut_after,
        gzip: gzip.then(|| GzEncoder::new(Vec::new(), Compression::fast())),
        finished: false,
    };
    let stream = futures::stream::unfold(producer, |mut p| async move {
        let piece = p.next_piece()?;
        if piece.is_err() {
            // Let the headers and the bytes before the cut reach the client first.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Some((piece, p))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
    h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    if gzip {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    } else {
        let start = range.unwrap_or(0);
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(total - start));
        if range.is_some() {
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{total}", total - 1)) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
        }
    }
    resp
}

/// `Range: bytes=N-` (the only form honoured; others get the whole file).
fn range_start(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::RANGE)?
        .to_str()
        .ok()?
        .trim()
        .strip_prefix("bytes=")?
        .strip_suffix('-')?
        .trim()
        .parse()
        .ok()
}

/// Whether `Accept-Encoding` lists gzip without `q=0`.
fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';');
            let name = parts.next().unwrap_or_default().trim();
            let refused = parts.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q == 0.0)
            });
            name.eq_ignore_ascii_case("gzip") && !refused
        })
}

/// Where a file's bytes come from.
enum Source {
    /// Resources regenerated patient by patient.
    Resources {
        dataset: Arc<Dataset>,
        selection: Arc<Selection>,
        resource_type: String,
        patient: usize,
        skip: usize,
        remaining: usize,
    },
    /// A small fixed body (the error file).
    Fixed(Option<Bytes>),
}

impl Source {
    /// The next piece of NDJSON (about [`CHUNK`] bytes, whole lines), or `None` at the end.
    fn next_chunk(&mut self) -> Option<Bytes> {
        match self {
            Source::Fixed(body) => body.take(),
            Source::Resources {
                dataset,
                selection,
                resource_type,
                patient,
                skip,
                remaining,
            } => {
                let mut buf = Vec::new();
                while *remaining > 0 && *patient < dataset.patient_count() && buf.len() < CHUNK {
                    let resources = selection.resources(dataset, resource_type, *patient);
                    for resource in resources.iter().skip(*skip).take(*remaining) {
                        if serde_json::to_writer(&mut buf, resource).is_ok() {
                            buf.push(b'\n');
                        }
                        *remaining -= 1;
                    }
                    *skip = 0;
                    *patient += 1;
                }
                (!buf.is_empty()).then(|| Bytes::from(buf))
            }
        }
    }
}

/// Turns a [`Source`] into body pieces: drops the first `skip` bytes (Range), cuts the
/// connection after `cut_after` bytes (`DropDownload`), gzips when asked.
struct Producer {
    source: Source,
    skip: u64,
    cut_after: Option<u64>,
    gzip: Option<GzEncoder<Vec<u8>>>,
    finished: bool,
}

impl Producer {
    fn next_piece(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        loop {
            if self.finished {
                return None;
            }
            if self.cut_after == Some(0) {
                self.finished = true;
                tracing::info!("injected fault: download connection dropped");
                return Some(Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "injected fault: download dropped",
                )));
            }
            let Some(mut chunk) = self.source.next_chunk() else {
                self.finished = true;
                let gz = self.gzip.take()?;
                return match gz.finish() {
                    Ok(tail) if tail.is_empty() => None,
                    Ok(tail) => Some(Ok(Bytes::from(tail))),
                    Err(e) => Some(Err(e)),
                };
            };
            if self.skip > 0 {
                let len = chunk.len() as u64;
                if len <= self.skip {
                    self.skip -= len;
                    continue;
                }
                chunk = chunk.slice(self.skip as usize..);
                self.skip = 0;
            }
            if let Some(left) = self.cut_after.as_mut() {
                if chunk.len() as u64 > *left {
                    chunk.truncate(*left as usize);
                }
                *left -= chunk.len() as u64;
            }
            if let Some(gz) = self.gzip.as_mut() {
                if let Err(e) = gz.write_all(&chunk) {
                    self.finished = true;
                    return Some(Err(e));
                }
                let out = std::mem::take(gz.get_mut());
                if out.is_empty() {
                    continue;
                }
                return Some(Ok(Bytes::from(out)));
            }
            return Some(Ok(chunk));
        }
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn bulk_type_filters_split_on_query_starts_only() {
        assert_eq!(
            split_type_filters("Observation?category=laboratory,vital-signs,Condition?code=1"),
            vec![
                "Observation?category=laboratory,vital-signs".to_string(),
                "Condition?code=1".to_string()
            ]
        );
        assert_eq!(split_type_filters(""), Vec::<String>::new());
    }

    #[test]
    fn bulk_gzip_and_range_headers() {
        let mut h = HeaderMap::new();
        assert!(!accepts_gzip(&h));
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("br, GZIP;q=0.5"),
        );
        assert!(accepts_gzip(&h));
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("gzip;q=0"),
        );
        assert!(!accepts_gzip(&h));
        h.insert(header::RANGE, HeaderValue::from_static("bytes=10-"));
        assert_eq!(range_start(&h), Some(10));
        h.insert(header::RANGE, HeaderValue::from_static("bytes=10-20"));
        assert_eq!(range_start(&h), None);
    }
}
