//! `TokenSource`: gets SMART backend access tokens and keeps one valid.
//!
//! It signs a fresh client assertion for every token request (retries included), caches the token,
//! renews it shortly before `expires_in` runs out, and lets concurrent callers share one renewal (the
//! renewal runs under a lock; callers that queued behind it get the new token). After a 401 the caller
//! hands back the token it used (`invalidate`), so a burst of 401s on one stale token renews it once.
//! The token is never printed: `AccessToken`'s `Debug` is redacted and errors never carry it.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;
use tokio::sync::Mutex;

use super::assertion;
use super::keys::SigningKey;
use crate::http::body;
use crate::http::retry::{self, RetryPolicy};

/// A bearer token. Cloning is cheap; `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken(Arc<str>);

impl AccessToken {
    /// The secret itself, for the `Authorization` header only.
    pub fn secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AccessToken(<redacted>)")
    }
}

/// What the token endpoint granted, without the token.
#[derive(Clone, Debug)]
pub struct Grant {
    pub scope: Option<String>,
    pub expires_in: Duration,
    pub token_type: String,
    /// The server's `Date` header, for measuring clock skew.
    pub server_date: Option<SystemTime>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(
        "the token endpoint {token_url} answered invalid_client{description}. Epic gives no reason; the usual causes are:\n  \
         - the client id belongs to another environment (non-production vs production ids differ)\n  \
         - the assertion's aud must be the token URL exactly (we sent {token_url})\n  \
         - the public key is not registered for this client, or not yet propagated (sandbox changes can take hours)\n  \
         - the kid we sent ({kid}) matches no key in the registered JWKS or at the JWK Set URL (auth.jwksUrl), or the key published under it is another one\n  \
         - clock skew: the assertion expires {lifetime} s after our clock{skew}\n\
         Run `epic-export check --config FILE` for these checks."
    )]
    InvalidClient {
        token_url: String,
        description: String,
        kid: String,
        lifetime: i64,
        skew: String,
    },
    #[error(
        "the token endpoint {token_url} refused the request: HTTP {status} {error}{description}"
    )]
    Rejected {
        token_url: String,
        status: u16,
        error: String,
        description: String,
    },
    #[error("the token endpoint {token_url} answered HTTP {status} {attempts} times; giving up")]
    Unavailable {
        token_url: String,
        status: u16,
        attempts: u32,
    },
    #[error("cannot reach the token endpoint {token_url}: {message}")]
    Transport { token_url: String, message: String },
    #[error(
        "the token endpoint {token_url} sent a response without a usable access_token: {detail}"
    )]
    BadResponse { token_url: String, detail: String },
    #[error("cannot build the client assertion: {0}")]
    Assertion(String),
    #[error("cannot discover the token URL from {url}: {detail}; set fhir.tokenUrl in the config")]
    Discovery { url: String, detail: String },
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: Option<String>,
    token_type: Option<String>,
    #[serde(default, deserialize_with = "number_or_string")]
    expires_in: Option<f64>,
    scope: Option<String>,
}

#[derive(Deserialize, Default)]
struct OAuthError {
    error: Option<String>,
    error_description: Option<String>,
}

/// `expires_in` as sent: a number, or a string holding one (some servers send that); anything else
/// counts as absent. Checked and clamped by `token_lifetime`.
fn number_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    Ok(match Option::<serde_json::Value>::deserialize(d)? {
        Some(serde_json::Value::Number(n)) => n.as_f64(),
        Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    })
}

/// The shortest and longest token lifetimes believed, whatever `expires_in` says.
pub const MIN_TOKEN_LIFETIME: Duration = Duration::from_secs(1);
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// The lifetime assumed without a usable `expires_in` (SMART's recommended five minutes).
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(300);

/// How long a token is used, from the server's `expires_in` (absent, zero, negative, not a number or
/// absurdly large: never a panic). Clamped to [1 s, 24 h]; without a finite number, 300 s.
pub fn token_lifetime(expires_in: Option<f64>) -> Duration {
    match expires_in.filter(|s| s.is_finite()) {
        None => DEFAULT_TOKEN_LIFETIME,
        Some(secs) => Duration::from_secs_f64(secs.clamp(
            MIN_TOKEN_LIFETIME.as_secs_f64(),
            MAX_TOKEN_LIFETIME.as_secs_f64(),
        )),
    }
}

struct Cached {
    token: AccessToken,
    renew_at: Instant,
}

/// Settings for a `TokenSource`.
pub struct TokenSourceConfig {
    pub client_id: String,
    pub token_url: String,
    pub scope: String,
    pub key: SigningKey,
    pub jku: Option<String>,
}

pub struct TokenSource {
    http: reqwest::Client,
    cfg: TokenSourceConfig,
    retry: RetryPolicy,
    cached: Mutex<Option<Cached>>,
    observer: std::sync::OnceLock<TokenObserver>,
}

