//! `FhirClient`: authorised GETs against one FHIR server with bounded retries.
//!
//! - The bearer token is only ever sent to the FHIR base URL's origin; a URL on another origin (such as a
//!   `next` link pointing elsewhere) is refused before any request is made.
//! - 401: the token is handed back to the `TokenSource` and the request is repeated once with a new one.
//! - 408/429/5xx, timeouts, connection errors and cut-short bodies are retried with `Retry-After` or
//!   exponential backoff with jitter, up to the policy's attempts.
//! - Anything else (400, 403, 404...) is returned at once with the server's OperationOutcome diagnostics.
//!
//! Errors never contain the URL's query (patient ids) or the token.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio::sync::Semaphore;

use super::ratelimit::RateLimiter;
use super::retry::{self, RetryPolicy};
use crate::auth::{AccessToken, AuthError, TokenSource};

/// The largest response body accepted (one search page or one resource).
pub const MAX_BODY_BYTES: usize = 256 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("HTTP {status}{}", diagnostics.as_ref().map(|d| format!(": {d}")).unwrap_or_default())]
    Status {
        status: u16,
        diagnostics: Option<String>,
        outcome: Option<Box<serde_json::value::RawValue>>,
    },
    #[error(
        "the server sent a link to another origin ({origin}); it was not followed and the access token was not sent there"
    )]
    ForeignOrigin { origin: String },
    #[error("{0}")]
    Transport(String),
    #[error("the response is larger than {MAX_BODY_BYTES} bytes")]
    TooLarge,
    #[error("{0}")]
    Auth(#[from] AuthError),
    #[error(
        "the server rejected a freshly issued access token (HTTP 401); check the app's API permissions and the client's user mapping at the site"
    )]
    Unauthorized,
}

impl FetchError {
    /// Errors that make the whole run pointless (authentication), as opposed to one failed search.
    pub fn is_fatal(&self) -> bool {
        matches!(self, FetchError::Auth(_) | FetchError::Unauthorized)
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
}

pub struct FhirClient {
    http: reqwest::Client,
    base: url::Url,
    tokens: Arc<TokenSource>,
    retry: RetryPolicy,
    limiter: Option<RateLimiter>,
    in_flight: Semaphore,
    pub counters: Counters,
}

impl FhirClient {
    pub fn new(
        http: reqwest::Client,
        base: &str,
        tokens: Arc<TokenSource>,
        limits: Limits,
    ) -> Result<Self, String> {
        let base = url::Url::parse(&format!("{}/", base.trim_end_matches('/')))
            .map_err(|e| format!("invalid FHIR base URL: {e}"))?;
        Ok(FhirClient {
            http,
            base,
            tokens,
            retry: limits.retry,
            limiter: limits.requests_per_second.map(RateLimiter::new),
            in_flight: Semaphore::new(limits.concurrency.max(1)),
            counters: Counters::default(),
        })
    }

    /// The absolute URL of `path` (e.g. `Observation?patient=...`) under the base.
    pub fn url(&self, path_and_query: &str) -> String {
        format!("{}{}", self.base, path_and_query)
    }

    pub fn tokens(&self) -> &TokenSource {
        &self.tokens
    }

