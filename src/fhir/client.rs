//! `FhirClient`: authorised requests against one FHIR server with bounded retries.
//!
//! - The bearer token is only ever sent to the FHIR base URL's origin and the origins the config trusts
//!   with it (`tokenHosts`, see `trusting`); a URL on another origin, such as a `next` link or a bulk
//!   status URL pointing elsewhere, is refused before any request is made. Download redirects are followed by hand: once a redirect leaves the
//!   origin, the token is no longer sent.
//! - 401: the token is handed back to the `TokenSource` and the request is repeated once with a new one.
//! - 408/429/5xx, timeouts, connection errors and cut-short bodies are retried with `Retry-After` or
//!   exponential backoff with jitter, up to the policy's attempts.
//! - Anything else (400, 403, 404...) is returned at once with the server's OperationOutcome diagnostics
//!   (`brief` leaves them out, for messages that leave the run folder).
//! - Bodies are read with a bound (`body`); of an error answer only a prefix.
//!
//! Errors never contain the URL's query (patient ids) or the token.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode};
use tokio::sync::Semaphore;

use super::ratelimit::RateLimiter;
use super::runlog::{self, EventKind, LogEvent, RunLog};
use crate::auth::{AccessToken, AuthError, TokenSource};
use crate::http::body::{self, BodyError};
use crate::http::retry::{self, RetryPolicy};
use crate::http::{Redirects, Timeout};

/// Redirects followed for one download.
const MAX_REDIRECTS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("HTTP {status}{}", diagnostics.as_ref().map(|d| format!(": {d}")).unwrap_or_default())]
    Status {
        status: u16,
        diagnostics: Option<String>,
        outcome: Option<Box<serde_json::value::RawValue>>,
        /// The server's correlation headers (`runlog::correlation`), to cite to its support.
        correlation: std::collections::BTreeMap<String, String>,
    },
    #[error(
        "the server sent a link to another origin ({origin}); it was not followed and the access token was not sent there"
    )]
    ForeignOrigin { origin: String },
    /// The network failed (connection, timeout, a body cut short); worth trying again later.
    #[error("{0}")]
    Transport(String),
    /// A URL the server sent (a link, a status URL) is not a valid URL.
    #[error("the server sent a link that is not a valid URL")]
    InvalidUrl,
    #[error("the response is larger than {limit} bytes; it was not read")]
    TooLarge { limit: usize },
    #[error("{0}")]
    Auth(#[from] AuthError),
    #[error(
        "the server rejected a freshly issued access token (HTTP 401); check the app's API permissions and the client's user mapping at the site"
    )]
    Unauthorized,
}

impl FetchError {
    /// Errors that make the whole run pointless (authentication), as opposed to one failed request.
    pub fn is_fatal(&self) -> bool {
        matches!(self, FetchError::Auth(_) | FetchError::Unauthorized)
    }

    /// The error without the server's free text (an OperationOutcome's diagnostics may be about a
    /// patient): the status and the outcome's issue codes. For summaries, e-mail and status; the
    /// full text goes to the run folder only.
    pub fn brief(&self) -> String {
        match self {
            FetchError::Status {
                status, outcome, ..
            } => {
                let codes = outcome.as_deref().map(outcome_codes).unwrap_or_default();
                let codes: Vec<String> = codes
                    .into_iter()
                    .filter(|c| {
                        c.len() <= 40 && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    })
                    .collect();
                if codes.is_empty() {
                    format!("HTTP {status}")
                } else {
                    format!("HTTP {status} (OperationOutcome: {})", codes.join(", "))
                }
            }
            other => other.to_string(),
        }
    }

    /// The server's correlation headers, for errors that came with an answer.
    pub fn correlation(&self) -> std::collections::BTreeMap<String, String> {
        match self {
            FetchError::Status { correlation, .. } => correlation.clone(),
            _ => Default::default(),
        }
    }