/// What one token request (retries included) came to, for the run log: never the token or the
/// assertion.
#[derive(Clone, Debug, Default)]
pub struct TokenRequestInfo {
    /// The token endpoint's URL path.
    pub path: String,
    /// The last HTTP status; `None` when no answer came.
    pub status: Option<u16>,
    pub elapsed: Duration,
    pub attempts: u32,
    /// The correlation headers of the last answer (see `fhir::runlog::correlation`).
    pub correlation: std::collections::BTreeMap<String, String>,
    /// `HTTP <status>`, or the kind of failure, if the request failed.
    pub error: Option<String>,
}

/// Called after every token request.
pub type TokenObserver = Box<dyn Fn(TokenRequestInfo) + Send + Sync>;

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSource")
            .field("client_id", &self.cfg.client_id)
            .field("token_url", &self.cfg.token_url)
            .finish_non_exhaustive()
    }
}

/// How long before expiry a token is renewed: a minute, or a fifth of a short lifetime.
pub fn renew_margin(lifetime: Duration) -> Duration {
    (lifetime / 5).min(Duration::from_secs(60))
}

impl TokenSource {
    pub fn new(http: reqwest::Client, cfg: TokenSourceConfig) -> Self {
        TokenSource {
            http,
            cfg,
            retry: RetryPolicy {
                max_attempts: 4,
                ..RetryPolicy::default()
            },
            cached: Mutex::new(None),
            observer: std::sync::OnceLock::new(),
        }
    }

    /// Calls `f` after every token request from now on (the run log); only the first observer set counts.
    pub fn observe(&self, f: TokenObserver) {
        let _ = self.observer.set(f);
    }

    pub fn token_url(&self) -> &str {
        &self.cfg.token_url
    }

    /// The key the assertions are signed with (for checks that compare its public half).
    pub fn key(&self) -> &SigningKey {
        &self.cfg.key
    }

    /// A valid token: the cached one, or a new one. Concurrent callers share one renewal.
    pub async fn token(&self) -> Result<AccessToken, AuthError> {
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref()
            && Instant::now() < c.renew_at
        {
            return Ok(c.token.clone());
        }
        let (token, grant) = self.request().await?;
        let now = Instant::now();
        let renew_at = now
            .checked_add(
                grant
                    .expires_in
                    .saturating_sub(renew_margin(grant.expires_in)),
            )
            .unwrap_or(now);
        *cached = Some(Cached {
            token: token.clone(),
            renew_at,
        });
        Ok(token)
    }

    /// Forgets `stale` after the server answered 401 to it; the next `token()` renews.
    /// A token that was already replaced is left alone, so many 401s cause one renewal.
    pub async fn invalidate(&self, stale: &AccessToken) {
        let mut cached = self.cached.lock().await;
        if cached.as_ref().is_some_and(|c| &c.token == stale) {
            *cached = None;
        }
    }

    /// One token request (with retries on 429/5xx/transport errors, each with a new assertion).
    pub async fn request(&self) -> Result<(AccessToken, Grant), AuthError> {
        let started = Instant::now();
        let mut info = TokenRequestInfo {
            path: url::Url::parse(&self.cfg.token_url)
                .map(|u| u.path().to_owned())
                .unwrap_or_else(|_| "{url}".into()),
            ..TokenRequestInfo::default()
        };
        let result = self.request_attempts(&mut info).await;
        if let Some(observe) = self.observer.get() {
            info.elapsed = started.elapsed();
            if let Err(e) = &result {
                info.error = Some(match (e, info.status) {
                    (AuthError::Transport { .. }, _) | (_, None) => "token request failed".into(),
                    (_, Some(s)) => format!("HTTP {s}"),
                });
            }
            observe(info);
        }
        result
    }

