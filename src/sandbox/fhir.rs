//! The sandbox's FHIR R4 side: bearer-token checks, latency and faults, reads of `Patient/{id}`
//! and of the shared catalogue types, per-patient searches and `_id` searches, with Epic-like
//! paging.
//!
//! Searches return `searchset` Bundles whose `next` links are opaque (`?sessionID=...&page=N`,
//! backed by a server-side session that expires after 10 idle minutes). Every second page is
//! deliberately half as long as the others and still has a `next` link, and some first pages
//! carry an OperationOutcome entry (`search.mode = outcome`), as on Epic. The catalogue types
//! (Medication, Practitioner, PractitionerRole, Organization, Location) are searchable by `_id`
//! only (comma lists and repeated `_id` parameters; unknown ids are left out), never per
//! patient. The resources themselves come from `data.rs`; token issuing is in `token.rs`,
//! Binary reads in `binary.rs`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{CATALOGUE_TYPES, Fault, SEARCH_TYPES, Shared};

/// Idle time after which a paging session is forgotten.
const SESSION_TTL: Duration = Duration::from_secs(600);
pub(super) const FHIR_JSON: &str = "application/fhir+json";

/// What a paging session remembers between pages.
#[derive(Debug, Clone)]
pub(super) struct Session {
    resource_type: String,
    scope: Scope,
    filters: Filters,
    page_size: usize,
    last_used: Instant,
}

/// Which resources a search looks at.
#[derive(Debug, Clone)]
enum Scope {
    /// One patient's resources of the type (for `Patient`: that patient).
    Patient(String),
    /// Catalogue resources by id (`_id`), in the order asked, each once.
    Ids(Vec<String>),
}

/// Token filters: every inner list must match (AND across parameters), by any of its codes
/// (OR within a comma list). Codes may be given as `system|code`; only the code is compared.
#[derive(Debug, Clone, Default)]
pub(super) struct Filters {
    category: Vec<Vec<String>>,
    code: Vec<Vec<String>>,
}

impl Filters {
    /// The `category` and `code` parameters among `params` (others are not looked at).
    pub(super) fn from_params(params: &[(String, String)]) -> Filters {
        let lists = |name: &str| -> Vec<Vec<String>> {
            params
                .iter()
                .filter(|(k, _)| k == name)
                .map(|(_, v)| token_list(v))
                .collect()
        };
        Filters {
            category: lists("category"),
            code: lists("code"),
        }
    }

    pub(super) fn matches(&self, resource: &Value) -> bool {
        let all = |lists: &[Vec<String>], codes: &[&str]| {
            lists
                .iter()
                .all(|wanted| wanted.iter().any(|w| codes.contains(&w.as_str())))
        };
        all(&self.category, &codes_of(resource, "category"))
            && all(&self.code, &codes_of(resource, "code"))
    }
}

/// The coding codes under `field` (a CodeableConcept or a list of them).
fn codes_of<'a>(resource: &'a Value, field: &str) -> Vec<&'a str> {
    let concepts: Vec<&Value> = match resource.get(field) {
        Some(Value::Array(a)) => a.iter().collect(),
        Some(v) => vec![v],
        None => Vec::new(),
    };
    concepts
        .into_iter()
        .filter_map(|c| c.get("coding").and_then(Value::as_array))
        .flatten()
        .filter_map(|c| c.get("code").and_then(Value::as_str))
        .collect()
}