    /// GETs `url` (which must be on the base's origin) and returns the body.
    pub async fn get(&self, url: &str) -> Result<Bytes, FetchError> {
        let parsed = url::Url::parse(url).map_err(|_| {
            FetchError::Transport("the server sent a link that is not a valid URL".into())
        })?;
        if parsed.origin() != self.base.origin() {
            return Err(FetchError::ForeignOrigin {
                origin: parsed.origin().ascii_serialization(),
            });
        }
        let mut attempt = 0u32;
        let mut renewed = false;
        loop {
            attempt += 1;
            if let Some(l) = &self.limiter {
                l.wait().await;
            }
            let token = self.tokens.token().await?;
            let (failure, server_wait) = match self.attempt(&parsed, &token).await {
                Attempt::Done(body) => return Ok(body),
                Attempt::Fatal(e) => return Err(e),
                Attempt::Unauthorized if renewed => return Err(FetchError::Unauthorized),
                Attempt::Unauthorized => {
                    renewed = true;
                    attempt -= 1;
                    self.counters.renewals.fetch_add(1, Ordering::Relaxed);
                    tracing::info!("the server answered 401; renewing the access token");
                    self.tokens.invalidate(&token).await;
                    continue;
                }
                Attempt::Retry {
                    failure,
                    retry_after,
                } => (failure, retry_after),
            };
            if attempt >= self.retry.max_attempts {
                return Err(failure.into_final(attempt));
            }
            let wait = server_wait
                .unwrap_or_else(|| retry::backoff(&self.retry, attempt, retry::jitter_unit()));
            self.counters.retries.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                attempt,
                wait_ms = wait.as_millis() as u64,
                "retrying: {}",
                failure.describe()
            );
            tokio::time::sleep(wait).await;
        }
    }

    /// One request, holding one of the in-flight permits until its body is read.
    async fn attempt(&self, url: &url::Url, token: &AccessToken) -> Attempt {
        let _permit = self.in_flight.acquire().await;
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let sent = self
            .http
            .get(url.clone())
            .bearer_auth(token.secret())
            .header(reqwest::header::ACCEPT, "application/fhir+json")
            .send()
            .await;
        let resp = match sent {
            Ok(r) => r,
            Err(e) => {
                return Attempt::Retry {
                    failure: Failure::Transport(super::describe_transport(&e)),
                    retry_after: None,
                };
            }
        };
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            return match read_body(resp).await {
                Ok(body) => Attempt::Done(body),
                Err(BodyError::TooLarge) => Attempt::Fatal(FetchError::TooLarge),
                Err(BodyError::Transport(m)) => Attempt::Retry {
                    failure: Failure::Transport(m),
                    retry_after: None,
                },
            };
        }
        if status == 401 {
            return Attempt::Unauthorized;
        }
        if retry::is_retryable_status(status) {
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| retry::parse_retry_after(v, SystemTime::now(), self.retry.max_delay));
            return Attempt::Retry {
                failure: Failure::Status(Box::new(status_error(status, resp).await)),
                retry_after,
            };
        }
        Attempt::Fatal(status_error(status, resp).await)
    }
}

/// What one attempt came to.
enum Attempt {
    Done(Bytes),
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

enum BodyError {
    TooLarge,
    Transport(String),
}

async fn read_body(resp: reqwest::Response) -> Result<Bytes, BodyError> {
    if resp
        .content_length()
        .is_some_and(|n| n as usize > MAX_BODY_BYTES)
    {
        return Err(BodyError::TooLarge);
    }
    let mut buf =
        BytesMut::with_capacity(resp.content_length().unwrap_or(16 * 1024).min(8 << 20) as usize);
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| BodyError::Transport(super::describe_transport(&e)))?;
        if buf.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(BodyError::TooLarge);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// Builds the error for a final non-success status, keeping the server's OperationOutcome.
async fn status_error(status: u16, resp: reqwest::Response) -> FetchError {
    let body = tokio::time::timeout(Duration::from_secs(30), read_body(resp))
        .await
        .ok()
        .and_then(Result::ok);
    let outcome: Option<Box<serde_json::value::RawValue>> = body
        .as_deref()
        .and_then(|b| serde_json::from_slice::<Box<serde_json::value::RawValue>>(b).ok())
        .filter(|raw| {
            crate::fhir::bundle::head(raw).is_ok_and(|h| h.resource_type == "OperationOutcome")
        });
    let diagnostics = outcome.as_deref().and_then(outcome_text);
    FetchError::Status {
        status,
        diagnostics,
        outcome,
    }
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
    Some(text.chars().take(300).collect())
}
