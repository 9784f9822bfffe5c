//! What every outgoing HTTP request of the exporter shares: the one way to build a client (`client`),
//! transport errors described without their URL (`describe_transport`), bounded body reads (`body`)
//! and when and how long to wait before trying again (`retry`: `Retry-After` and backoff with jitter).
//! Nothing here knows FHIR, OAuth or files; `auth` and `fhir` build on it.

pub mod body;
pub mod retry;

use std::time::Duration;

/// Where a client may follow a redirect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Redirects {
    /// Never: the caller follows redirects itself (bulk downloads decide per hop whether the token goes).
    None,
    /// Within the same origin only, at most five hops: a bearer token never leaves the server it was
    /// issued for.
    SameOrigin,
    /// Anywhere, at most five hops: for requests that carry no credential.
    Anywhere,
}

/// How long a request may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timeout {
    /// The whole request, body included.
    Total(Duration),
    /// Each read of the body (a download of gigabytes has no total bound).
    BetweenReads(Duration),
}

/// Builds an HTTP client: our user agent, a connect timeout of at most 15 s, `timeout` and `redirects`.
/// The client has no default headers, so it sends no credential unless a request adds one.
pub fn client(timeout: Timeout, redirects: Redirects) -> reqwest::Client {
    let builder =
        reqwest::Client::builder().user_agent(concat!("epic-export/", env!("CARGO_PKG_VERSION")));
    let builder = match timeout {
        Timeout::Total(t) => builder.timeout(t).connect_timeout(CONNECT_TIMEOUT.min(t)),
        Timeout::BetweenReads(t) => builder
            .read_timeout(t)
            .connect_timeout(CONNECT_TIMEOUT.min(t)),
    };
    let policy = match redirects {
        Redirects::None => reqwest::redirect::Policy::none(),
        Redirects::Anywhere => reqwest::redirect::Policy::limited(MAX_REDIRECTS),
        Redirects::SameOrigin => reqwest::redirect::Policy::custom(|attempt| {
            let same = attempt
                .previous()
                .last()
                .is_some_and(|prev| prev.origin() == attempt.url().origin());
            if attempt.previous().len() > MAX_REDIRECTS || !same {
                attempt.stop()
            } else {
                attempt.follow()
            }
        }),
    };
    builder
        .redirect(policy)
        .build()
        // Only fails if the TLS backend cannot initialise, which the crate's single provider rules out.
        .expect("building the HTTP client")
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
const MAX_REDIRECTS: usize = 5;

/// A transport error described without its URL (URLs carry patient ids and must not reach logs).
pub fn describe_transport(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "the response body was cut short or corrupt"
    } else if e.is_redirect() {
        "too many or cross-origin redirects"
    } else {
        "request failed"
    };
    let mut detail = String::new();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if detail.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind}: {detail}")
    }
}