    /// The HTTP status, for errors that have one.
    pub fn status(&self) -> Option<u16> {
        match self {
            FetchError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Request counters for the summary.
#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub retries: AtomicU64,
    pub renewals: AtomicU64,
}

/// How hard a client may push the server.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Requests started per second; `None` = no limit.
    pub requests_per_second: Option<f64>,
    pub retry: RetryPolicy,
    /// Timeout of one request; for downloads, of each read.
    pub request_timeout: Duration,
}

/// A successful (2xx) response read into memory.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Which failures `fetch` retries by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryMode {
    /// Transport errors and 408/429/5xx.
    All,
    /// Transport errors only: the caller decides about every status (bulk status polling).
    TransportOnly,
}

pub struct FhirClient {
    http: reqwest::Client,
    download_http: reqwest::Client,
    base: url::Url,
    /// Origins the token is sent to: the base URL's, and those the config trusts (`tokenHosts`).
    token_origins: Vec<String>,
    tokens: Arc<TokenSource>,
    retry: RetryPolicy,
    limiter: Option<RateLimiter>,
    in_flight: Semaphore,
    pub counters: Counters,
    /// The run's `log.ndjson` (see `runlog`), shared with the token source's observer.
    pub log: Arc<RunLog>,
}

/// What the last answer of a request said, for the run log.
#[derive(Default)]
struct Last {
    /// When the first attempt was sent (after waiting for a slot among `limits.concurrency` and for
    /// the rate limit): the log's `ms` is the server's time, not the queue's.
    sent: Option<Instant>,
    status: Option<u16>,
    correlation: std::collections::BTreeMap<String, String>,
    progress: Option<String>,
}

impl Last {
    fn sending(&mut self) {
        self.sent.get_or_insert_with(Instant::now);
    }

    fn saw(&mut self, status: StatusCode, headers: &HeaderMap) {
        self.status = Some(status.as_u16());
        self.correlation = runlog::correlation(headers);
        self.progress = runlog::progress(headers);
    }
}

/// A failure as the run log says it: the status and OperationOutcome codes, or the kind of error;
/// never the server's free text.
fn log_error(e: &FetchError) -> String {
    match e {
        FetchError::Status { .. } => e.brief(),
        FetchError::Transport(m) => m.chars().take(300).collect(),
        FetchError::Auth(_) => "authentication failed".into(),
        other => other.to_string(),
    }
}

impl FhirClient {
    pub fn new(
        base: &str,
        tokens: Arc<TokenSource>,
        limits: Limits,
    ) -> Result<Self, url::ParseError> {
        let base = url::Url::parse(&format!("{}/", base.trim_end_matches('/')))?;
        Ok(FhirClient {
            http: crate::http::client(
                Timeout::Total(limits.request_timeout),
                Redirects::SameOrigin,
            ),
            download_http: crate::http::client(
                Timeout::BetweenReads(limits.request_timeout),
                Redirects::None,
            ),
            token_origins: vec![base.origin().ascii_serialization()],
            base,
            tokens,
            retry: limits.retry,
            limiter: limits.requests_per_second.map(RateLimiter::new),
            in_flight: Semaphore::new(limits.concurrency.max(1)),
            counters: Counters::default(),
            log: Arc::new(RunLog::default()),
        })
    }

    /// Also sends the token to these origins (`https://host[:port]`, the config's `tokenHosts`).
    pub fn trusting(mut self, origins: &[String]) -> Self {
        for o in origins {
            if !self.token_origins.contains(o) {
                self.token_origins.push(o.clone());
            }
        }
        self
    }

    /// Whether the token may be sent to `url`'s origin.
    pub fn is_trusted(&self, url: &url::Url) -> bool {
        self.token_origins
            .contains(&url.origin().ascii_serialization())
    }

    /// The absolute URL of `path` (e.g. `Observation?patient=...`) under the base.
    pub fn url(&self, path_and_query: &str) -> String {
        format!("{}{}", self.base, path_and_query)
    }

