//! When to retry an HTTP request and how long to wait: pure functions, no I/O.
//!
//! Retryable: 408, 429, 500, 502, 503, 504, timeouts and connection errors. The wait is the server's
//! `Retry-After` when it gives one (delta-seconds or an HTTP date; absurd values are clamped), otherwise
//! exponential backoff with jitter (`Backoff`).

use std::time::{Duration, SystemTime};

/// Retry budget and wait bounds for one request.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// First backoff step; doubles each attempt.
    pub base_delay: Duration,
    /// Upper bound for any single wait, `Retry-After` included.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(120),
        }
    }
}

/// HTTP statuses worth trying again.
pub fn is_retryable_status(status: u16) -> bool {
    matches!(status, 408 | 429 | 500 | 502 | 503 | 504)
}

/// Parses a `Retry-After` value: delta-seconds (`"120"`), an HTTP date, or a Unix timestamp in seconds
/// (some servers send one). Returns the wait from `now`, clamped to `max`; a date in the past is zero.
/// Unparseable values give `None` (the caller falls back to backoff).
pub fn parse_retry_after(value: &str, now: SystemTime, max: Duration) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        // A number far larger than any sane delay is most likely an absolute epoch timestamp.
        let now_secs = now.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs();
        let wait = if secs > 1_000_000_000 {
            secs.saturating_sub(now_secs)
        } else {
            secs
        };
        return Some(Duration::from_secs(wait).min(max));
    }
    if let Ok(secs) = value.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Some(Duration::from_secs_f64(secs.min(max.as_secs_f64())));
        }
        return None;
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO).min(max))
}

/// Exponential backoff with jitter: the one wait the exporter uses wherever it tries again (HTTP
/// requests, token requests, Bulk Data status polls, e-mail, the controller's API errors). The step
/// starts at `first`, doubles each attempt and is capped at `cap`; half of it is fixed and half random,
/// so the wait is never zero and many clients that failed together do not retry together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub cap: Duration,
}

impl Backoff {
    /// The wait before retry number `attempt` (1 = first retry), for `unit`, a random number in [0, 1)
    /// (1.0 gives the whole step).
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let exp = self
            .first
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
        exp.min(self.cap).mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
    }

    /// `delay` with fresh randomness.
    pub fn next(&self, attempt: u32) -> Duration {
        self.delay(attempt, jitter_unit())
    }
}

impl RetryPolicy {
    /// The backoff between attempts (`base_delay` doubling up to `max_delay`).
    pub fn backoff(&self) -> Backoff {
        Backoff {
            first: self.base_delay,
            cap: self.max_delay,
        }
    }
}

/// A random number in [0, 1) for jitter.
pub fn jitter_unit() -> f64 {
    let mut b = [0u8; 8];
    if aws_lc_rs::rand::fill(&mut b).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_secs(300);

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(
            parse_retry_after("7", now, MAX),
            Some(Duration::from_secs(7))
        );
        assert_eq!(parse_retry_after(" 0 ", now, MAX), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("1.5", now, MAX),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_retry_after("86400", now, MAX),
            Some(MAX),
            "hours are clamped"
        );
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&date, now, MAX),
            Some(Duration::from_secs(30))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&past, now, MAX), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("1800000012", now, MAX),
            Some(Duration::from_secs(12)),
            "epoch seconds"
        );
        assert_eq!(parse_retry_after("soon", now, MAX), None);
        assert_eq!(parse_retry_after("-3", now, MAX), None);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        };
        let b = p.backoff();
        assert_eq!(b.delay(1, 1.0), Duration::from_millis(100));
        assert_eq!(b.delay(3, 1.0), Duration::from_millis(400));
        assert_eq!(b.delay(9, 1.0), Duration::from_secs(1));
        assert_eq!(b.delay(1, 0.0), Duration::from_millis(50));
        let u = jitter_unit();
        assert!((0.0..1.0).contains(&u));
    }

    #[test]
    fn retryable_statuses() {
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(is_retryable_status(s));
        }
        for s in [200, 400, 401, 403, 404, 410, 501] {
            assert!(!is_retryable_status(s));
        }
    }
}