    async fn request_attempts(
        &self,
        info: &mut TokenRequestInfo,
    ) -> Result<(AccessToken, Grant), AuthError> {
        let url = &self.cfg.token_url;
        let mut attempt = 0;
        loop {
            attempt += 1;
            info.attempts = attempt;
            let jti = assertion::new_jti();
            let now = unix_now();
            let claims = assertion::claims(&self.cfg.client_id, url, &jti, now);
            let jwt = assertion::sign(&self.cfg.key, self.cfg.jku.as_deref(), &claims)
                .map_err(|e| AuthError::Assertion(e.to_string()))?;
            let form = [
                ("grant_type", "client_credentials"),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", jwt.as_str()),
                ("scope", self.cfg.scope.as_str()),
            ];
            let sent = self
                .http
                .post(url)
                .header("Accept", "application/json")
                .form(&form)
                .send()
                .await;
            info.status = None;
            info.correlation.clear();
            let resp = match sent {
                Ok(r) => r,
                Err(e) if attempt < self.retry.max_attempts => {
                    tracing::warn!(
                        attempt,
                        "token request failed ({}); retrying",
                        crate::http::describe_transport(&e)
                    );
                    tokio::time::sleep(self.retry.backoff().next(attempt)).await;
                    continue;
                }
                Err(e) => {
                    return Err(AuthError::Transport {
                        token_url: url.clone(),
                        message: crate::http::describe_transport(&e),
                    });
                }
            };
            let status = resp.status().as_u16();
            info.status = Some(status);
            info.correlation = crate::fhir::runlog::correlation(resp.headers());
            let server_date = resp
                .headers()
                .get(reqwest::header::DATE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| httpdate::parse_http_date(v).ok());
            if retry::is_retryable_status(status) {
                if attempt >= self.retry.max_attempts {
                    return Err(AuthError::Unavailable {
                        token_url: url.clone(),
                        status,
                        attempts: attempt,
                    });
                }
                let wait = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| {
                        retry::parse_retry_after(v, SystemTime::now(), self.retry.max_delay)
                    })
                    .unwrap_or_else(|| self.retry.backoff().next(attempt));
                tracing::warn!(
                    status,
                    attempt,
                    wait_ms = wait.as_millis() as u64,
                    "token endpoint busy; retrying"
                );
                tokio::time::sleep(wait).await;
                continue;
            }
            if !(200..300).contains(&status) {
                // Only a prefix of an error answer is read: the OAuth error is small.
                let body = body::read_prefix(resp, body::ERROR_PREFIX_BYTES).await;
                let err: OAuthError = serde_json::from_slice(&body).unwrap_or_default();
                let error = err.error.unwrap_or_else(|| "(no OAuth error code)".into());
                let description = err
                    .error_description
                    .map(|d| format!(": {}", crate::text::truncate(&d, 300)))
                    .unwrap_or_default();
                if error == "invalid_client" {
                    return Err(AuthError::InvalidClient {
                        token_url: url.clone(),
                        description,
                        kid: self.cfg.key.kid().to_owned(),
                        lifetime: assertion::ASSERTION_LIFETIME_SECS,
                        skew: describe_skew(server_date, SystemTime::now()),
                    });
                }
                return Err(AuthError::Rejected {
                    token_url: url.clone(),
                    status,
                    error,
                    description,
                });
            }
            let body = body::read_limited(resp, body::MAX_DOCUMENT_BYTES)
                .await
                .map_err(|e| match e {
                    body::BodyError::TooLarge { .. } => AuthError::BadResponse {
                        token_url: url.clone(),
                        detail: e.to_string(),
                    },
                    body::BodyError::Transport(message) => AuthError::Transport {
                        token_url: url.clone(),
                        message,
                    },
                })?;
            let parsed: TokenResponse =
                serde_json::from_slice(&body).map_err(|e| AuthError::BadResponse {
                    token_url: url.clone(),
                    detail: format!("not JSON ({})", crate::http::body::json_error_kind(&e)),
                })?;
            let token = parsed
                .access_token
                .filter(|t| !t.is_empty())
                .ok_or_else(|| AuthError::BadResponse {
                    token_url: url.clone(),
                    detail: "access_token is missing".into(),
                })?;
            let token_type = parsed.token_type.unwrap_or_else(|| "bearer".into());
            if !token_type.eq_ignore_ascii_case("bearer") {
                return Err(AuthError::BadResponse {
                    token_url: url.clone(),
                    detail: format!("token_type is {token_type:?}, not bearer"),
                });
            }
            let expires_in = token_lifetime(parsed.expires_in);
            if parsed.expires_in.map(Duration::try_from_secs_f64) != Some(Ok(expires_in)) {
                tracing::warn!(
                    expires_in = ?parsed.expires_in,
                    "the token endpoint's expires_in is absent or out of range; using {} s",
                    expires_in.as_secs()
                );
            }
            tracing::info!(expires_in_s = expires_in.as_secs(), "access token obtained");
            return Ok((
                AccessToken(token.into()),
                Grant {
                    scope: parsed.scope,
                    expires_in,
                    token_type,
                    server_date,
                },
            ));
        }
    }
}

/// A sentence about the difference between our clock and the server's `Date` header.
pub fn describe_skew(server_date: Option<SystemTime>, now: SystemTime) -> String {
    match server_date {
        None => " (the server sent no Date header to compare clocks)".into(),
        Some(d) => {
            let skew = match now.duration_since(d) {
                Ok(ahead) => ahead.as_secs() as i64,
                Err(e) => -(e.duration().as_secs() as i64),
            };
            if skew.abs() <= 5 {
                format!(
                    " (our clock is within {} s of the server's Date header)",
                    skew.abs().max(1)
                )
            } else if skew > 0 {
                format!(" (our clock is {skew} s AHEAD of the server's Date header: fix NTP)")
            } else {
                format!(
                    " (our clock is {} s BEHIND the server's Date header: fix NTP)",
                    -skew
                )
            }
        }
    }
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
