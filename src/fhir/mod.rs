//! Talking to a FHIR R4 server: the authorised HTTP client with retries and rate limiting (`client`),
//! bounded body reads (`body`), search-bundle parsing (`bundle`), and the retry rules (`retry`).
//! Nothing here writes files.

pub mod body;
pub mod bundle;
pub mod client;
pub mod ratelimit;
pub mod retry;

pub use client::{FetchError, FhirClient, Limits, Reply, RetryMode};

use std::time::Duration;

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

/// The client for bulk file downloads: no total timeout (files can be gigabytes), a read timeout instead,
/// and no automatic redirects (`FhirClient::open_download` follows them itself, dropping the token when a
/// redirect leaves the trusted origins).
pub fn download_client(read_timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .user_agent(concat!("epic-export/", env!("CARGO_PKG_VERSION")))
        .read_timeout(read_timeout)
        .connect_timeout(Duration::from_secs(15).min(read_timeout))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("building the HTTP client")
}

/// The one HTTP client configuration used for FHIR and token requests. Redirects are followed only
/// within the same origin, so a bearer token never leaves the server it was issued for.
pub fn http_client(timeout: Duration) -> reqwest::Client {
    let policy = reqwest::redirect::Policy::custom(|attempt| {
        let same = attempt
            .previous()
            .last()
            .is_some_and(|prev| prev.origin() == attempt.url().origin());
        if attempt.previous().len() > 5 || !same {
            attempt.stop()
        } else {
            attempt.follow()
        }
    });
    reqwest::Client::builder()
        .user_agent(concat!("epic-export/", env!("CARGO_PKG_VERSION")))
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(15).min(timeout))
        .redirect(policy)
        .build()
        // Only fails if the TLS backend cannot initialise, which the crate's single provider rules out.
        .expect("building the HTTP client")
}