fn token_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(|t| t.rsplit('|').next().unwrap_or(t).trim().to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

/// A FHIR JSON response.
pub(super) fn fhir(status: StatusCode, body: &Value) -> Response {
    let bytes = body.to_string();
    (status, [(header::CONTENT_TYPE, FHIR_JSON)], bytes).into_response()
}

pub(super) fn operation_outcome(severity: &str, code: &str, diagnostics: &str) -> Value {
    json!({
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    })
}

pub(super) fn error(status: StatusCode, code: &str, diagnostics: &str) -> Response {
    fhir(status, &operation_outcome("error", code, diagnostics))
}

/// Fallback for every unknown path.
pub(super) async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not-supported",
        "The requested URL is not a supported endpoint.",
    )
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The configured latency: a FHIR or Bulk Data request is answered `latency` after it arrived, its
/// own processing included (like a server's response time; sleeping after the work would add it).
pub(super) async fn emulate_latency(
    State(s): State<Arc<Shared>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let due = Instant::now() + s.opts.latency;
    let resp = next.run(req).await;
    let early = Duration::from_micros(s.wake_early_us.load(Ordering::Relaxed).max(0) as u64);
    let left = due
        .checked_sub(early)
        .unwrap_or(due)
        .saturating_duration_since(Instant::now());
    if !left.is_zero() {
        // tokio's timer works in whole milliseconds and wakes up to 2 ms late (22 ms for 20 ms,
        // measured); a blocking-pool thread's sleep is within about 0.1 ms, and the hand-offs to and
        // from that thread add about 0.2 ms, which the next sleeps take off (a quarter of each
        // error at a time, within 0-2 ms).
        let _ = tokio::task::spawn_blocking(move || {
            exact_sleeps();
            std::thread::sleep(left)
        })
        .await;
        let now = Instant::now();
        let late_us = match now.checked_duration_since(due) {
            Some(late) => late.as_micros() as i64,
            None => -(due.duration_since(now).as_micros() as i64),
        };
        let _ = s
            .wake_early_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |e| {
                Some((e + late_us / 4).clamp(0, 2000))
            });
    }
    resp
}

/// Makes this thread's sleeps end on time: Linux lets a sleep run over by the thread's timer slack
/// (50 µs by default) to batch wake-ups.
#[cfg(target_os = "linux")]
fn exact_sleeps() {
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer and changes only the calling thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
}

#[cfg(not(target_os = "linux"))]
fn exact_sleeps() {}

/// Everything a FHIR request goes through before being served: the `RevokeTokens` fault, the
/// bearer token, the other queued faults, then the random 429/503 rolls. Returns the
/// client id the token was issued to.
pub(super) async fn gate(s: &Shared, headers: &HeaderMap) -> Result<String, Response> {
    let authorized = {
        let mut inner = s.lock();
        inner.stats.fhir_requests += 1;
        let first_general = inner.faults.iter().position(Fault::is_general);
        if let Some(i) = first_general.filter(|i| inner.faults[*i] == Fault::RevokeTokens) {
            inner.faults.remove(i);
            inner.tokens.clear();
            inner.stats.injected_faults += 1;
            tracing::info!("injected fault: all access tokens revoked");
        }
        let now = Instant::now();
        let client = bearer(headers)
            .and_then(|t| inner.tokens.get(t))
            .filter(|(exp, _)| *exp > now)
            .map(|(_, client)| client.clone());
        if client.is_none() {
            inner.stats.unauthorized += 1;
        }
        client
    };
    let Some(client) = authorized else {
        let mut resp = error(
            StatusCode::UNAUTHORIZED,
            "login",
            "The access token is missing, invalid or expired.",
        );
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
        return Err(resp);
    };
    let mut inner = s.lock();
    // The first queued fault that any FHIR request can take; the bulk-specific ones wait for
    // their kind of request (see `bulk.rs`).
    let fault = inner
        .faults
        .iter()
        .position(Fault::is_general)
        .filter(|i| inner.faults[*i] != Fault::RevokeTokens)
        .and_then(|i| inner.faults.remove(i));
    match fault {
        Some(Fault::Status {
            status,
            retry_after,
        }) => {
            inner.stats.injected_faults += 1;
            tracing::info!(status, "injected fault: status");
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return Err(fault_response(status, retry_after.as_deref()));
        }
        Some(Fault::ForeignNextLink { origin }) => {
            inner.stats.injected_faults += 1;
            inner.foreign_origins.push_back(origin);
        }
        Some(_) | None => {}
    }
    let (r429, r5xx) = (s.opts.rate_429.max(0.0), s.opts.rate_5xx.max(0.0));
    if r429 > 0.0 || r5xx > 0.0 {
        let roll = inner.rng.unit();
        if roll < r429 {
            inner.stats.random_faults += 1;
            return Err(fault_response(StatusCode::TOO_MANY_REQUESTS, Some("1")));
        }
        if roll < r429 + r5xx {
            inner.stats.random_faults += 1;
            return Err(fault_response(StatusCode::SERVICE_UNAVAILABLE, None));
        }
    }
    Ok(client)
}