    /// The FHIR server's origin, e.g. `https://fhir.example.org`.
    pub fn origin(&self) -> String {
        self.base.origin().ascii_serialization()
    }

    pub fn tokens(&self) -> &TokenSource {
        &self.tokens
    }

    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.retry
    }

    /// The requests that failed (the first `runlog::MAX_FAILED_REQUESTS`), as the run log has them.
    pub fn failed_requests(&self) -> Vec<LogEvent> {
        self.log.failed()
    }

    /// Records one finished request in the run log (and among the failed ones if it failed).
    #[allow(clippy::too_many_arguments)]
    fn note(
        &self,
        kind: EventKind,
        method: &Method,
        url: &str,
        started: Instant,
        attempts: u32,
        last: Last,
        bytes: Option<u64>,
        error: Option<&FetchError>,
    ) {
        if attempts == 0 {
            return;
        }
        let event = self.event(kind, method, url, started, attempts, last, bytes, error);
        self.log.record(&event);
    }

    /// The run log's line for a request.
    #[allow(clippy::too_many_arguments)]
    fn event(
        &self,
        kind: EventKind,
        method: &Method,
        url: &str,
        started: Instant,
        attempts: u32,
        last: Last,
        bytes: Option<u64>,
        error: Option<&FetchError>,
    ) -> LogEvent {
        let path = url::Url::parse(url)
            .map(|u| runlog::path_template(&u, &self.base, kind))
            .unwrap_or_else(|_| "{url}".into());
        LogEvent {
            time: jiff::Timestamp::now().to_string(),
            event: kind.as_str().into(),
            method: method.as_str().into(),
            path,
            status: last.status,
            bytes,
            ms: last.sent.unwrap_or(started).elapsed().as_millis() as u64,
            attempts,
            progress: last.progress,
            correlation: last.correlation,
            error: error.map(log_error),
        }
    }

    /// GETs `url` (which must be on a trusted origin) as FHIR JSON and returns the body (at most
    /// `body::MAX_PAGE_BYTES`).
    pub async fn get(&self, url: &str) -> Result<Bytes, FetchError> {
        self.get_as(EventKind::Page, url).await
    }

    /// `get`, logged as `kind`.
    pub async fn get_as(&self, kind: EventKind, url: &str) -> Result<Bytes, FetchError> {
        let accept = [(reqwest::header::ACCEPT, "application/fhir+json")];
        Ok(self
            .fetch(
                kind,
                Method::GET,
                url,
                &accept,
                RetryMode::All,
                body::MAX_PAGE_BYTES,
            )
            .await?
            .body)
    }

    /// Sends an authorised request to `url` (on a trusted origin) and reads the 2xx response, which
    /// may be at most `max_body` bytes.
    /// The request is logged in the run log as `kind`.
    pub async fn fetch(
        &self,
        kind: EventKind,
        method: Method,
        url: &str,
        headers: &[(HeaderName, &str)],
        mode: RetryMode,
        max_body: usize,
    ) -> Result<Reply, FetchError> {
        let started = Instant::now();
        let mut attempts = 0;
        let mut last = Last::default();
        let result = self
            .fetch_attempts(
                &method,
                url,
                headers,
                mode,
                max_body,
                &mut attempts,
                &mut last,
            )
            .await;
        let bytes = result.as_ref().ok().map(|r| r.body.len() as u64);
        let error = result.as_ref().err();
        self.note(kind, &method, url, started, attempts, last, bytes, error);
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn fetch_attempts(
        &self,
        method: &Method,
        url: &str,
        headers: &[(HeaderName, &str)],
        mode: RetryMode,
        max_body: usize,
        attempt: &mut u32,
        last: &mut Last,
    ) -> Result<Reply, FetchError> {
        let parsed = self.trusted_url(url)?;
        let mut renewed = false;
        loop {
            *attempt += 1;
            if let Some(l) = &self.limiter {
                l.wait().await;
            }
            let token = self.tokens.token().await?;
            let outcome = self
                .attempt(method, &parsed, headers, &token, mode, max_body, last)
                .await;
            let (failure, server_wait) = match outcome {
                Attempt::Done(reply) => return Ok(reply),
                Attempt::Fatal(e) => return Err(e),
                Attempt::Unauthorized if renewed => return Err(FetchError::Unauthorized),
                Attempt::Unauthorized => {
                    renewed = true;
                    *attempt -= 1;
                    self.renew(&token).await;
                    continue;
                }
                Attempt::Retry {
                    failure,
                    retry_after,
                } => (failure, retry_after),
            };
            if *attempt >= self.retry.max_attempts {
                return Err(failure.into_final(*attempt));
            }
            self.pause(*attempt, server_wait, &failure.describe()).await;
        }
    }

    /// Opens a download for streaming: follows redirects by hand (the token is sent only while the URL
    /// is on an origin in `token_origins`), renews the token after a 401, and retries 408/429/5xx and
    /// transport errors. `accept` is the `Accept` header; `range_from` asks for the bytes from that
    /// offset on (`Range: bytes=N-`). The request goes to the run log as `kind`: a failure at once, an
    /// opened download when the caller finishes the returned line with the body's size.
    pub async fn open_download(
        &self,
        kind: EventKind,
        url: &str,
        token_origins: &[String],
        accept: &str,
        range_from: Option<u64>,
    ) -> Result<(reqwest::Response, runlog::PendingEvent), FetchError> {
        let started = Instant::now();
        let mut attempts = 0;
        let mut last = Last::default();
        let result = self
            .download_attempts(
                url,
                token_origins,
                accept,
                range_from,
                &mut attempts,
                &mut last,
            )
            .await;
        match result {
            Ok(resp) => {
                let sent = last.sent.unwrap_or(started);
                let event =
                    self.event(kind, &Method::GET, url, started, attempts, last, None, None);
                Ok((
                    resp,
                    runlog::PendingEvent::new(self.log.clone(), event, sent),
                ))
            }
            Err(e) => {
                self.note(
                    kind,
                    &Method::GET,
                    url,
                    started,
                    attempts,
                    last,
                    None,
                    Some(&e),
                );
                Err(e)
            }
        }
    }

    async fn download_attempts(
        &self,
        url: &str,
        token_origins: &[String],
        accept: &str,
        range_from: Option<u64>,
        attempt: &mut u32,
        last: &mut Last,
    ) -> Result<reqwest::Response, FetchError> {
        let start = url::Url::parse(url).map_err(|_| FetchError::InvalidUrl)?;
        let mut renewed = false;
        loop {
            *attempt += 1;
            // No token is fetched for a file that will never get one.
            let token = match token_origins.is_empty() {
                true => None,
                false => Some(self.tokens.token().await?),
            };
            let mut target = start.clone();
            let mut with_token = token_origins.contains(&target.origin().ascii_serialization());
            let mut redirects = 0;
            let failure = loop {
                last.sending();
                self.counters.requests.fetch_add(1, Ordering::Relaxed);
                let mut req = self
                    .download_http
                    .get(target.clone())
                    .header(reqwest::header::ACCEPT, accept);
                if let (true, Some(t)) = (with_token, &token) {
                    req = req.bearer_auth(t.secret());
                }
                if let Some(from) = range_from.filter(|n| *n > 0) {
                    req = req.header(reqwest::header::RANGE, format!("bytes={from}-"));
                }
                let resp = match req.send().await {
                    Ok(r) => r,
                    Err(e) => {
                        *last = Last {
                            sent: last.sent,
                            ..Last::default()
                        };
                        break (
                            Failure::Transport(crate::http::describe_transport(&e)),
                            None,
                        );
                    }
                };
                let status = resp.status();
                last.saw(status, resp.headers());
                if status.is_redirection() && redirects < MAX_REDIRECTS {
                    let Some(next) = resp
                        .headers()
                        .get(reqwest::header::LOCATION)
                        .and_then(|l| l.to_str().ok())
                        .and_then(|l| target.join(l).ok())
                    else {
                        return Err(FetchError::Transport(format!(
                            "HTTP {} without a usable Location header",
                            status.as_u16()
                        )));
                    };
                    redirects += 1;
                    // Once a redirect leaves the trusted origins, the token stays behind for good.
                    with_token =
                        with_token && token_origins.contains(&next.origin().ascii_serialization());
                    target = next;
                    continue;
                }
                if status.is_success() {
                    return Ok(resp);
                }
                if let (true, false, Some(t)) = (
                    status == StatusCode::UNAUTHORIZED && with_token,
                    renewed,
                    &token,
                ) {
                    renewed = true;
                    *attempt -= 1;
                    self.renew(t).await;
                    break (Failure::Transport("HTTP 401".into()), Some(Duration::ZERO));
                }
                if retry::is_retryable_status(status.as_u16()) {
                    let wait = self.retry_after(resp.headers());
                    break (
                        Failure::Status(Box::new(status_error(status.as_u16(), resp).await)),
                        wait,
                    );
                }
                return Err(status_error(status.as_u16(), resp).await);
            };
            let (failure, server_wait) = failure;
            if *attempt >= self.retry.max_attempts {
                return Err(failure.into_final(*attempt));
            }
            if server_wait != Some(Duration::ZERO) {
                self.pause(*attempt, server_wait, &failure.describe()).await;
            }
        }
    }

    /// Waits for the request rate limit (`limits.requestsPerSecond`), for requests that do not go
    /// through `fetch` (downloads of documents from the FHIR server).
    pub async fn pace(&self) {
        if let Some(l) = &self.limiter {
            l.wait().await;
        }
    }

    /// Waits before retry number `attempt`: the server's `Retry-After`, or backoff with jitter.
    pub async fn pause(&self, attempt: u32, server_wait: Option<Duration>, why: &str) {
        let wait = server_wait.unwrap_or_else(|| self.retry.backoff().next(attempt));
        self.counters.retries.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            attempt,
            wait_ms = wait.as_millis() as u64,
            "retrying: {why}"
        );
        tokio::time::sleep(wait).await;
    }

    async fn renew(&self, stale: &AccessToken) {
        self.counters.renewals.fetch_add(1, Ordering::Relaxed);
        tracing::info!("the server answered 401; renewing the access token");
        self.tokens.invalidate(stale).await;
    }

    fn trusted_url(&self, url: &str) -> Result<url::Url, FetchError> {
        let parsed = url::Url::parse(url).map_err(|_| FetchError::InvalidUrl)?;
        if !self.is_trusted(&parsed) {
            return Err(FetchError::ForeignOrigin {
                origin: parsed.origin().ascii_serialization(),
            });
        }
        Ok(parsed)
    }

    fn retry_after(&self, headers: &HeaderMap) -> Option<Duration> {
        headers
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry::parse_retry_after(v, SystemTime::now(), self.retry.max_delay))
    }

    /// One request, holding one of the in-flight permits until its body is read.
    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        method: &Method,
        url: &url::Url,
        headers: &[(HeaderName, &str)],
        token: &AccessToken,
        mode: RetryMode,
        max_body: usize,
        last: &mut Last,
    ) -> Attempt {
        let _permit = self.in_flight.acquire().await;
        last.sending();
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let mut req = self
            .http
            .request(method.clone(), url.clone())
            .bearer_auth(token.secret());
        for (name, value) in headers {
            if let Ok(v) = HeaderValue::from_str(value) {
                req = req.header(name, v);
            }
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                *last = Last {
                    sent: last.sent,
                    ..Last::default()
                };
                return Attempt::Retry {
                    failure: Failure::Transport(crate::http::describe_transport(&e)),
                    retry_after: None,
                };
            }
        };
        let status = resp.status();
        last.saw(status, resp.headers());
        if status.is_success() {
            let headers = resp.headers().clone();
            return match body::read_limited(resp, max_body).await {
                Ok(body) => Attempt::Done(Reply {
                    status,
                    headers,
                    body,
                }),
                Err(BodyError::TooLarge { limit }) => {
                    Attempt::Fatal(FetchError::TooLarge { limit })
                }
                Err(BodyError::Transport(m)) => Attempt::Retry {
                    failure: Failure::Transport(m),
                    retry_after: None,
                },
            };
        }
        if status == StatusCode::UNAUTHORIZED {
            return Attempt::Unauthorized;
        }
        if mode == RetryMode::All && retry::is_retryable_status(status.as_u16()) {
            let retry_after = self.retry_after(resp.headers());
            return Attempt::Retry {
                failure: Failure::Status(Box::new(status_error(status.as_u16(), resp).await)),
                retry_after,
            };
        }
        Attempt::Fatal(status_error(status.as_u16(), resp).await)
    }
}

/// What one attempt came to.
enum Attempt {
    Done(Reply),
    /// Not worth repeating (for this request; whether the run goes on is the caller's call).
    Fatal(FetchError),
    Unauthorized,
    Retry {
        failure: Failure,
        retry_after: Option<Duration>,
    },
}

/// A retryable failure, kept to report if the attempts run out.
enum Failure {
    Transport(String),
    Status(Box<FetchError>),
}

impl Failure {
    fn describe(&self) -> String {
        match self {
            Failure::Transport(m) => m.clone(),
            Failure::Status(e) => e.to_string(),
        }
    }

    fn into_final(self, attempts: u32) -> FetchError {
        match self {
            Failure::Transport(m) => {
                FetchError::Transport(format!("{m} (after {attempts} attempts)"))
            }
            Failure::Status(e) => *e,
        }
    }
}

/// Builds the error for a final non-success status, keeping the server's OperationOutcome.
/// Only a prefix of the body is read (`body::ERROR_PREFIX_BYTES`), for at most 30 seconds.
async fn status_error(status: u16, resp: reqwest::Response) -> FetchError {
    let correlation = runlog::correlation(resp.headers());
    let body = tokio::time::timeout(
        Duration::from_secs(30),
        body::read_prefix(resp, body::ERROR_PREFIX_BYTES),
    )
    .await
    .ok();
    let outcome = body.as_deref().and_then(parse_outcome);
    let diagnostics = outcome.as_deref().and_then(outcome_text);
    FetchError::Status {
        status,
        diagnostics,
        outcome,
        correlation,
    }
}