fn fault_response(status: StatusCode, retry_after: Option<&str>) -> Response {
    let code = match status.as_u16() {
        429 => "throttled",
        500..=599 => "transient",
        _ => "processing",
    };
    let mut resp = error(
        status,
        code,
        &format!("Simulated failure: HTTP {}", status.as_u16()),
    );
    if let Some(value) = retry_after.and_then(|v| HeaderValue::from_str(v).ok()) {
        resp.headers_mut().insert(header::RETRY_AFTER, value);
    }
    resp
}

/// `GET {base}/{Type}/{id}`: reads of `Patient` and of the catalogue types (`Binary` has its
/// own route).
pub(super) async fn read(
    State(s): State<Arc<Shared>>,
    Path((resource_type, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(resp) = gate(&s, &headers).await {
        return resp;
    }
    if CATALOGUE_TYPES.contains(&resource_type.as_str()) {
        *s.lock()
            .stats
            .reads_by_type
            .entry(resource_type.clone())
            .or_default() += 1;
        return match s.dataset.catalogue_resource(&resource_type, &id) {
            Some(resource) => fhir(StatusCode::OK, &resource),
            None => error(
                StatusCode::NOT_FOUND,
                "not-found",
                &format!("{resource_type}/{id} was not found."),
            ),
        };
    }
    if resource_type == "Patient" {
        return match s.dataset.resources("Patient", &id).into_iter().next() {
            Some(patient) => fhir(StatusCode::OK, &patient),
            None => error(
                StatusCode::NOT_FOUND,
                "not-found",
                &format!("Patient/{id} was not found."),
            ),
        };
    }
    if SEARCH_TYPES.contains(&resource_type.as_str()) {
        return error(
            StatusCode::NOT_FOUND,
            "not-supported",
            &format!(
                "{resource_type}.Read is not supported by the sandbox; search by patient instead."
            ),
        );
    }
    error(
        StatusCode::NOT_FOUND,
        "not-supported",
        &format!("Unknown resource type {resource_type}."),
    )
}

/// `GET {base}/{Type}?...`: a new search, or a further page of one (`sessionID`).
pub(super) async fn search(
    State(s): State<Arc<Shared>>,
    Path(resource_type): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    if let Err(resp) = gate(&s, &headers).await {
        return resp;
    }
    let query = query.unwrap_or_default();
    let params: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let self_url = if query.is_empty() {
        format!("{}/{resource_type}", s.base_url())
    } else {
        format!("{}/{resource_type}?{query}", s.base_url())
    };

    if let Some(sid) = param("sessionID") {
        let page = match param("page").map(str::parse::<usize>) {
            None => 1,
            Some(Ok(p)) if p >= 1 => p,
            Some(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    "Invalid page parameter.",
                );
            }
        };
        let session = {
            let mut inner = s.lock();
            let now = Instant::now();
            match inner.sessions.get_mut(sid) {
                Some(session)
                    if session.resource_type == resource_type
                        && now.duration_since(session.last_used) < SESSION_TTL =>
                {
                    session.last_used = now;
                    Some(session.clone())
                }
                _ => None,
            }
        };
        let Some(session) = session else {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid",
                "The search session is unknown or has expired; repeat the search from the start.",
            );
        };
        return page_response(&s, &session, Some(sid), page, &self_url);
    }

    let (scope, filters) = match new_search(&resource_type, &params) {
        Ok(found) => found,
        Err(resp) => return resp,
    };
    if let Scope::Ids(ids) = &scope {
        let mut inner = s.lock();
        inner.stats.id_searches += 1;
        inner.stats.id_search_ids += ids.len() as u64;
    }
    let page_size = match param("_count").map(str::parse::<usize>) {
        Some(Ok(n)) if n >= 1 => n.min(s.opts.page_size.max(1)),
        _ => s.opts.page_size.max(1),
    };
    let session = Session {
        resource_type,
        scope,
        filters,
        page_size,
        last_used: Instant::now(),
    };
    page_response(&s, &session, None, 1, &self_url)
}

/// Validates a new search's parameters like Epic; returns what to search and the filters.
#[allow(clippy::result_large_err)]
fn new_search(
    resource_type: &str,
    params: &[(String, String)],
) -> Result<(Scope, Filters), Response> {
    let values = |name: &str| -> Vec<&str> {
        params
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    if CATALOGUE_TYPES.contains(&resource_type) {
        // Every `_id` parameter, comma lists split; each id once, in the order asked.
        let mut ids: Vec<String> = Vec::new();
        let mut asked = false;
        for id in values("_id").into_iter().flat_map(|v| v.split(',')) {
            asked = true;
            let id = id.trim();
            let id = id.rsplit('/').next().unwrap_or(id);
            if !id.is_empty() && !ids.iter().any(|x| x == id) {
                ids.push(id.to_string());
            }
        }
        if !asked {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "required",
                &format!(
                    "A search parameter is required: {resource_type} can only be searched by _id."
                ),
            ));
        }
        return Ok((Scope::Ids(ids), Filters::default()));
    }
    if resource_type == "Patient" {
        return match values("_id").first() {
            Some(id) => Ok((Scope::Patient(id.to_string()), Filters::default())),
            None => Err(error(
                StatusCode::BAD_REQUEST,
                "required",
                "This resource requires demographics or _id parameter for searching.",
            )),
        };
    }
    if !SEARCH_TYPES.contains(&resource_type) {
        return Err(error(
            StatusCode::NOT_FOUND,
            "not-supported",
            &format!("Unknown resource type {resource_type}."),
        ));
    }
    let patient = values("patient")
        .first()
        .or(values("subject").first())
        .map(|p| p.strip_prefix("Patient/").unwrap_or(p).to_string());
    let Some(patient) = patient.filter(|p| !p.is_empty()) else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "required",
            "Required search parameter missing: patient.",
        ));
    };
    let filters = Filters::from_params(params);
    if resource_type == "Observation" && filters.category.is_empty() && filters.code.is_empty() {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "required",
            "Must have either code or category. Observation searches must include category or code.",
        ));
    }
    Ok((Scope::Patient(patient), filters))
}

/// Page `n` (1-based) has `page_size` entries when odd and half that (at least 1) when even.
fn page_len(page_size: usize, n: usize) -> usize {
    if n.is_multiple_of(2) {
        (page_size / 2).max(1)
    } else {
        page_size
    }
}

/// Where page `n` starts, or `None` if it starts beyond `total`.
fn page_offset(page_size: usize, n: usize, total: usize) -> Option<usize> {
    let mut offset = 0;
    for k in 1..n {
        offset += page_len(page_size, k);
        if offset > total {
            return None;
        }
    }
    Some(offset)
}

/// Stores a paging session (dropping idle ones) and returns its id.
fn start_session(s: &Shared, session: &Session) -> String {
    let sid = uuid::Uuid::new_v4().to_string();
    let mut inner = s.lock();
    let now = Instant::now();
    inner
        .sessions
        .retain(|_, v| now.duration_since(v.last_used) < SESSION_TTL);
    inner.sessions.insert(sid.clone(), session.clone());
    sid
}