/// The body as an OperationOutcome, if it is one.
pub fn parse_outcome(body: &[u8]) -> Option<Box<serde_json::value::RawValue>> {
    serde_json::from_slice::<Box<serde_json::value::RawValue>>(body)
        .ok()
        .filter(|raw| {
            crate::fhir::bundle::head(raw).is_ok_and(|h| h.resource_type == "OperationOutcome")
        })
}

/// The first issue's diagnostics or details text of an OperationOutcome, shortened.
pub fn outcome_text(outcome: &serde_json::value::RawValue) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(outcome.get()).ok()?;
    let issue = v.get("issue")?.get(0)?;
    let text = issue
        .get("diagnostics")
        .and_then(|d| d.as_str())
        .or_else(|| issue.pointer("/details/text").and_then(|d| d.as_str()))
        .or_else(|| issue.get("code").and_then(|d| d.as_str()))?;
    Some(text.chars().filter(|c| !c.is_control()).take(300).collect())
}

/// The `code` of every issue of an OperationOutcome (e.g. `transient`, `processing`).
pub fn outcome_codes(outcome: &serde_json::value::RawValue) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(outcome.get()).unwrap_or_default();
    v.get("issue")
        .and_then(|i| i.as_array())
        .map(|issues| {
            issues
                .iter()
                .filter_map(|i| i.get("code")?.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}