/// Renders one page. `sid` is `None` for the first page of a new search; a session is then
/// created only if a `next` link is needed.
fn page_response(
    s: &Shared,
    session: &Session,
    sid: Option<&str>,
    page: usize,
    self_url: &str,
) -> Response {
    let base = s.base_url();
    let rt = session.resource_type.as_str();
    let found = match &session.scope {
        Scope::Patient(patient) => s.dataset.resources(rt, patient),
        Scope::Ids(ids) => ids
            .iter()
            .filter_map(|id| s.dataset.catalogue_resource(rt, id))
            .collect(),
    };
    let matches: Vec<Value> = found
        .into_iter()
        .filter(|r| session.filters.matches(r))
        .collect();
    let total = matches.len();
    let Some(offset) = page_offset(session.page_size, page, total) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid",
            "The requested page does not exist.",
        );
    };
    let end = (offset + page_len(session.page_size, page)).min(total);
    let mut links = vec![json!({"relation": "self", "url": self_url})];
    if end < total {
        let sid = match sid {
            Some(sid) => sid.to_string(),
            None => start_session(s, session),
        };
        let mut next = format!("{base}/{rt}?sessionID={sid}&page={}", page + 1);
        if let Some(origin) = s.lock().foreign_origins.pop_front() {
            tracing::info!(%origin, "injected fault: next link moved to a foreign origin");
            let path_and_query = next.strip_prefix(s.origin.as_str()).unwrap_or(&next);
            next = format!("{}{path_and_query}", origin.trim_end_matches('/'));
        }
        links.push(json!({"relation": "next", "url": next}));
    }
    let mut entries: Vec<Value> = Vec::with_capacity(end - offset + 1);
    for resource in matches.into_iter().skip(offset).take(end - offset) {
        let id = resource
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default();
        entries.push(json!({
            "fullUrl": format!("{base}/{rt}/{id}"),
            "resource": resource,
            "search": {"mode": "match"},
        }));
    }
    let outcome = match &session.scope {
        Scope::Patient(patient) => s.dataset.search_has_outcome(rt, patient),
        Scope::Ids(_) => false,
    };
    if page == 1 && outcome {
        entries.push(json!({
            "resource": operation_outcome(
                "warning",
                "informational",
                "Some results may not be available. Additional data may be present in other systems.",
            ),
            "search": {"mode": "outcome"},
        }));
    }
    fhir(
        StatusCode::OK,
        &json!({
            "resourceType": "Bundle",
            "id": uuid::Uuid::new_v4().to_string(),
            "type": "searchset",
            "total": total,
            "link": links,
            "entry": entries,
        }),
    )
}

/// `GET {base}/metadata`: a minimal CapabilityStatement (no token needed, like Epic), with the
/// token endpoint in the SMART `oauth-uris` extension for clients that discover that way.
pub(super) async fn metadata(State(s): State<Arc<Shared>>) -> Response {
    let by_id = json!([{"name": "_id", "type": "token"}]);
    let mut resources: Vec<Value> = std::iter::once("Patient")
        .chain(SEARCH_TYPES.iter().copied())
        .map(|t| {
            let interaction = if t == "Patient" {
                json!([{"code": "read"}, {"code": "search-type"}])
            } else {
                json!([{"code": "search-type"}])
            };
            json!({"type": t, "interaction": interaction})
        })
        .collect();
    resources.extend(CATALOGUE_TYPES.iter().map(|t| {
        json!({
            "type": t,
            "interaction": [{"code": "read"}, {"code": "search-type"}],
            "searchParam": by_id,
        })
    }));
    resources.push(json!({"type": "Binary", "interaction": [{"code": "read"}]}));
    fhir(
        StatusCode::OK,
        &json!({
            "resourceType": "CapabilityStatement",
            "status": "active",
            "kind": "instance",
            "fhirVersion": "4.0.1",
            "format": ["json"],
            "implementation": {"description": "epic-export sandbox", "url": s.base_url()},
            "rest": [{
                "mode": "server",
                "security": {
                    "extension": [{
                        "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                        "extension": [{"url": "token", "valueUri": s.token_url()}],
                    }],
                    "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR"}]}],
                },
                "resource": resources,
            }],
        }),
    )
}
